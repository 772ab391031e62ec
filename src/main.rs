//! `capstan`: the command-line client of the Capstan API, and `capstan dev`,
//! the whole platform in one process.

mod cli;
use capstan::dev;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // The log writer of a process app that `capstan dev` runs: before
    // anything else (no runtime, no telemetry), see capstan_runtime::logs.
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(capstan_runtime::logs::WRITER_ARG) {
        let code = capstan_runtime::logs::writer_main(&raw[2..]);
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
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
