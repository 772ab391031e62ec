//! `capstan-auth`: the auth service in its own process.

use clap::Parser;

/// Issues short-lived JWTs for API keys and publishes the keys that verify them.
#[derive(Parser)]
#[command(name = "capstan-auth", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
    /// How long issued tokens live (1s to 1h).
    #[arg(long, default_value = "15m", value_parser = capstan_auth::parse_token_ttl)]
    token_ttl: std::time::Duration,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let data_dir = args.standalone.data_dir.clone();
    let token_ttl = args.token_ttl;
    capstan_server::standalone::main(
        "capstan-auth",
        args.standalone,
        capstan_server::standalone::Credential::CreateServiceKey,
        |platform, listener, shutdown| async move {
            capstan_auth::bootstrap_keys(&platform, &data_dir).await?;
            capstan_auth::run(platform, token_ttl, listener, shutdown).await
        },
    )
}
