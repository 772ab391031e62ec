//! The contract every [`Driver`] passes. The caller supplies a `serve`
//! program that answers HTTP on its port and a `crash` program that exits
//! with code 3 at once; `reopen` builds a fresh driver over the same state,
//! as after an agent restart.

use std::time::Duration;

use capstan_types::InstanceId;

use crate::{Driver, Program, WorkloadSpec, WorkloadStatus};

fn instance_id(text: &str) -> InstanceId {
    InstanceId::parse("instance_id", text).expect("contract ids are valid")
}

pub struct Programs {
    pub serve: Program,
    pub crash: Program,
    /// Whether the driver counts network bytes per workload.
    pub counts_network: bool,
}

fn spec(id: &InstanceId, program: Program, port: u16) -> WorkloadSpec {
    WorkloadSpec {
        instance_id: id.clone(),
        app: "contract".into(),
        spec_hash: "h1".into(),
        program,
        env: [("GREETING".to_string(), "hi".to_string())].into(),
        host_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        host_port: port,
        cpu_millis: 100,
        memory_mb: 64,
    }
}

async fn http_ok(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream
        .write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200")
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..150 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

pub async fn run(
    driver: &dyn Driver,
    reopen: impl Fn() -> Box<dyn Driver>,
    programs: Programs,
    prefix: &str,
) {
    let port = free_port();
    let id = instance_id(&format!("{prefix}-serve"));
    let started = driver
        .start(&spec(&id, programs.serve.clone(), port))
        .await
        .expect("start serve workload");
    assert_eq!(started.host_port, port);
    eventually("the workload answers HTTP on its port", async || {
        http_ok(port).await
    })
    .await;
    assert_eq!(driver.status(&id).await.unwrap(), WorkloadStatus::Running);

    // What it uses: memory held now, CPU time that only grows.
    let usage = driver.usage().await.expect("usage");
    let mine: Vec<&crate::Usage> = usage
        .iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, u)| u)
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "one usage sample for the workload: {usage:?}"
    );
    assert!(mine[0].memory_bytes > 0, "{usage:?}");
    assert_eq!(
        mine[0].network.is_some(),
        programs.counts_network,
        "network counters: {usage:?}"
    );
    assert!(mine[0].cpu_seconds >= 0.0, "{usage:?}");
    for _ in 0..20 {
        http_ok(port).await;
    }
    let later = driver.usage().await.expect("usage");
    let again = later.iter().find(|(i, _)| *i == id).map(|(_, u)| *u);
    assert!(
        again.is_some_and(|u| u.cpu_seconds >= mine[0].cpu_seconds),
        "CPU time went back: {usage:?} then {later:?}"
    );
    // Network counters, where the runtime keeps them, count what was sent
    // and received since the workload started: 20 requests went in.
    if let (Some((rx, tx)), Some(Some((rx2, tx2)))) = (mine[0].network, again.map(|u| u.network)) {
        assert!(
            rx2 > rx && tx2 > tx,
            "network counters did not grow with traffic: {usage:?} then {later:?}"
        );
    }

    // Starting the same instance again is a no-op, not a second copy.
    driver
        .start(&spec(&id, programs.serve.clone(), port))
        .await
        .expect("idempotent start");
    assert_eq!(
        driver
            .list()
            .await
            .unwrap()
            .iter()
            .filter(|w| w.instance_id == id)
            .count(),
        1
    );

    // A fresh driver over the same state re-adopts the running workload.
    let reopened = reopen();
    let listed = reopened.list().await.unwrap();
    let adopted = listed
        .iter()
        .find(|w| w.instance_id == id)
        .expect("reopened driver lists the workload");
    assert_eq!(
        (
            adopted.app.as_str(),
            adopted.spec_hash.as_str(),
            adopted.host_port
        ),
        ("contract", "h1", port)
    );
    assert_eq!(reopened.status(&id).await.unwrap(), WorkloadStatus::Running);

    reopened
        .stop(&id, Duration::from_secs(2))
        .await
        .expect("stop");
    eventually("the port is closed after stop", async || {
        !http_ok(port).await
    })
    .await;
    assert_eq!(driver.status(&id).await.unwrap(), WorkloadStatus::Missing);
    assert!(
        driver
            .list()
            .await
            .unwrap()
            .iter()
            .all(|w| w.instance_id != id)
    );
    assert!(
        driver.usage().await.unwrap().iter().all(|(i, _)| *i != id),
        "a stopped workload has no usage"
    );
    driver
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stopping twice succeeds");

    let crash_id = instance_id(&format!("{prefix}-crash"));
    driver
        .start(&spec(&crash_id, programs.crash, free_port()))
        .await
        .expect("start crash workload");
    eventually("the crashing workload is reported exited", async || {
        matches!(
            driver.status(&crash_id).await,
            Ok(WorkloadStatus::Exited { .. })
        )
    })
    .await;
    // The exit code is what a user debugs a crash with: every driver reports it.
    match driver.status(&crash_id).await.unwrap() {
        WorkloadStatus::Exited { code, reason } => {
            assert_eq!(code, Some(3), "exit code of the crash program ({reason})")
        }
        other => panic!("crash workload is {other:?}"),
    }
    driver
        .stop(&crash_id, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(
        driver.status(&instance_id("never-started")).await.unwrap(),
        WorkloadStatus::Missing
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
