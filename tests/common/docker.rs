//! Capstan in containers on a private Docker network, from images built
//! here: the runtime base from `infra/docker/base-image.sh` (debootstrap,
//! cached per machine) and the `prebuilt` target of the Dockerfile around the
//! binaries this test run built.

use std::path::Path;
use std::process::{Command, Output};

use super::BIN;

pub const BASE_IMAGE: &str = "capstan-base:bookworm";
pub const IMAGE: &str = "capstan:e2e";
const BINARIES: [&str; 8] = [
    "capstan",
    "capstan-orchestrator",
    "capstan-scheduler",
    "capstan-router-config",
    "capstan-auth",
    "capstan-metrics",
    "capstan-gateway",
    "capstan-agent",
];

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run docker {args:?}: {e}; the tests need the Docker engine"))
}

pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds [`IMAGE`] from this run's binaries (stripped) on the local base
/// image; Docker's layer cache makes an unchanged rebuild cheap.
pub fn build_image() -> &'static str {
    capstan_testkit::docker::require_docker();
    capstan_testkit::require_tool("debootstrap", "apt-get install -y debootstrap");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = Command::new("bash")
        .arg(root.join("infra/docker/base-image.sh"))
        .arg(BASE_IMAGE)
        .output()
        .expect("run infra/docker/base-image.sh");
    assert!(
        base.status.success(),
        "infra/docker/base-image.sh failed: {}{}",
        String::from_utf8_lossy(&base.stdout),
        String::from_utf8_lossy(&base.stderr)
    );
    let stage = tempfile::tempdir().unwrap();
    let bin = stage.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for name in BINARIES {
        let built = Path::new(BIN).with_file_name(name);
        assert!(
            built.exists(),
            "{} is missing: build the binaries first with `cargo build --workspace --bins`",
            built.display()
        );
        let strip = Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(bin.join(name))
            .arg(&built)
            .status()
            .expect("run strip (apt-get install -y binutils)");
        assert!(strip.success(), "strip {}", built.display());
    }
    let dockerfile = root.join("Dockerfile");
    docker_ok(&[
        "build",
        "-q",
        "--target",
        "prebuilt",
        "--build-arg",
        &format!("RUNTIME_IMAGE={BASE_IMAGE}"),
        "-f",
        dockerfile.to_str().unwrap(),
        "-t",
        IMAGE,
        stage.path().to_str().unwrap(),
    ]);
    IMAGE
}

/// A private bridge network, `10.X.Y.0/24` with the host at `.1`; removed
/// with everything on it when dropped.
pub struct Network {
    pub name: String,
    prefix: String,
    containers: std::sync::Mutex<Vec<String>>,
}

impl Network {
    pub fn create(label: &str) -> Network {
        let pid = std::process::id();
        let name = format!("capstan-{label}-{pid}");
        // A /24 per run, away from Docker's default 172.17-31 pools.
        let prefix = format!("10.{}.{}", 200 + (pid >> 8) % 50, pid % 256);
        docker_ok(&[
            "network",
            "create",
            "--subnet",
            &format!("{prefix}.0/24"),
            "--gateway",
            &format!("{prefix}.1"),
            &name,
        ]);
        Network {
            name,
            prefix,
            containers: Default::default(),
        }
    }

    /// The host's address on this network.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    pub fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }

    /// The container name for `host` on this network.
    pub fn container(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    /// Starts `argv` in a container named after `host`, with its own
    /// hostname and the address `.ip`; `options` go to `docker run`.
    pub fn run(&self, host: &str, ip: u8, options: &[&str], argv: &[&str]) -> String {
        let name = self.container(host);
        let address = self.ip(ip);
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            host,
            "--network",
            &self.name,
            "--ip",
            &address,
        ];
        args.extend_from_slice(options);
        args.push(IMAGE);
        args.extend_from_slice(argv);
        docker_ok(&args);
        self.containers.lock().unwrap().push(name.clone());
        name
    }

    pub fn logs(&self, host: &str) -> String {
        self.logs_tail(host, "60")
    }

    pub fn logs_all(&self, host: &str) -> String {
        self.logs_tail(host, "all")
    }

    fn logs_tail(&self, host: &str, tail: &str) -> String {
        let out = docker(&["logs", "--tail", tail, &self.container(host)]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for name in self.containers.lock().unwrap().iter() {
            let _ = docker(&["rm", "-f", name]);
        }
        let _ = docker(&["network", "rm", &self.name]);
    }
}
