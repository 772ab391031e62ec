//! `capstan-gateway`: the HTTP gateway in its own process (behind Traefik
//! in the cluster).

use clap::Parser;

/// REST and JSON under /v1/ over Capstan's gRPC services, /openapi.json.
#[derive(Parser)]
#[command(name = "capstan-gateway", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    capstan_server::standalone::main(
        "capstan-gateway",
        args.standalone,
        capstan_server::standalone::Credential::CallersOnly,
        capstan_gateway::run,
    )
}
