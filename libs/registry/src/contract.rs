//! The contract every [`ServiceRegistry`] adapter passes (the Consul adapter
//! runs it against a live agent when one is configured).

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::{Check, Registration, ServiceRegistry};

fn registration(id: &str, name: &str, check: Check) -> Registration {
    Registration {
        id: id.into(),
        name: name.into(),
        address: "127.0.0.1:1".into(),
        tags: vec!["v1".into()],
        check,
    }
}

pub async fn run(registry: &dyn ServiceRegistry) {
    run_timed(registry).await;
    run_networked(registry).await;
}

/// The checks about time: TTL expiry and blocking watches. They do no
/// network I/O of their own, so an adapter that keeps time with tokio runs
/// them under `tokio::time::pause()`, where their durations are exact.
pub async fn run_timed(registry: &dyn ServiceRegistry) {
    ttl_checks_start_critical_pass_and_expire(registry).await;
    watch_blocks_until_change(registry).await;
}

/// The timed checks on a real clock, with waits a remote registry can keep
/// (Consul's blocking-query wait counts whole seconds).
pub async fn run_realtime(registry: &dyn ServiceRegistry) {
    ttl_checks_start_critical_pass_and_expire(registry).await;
    let (index, _) = registry
        .watch("svc-rt", 0, Duration::from_secs(1))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let (same, _) = registry
        .watch("svc-rt", index, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(same, index, "no change, same index");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "a watch with no change returned after {:?}, before its 2 s wait",
        started.elapsed()
    );
    let waiter = registry.watch("svc-rt", index, Duration::from_secs(10));
    let change = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        registry
            .register(registration(
                "rt-1",
                "svc-rt",
                Check::Ttl {
                    ttl: Duration::from_secs(30),
                },
            ))
            .await
            .unwrap();
        registry.pass_ttl("rt-1").await.unwrap();
    };
    let started = tokio::time::Instant::now();
    let ((next, _), ()) = tokio::join!(async { waiter.await.unwrap() }, change);
    assert!(next > index);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the watch returned on the change, not after its wait"
    );
    registry.deregister("rt-1").await.unwrap();
}

/// The checks that talk to real endpoints: these need a running clock.
pub async fn run_networked(registry: &dyn ServiceRegistry) {
    http_checks_follow_the_endpoint(registry).await;
    deregister_removes(registry).await;
}

async fn ttl_checks_start_critical_pass_and_expire(registry: &dyn ServiceRegistry) {
    let ttl = Duration::from_millis(600);
    registry
        .register(registration("ttl-1", "svc-ttl", Check::Ttl { ttl }))
        .await
        .unwrap();
    assert!(
        registry.healthy("svc-ttl").await.unwrap().is_empty(),
        "a new instance starts critical"
    );
    registry.pass_ttl("ttl-1").await.unwrap();
    let healthy = registry.healthy("svc-ttl").await.unwrap();
    assert_eq!(healthy.len(), 1);
    assert_eq!(healthy[0].tags, ["v1"]);
    tokio::time::sleep(ttl * 3).await;
    assert!(
        registry.healthy("svc-ttl").await.unwrap().is_empty(),
        "a TTL check that is not renewed expires"
    );
    assert!(registry.pass_ttl("no-such-instance").await.is_err());
}

async fn watch_blocks_until_change(registry: &dyn ServiceRegistry) {
    let (index, _) = registry
        .watch("svc-watch", 0, Duration::from_millis(10))
        .await
        .unwrap();
    // With no change, a watch waits out its whole wait and reports the
    // same index: a watch that returned early would show an elapsed time
    // under its wait (exact under a paused clock).
    let started = tokio::time::Instant::now();
    let (same, _) = registry
        .watch("svc-watch", index, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(same, index);
    assert!(
        started.elapsed() >= Duration::from_secs(300),
        "watch returned after {:?}, before its wait, with no change",
        started.elapsed()
    );

    let waiter = registry.watch("svc-watch", index, Duration::from_secs(10));
    let change = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        registry
            .register(registration(
                "w-1",
                "svc-watch",
                Check::Ttl {
                    ttl: Duration::from_secs(30),
                },
            ))
            .await
            .unwrap();
        registry.pass_ttl("w-1").await.unwrap();
    };
    let ((next, _), ()) = tokio::join!(async { waiter.await.unwrap() }, change);
    assert!(next > index);
}

async fn http_checks_follow_the_endpoint(registry: &dyn ServiceRegistry) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/health", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let check = Check::Http {
        url,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
    };
    registry
        .register(registration("http-1", "svc-http", check))
        .await
        .unwrap();
    assert!(
        eventually(registry, "svc-http", 1).await,
        "HTTP check never passed"
    );
    server.abort();
    let _ = server.await;
    assert!(
        eventually(registry, "svc-http", 0).await,
        "HTTP check never failed after the endpoint went away"
    );
}

async fn deregister_removes(registry: &dyn ServiceRegistry) {
    registry
        .register(registration(
            "d-1",
            "svc-d",
            Check::Ttl {
                ttl: Duration::from_secs(30),
            },
        ))
        .await
        .unwrap();
    registry.pass_ttl("d-1").await.unwrap();
    registry.deregister("d-1").await.unwrap();
    assert!(registry.healthy("svc-d").await.unwrap().is_empty());
    registry.deregister("d-1").await.unwrap();
}

async fn eventually(registry: &dyn ServiceRegistry, name: &str, count: usize) -> bool {
    for _ in 0..100 {
        if registry.healthy(name).await.unwrap().len() == count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
