//! `capstan-orchestrator`: the orchestrator service in its own process.

use clap::Parser;

/// Serves the apps API and reconciles what runs with what should.
#[derive(Parser)]
#[command(name = "capstan-orchestrator", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let lease_ttl = args.standalone.lease_ttl;
    capstan_server::standalone::main(
        "capstan-orchestrator",
        args.standalone,
        capstan_server::standalone::Credential::ServiceKey,
        move |platform, listener, shutdown| {
            capstan_orchestrator::run(platform, lease_ttl, listener, shutdown)
        },
    )
}
