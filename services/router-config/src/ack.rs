//! Confirmation from the routers in front of Capstan that they no longer
//! route to an upstream, before its instance is stopped.
//!
//! The built-in edge proxy applies a table synchronously, so its
//! confirmation is immediate (then its in-flight requests drain). Traefik
//! applies a table when it has fetched it (HTTP provider) or watched it
//! (Consul KV provider) and rebuilt its routers, seconds later and on its own
//! schedule. [`TraefikApi`] asks Traefik's API what it actually routes: it
//! serves `/api/http/services` from the same runtime configuration its entry
//! points were switched to, so a server missing there gets no new request.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;

/// How long one call to Traefik's API may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often Traefik's API is asked again while it still routes a server.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Services per page of Traefik's API (it pages at 100 by default).
const PER_PAGE: usize = 500;
/// Most pages read in one poll; a Traefik with more `capstan-*` services
/// than this times this is not believed.
const MAX_PAGES: usize = 100;

/// Traefik's API, e.g. `http://traefik:8080` (its `traefik` entry point with
/// `api.insecure`, or any router to `api@internal`).
#[derive(Clone)]
pub struct TraefikApi {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// Checks a `--traefik-api` URL: `http://HOST:PORT` with an optional path
/// prefix, no query, no credentials.
pub fn parse_api_url(text: &str) -> Result<String, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{text:?}: expected http://HOST:PORT"));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{text:?}: expected http://HOST:PORT"));
    };
    if authority.as_str().contains('@') {
        return Err(format!("{text:?}: credentials do not belong in the URL"));
    }
    if authority.port_u16().is_none() {
        return Err(format!(
            "{text:?}: the port is missing (Traefik's API is usually on 8080)"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("{text:?}: a query does not belong in the URL"));
    }
    Ok(text.trim_end_matches('/').to_string())
}

impl TraefikApi {
    /// `base` as checked by [`parse_api_url`].
    pub fn new(base: &str) -> TraefikApi {
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        TraefikApi {
            base: base.trim_end_matches('/').to_string(),
            client,
        }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    async fn get(&self, path_and_query: &str) -> Result<(Option<usize>, Value), String> {
        let uri = format!("{}{path_and_query}", self.base);
        let request = http::Request::get(&uri)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(CALL_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("no answer in {CALL_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let next_page = response
            .headers()
            .get("X-Next-Page")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let body = tokio::time::timeout(CALL_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| format!("no body in {CALL_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{uri}: {status}"));
        }
        let value = serde_json::from_slice(&body).map_err(|e| format!("{uri}: {e}"))?;
        Ok((next_page, value))
    }

    /// Every server URL Traefik routes to in a `capstan-*` service, from
    /// any provider.
    pub async fn routed(&self) -> Result<BTreeSet<String>, String> {
        let mut servers = BTreeSet::new();
        let mut page = 1;
        for _ in 0..MAX_PAGES {
            let (next, services) = self
                .get(&format!(
                    "/api/http/services?search=capstan-&per_page={PER_PAGE}&page={page}"
                ))
                .await?;
            let services = services
                .as_array()
                .ok_or("/api/http/services did not answer a list")?;
            for service in services {
                let owned = service["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("capstan-"));
                if !owned {
                    continue;
                }
                for server in service["loadBalancer"]["servers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if let Some(url) = server["url"].as_str() {
                        servers.insert(url.to_string());
                    }
                }
            }
            match next {
                Some(next) if next > page => page = next,
                _ => return Ok(servers),
            }
        }
        Err(format!(
            "Traefik's API has more than {MAX_PAGES} pages of services"
        ))
    }

    /// Waits until every server Traefik routes to in a `capstan-*` service
    /// is in `allowed` (`http://HOST:PORT`), or `timeout` passes. Returns
    /// how long it took, or why it gave up.
    pub async fn confirm_only(
        &self,
        allowed: &BTreeSet<String>,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let started = tokio::time::Instant::now();
        loop {
            let why = match self.routed().await {
                Ok(routed) => {
                    let stale: Vec<&String> = routed.difference(allowed).collect();
                    if stale.is_empty() {
                        return Ok(started.elapsed());
                    }
                    format!("it still routes to {stale:?}")
                }
                Err(e) => e,
            };
            if started.elapsed() >= timeout {
                return Err(format!("no confirmation in {timeout:?}: {why}"));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// The flags that put Traefik in front, shared by `capstan-router-config`
/// and `capstan dev`.
#[derive(clap::Args, Debug, Clone)]
pub struct TraefikArgs {
    /// Traefik's API, e.g. http://traefik:8080 (repeatable, one per Traefik
    /// instance). An instance is stopped only after each of them shows it
    /// no longer routes to it.
    #[arg(long = "traefik-api", env = "CAPSTAN_TRAEFIK_API", value_delimiter = ',', value_parser = parse_api_url)]
    pub traefik_api: Vec<String>,
    /// How long to wait for Traefik's confirmation before draining anyway
    /// (and recording a routes.unconfirmed event), e.g. 30s.
    #[arg(long, env = "CAPSTAN_TRAEFIK_CONFIRM_TIMEOUT", default_value = "30s", value_parser = parse_confirm_timeout)]
    pub traefik_confirm_timeout: Duration,
    /// How long requests Traefik sent to an instance before its confirmation
    /// get to finish before the instance is stopped, e.g. 1s.
    #[arg(long, env = "CAPSTAN_TRAEFIK_IN_FLIGHT_GRACE", default_value = "1s", value_parser = parse_grace)]
    pub traefik_in_flight_grace: Duration,
}

impl TraefikArgs {
    pub fn apis(&self) -> Vec<TraefikApi> {
        self.traefik_api
            .iter()
            .map(|url| TraefikApi::new(url))
            .collect()
    }
}

fn parse_confirm_timeout(text: &str) -> Result<Duration, String> {
    capstan_types::duration::parse_within(
        text,
        Duration::from_secs(1)..=Duration::from_secs(600),
        "1s and 10m",
    )
}

fn parse_grace(text: &str) -> Result<Duration, String> {
    let grace = capstan_types::duration::parse(text)?;
    if grace > Duration::from_secs(300) {
        return Err(format!("`{text}` must be at most 5m"));
    }
    Ok(grace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_are_checked() {
        assert_eq!(
            parse_api_url("http://traefik:8080/").unwrap(),
            "http://traefik:8080"
        );
        assert!(parse_api_url("http://10.0.0.5:8080/prefix").is_ok());
        for (bad, reason) in [
            ("traefik:8080", "expected http://"),
            ("https://traefik:8080", "expected http://"),
            ("http://traefik", "port is missing"),
            ("http://u:p@traefik:8080", "credentials"),
            ("http://traefik:8080/?x=1", "query"),
        ] {
            let error = parse_api_url(bad).unwrap_err();
            assert!(error.contains(reason), "{bad}: {error}");
        }
    }
}
