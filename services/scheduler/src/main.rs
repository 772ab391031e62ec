//! `capstan-scheduler`: the scheduler service in its own process.

use clap::Parser;

/// Keeps the node registry and places instances on nodes.
#[derive(Parser)]
#[command(name = "capstan-scheduler", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    capstan_server::standalone::main(
        "capstan-scheduler",
        args.standalone,
        false,
        capstan_scheduler::run,
    )
}
