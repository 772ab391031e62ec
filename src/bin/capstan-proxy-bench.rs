//! The edge proxy beside nginx and HAProxy, in one run: a 13-byte nginx
//! backend, then each proxy in front of it, loaded in turn by the same
//! `wrk -t1 -cC` over HTTP/1.1 keep-alive, and `h2load` over HTTP/2
//! cleartext (prior knowledge) to the client.
//!
//! The single-core comparison pins each proxy to CPU 0 (ours runs in a
//! one-worker Tokio runtime on a thread pinned there; nginx has one worker
//! process and HAProxy one thread, both started under `taskset -c 0`), and
//! the backend and the load generator to CPU 1. The all-cores run leaves
//! everything unpinned: our runtime gets a worker per core, nginx a worker
//! per core, HAProxy a thread per core.
//!
//! Every proxy keeps its upstream connections alive and adds
//! `X-Forwarded-For`. Prints one JSON object: per footing, each proxy's
//! requests/s and latency percentiles, and ours as a ratio of nginx's. On
//! one core it also reads how busy CPU 0 was during the HTTP/1.1 run
//! (`/proc/stat`, the kernel's network work included) and divides that by
//! the requests served: CPU per request, which does not depend on whether
//! the proxy or CPU 1 (load and backend) was the limit.
//!
//! Needs nginx, haproxy, wrk and h2load
//! (`apt-get install -y nginx haproxy wrk nghttp2-client`).
//!
//! Each proxy is measured `--rounds` times, in turn with the others, and
//! the JSON gives medians: on a shared machine one proxy's run can fall
//! in a slow minute, and a single run per proxy read ±20% apart.
//!
//!   capstan-proxy-bench [--seconds 10] [--connections 50] [--rounds 3] [--footings one-core,all-cores]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use capstan_router_config::proxy::{EdgeProxy, HttpLimits, TrustedProxies};
use capstan_router_config::table::{Route, RouteTable, Upstream};
use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const HOST: &str = "bench.localhost";
const BODY: &str = "hello, world\n";

#[derive(Parser)]
struct Args {
    /// Seconds of load per proxy and footing.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Open client connections (wrk -c; h2load -c with 10 streams each).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// `one-core` and/or `all-cores`.
    #[arg(long, default_value = "one-core,all-cores")]
    footings: String,
    /// Seconds of warm-up load before each measured run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Times each proxy is measured, in turn with the others.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn require(tool: &str, package: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin", "/bin"] {
        let path = Path::new(dir).join(tool);
        if path.is_file() {
            return Ok(path);
        }
    }
    anyhow::bail!("{tool} is not installed: apt-get install -y {package}")
}

/// A child process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master then stops its workers.
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.0.wait();
    }
}

/// `program`, under `taskset -c CPUS` when `cpus` is given.
fn pinned(cpus: Option<&str>, program: &Path) -> Command {
    match cpus {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(cpus).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// `program args...`, under `taskset -c CPUS` when `cpus` is given.
fn spawn(cpus: Option<&str>, program: &Path, args: &[&str]) -> anyhow::Result<Server> {
    let mut command = pinned(cpus, program);
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Server(child))
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("nothing listens on 127.0.0.1:{port} after 10 s")
}

fn nginx_conf(dir: &Path, workers: &str, body: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("nginx-{}.conf", free_port()?));
    let conf = format!(
        "worker_processes {workers};\n\
         daemon off;\n\
         pid {pid};\n\
         error_log stderr error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {dir}/body;\n\
           proxy_temp_path {dir}/proxy;\n\
           fastcgi_temp_path {dir}/fastcgi;\n\
           uwsgi_temp_path {dir}/uwsgi;\n\
           scgi_temp_path {dir}/scgi;\n\
           keepalive_requests 1000000;\n\
           {body}\n\
         }}\n",
        pid = path.with_extension("pid").display(),
        dir = dir.display(),
    );
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// Busy and total ticks of one CPU so far (`/proc/stat`).
fn cpu_ticks(cpu: usize) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name.as_str()))
        .with_context(|| format!("/proc/stat has no {name} line"))?;
    // user nice system idle iowait irq softirq steal ...
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    anyhow::ensure!(ticks.len() == 8, "/proc/stat's {name} line is short");
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    Ok((busy, busy + ticks[3] + ticks[4] + ticks[7]))
}

/// `wrk`, and how busy CPU 0 was meanwhile: its busy share and the CPU
/// time per request served.
fn wrk_with_cpu0(
    wrk_path: &Path,
    cpus: Option<&str>,
    port: u16,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<Value> {
    let (busy_before, total_before) = cpu_ticks(0)?;
    let mut result = wrk(wrk_path, cpus, port, connections, seconds)?;
    let (busy_after, total_after) = cpu_ticks(0)?;
    let busy = (busy_after - busy_before) as f64;
    let total = (total_after - total_before).max(1) as f64;
    // Ticks are 1/100 s (USER_HZ) on Linux.
    let requests = result["rps"].as_f64().unwrap_or_default() * seconds.ceil().max(1.0);
    result["cpu0_busy"] = json!((busy / total * 1000.0).round() / 1000.0);
    if requests > 0.0 {
        result["cpu0_us_per_request"] = json!((busy * 10_000.0 / requests * 100.0).round() / 100.0);
    }
    Ok(result)
}

/// wrk's summary: requests/s and its latency percentiles.
fn wrk(
    wrk: &Path,
    cpus: Option<&str>,
    port: u16,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<Value> {
    let duration = format!("{}s", seconds.ceil().max(1.0) as u64);
    let connections = connections.to_string();
    let url = format!("http://127.0.0.1:{port}/");
    let host = format!("Host: {HOST}");
    let args = [
        "-t1",
        "-c",
        &connections,
        "-d",
        &duration,
        "--latency",
        "-H",
        &host,
        &url,
    ];
    let mut command = pinned(cpus, wrk);
    let out = command.args(args).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&text)
}

fn parse_ms(value: &str) -> Option<f64> {
    let (number, scale) = if let Some(v) = value.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = value.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

fn parse_wrk(text: &str) -> anyhow::Result<Value> {
    let mut rps = None;
    let mut percentiles = serde_json::Map::new();
    let mut errors = 0u64;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => rps = value.parse::<f64>().ok(),
            [p @ ("50%" | "75%" | "90%" | "99%"), value] => {
                if let Some(ms) = parse_ms(value) {
                    let key = format!("p{}_ms", p.trim_end_matches('%'));
                    percentiles.insert(key, json!(ms));
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", ..] => {
                errors += words
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    let rps = rps.ok_or_else(|| anyhow::anyhow!("wrk printed no Requests/sec: {text}"))?;
    let mut summary = json!({ "rps": rps, "errors": errors });
    if let Some(fields) = summary.as_object_mut() {
        fields.extend(percentiles);
    }
    Ok(summary)
}

/// h2load over HTTP/2 cleartext (prior knowledge): requests/s and the
/// mean and max latency it prints (it has no percentiles).
fn h2load(
    h2load: &Path,
    cpus: Option<&str>,
    port: u16,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<Value> {
    let duration = format!("{}", seconds.ceil().max(1.0) as u64);
    let clients = connections.to_string();
    let url = format!("http://127.0.0.1:{port}/");
    let host = format!("host: {HOST}");
    let args = [
        "-t1", "-c", &clients, "-m", "10", "-D", &duration, "-H", &host, &url,
    ];
    let mut command = pinned(cpus, h2load);
    let out = command.args(args).output().context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "h2load failed: {text}");
    let mut rps = None;
    let mut failed = 0u64;
    let mut mean = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["finished", "in", _, rate, "req/s,", ..] => rps = rate.parse::<f64>().ok(),
            [
                "requests:",
                _,
                "total,",
                _,
                "started,",
                _,
                "done,",
                _,
                "succeeded,",
                f,
                ..,
            ] => {
                failed = f.parse().unwrap_or(0);
            }
            ["time", "for", "request:", _min, _max, m, ..] => mean = parse_ms(m),
            _ => {}
        }
    }
    let rps = rps.ok_or_else(|| anyhow::anyhow!("h2load printed no req/s: {text}"))?;
    Ok(json!({ "rps": rps, "errors": failed, "mean_ms": mean }))
}

/// Our proxy, on a thread of its own: a one-worker runtime pinned to CPU 0,
/// or a runtime with a worker per core.
fn start_capstan(port: u16, backend: u16, one_core: bool) -> anyhow::Result<CancellationToken> {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("capstan-proxy".into())
        .spawn(move || {
            let runtime = if one_core {
                if let Err(e) = pin_to_cpu(0) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
            };
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let limits = HttpLimits::default();
                let proxy = EdgeProxy::new(limits, TrustedProxies::default());
                proxy.apply(RouteTable {
                    generation: 1,
                    routes: vec![Route {
                        app: "bench".into(),
                        project: "default".into(),
                        hosts: vec![HOST.into()],
                        upstreams: vec![Upstream {
                            instance_id: "bench-1".into(),
                            address: format!("127.0.0.1:{backend}"),
                        }]
                        .into(),
                        health: None,
                        wakeable: false,
                    }],
                });
                let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let handler =
                    move |request, remote: SocketAddr| proxy.clone().handle(request, remote);
                capstan_router_config::proxy::serve(
                    listener,
                    handler,
                    stop,
                    Duration::from_secs(1),
                    limits,
                )
                .await;
            });
        })?;
    ready_rx
        .recv()
        .context("the proxy thread ended before it listened")??;
    Ok(shutdown)
}

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

struct Tools {
    nginx: PathBuf,
    haproxy: PathBuf,
    wrk: PathBuf,
    h2load: Option<PathBuf>,
}

/// The three proxies of one footing, each listening (idle ones cost
/// nothing), in front of the same backend.
struct Proxies {
    /// (name, HTTP/1.1 port, HTTP/2 port).
    ports: Vec<(&'static str, u16, u16)>,
    _servers: Vec<Server>,
    capstan: CancellationToken,
}

impl Drop for Proxies {
    fn drop(&mut self) {
        self.capstan.cancel();
        // Let our runtime's thread wind down before the next footing.
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_proxies(
    tools: &Tools,
    one_core: bool,
    dir: &Path,
    backend: u16,
) -> anyhow::Result<Proxies> {
    let proxy_cpus = one_core.then_some("0");
    let workers = if one_core { "1" } else { "auto" };
    let mut ports = Vec::new();
    let mut servers = Vec::new();

    // One listener serves both: our proxy sniffs HTTP/1 or /2.
    let port = free_port()?;
    let capstan = start_capstan(port, backend, one_core)?;
    ports.push(("capstan", port, port));

    let (port, h2_port) = (free_port()?, free_port()?);
    let conf = nginx_conf(
        dir,
        workers,
        &format!(
            "upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}\n\
             server {{\n\
               listen 127.0.0.1:{port};\n\
               listen 127.0.0.1:{h2_port} http2;\n\
               location / {{\n\
                 proxy_pass http://backend;\n\
                 proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n\
                 proxy_set_header Host $host;\n\
                 proxy_set_header X-Forwarded-For $remote_addr;\n\
               }}\n\
             }}"
        ),
    )?;
    let conf = conf.display().to_string();
    servers.push(spawn(
        proxy_cpus,
        &tools.nginx,
        &["-c", &conf, "-e", "stderr"],
    )?);
    ports.push(("nginx", port, h2_port));

    let (port, h2_port) = (free_port()?, free_port()?);
    let threads = if one_core {
        "1".to_string()
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .to_string()
    };
    let path = dir.join(format!("haproxy-{port}.cfg"));
    std::fs::write(
        &path,
        format!(
            "global\n  nbthread {threads}\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n  option forwardfor\n\
             frontend edge\n  bind 127.0.0.1:{port}\n  bind 127.0.0.1:{h2_port} proto h2\n  default_backend app\n\
             backend app\n  server app1 127.0.0.1:{backend}\n"
        ),
    )?;
    let path = path.display().to_string();
    servers.push(spawn(proxy_cpus, &tools.haproxy, &["-f", &path, "-db"])?);
    ports.push(("haproxy", port, h2_port));

    let proxies = Proxies {
        ports,
        _servers: servers,
        capstan,
    };
    for (_, port, h2_port) in &proxies.ports {
        wait_for_port(*port)?;
        wait_for_port(*h2_port)?;
    }
    Ok(proxies)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// One footing: every proxy loaded in turn, `--rounds` times, the order
/// rotated each round, so a slow minute of a shared machine falls on all
/// of them alike. Each figure is the median over the rounds; each ratio
/// is the median of the rounds' own ratios (ours and the peer's measured
/// a few seconds apart).
fn footing(args: &Args, tools: &Tools, one_core: bool, dir: &Path) -> anyhow::Result<Value> {
    let load_cpus = one_core.then_some("1");
    let backend = free_port()?;
    let conf = nginx_conf(
        dir,
        "1",
        &format!(
            "server {{ listen 127.0.0.1:{backend}; location / {{ default_type text/plain; return 200 \"{}\"; }} }}",
            BODY.escape_default()
        ),
    )?;
    let conf = conf.display().to_string();
    let _backend = spawn(load_cpus, &tools.nginx, &["-c", &conf, "-e", "stderr"])?;
    wait_for_port(backend)?;
    let proxies = start_proxies(tools, one_core, dir, backend)?;

    // rounds[r][proxy] = {"http1": .., "http2": ..}
    let mut rounds: Vec<serde_json::Map<String, Value>> = Vec::new();
    for round in 0..args.rounds.max(1) {
        let mut results = serde_json::Map::new();
        let count = proxies.ports.len();
        for k in 0..count {
            let (proxy, port, h2_port) = proxies.ports[(round + k) % count];
            if args.warmup > 0.0 {
                wrk(&tools.wrk, load_cpus, port, args.connections, args.warmup)?;
            }
            let http1 = if one_core {
                wrk_with_cpu0(&tools.wrk, load_cpus, port, args.connections, args.seconds)?
            } else {
                wrk(&tools.wrk, load_cpus, port, args.connections, args.seconds)?
            };
            let mut result = json!({ "http1": http1 });
            if let Some(h2load_path) = &tools.h2load {
                let connections = args.connections.div_ceil(10).max(1);
                result["http2"] =
                    h2load(h2load_path, load_cpus, h2_port, connections, args.seconds)?;
            }
            results.insert(proxy.to_string(), result);
        }
        rounds.push(results);
    }
    drop(proxies);

    let figure = |round: &serde_json::Map<String, Value>,
                  proxy: &str,
                  protocol: &str,
                  field: &str| { round.get(proxy)?[protocol][field].as_f64() };
    let mut report = serde_json::Map::new();
    for proxy in ["capstan", "nginx", "haproxy"] {
        let mut http1 = serde_json::Map::new();
        for field in [
            "rps",
            "p50_ms",
            "p99_ms",
            "cpu0_busy",
            "cpu0_us_per_request",
        ] {
            let values: Vec<f64> = rounds
                .iter()
                .filter_map(|round| figure(round, proxy, "http1", field))
                .collect();
            if let Some(m) = median(values) {
                http1.insert(field.to_string(), json!(m));
            }
        }
        let rps_by_round: Vec<f64> = rounds
            .iter()
            .filter_map(|round| figure(round, proxy, "http1", "rps"))
            .collect();
        http1.insert("rps_by_round".into(), json!(rps_by_round));
        let errors = |protocol: &str| -> u64 {
            rounds
                .iter()
                .filter_map(|round| round.get(proxy)?[protocol]["errors"].as_u64())
                .sum()
        };
        // Errors are summed over the rounds: one failed request is one too many.
        http1.insert("errors".into(), json!(errors("http1")));
        let mut http2 = serde_json::Map::new();
        http2.insert("errors".into(), json!(errors("http2")));
        for field in ["rps", "mean_ms"] {
            let values: Vec<f64> = rounds
                .iter()
                .filter_map(|round| figure(round, proxy, "http2", field))
                .collect();
            if let Some(m) = median(values) {
                http2.insert(field.to_string(), json!(m));
            }
        }
        report.insert(proxy.to_string(), json!({ "http1": http1, "http2": http2 }));
    }
    let ratio = |protocol: &str, field: &str, peer: &str| -> Option<f64> {
        median(
            rounds
                .iter()
                .filter_map(|round| {
                    let ours = figure(round, "capstan", protocol, field)?;
                    let theirs = figure(round, peer, protocol, field)?;
                    (theirs > 0.0).then(|| ours / theirs)
                })
                .collect(),
        )
    };
    let ratios = json!({
        "http1_rps_vs_nginx": ratio("http1", "rps", "nginx"),
        "http1_p99_vs_nginx": ratio("http1", "p99_ms", "nginx"),
        "http1_rps_vs_haproxy": ratio("http1", "rps", "haproxy"),
        "http1_p99_vs_haproxy": ratio("http1", "p99_ms", "haproxy"),
        "http1_cpu_per_request_vs_nginx": ratio("http1", "cpu0_us_per_request", "nginx"),
        "http1_cpu_per_request_vs_haproxy": ratio("http1", "cpu0_us_per_request", "haproxy"),
        "http2_rps_vs_nginx": ratio("http2", "rps", "nginx"),
        "http2_rps_vs_haproxy": ratio("http2", "rps", "haproxy"),
    });
    report.insert("ratios".into(), ratios);
    report.insert("rounds".into(), json!(rounds.len()));
    Ok(Value::Object(report))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The proxy runs under the subscriber `capstan dev` installs: without
    // one, every span a library opens (h2 opens several per frame) goes
    // through `tracing`'s fallback to `log`.
    let _telemetry = capstan_telemetry::init("capstan-proxy-bench", "info");
    let tools = Tools {
        nginx: require("nginx", "nginx")?,
        haproxy: require("haproxy", "haproxy")?,
        wrk: require("wrk", "wrk")?,
        h2load: Some(require("h2load", "nghttp2-client")?),
    };
    require("taskset", "util-linux")?;
    let dir = tempfile::tempdir()?;
    let mut report = serde_json::Map::new();
    report.insert(
        "setup".into(),
        json!({
            "backend": format!("nginx, 1 worker, {}-byte body", BODY.len()),
            "load": format!("wrk -t1 -c{} for {} s after {} s of warm-up", args.connections, args.seconds, args.warmup),
            "http2_load": tools.h2load.as_ref().map(|_| format!("h2load -t1 -c{} -m10", args.connections.div_ceil(10).max(1))),
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        }),
    );
    for name in args.footings.split(',').map(str::trim) {
        let one_core = match name {
            "one-core" => true,
            "all-cores" => false,
            other => anyhow::bail!("--footings: `{other}` is not one-core or all-cores"),
        };
        report.insert(
            name.to_string(),
            footing(&args, &tools, one_core, dir.path())?,
        );
    }
    println!("{}", Value::Object(report));
    Ok(())
}
