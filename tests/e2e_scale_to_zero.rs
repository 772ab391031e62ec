//! Scale to zero and back on `capstan dev`: an idle app goes to zero
//! replicas after `scale_to_zero_after`; the first request afterwards waits
//! while the edge proxy wakes it, and succeeds; a burst of first requests
//! past the proxy's queue bound gets a clean 503 with Retry-After.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn spec(name: &str) -> String {
    format!(
        "{}\n[autoscale]\nmin = 0\nmax = 2\ntarget_rps_per_instance = 1000\nscale_to_zero_after = \"10s\"\n",
        whoami_spec(name, 1, "v1")
    )
}

/// One request on its own connection: the status and the Retry-After.
fn request(port: u16, host: &str) -> (u16, Option<String>, String) {
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let retry_after = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("retry-after: ")
                .or_else(|| l.strip_prefix("Retry-After: "))
        })
        .map(str::to_string);
    (status, retry_after, body.to_string())
}

fn replicas(dev: &Dev, app: &str) -> u64 {
    dev.status(app)["replicas"].as_u64().unwrap()
}

fn wait_for_zero(dev: &Dev, app: &str) {
    wait_until(
        "the idle app is scaled to zero",
        Duration::from_secs(60),
        || {
            let status = dev.status(app);
            status["replicas"] == 0 && status["instances"].as_array().is_some_and(|i| i.is_empty())
        },
    );
}

#[test]
fn an_idle_app_goes_to_zero_and_the_first_request_wakes_it() {
    let dev = Dev::start_with(
        None,
        &["--no-docker", "--sample-every", "1s", "--wake-queue", "20"],
    );
    let file = spec_file(dev.data_dir(), "z.toml", &spec("sleepy"));
    dev.ok(&["app", "deploy", "-f", &file, "--timeout", "60s"]);
    assert_eq!(replicas(&dev, "sleepy"), 1);
    let deployed = Instant::now();
    wait_for_zero(&dev, "sleepy");
    assert!(
        deployed.elapsed() >= Duration::from_secs(9),
        "scaled to zero after {:?}, before scale_to_zero_after",
        deployed.elapsed()
    );
    let history: Value =
        serde_json::from_str(&dev.ok(&["app", "history", "sleepy", "-o", "json"])).unwrap();
    let reason = history[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("scaled 1 -> 0: no requests for ")
            && reason.ends_with("(scale_to_zero_after 10 s)"),
        "{reason}"
    );

    // The first request waits for the wake, and succeeds.
    let started = Instant::now();
    let (status, _, body) = request(dev.http_port, "sleepy.localhost");
    println!(
        "cold start: first request answered in {:?}",
        started.elapsed()
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("v1"), "{body}");
    assert_eq!(replicas(&dev, "sleepy"), 1);
    let history: Value =
        serde_json::from_str(&dev.ok(&["app", "history", "sleepy", "-o", "json"])).unwrap();
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "scaled 0 -> 1: a request arrived while at zero"),
        "{history:#}"
    );

    // Idle again; then 50 first requests at once: the 20 the queue holds
    // succeed, the rest get 503 with Retry-After, nothing else.
    wait_for_zero(&dev, "sleepy");
    let burst: Vec<_> = (0..50)
        .map(|_| {
            let port = dev.http_port;
            std::thread::spawn(move || request(port, "sleepy.localhost"))
        })
        .collect();
    let answers: Vec<(u16, Option<String>, String)> =
        burst.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = answers.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    println!(
        "burst of 50: {ok} served, {} refused with 503",
        refused.len()
    );
    assert_eq!(ok + refused.len(), 50, "only 200 or 503: {answers:?}");
    assert!(ok >= 20, "the queue holds 20, {ok} were served");
    assert!(!refused.is_empty(), "50 requests fit a queue of 20");
    for (_, retry_after, body) in &refused {
        assert!(retry_after.is_some(), "a 503 without Retry-After: {body}");
        assert!(body.contains("requests already wait"), "{body}");
    }
}
