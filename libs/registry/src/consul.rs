//! The registry on Consul.
//!
//! - Discovery (`healthy`, `watch`) goes through rs-consul's
//!   `/v1/health/service/NAME?passing` with blocking queries (`index`,
//!   `wait`, `X-Consul-Index`).
//! - Registration with a check, TTL passes and deregistration go through
//!   [`ConsulAgent`], our thin client of the agent endpoints rs-consul lacks
//!   (`/v1/agent/service/register`, `/v1/agent/check/pass/:id`,
//!   `/v1/agent/service/deregister/:id`).
//!
//! Every instance's check has `DeregisterCriticalServiceAfter`, so an
//! instance that died without deregistering leaves the catalog by itself,
//! and carries the Capstan version in its meta.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use crate::{Check, Registration, RegistryError, ServiceInstance, ServiceRegistry};

/// How long one agent call may take (blocking queries add their wait).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A critical instance leaves the catalog after this long.
pub const DEREGISTER_CRITICAL_AFTER: &str = "1m";

/// `consul://HOST:PORT` as the base URL of the agent's HTTP API.
pub fn parse_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("consul://")
        .ok_or_else(|| format!("`{url}` is not consul://HOST:PORT"))?;
    let authority = rest.trim_end_matches('/');
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| {
        format!("`{url}` has no port (consul://HOST:PORT, e.g. consul://127.0.0.1:8500)")
    })?;
    if host.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(format!("`{url}` is not consul://HOST:PORT"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("`{port}` in `{url}` is not a port"))?;
    Ok(format!("http://{authority}"))
}

/// The agent endpoints rs-consul does not cover, as a thin JSON client.
#[derive(Clone)]
pub struct ConsulAgent {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// An answer from Consul: status, `X-Consul-Index` (0 when absent), body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub index: u64,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Result<Value, RegistryError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| RegistryError::Unavailable(format!("consul answered with bad JSON: {e}")))
    }
}

impl ConsulAgent {
    /// `base` is `http://HOST:PORT`; `token` goes in `X-Consul-Token`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            client,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One call with a JSON body (or none); `path` starts with `/v1/`.
    /// Waits at most `timeout`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Answer, RegistryError> {
        let body = body.map(|value| (Bytes::from(value.to_string()), "application/json"));
        self.call_bytes(method, path, body, timeout).await
    }

    /// One call with a raw body and its content type (a KV value).
    pub async fn call_bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
        timeout: Duration,
    ) -> Result<Answer, RegistryError> {
        let unavailable =
            |what: String| RegistryError::Unavailable(format!("consul at {}: {what}", self.base));
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token);
        }
        let body = match body {
            Some((bytes, content_type)) => {
                request = request.header("Content-Type", content_type);
                Full::new(bytes)
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|e| unavailable(format!("bad request {method} {path}: {e}")))?;
        let response = tokio::time::timeout(timeout, self.client.request(request))
            .await
            .map_err(|_| unavailable(format!("{method} {path} timed out after {timeout:?}")))?
            .map_err(|e| unavailable(format!("{method} {path}: {e}")))?;
        let status = response.status();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = tokio::time::timeout(timeout, response.into_body().collect())
            .await
            .map_err(|_| unavailable(format!("{method} {path}: body timed out")))?
            .map_err(|e| unavailable(format!("{method} {path}: {e}")))?
            .to_bytes();
        Ok(Answer {
            status,
            index,
            body,
        })
    }

    /// A call that must answer 2xx.
    pub async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, RegistryError> {
        let answer = self.call(method.clone(), path, body, CALL_TIMEOUT).await?;
        if !answer.status.is_success() {
            return Err(RegistryError::Unavailable(format!(
                "consul at {}: {method} {path}: {} {}",
                self.base,
                answer.status,
                String::from_utf8_lossy(&answer.body).trim()
            )));
        }
        Ok(answer)
    }
}

/// The body of `PUT /v1/agent/service/register` for `registration`.
pub fn registration_body(registration: &Registration) -> Result<Value, RegistryError> {
    let (host, port) = registration
        .address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| {
            RegistryError::Unavailable(format!(
                "address `{}` of `{}` is not HOST:PORT",
                registration.address, registration.id
            ))
        })?;
    let mut check = json!({
        "CheckID": check_id(&registration.id),
        "Name": format!("{} health", registration.name),
        "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
    });
    match &registration.check {
        Check::Ttl { ttl } => {
            check["TTL"] = json!(go_duration(*ttl));
            check["Status"] = json!("critical");
        }
        Check::Http {
            url,
            interval,
            timeout,
        } => {
            check["HTTP"] = json!(url);
            check["Interval"] = json!(go_duration(*interval));
            check["Timeout"] = json!(go_duration(*timeout));
        }
    }
    Ok(json!({
        "ID": registration.id,
        "Name": registration.name,
        "Address": host,
        "Port": port,
        "Tags": registration.tags,
        "Meta": { "capstan_version": env!("CARGO_PKG_VERSION") },
        "Check": check,
    }))
}

/// The check id of an instance: one check per instance.
pub fn check_id(instance_id: &str) -> String {
    format!("service:{instance_id}")
}

/// A duration as Go's `time.ParseDuration` reads it, in milliseconds.
pub fn go_duration(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

/// Ids go into URL paths: only what a Capstan id can hold.
pub(crate) fn path_segment(id: &str) -> Result<&str, RegistryError> {
    if !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && id != "."
        && id != ".."
    {
        Ok(id)
    } else {
        Err(RegistryError::UnknownInstance(id.to_string()))
    }
}

pub struct ConsulRegistry {
    agent: ConsulAgent,
    catalog: rs_consul::Consul,
}

impl ConsulRegistry {
    /// `url` is `consul://HOST:PORT`.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, String> {
        let base = parse_url(url)?;
        let catalog = rs_consul::Consul::new(rs_consul::Config {
            address: base.clone(),
            token: token.clone(),
            ..Default::default()
        });
        Ok(Self {
            agent: ConsulAgent::new(&base, token),
            catalog,
        })
    }

    pub fn agent(&self) -> &ConsulAgent {
        &self.agent
    }

    async fn passing(
        &self,
        name: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<(u64, Vec<ServiceInstance>), RegistryError> {
        let name = path_segment(name)?;
        let request = rs_consul::types::GetServiceNodesRequest {
            service: name,
            passing: true,
            ..Default::default()
        };
        // Consul's wait has a granularity of seconds.
        let wait = Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64);
        let options = rs_consul::types::QueryOptions {
            index,
            wait: index.map(|_| wait),
            timeout: Some(wait + CALL_TIMEOUT),
            ..Default::default()
        };
        let answer = self
            .catalog
            .get_service_nodes(request, Some(options))
            .await
            .map_err(|e| {
                RegistryError::Unavailable(format!("consul at {}: {e}", self.agent.base()))
            })?;
        let mut instances: Vec<ServiceInstance> = answer
            .response
            .into_iter()
            .map(|node| {
                let host = if node.service.address.is_empty() {
                    node.node.address
                } else {
                    node.service.address
                };
                ServiceInstance {
                    id: node.service.id,
                    name: node.service.service,
                    address: format!("{host}:{}", node.service.port),
                    tags: node.service.tags,
                }
            })
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((answer.index, instances))
    }
}

#[async_trait]
impl ServiceRegistry for ConsulRegistry {
    async fn register(&self, registration: Registration) -> Result<(), RegistryError> {
        path_segment(&registration.id)?;
        let body = registration_body(&registration)?;
        self.agent
            .ok(Method::PUT, "/v1/agent/service/register", Some(&body))
            .await
            .map(drop)
    }

    async fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        let id = path_segment(id)?;
        let answer = self
            .agent
            .call(
                Method::PUT,
                &format!("/v1/agent/service/deregister/{id}"),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        // Deregistering an instance that is gone already is done.
        if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(RegistryError::Unavailable(format!(
            "consul: deregister {id}: {}",
            answer.status
        )))
    }

    async fn pass_ttl(&self, id: &str) -> Result<(), RegistryError> {
        let check = check_id(path_segment(id)?);
        let answer = self
            .agent
            .call(
                Method::PUT,
                &format!("/v1/agent/check/pass/{check}"),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        match answer.status {
            status if status.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::UnknownInstance(id.to_string())),
            // Older agents answer 500 "Unknown check ID".
            StatusCode::INTERNAL_SERVER_ERROR
                if String::from_utf8_lossy(&answer.body).contains("Unknown check") =>
            {
                Err(RegistryError::UnknownInstance(id.to_string()))
            }
            status => Err(RegistryError::Unavailable(format!(
                "consul: pass check {check}: {status}"
            ))),
        }
    }

    async fn healthy(&self, name: &str) -> Result<Vec<ServiceInstance>, RegistryError> {
        Ok(self.passing(name, None, Duration::ZERO).await?.1)
    }

    async fn watch(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(u64, Vec<ServiceInstance>), RegistryError> {
        let (next, instances) = self.passing(name, Some(index), wait).await?;
        // Consul's index may go backwards (a snapshot restore): start over.
        Ok((if next < index { 0 } else { next }, instances))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why() {
        assert_eq!(
            parse_url("consul://127.0.0.1:8500").unwrap(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            parse_url("consul://consul:8500/").unwrap(),
            "http://consul:8500"
        );
        for bad in [
            "",
            "consul://",
            "consul://h",
            "http://h:1",
            "consul://h:x",
            "consul://:1",
            "consul://u@h:1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registrations_follow_the_agent_api() {
        let body = registration_body(&Registration {
            id: "scheduler-1".into(),
            name: "scheduler".into(),
            address: "10.0.0.5:7001".into(),
            tags: vec!["grpc".into()],
            check: Check::Ttl {
                ttl: Duration::from_secs(6),
            },
        })
        .unwrap();
        assert_eq!(body["ID"], "scheduler-1");
        assert_eq!(body["Address"], "10.0.0.5");
        assert_eq!(body["Port"], 7001);
        assert_eq!(body["Check"]["CheckID"], "service:scheduler-1");
        assert_eq!(body["Check"]["TTL"], "6000ms");
        assert_eq!(body["Check"]["DeregisterCriticalServiceAfter"], "1m");
        assert!(body["Meta"]["capstan_version"].is_string());
    }

    #[test]
    fn ids_that_are_not_ids_never_reach_a_path() {
        assert!(path_segment("../../v1/kv").is_err());
        assert!(path_segment("a/b").is_err());
        assert!(path_segment("..").is_err());
        assert!(path_segment("scheduler-1").is_ok());
    }
}
