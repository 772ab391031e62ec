//! `capstan-scheduler`: the scheduler service in its own process.

use clap::Parser;

/// Keeps the node registry and places instances on nodes.
#[derive(Parser)]
#[command(name = "capstan-scheduler", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
    /// Placement strategy of apps that do not name one: binpack, spread,
    /// least-loaded or round-robin.
    #[arg(long, default_value = "spread", value_parser = parse_strategy)]
    default_strategy: capstan_placement::Strategy,
}

fn parse_strategy(text: &str) -> Result<capstan_placement::Strategy, String> {
    capstan_placement::Strategy::parse(text)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = capstan_scheduler::SchedulerConfig {
        default_strategy: args.default_strategy,
        lease_ttl: args.standalone.lease_ttl,
    };
    capstan_server::standalone::main(
        "capstan-scheduler",
        args.standalone,
        capstan_server::standalone::Credential::ServiceKey,
        move |platform, listener, shutdown| {
            capstan_scheduler::run(platform, config, listener, shutdown)
        },
    )
}
