//! `capstan-router-config`: the router-config service in its own process.

use std::net::SocketAddr;

use clap::Parser;

/// Builds the routing table, runs the edge proxy, serves Traefik's HTTP provider.
#[derive(Parser)]
#[command(name = "capstan-router-config", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
    /// Run the built-in edge proxy here (omit when Traefik routes).
    #[arg(long, env = "CAPSTAN_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Serve the Traefik HTTP provider document (/traefik) here.
    #[arg(long)]
    traefik_provider_addr: Option<SocketAddr>,
    /// A load balancer in front of the proxy whose X-Forwarded-* headers
    /// are believed: an IP or CIDR range (repeatable). Others' are replaced.
    #[arg(long = "trusted-proxy", value_parser = parse_trusted_proxy)]
    trusted_proxies: Vec<String>,
    /// Write the routing table into Consul KV for Traefik's Consul KV
    /// provider (keys under `traefik/`, one transaction per change), e.g.
    /// consul://127.0.0.1:8500 (ACL token from CONSUL_HTTP_TOKEN).
    #[arg(long, env = "CAPSTAN_TRAEFIK_KV", value_parser = parse_traefik_kv)]
    traefik_kv: Option<String>,
    #[command(flatten)]
    traefik: capstan_router_config::ack::TraefikArgs,
    /// How often the edge proxy's traffic per app and instance goes to the
    /// metrics service (1s to 5m).
    #[arg(long, env = "CAPSTAN_SAMPLE_EVERY", default_value = "5s", value_parser = capstan_types::duration::parse_sample_every)]
    sample_every: std::time::Duration,
}

fn parse_traefik_kv(text: &str) -> Result<String, String> {
    capstan_registry::consul::parse_url(text)
}

fn parse_trusted_proxy(text: &str) -> Result<String, String> {
    capstan_router_config::TrustedProxies::parse(&[text.to_string()])?;
    Ok(text.to_string())
}

async fn bind(
    addr: Option<SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>, capstan_types::Error> {
    match addr {
        None => Ok(None),
        Some(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|e| capstan_types::Error::Unavailable(format!("listen on {addr}: {e}"))),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (http_addr, provider_addr) = (args.http_addr, args.traefik_provider_addr);
    let traefik = args.traefik;
    let traffic_every = args.sample_every;
    let token = std::env::var("CONSUL_HTTP_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let traefik_kv = args.traefik_kv.map(|base| {
        capstan_registry::ConsulKv::new(capstan_registry::consul::ConsulAgent::new(&base, token))
    });
    let trusted_proxies = match capstan_router_config::TrustedProxies::parse(&args.trusted_proxies)
    {
        Ok(trusted) => trusted,
        Err(e) => {
            eprintln!("error: --trusted-proxy: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    capstan_server::standalone::main(
        "capstan-router-config",
        args.standalone,
        capstan_server::standalone::Credential::ServiceKey,
        |platform, listener, shutdown| async move {
            let options = capstan_router_config::RouterOptions {
                proxy: bind(http_addr).await?,
                provider: bind(provider_addr).await?,
                traefik_kv,
                traefik_apis: traefik.apis(),
                traefik_confirm_timeout: traefik.traefik_confirm_timeout,
                traefik_in_flight_grace: traefik.traefik_in_flight_grace,
                traffic_every,
                ..capstan_router_config::RouterOptions::new(trusted_proxies)
            };
            capstan_router_config::run(platform, options, listener, shutdown).await
        },
    )
}
