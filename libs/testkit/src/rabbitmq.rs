//! A throwaway RabbitMQ node on random ports, with its own data dir, killed
//! (with its whole process group) on drop.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct RabbitMq {
    child: Child,
    port: u16,
    dist_port: u16,
    node: String,
    dir: tempfile::TempDir,
    bind: String,
}

impl RabbitMq {
    pub async fn start() -> RabbitMq {
        RabbitMq::start_on("127.0.0.1").await
    }

    /// A broker listening on `bind` (e.g. a Docker bridge's gateway, so
    /// that containers reach it), with the `guest` user allowed from
    /// other hosts than loopback.
    pub async fn start_on(bind: &str) -> RabbitMq {
        crate::require_tool(SERVER, "apt-get install -y rabbitmq-server");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = crate::free_port();
        let dist_port = crate::free_port();
        let node = format!(
            "capstan-test-{}-{}@localhost",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if bind != "127.0.0.1" {
            std::fs::write(dir.path().join("rabbitmq.conf"), "loopback_users = none\n")
                .expect("write rabbitmq.conf");
        }
        let child = spawn(dir.path(), &node, bind, port, dist_port);
        let broker = RabbitMq {
            child,
            port,
            dist_port,
            node,
            dir,
            bind: bind.to_string(),
        };
        broker.wait_until_listening().await;
        broker
    }

    /// Kills the broker (SIGKILL, like a crash) and starts it again on the
    /// same port and data: durable queues and confirmed messages survive.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = spawn(
            self.dir.path(),
            &self.node,
            &self.bind,
            self.port,
            self.dist_port,
        );
        self.wait_until_listening().await;
    }

    async fn wait_until_listening(&self) {
        if !crate::wait_for_port(self.port, Duration::from_secs(60)).await {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "rabbitmq-server did not listen on {} within 60s; its log:\n{log}",
                self.port
            );
        }
    }

    fn kill(&mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn amqp_uri(&self) -> String {
        self.amqp_uri_at(&self.bind)
    }

    /// The URL with another host than the one it binds (a name or address
    /// that reaches it from elsewhere).
    pub fn amqp_uri_at(&self, host: &str) -> String {
        format!("amqp://guest:guest@{host}:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

fn spawn(base: &std::path::Path, node: &str, bind: &str, port: u16, dist_port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(base.join("server.log"))
        .expect("log file");
    Command::new(SERVER)
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        )
        .env("RABBITMQ_NODENAME", node)
        .env("RABBITMQ_NODE_IP_ADDRESS", bind)
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", base.join("log"))
        .env(
            "RABBITMQ_ENABLED_PLUGINS_FILE",
            base.join("enabled_plugins"),
        )
        .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq"))
        .env("RABBITMQ_PID_FILE", base.join("pid"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start rabbitmq-server")
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.kill();
    }
}
