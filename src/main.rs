//! `capstan`: the command-line client of the Capstan API, and `capstan dev`,
//! the whole platform in one process.

mod cli;
mod dev;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Exactly one rustls crypto provider, installed before anything uses TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = cli::Args::parse();
    let _telemetry =
        capstan_telemetry::init("capstan", if args.is_dev() { "info" } else { "warn" });
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
