//! `capstan-agent`: the node agent in its own process.

use std::collections::BTreeMap;

use clap::Parser;

/// Runs this node's instances and reports them.
#[derive(Parser)]
#[command(name = "capstan-agent", version)]
struct Args {
    #[command(flatten)]
    standalone: capstan_server::standalone::StandaloneArgs,
    /// This node's id, stable across restarts (a DNS label).
    #[arg(long, env = "CAPSTAN_NODE_ID")]
    node_id: String,
    /// CPU this node offers, in millicores.
    #[arg(long, default_value_t = 4000)]
    cpu_millis: u32,
    /// Memory this node offers, in MB.
    #[arg(long, default_value_t = 8192)]
    memory_mb: u32,
    /// A node label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Do not connect to Docker; image apps then fail to start here.
    #[arg(long)]
    no_docker: bool,
    /// The user process apps run as (when the agent runs as root).
    #[arg(long, default_value = capstan_agent::DEFAULT_RUN_AS)]
    run_as: String,
    /// Where process apps get their working directories (default:
    /// /var/lib/capstan/work/NODE_ID as root, else under --data-dir).
    #[arg(long)]
    work_dir: Option<std::path::PathBuf>,
    /// A file holding this node's API key, which acts only as this node.
    /// Create one with `capstan key create --role node --name NODE_ID`.
    #[arg(long, env = "CAPSTAN_NODE_KEY_FILE")]
    node_key_file: std::path::PathBuf,
    /// The address other hosts reach this node at, e.g. 10.0.0.5: instances
    /// bind to it (CAPSTAN_HOST_IP), routers dial it, and it is the agent's
    /// own advertised host when --listen is a wildcard. Default: the
    /// address of the interface the default route leaves by.
    #[arg(long, env = "CAPSTAN_ADVERTISE_ADDR")]
    advertise_addr: Option<std::net::IpAddr>,
    /// How often each instance's CPU and memory are sampled (1s to 5m).
    #[arg(long, env = "CAPSTAN_SAMPLE_EVERY", default_value = "5s", value_parser = capstan_types::duration::parse_sample_every)]
    sample_every: std::time::Duration,
    /// Where process apps' memory_mb and cpu_millis limits come from:
    /// `auto` (a cgroup v2 per instance when this agent's cgroup is
    /// delegated to it, else rlimits and a memory watchdog), `off`, or the
    /// path of a cgroup v2 directory the agent owns.
    #[arg(long, env = "CAPSTAN_CGROUP_ROOT", default_value = "auto", value_parser = capstan_agent::parse_cgroup_root)]
    cgroup_root: capstan_runtime::cgroup::CgroupMode,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "expected KEY=VALUE".to_string())
}

fn main() -> std::process::ExitCode {
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(capstan_runtime::logs::WRITER_ARG) {
        let code = capstan_runtime::logs::writer_main(&raw[2..]);
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let args = Args::parse();
    if let Err(reason) = capstan_types::spec::check_dns_label(&args.node_id) {
        eprintln!("error: --node-id: {reason}");
        return std::process::ExitCode::from(2);
    }
    let advertise_ip = match args.advertise_addr {
        Some(ip) if ip.is_unspecified() => {
            eprintln!("error: --advertise-addr: {ip} is not an address others can dial");
            return std::process::ExitCode::from(2);
        }
        Some(ip) => ip,
        None => match capstan_agent::primary_address() {
            Ok(ip) => ip,
            Err(e) => {
                eprintln!("error: --advertise-addr: {e}");
                return std::process::ExitCode::from(2);
            }
        },
    };
    let cgroups = match capstan_agent::cgroups(&args.cgroup_root) {
        Ok(cgroups) => cgroups,
        Err(reason) => {
            eprintln!("error: --cgroup-root: {reason}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut standalone = args.standalone;
    if standalone.advertise_host.is_none() {
        standalone.advertise_host = Some(advertise_ip.to_string());
    }
    let state_dir = standalone.data_dir.join("agents").join(&args.node_id);
    let config = capstan_agent::AgentConfig {
        work_root: args
            .work_dir
            .unwrap_or_else(|| capstan_agent::default_work_root(&args.node_id, &state_dir)),
        run_as: args.run_as,
        state_dir,
        node_id: args.node_id,
        capacity: capstan_types::Resources {
            cpu_millis: args.cpu_millis,
            memory_mb: args.memory_mb,
        },
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        docker: !args.no_docker,
        advertise_ip,
        sample_every: args.sample_every,
        cgroups,
        // This binary is its own log writer.
        log_writer: std::env::current_exe().ok(),
    };
    capstan_server::standalone::main(
        "capstan-agent",
        standalone,
        capstan_server::standalone::Credential::NodeKeyFile(args.node_key_file),
        |platform, listener, shutdown| capstan_agent::run(platform, config, listener, shutdown),
    )
}
