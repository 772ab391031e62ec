//! Test support. Everything here starts real things (a broker, an image in
//! the real Docker engine) and fails loudly, naming the install command, when
//! a tool is missing: no test skips silently.

pub mod consul_double;
pub mod docker;
pub mod faulty_store;
pub mod otlp;
pub mod pki;
pub mod rabbitmq;
pub mod redis;
pub mod traefik;
pub mod vault_double;

use std::net::TcpListener;
use std::path::Path;

/// A port that was free a moment ago on 127.0.0.1.
/// Go's duration syntax as Consul and Vault take it (`500ms`, `90s`, `15m`,
/// `1h`), for the doubles.
pub(crate) fn go_duration(text: &str) -> Option<std::time::Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Some(std::time::Duration::from_secs_f64(seconds))
}

/// A port nothing listens on, for a server a test starts next. It comes
/// from below the kernel's ephemeral range (`ip_local_port_range`), at
/// random: a port the kernel hands out for `bind(:0)` or an outgoing
/// connection is never in that range, so another test's listener or client
/// cannot take it between this probe and the server's bind.
pub fn free_port() -> u16 {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_start.max(10_001));
    for _ in 0..1000 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), low..high);
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port)).is_ok()
        {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Panics with the install command when `program` is not on this machine.
pub fn require_tool(program: &str, install: &str) {
    let found = if program.contains('/') {
        Path::new(program).exists()
    } else {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
            .unwrap_or(false)
    };
    assert!(
        found,
        "this test needs `{program}`; install it with: {install}"
    );
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, timeout: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

/// Fails unless every `[dependencies]` entry of `manifest` (a crate's
/// Cargo.toml text) is in `allowed`: how a pure crate proves it stays pure.
pub fn assert_only_dependencies(manifest: &str, allowed: &[&str], what: &str) {
    let mut section = "";
    let mut found = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[dependencies]" && !line.is_empty() && !line.starts_with('#') {
            let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
            found.push(name.to_string());
        }
        assert!(
            !(section.starts_with("[dependencies.") || section.starts_with("[target")),
            "dependencies must be listed in [dependencies] only, found {section}"
        );
    }
    for name in &found {
        assert!(
            allowed.contains(&name.as_str()),
            "`{name}` is not an allowed dependency of {what}"
        );
    }
    assert!(
        !found.is_empty(),
        "the manifest parse found no dependencies at all"
    );
}
