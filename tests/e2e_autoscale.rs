//! Autoscaling on `capstan dev` under real load: a load step scales the
//! app up, removing it scales it down after the stabilisation window, no
//! request fails, the journal explains each step, and a manual scale
//! pauses the autoscaler until `app autoscale --resume`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn autoscaled_spec(name: &str) -> String {
    format!(
        "{}\n[autoscale]\nmin = 1\nmax = 3\ntarget_rps_per_instance = 20\nscale_up_cooldown = \"2s\"\nscale_down_cooldown = \"3s\"\nstabilization = \"4s\"\n",
        whoami_spec(name, 1, "v1")
    )
}

fn replicas(dev: &Dev, app: &str) -> u64 {
    dev.status(app)["replicas"].as_u64().unwrap()
}

fn autoscale_entries(dev: &Dev, app: &str) -> Vec<Value> {
    let history: Value =
        serde_json::from_str(&dev.ok(&["app", "history", app, "-o", "json"])).unwrap();
    history
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "autoscale")
        .cloned()
        .collect()
}

#[test]
fn load_scales_up_idleness_scales_down_and_a_manual_scale_pauses_the_autoscaler() {
    let dev = Dev::start_with(None, &["--no-docker", "--sample-every", "1s"]);
    let spec = spec_file(dev.data_dir(), "a.toml", &autoscaled_spec("auto"));
    dev.ok(&["app", "deploy", "-f", &spec, "--timeout", "60s"]);
    assert_eq!(replicas(&dev, "auto"), 1);
    let status = dev.ok(&["app", "status", "auto"]);
    assert!(status.contains("autoscale: 1 to 3 replicas"), "{status}");

    // A load step: far more than 20 requests/s per instance.
    let loads: Vec<Load> = (0..4)
        .map(|_| Load::start(dev.http_port, "auto.localhost"))
        .collect();
    let step = Instant::now();
    wait_until(
        "the autoscaler scales up to max",
        Duration::from_secs(60),
        || replicas(&dev, "auto") == 3 && healthy(&dev.status("auto")) == 3,
    );
    println!("load step -> 3 healthy replicas in {:?}", step.elapsed());
    let up = autoscale_entries(&dev, "auto");
    let first_up = up.last().expect("a scale-up entry");
    let reason = first_up["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("scaled 1 -> ")
            && reason.contains("rps")
            && reason.contains("> target 20"),
        "{reason}"
    );
    assert_eq!(first_up["inputs"]["target_rps_per_instance"], "20");
    assert!(first_up["rule"].as_str().unwrap().contains("largest wins"));

    // Remove the load: down to min once the stabilisation window passes.
    let mut ok = 0;
    let mut failures = Vec::new();
    for load in loads {
        let (n, failed) = load.finish();
        ok += n;
        failures.extend(failed);
    }
    let idle = Instant::now();
    wait_until(
        "the autoscaler scales down to min",
        Duration::from_secs(60),
        || replicas(&dev, "auto") == 1,
    );
    let down_after = idle.elapsed();
    println!("load removed -> 1 replica in {down_after:?}");
    assert!(
        down_after >= Duration::from_secs(3),
        "scaled down {down_after:?} after the load stopped: inside the 4 s stabilisation window"
    );
    let entries = autoscale_entries(&dev, "auto");
    let down = &entries[0];
    let reason = down["reason"].as_str().unwrap();
    assert!(
        // Down in one step or two, as the stabilisation window lets go.
        reason.starts_with("scaled ") && reason.contains(" -> 1: rps 0/instance < target 20"),
        "{reason}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests were served");

    // A manual scale pauses it: the count stays though the app is idle.
    let out = dev.ok(&["app", "scale", "auto", "2"]);
    assert!(out.contains("autoscaling is paused"), "{out}");
    let status = dev.json(&["app", "status", "auto", "-o", "json"]);
    assert_eq!(status["autoscale"]["paused_by"], "admin");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        replicas(&dev, "auto"),
        2,
        "the autoscaler changed a manual count"
    );
    assert!(
        autoscale_entries(&dev, "auto")[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("autoscaling paused: scaled 1 -> 2 by hand")
    );
    // A deploy ends the pause too, whether or not the spec changed.
    let wider = spec_file(
        dev.data_dir(),
        "a4.toml",
        &autoscaled_spec("auto").replace("max = 3", "max = 4"),
    );
    dev.ok(&["app", "deploy", "-f", &wider, "--timeout", "60s"]);
    let status = dev.json(&["app", "status", "auto", "-o", "json"]);
    assert_eq!(status["autoscale"]["max"], 4);
    assert!(status["autoscale"]["paused_by"].is_null(), "{status:#}");
    wait_until(
        "the autoscaler takes over after the deploy",
        Duration::from_secs(60),
        || replicas(&dev, "auto") == 1,
    );
    dev.ok(&["app", "scale", "auto", "2"]);
    // --resume hands it back: idle, so back to min.
    dev.ok(&["app", "autoscale", "auto", "--resume"]);
    wait_until(
        "the resumed autoscaler scales down",
        Duration::from_secs(60),
        || replicas(&dev, "auto") == 1,
    );
    let out = dev.cli(&["app", "autoscale", "missing", "--resume"]);
    assert!(!out.status.success());
}
