//! Two comparisons, each side by side in one run, printed as one JSON
//! object:
//!
//! - **Gateway overhead**: `GET /v1/apps/{name}` through the HTTP gateway
//!   (HTTP/1.1 keep-alive, the API key in `Authorization`, exchanged once
//!   and cached by the gateway) against the same `Orchestrator.GetApp` made
//!   directly over gRPC with a token, on a running `capstan dev`.
//! - **Token verification**: a gRPC call to a server whose every request
//!   passes `RequireAuthLayer` (an EdDSA JWT verified, the rule checked)
//!   against the same call to the same server built without the layer, in
//!   this process.
//! - **RPC cost**: the direct `Orchestrator.GetApp` above against a
//!   `grpc.health.v1.Health/Check` on a bare tonic server (no layer of
//!   ours) running alone on CPU 0 in this process. For the one-core
//!   footing, start `capstan dev` under `taskset -c 0` too.
//!
//!   capstan-gateway-bench --data-dir DIR [--seconds 5] [--connections 8]
//!
//! Each side runs `--connections` workers, one connection each, one request
//! in flight per worker, for `--seconds`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capstan_authn::{
    Authed, Policy, RequireAuthLayer, Role, StaticKeys, TokenSigner, TokenSource, Verifier,
};
use capstan_proto::v1::orchestrator_client::OrchestratorClient;
use capstan_proto::v1::{AppSpec, ApplyAppRequest, GetAppRequest, RunSpec};
use clap::Parser;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data_dir: PathBuf,
    /// How long each side runs.
    #[arg(long, default_value = "5")]
    seconds: f64,
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

#[derive(serde::Deserialize)]
struct Endpoints {
    auth: String,
    orchestrator: String,
    gateway: String,
}

const APP: &str = "gateway-bench";

/// Requests per second and latency percentiles (ms) of `latencies`.
fn summary(latencies: &mut [f64], seconds: f64) -> Value {
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    json!({
        "requests": latencies.len(),
        "rps": (latencies.len() as f64 / seconds).round(),
        "p50_ms": (at(0.5) * 1000.0).round() / 1000.0,
        "p99_ms": (at(0.99) * 1000.0).round() / 1000.0,
    })
}

/// Runs `connections` workers of `work` (each stops at its deadline); their latencies.
async fn drive<F, Fut>(connections: usize, work: F) -> anyhow::Result<Vec<f64>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<f64>>> + Send + 'static,
{
    let workers: Vec<_> = (0..connections).map(|i| tokio::spawn(work(i))).collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await??);
    }
    Ok(all)
}

/// One keep-alive HTTP/1.1 connection's GETs of `path` until `until`.
async fn http_worker(
    address: String,
    path: String,
    key: String,
    until: Instant,
) -> anyhow::Result<Vec<f64>> {
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: api.localhost\r\nAuthorization: Bearer {key}\r\n\r\n"
    );
    let mut buffer = Vec::with_capacity(16 * 1024);
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        stream.write_all(request.as_bytes()).await?;
        buffer.clear();
        // Read the head, then the body by Content-Length.
        let (head_end, length) = loop {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "the gateway closed the connection");
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buffer[..end])?;
                anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "gateway: {head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .ok_or_else(|| anyhow::anyhow!("no content-length: {head}"))?;
                break (end + 4, length);
            }
        };
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "the gateway closed the connection mid-body");
            buffer.extend_from_slice(&chunk[..n]);
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(latencies)
}

async fn gateway_overhead(args: &Args) -> anyhow::Result<Value> {
    let path = args.data_dir.join("endpoints.json");
    let endpoints: Endpoints =
        serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!("{}: {e}; is `capstan dev` running there?", path.display())
        })?)?;
    let key = std::fs::read_to_string(args.data_dir.join("admin.key"))?
        .trim()
        .to_string();
    let tokens = TokenSource::new(
        capstan_secrets::Secret::new(key.clone()),
        capstan_server::channel_to(&endpoints.auth)?,
    );
    let client = |tokens: Arc<TokenSource>| -> anyhow::Result<OrchestratorClient<Authed>> {
        Ok(OrchestratorClient::new(Authed::new(
            capstan_server::channel_to(&endpoints.orchestrator)?,
            tokens,
        )))
    };
    // An app with no instances: what is read is its record, nothing else.
    client(tokens.clone())?
        .apply_app(ApplyAppRequest {
            spec: Some(AppSpec {
                name: APP.into(),
                replicas: 0,
                run: Some(RunSpec {
                    command: vec!["sleep".into(), "60".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await?;
    let seconds = args.seconds;
    let span = Duration::from_secs_f64(seconds);

    let until = Instant::now() + span;
    let clients = (0..args.connections)
        .map(|_| client(tokens.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut direct = drive(args.connections, |i| {
        let mut client = clients[i].clone();
        async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                client.get_app(GetAppRequest { name: APP.into() }).await?;
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(latencies)
        }
    })
    .await?;

    let until = Instant::now() + span;
    let mut gateway = drive(args.connections, |_| {
        http_worker(
            endpoints.gateway.clone(),
            format!("/v1/apps/{APP}"),
            key.clone(),
            until,
        )
    })
    .await?;
    let (direct, gateway) = (
        summary(&mut direct, seconds),
        summary(&mut gateway, seconds),
    );
    let ratio = gateway["rps"].as_f64().unwrap_or_default()
        / direct["rps"].as_f64().unwrap_or(1.0).max(1.0);
    Ok(json!({
        "request": format!("GET /v1/apps/{APP} vs Orchestrator.GetApp"),
        "grpc_direct": direct,
        "gateway": gateway,
        "rps_ratio": (ratio * 1000.0).round() / 1000.0,
        "goal_rps_ratio": 0.7,
    }))
}

/// The health service behind `RequireAuthLayer` (or not) on a loopback port.
async fn health_server(auth: Option<RequireAuthLayer>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let (_, health) = tonic_health::server::health_reporter();
    let incoming = capstan_server::accepted(Arc::new(listener));
    tokio::spawn(async move {
        let result = match auth {
            Some(layer) => {
                tonic::transport::Server::builder()
                    .layer(layer)
                    .add_service(health)
                    .serve_with_incoming(incoming)
                    .await
            }
            None => {
                tonic::transport::Server::builder()
                    .add_service(health)
                    .serve_with_incoming(incoming)
                    .await
            }
        };
        if let Err(e) = result {
            eprintln!("bench server: {e}");
        }
    });
    Ok(address)
}

/// A bare tonic server (the health service, no layer of ours) on a
/// one-worker runtime pinned to CPU 0: the floor a unary call costs.
fn bare_server() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?.to_string();
    std::thread::Builder::new()
        .name("bare-tonic".into())
        .spawn(move || {
            let mut cpu = nix::sched::CpuSet::new();
            if cpu.set(0).is_ok() {
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu);
            }
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let (_, health) = tonic_health::server::health_reporter();
                let incoming = capstan_server::accepted(Arc::new(listener));
                if let Err(e) = tonic::transport::Server::builder()
                    .add_service(health)
                    .serve_with_incoming(incoming)
                    .await
                {
                    eprintln!("bare server: {e}");
                }
            });
        })?;
    Ok(address)
}

async fn rpc_cost(args: &Args, get_app: &Value) -> anyhow::Result<Value> {
    let bare = bare_server()?;
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut latencies = drive(args.connections, |_| {
        health_calls(bare.clone(), String::new(), until)
    })
    .await?;
    let bare = summary(&mut latencies, args.seconds);
    let ratio =
        get_app["rps"].as_f64().unwrap_or_default() / bare["rps"].as_f64().unwrap_or(1.0).max(1.0);
    Ok(json!({
        "request": "Orchestrator.GetApp (auth, metrics, store read) vs grpc.health.v1.Health/Check on a bare tonic server on one core",
        "get_app": get_app,
        "bare_tonic": bare,
        "rps_ratio": (ratio * 1000.0).round() / 1000.0,
        "goal_rps_ratio": 0.7,
        "footing": "the bare server runs on CPU 0 alone; start `capstan dev` under `taskset -c 0` for the same footing",
    }))
}

async fn health_calls(address: String, token: String, until: Instant) -> anyhow::Result<Vec<f64>> {
    let mut client =
        tonic_health::pb::health_client::HealthClient::new(capstan_server::channel_to(&address)?);
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());
        if !token.is_empty() {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        client.check(request).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(latencies)
}

async fn token_verification(args: &Args) -> anyhow::Result<Value> {
    let signer = TokenSigner::generate();
    let verifier = Arc::new(Verifier::new(Arc::new(StaticKeys(vec![(
        signer.kid().to_string(),
        signer.public_key(),
    )]))));
    let policy = Policy::none().read("/grpc.health.v1.Health/Check");
    let (token, _) = signer.issue("bench", Role::Viewer, Duration::from_secs(3600));
    let verified = health_server(Some(RequireAuthLayer::new(verifier, policy))).await?;
    let open = health_server(None).await?;
    let span = Duration::from_secs_f64(args.seconds);
    let mut results = Vec::new();
    for address in [open, verified] {
        let until = Instant::now() + span;
        let mut latencies = drive(args.connections, |_| {
            health_calls(address.clone(), token.clone(), until)
        })
        .await?;
        results.push(summary(&mut latencies, args.seconds));
    }
    let ratio = results[1]["rps"].as_f64().unwrap_or_default()
        / results[0]["rps"].as_f64().unwrap_or(1.0).max(1.0);
    Ok(json!({
        "request": "grpc.health.v1.Health/Check with an EdDSA JWT",
        "auth_off": results[0],
        "verified": results[1],
        "rps_ratio": (ratio * 1000.0).round() / 1000.0,
        "goal_rps_ratio": 0.9,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    anyhow::ensure!(args.connections > 0, "--connections: at least 1");
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds <= 600.0,
        "--seconds: between 0 and 600"
    );
    let gateway = gateway_overhead(&args).await?;
    let rpc = rpc_cost(&args, &gateway["grpc_direct"]).await?;
    let token = token_verification(&args).await?;
    println!(
        "{}",
        json!({
            "bench": "gateway",
            "connections": args.connections,
            "seconds": args.seconds,
            "gateway_overhead": gateway,
            "token_verification": token,
            "rpc_cost": rpc,
        })
    );
    Ok(())
}
