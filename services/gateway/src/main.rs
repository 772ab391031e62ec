//! `capstan-gateway`: the HTTP gateway in its own process (behind Traefik
//! in the cluster).

use clap::Parser;

/// REST and JSON under /v1/ over Capstan's gRPC services, /openapi.json.
#[derive(Parser)]
#[command(name = "capstan-gateway", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
    /// Requests a second per API key or token (bursts of twice as many),
    /// counted in the cache (shared by every gateway).
    #[arg(long, env = "CAPSTAN_API_RATE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    api_rate: u32,
    /// A proxy in front (Traefik) whose X-Forwarded-For and -Proto the
    /// gateway believes: an address or CIDR range, repeatable. Nobody's by
    /// default.
    #[arg(long = "trusted-proxy", env = "CAPSTAN_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_trusted_proxy)]
    trusted_proxies: Vec<capstan_server::trusted::TrustedProxies>,
}

fn parse_trusted_proxy(text: &str) -> Result<capstan_server::trusted::TrustedProxies, String> {
    capstan_server::trusted::TrustedProxies::parse(&[text.to_string()])
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let api_rate = args.api_rate;
    let trusted_proxies = capstan_server::trusted::TrustedProxies::merge(args.trusted_proxies);
    capstan_server::standalone::main(
        "capstan-gateway",
        args.standalone,
        capstan_server::standalone::Credential::CallersOnly,
        move |platform, listener, shutdown| {
            let options = capstan_gateway::GatewayOptions {
                requests_per_second: api_rate,
                trusted_proxies: trusted_proxies.clone(),
            };
            capstan_gateway::run(platform, options, listener, shutdown)
        },
    )
}
