//! `capstan`: the command-line client of the Capstan API, and `capstan dev`,
//! the whole platform in one process.

mod cli;
mod dev;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Exactly one rustls crypto provider, installed before anything uses TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = cli::Args::parse();
    // Spans of `capstan dev` (every service in one process) and of the CLI
    // go to the collector under different service names.
    let _telemetry = if args.is_dev() {
        capstan_telemetry::init("capstan-dev", "info")
    } else {
        capstan_telemetry::init("capstan", "warn")
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
