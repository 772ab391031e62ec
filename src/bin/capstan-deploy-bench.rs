//! Deploy-to-routable latency: from the `ApplyApp` call to the first 200
//! through the edge proxy, for a process app and a Docker app, each beside
//! its raw floor measured in the same run (spawn the same process, or
//! `docker run` the same image, then poll until it answers).
//!
//! Two more modes measure what autoscaling costs, each beside the process
//! deploy-to-routable of the same run:
//!
//! - `cold-start`: an app with `min = 0` idles to zero replicas; the
//!   latency of the first request, which the edge proxy holds while the
//!   app wakes;
//! - `autoscale`: from a load step on a one-replica app (target 20 rps per
//!   instance) to its second replica serving.
//!
//! Prints one JSON object per mode. Needs a running `capstan dev` (pass its
//! `--data-dir`; for the autoscaling modes started with `--sample-every
//! 1s`, or each run waits out 5 s periods), `/bin/busybox` (busybox-static)
//! and, for the Docker mode, the Docker engine and the image
//! `capstan-test/busybox:2` (the test suite builds it).
//!
//!   capstan-deploy-bench --data-dir DIR [--runs 10] [--modes process,docker,cold-start,autoscale]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use capstan_authn::{Authed, TokenSource};
use capstan_proto::v1::orchestrator_client::OrchestratorClient;
use capstan_proto::v1::{ApplyAppRequest, DeleteAppRequest, GetAppRequest};
use capstan_secrets::Secret;
use capstan_types::AppSpec;
use capstan_types::spec::SpecFormat;
use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "capstan-test/busybox:2";
const POLL: Duration = Duration::from_millis(2);
const GIVE_UP: Duration = Duration::from_secs(60);

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long, default_value = "process,docker")]
    modes: String,
}

#[derive(serde::Deserialize)]
struct Endpoints {
    orchestrator: String,
    auth: String,
    proxy: String,
}

async fn http_status(address: &str, host: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream
        .write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

async fn until_200(address: &str, host: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + GIVE_UP;
    while Instant::now() < deadline {
        if http_status(address, host).await == Some(200) {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    anyhow::bail!("{host} at {address} did not answer 200 within {GIVE_UP:?}")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (samples.len() as f64 - 1.0)).round() as usize;
    samples.get(rank).copied().unwrap_or(f64::NAN)
}

fn spec(mode: &str, name: &str, www: &str) -> anyhow::Result<AppSpec> {
    let run = match mode {
        "process" | "cold-start" | "autoscale" => format!(
            "command = [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"127.0.0.1:${{PORT}}\", \"-h\", \"{www}\"]"
        ),
        _ => format!(
            "image = \"{IMAGE}\"\nargs = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]"
        ),
    };
    let ports = if mode != "docker" {
        "[[ports]]\nname = \"http\"".to_string()
    } else {
        "[[ports]]\nname = \"http\"\ncontainer_port = 8080".to_string()
    };
    let autoscale = match mode {
        "cold-start" => {
            "[autoscale]\nmin = 0\nmax = 1\ntarget_rps_per_instance = 100000\nscale_to_zero_after = \"10s\"\n"
        }
        "autoscale" => {
            "[autoscale]\nmin = 1\nmax = 2\ntarget_rps_per_instance = 20\nscale_up_cooldown = \"1s\"\n"
        }
        _ => "",
    };
    let text = format!(
        "name = \"{name}\"\nreplicas = 1\n[run]\n{run}\n{ports}\n[health]\nhttp_path = \"/\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n[route]\nhosts = [\"{name}.bench.localhost\"]\n{autoscale}"
    );
    Ok(AppSpec::parse(&text, SpecFormat::Toml)?)
}

/// Spawns the workload the way a user would without Capstan, and times
/// until it answers.
async fn raw_floor(mode: &str, www: &str) -> anyhow::Result<f64> {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let result = match mode {
        "process" => {
            let mut child = Command::new("/bin/busybox")
                .args(["httpd", "-f", "-p", &address, "-h", www])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let answered = until_200(&address, "raw").await;
            let elapsed = started.elapsed();
            let _ = child.kill();
            let _ = child.wait();
            answered.map(|()| elapsed)
        }
        _ => {
            let name = format!("capstan-bench-raw-{port}");
            let out = Command::new("docker")
                .args([
                    "run",
                    "-d",
                    "--name",
                    &name,
                    "-p",
                    &format!("{address}:8080"),
                    IMAGE,
                    "httpd",
                    "-f",
                    "-p",
                    "8080",
                    "-h",
                    "/www",
                ])
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "docker run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let answered = until_200(&address, "raw").await;
            let elapsed = started.elapsed();
            let _ = Command::new("docker").args(["rm", "-f", &name]).output();
            answered.map(|()| elapsed)
        }
    };
    Ok(result?.as_secs_f64() * 1000.0)
}

async fn capstan_deploy(
    client: &mut OrchestratorClient<Authed>,
    proxy: &str,
    spec: AppSpec,
) -> anyhow::Result<f64> {
    let host = spec.route.hosts[0].clone();
    let name = spec.name.clone();
    let started = Instant::now();
    client
        .apply_app(ApplyAppRequest {
            spec: Some(capstan_proto::spec_to_wire(&spec)),
        })
        .await?;
    until_200(proxy, &host).await?;
    let elapsed = started.elapsed();
    delete(client, name.as_str()).await?;
    Ok(elapsed.as_secs_f64() * 1000.0)
}

/// Applies `spec` and waits until its first host answers 200 through the
/// proxy; its host and name.
async fn deploy(
    client: &mut OrchestratorClient<Authed>,
    proxy: &str,
    spec: &AppSpec,
) -> anyhow::Result<(String, String)> {
    let host = spec.route.hosts[0].clone();
    client
        .apply_app(ApplyAppRequest {
            spec: Some(capstan_proto::spec_to_wire(spec)),
        })
        .await?;
    until_200(proxy, &host).await?;
    Ok((host, spec.name.to_string()))
}

/// Deploys an app that scales to zero, waits until it has, then times the
/// first request (held by the proxy while the app wakes).
async fn cold_start(
    client: &mut OrchestratorClient<Authed>,
    proxy: &str,
    spec: AppSpec,
) -> anyhow::Result<f64> {
    let (host, name) = deploy(client, proxy, &spec).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let app = client
            .get_app(GetAppRequest { name: name.clone() })
            .await?
            .into_inner();
        if app.spec.is_some_and(|s| s.replicas == 0) && app.instances.is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{name} never scaled to zero");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let status = http_status(proxy, &host).await;
    let elapsed = started.elapsed();
    anyhow::ensure!(status == Some(200), "the first request got {status:?}");
    delete(client, &name).await?;
    Ok(elapsed.as_secs_f64() * 1000.0)
}

/// Deploys a one-replica autoscaled app, steps load onto it, and times
/// until a second replica is healthy and routed.
async fn autoscale_reaction(
    client: &mut OrchestratorClient<Authed>,
    proxy: &str,
    spec: AppSpec,
) -> anyhow::Result<f64> {
    let (host, name) = deploy(client, proxy, &spec).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (stop, proxy, host) = (stop.clone(), proxy.to_string(), host.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = http_status(&proxy, &host).await;
                }
            })
        })
        .collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let result = loop {
        let app = client
            .get_app(GetAppRequest { name: name.clone() })
            .await?
            .into_inner();
        let serving = app
            .instances
            .iter()
            .filter(|i| i.routable && i.state == capstan_proto::v1::InstanceState::Healthy as i32)
            .count();
        if serving >= 2 {
            break Ok(started.elapsed());
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!("{name} did not scale up under load"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    delete(client, &name).await?;
    Ok(result?.as_secs_f64() * 1000.0)
}

async fn delete(client: &mut OrchestratorClient<Authed>, name: &str) -> anyhow::Result<()> {
    client
        .delete_app(DeleteAppRequest {
            name: name.to_string(),
        })
        .await?;
    // Let the delete finish so runs do not overlap.
    let deadline = Instant::now() + GIVE_UP;
    while client
        .get_app(GetAppRequest {
            name: name.to_string(),
        })
        .await
        .is_ok()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let endpoints: Endpoints = serde_json::from_str(&std::fs::read_to_string(
        args.data_dir.join("endpoints.json"),
    )?)?;
    let api_key = std::fs::read_to_string(args.data_dir.join("admin.key"))?
        .trim()
        .to_string();
    let tokens = TokenSource::new(
        Secret::new(api_key),
        capstan_server::channel_to(&endpoints.auth)?,
    );
    let mut client = OrchestratorClient::new(Authed::new(
        capstan_server::channel_to(&endpoints.orchestrator)?,
        tokens,
    ));
    // World-readable: the agent runs process apps as an unprivileged user.
    let www = tempfile::tempdir()?;
    std::fs::set_permissions(
        www.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::write(www.path().join("index.html"), "bench\n")?;
    let www = www.path().display().to_string();

    for mode in args.modes.split(',') {
        if matches!(mode, "cold-start" | "autoscale") {
            let (mut measured, mut deploy) = (Vec::new(), Vec::new());
            for run in 0..args.runs {
                let name = format!("bench-deploy-{}-{run}", std::process::id());
                deploy.push(
                    capstan_deploy(&mut client, &endpoints.proxy, spec("process", &name, &www)?)
                        .await?,
                );
                let name = format!("bench-{mode}-{}-{run}", std::process::id());
                let app = spec(mode, &name, &www)?;
                measured.push(if mode == "cold-start" {
                    cold_start(&mut client, &endpoints.proxy, app).await?
                } else {
                    autoscale_reaction(&mut client, &endpoints.proxy, app).await?
                });
            }
            let what = if mode == "cold-start" {
                "first_request"
            } else {
                "load_step_to_second_replica_serving"
            };
            let deploy_p50 = percentile(&mut deploy, 50.0);
            let result = json!({
                "mode": mode,
                "runs": args.runs,
                "measures": what,
                "p50_ms": percentile(&mut measured, 50.0),
                "p90_ms": percentile(&mut measured, 90.0),
                "max_ms": percentile(&mut measured, 100.0),
                "deploy_to_routable_p50_ms": deploy_p50,
                "deploy_to_routable_p90_ms": percentile(&mut deploy, 90.0),
            });
            println!("{result}");
            continue;
        }
        let (mut capstan, mut raw) = (Vec::new(), Vec::new());
        for run in 0..args.runs {
            // Interleave the two so drift on the machine hits both alike.
            raw.push(raw_floor(mode, &www).await?);
            let name = format!("bench-{mode}-{}-{run}", std::process::id());
            capstan.push(
                capstan_deploy(&mut client, &endpoints.proxy, spec(mode, &name, &www)?).await?,
            );
        }
        let result = json!({
            "mode": mode,
            "runs": args.runs,
            "capstan_p50_ms": percentile(&mut capstan, 50.0),
            "capstan_p90_ms": percentile(&mut capstan, 90.0),
            "capstan_max_ms": percentile(&mut capstan, 100.0),
            "raw_p50_ms": percentile(&mut raw, 50.0),
            "raw_p90_ms": percentile(&mut raw, 90.0),
            "raw_max_ms": percentile(&mut raw, 100.0),
        });
        println!("{result}");
    }
    Ok(())
}
