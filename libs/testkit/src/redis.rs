//! A throwaway `redis-server` on a random port, with nothing persisted,
//! killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SERVER: &str = "redis-server";
pub const INSTALL: &str = "apt-get install -y redis-server";

pub struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::start_on(crate::free_port()).await
    }

    /// On a chosen port: for tests that start a client before its server.
    pub async fn start_on(port: u16) -> Redis {
        crate::require_tool(SERVER, INSTALL);
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new(SERVER)
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {SERVER}: {e}; install it with: {INSTALL}"));
        let redis = Redis {
            child,
            port,
            _dir: dir,
        };
        assert!(
            crate::wait_for_port(port, Duration::from_secs(20)).await,
            "redis-server did not listen on {port} within 20s"
        );
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
