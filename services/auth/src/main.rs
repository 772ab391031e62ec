//! `capstan-auth`: the auth service in its own process.

use clap::Parser;

/// Issues short-lived JWTs for API keys and publishes the keys that verify them.
#[derive(Parser)]
#[command(name = "capstan-auth", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let data_dir = args.standalone.data_dir.clone();
    capstan_server::standalone::main(
        "capstan-auth",
        args.standalone,
        capstan_server::standalone::Credential::CreateServiceKey,
        |platform, listener, shutdown| async move {
            capstan_auth::bootstrap_keys(&platform, &data_dir).await?;
            capstan_auth::run(platform, listener, shutdown).await
        },
    )
}
