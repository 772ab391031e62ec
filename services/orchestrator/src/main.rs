//! `capstan-orchestrator`: the orchestrator service in its own process.

use clap::Parser;

/// Serves the apps API and reconciles what runs with what should.
#[derive(Parser)]
#[command(name = "capstan-orchestrator", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
    /// The agents' and the edge proxy's sampling period: the autoscaler
    /// decides once per period, from the last two (1s to 5m).
    #[arg(long, env = "CAPSTAN_SAMPLE_EVERY", default_value = "5s", value_parser = capstan_types::duration::parse_sample_every)]
    sample_every: std::time::Duration,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let options = capstan_orchestrator::OrchestratorOptions {
        lease_ttl: args.standalone.lease_ttl,
        autoscale_every: args.sample_every,
    };
    capstan_server::standalone::main(
        "capstan-orchestrator",
        args.standalone,
        capstan_server::standalone::Credential::ServiceKey,
        move |platform, listener, shutdown| {
            capstan_orchestrator::run(platform, options, listener, shutdown)
        },
    )
}
