//! The simulated driver (`capstan-sim`) is a bench and test facility: no
//! binary of the platform can run it, whatever its flags or config. No
//! platform package depends on the crate, so its code is not in them: this
//! looks for its name, which the driver reports, in the built binaries.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// The platform's binaries: the CLI and `capstan dev`, and every service.
const PLATFORM: &[&str] = &[
    "capstan",
    "capstan-agent",
    "capstan-auth",
    "capstan-gateway",
    "capstan-metrics",
    "capstan-orchestrator",
    "capstan-router-config",
    "capstan-scheduler",
];

fn binary(name: &str) -> Vec<u8> {
    let path = Path::new(BIN).with_file_name(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build every binary first: cargo build --workspace --bins",
            path.display()
        )
    })
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_platform_binary_contains_the_simulated_driver() {
    let marker = capstan_sim::NAME.as_bytes();
    // The search finds the driver where it is linked in.
    assert!(
        holds(&binary("capstan-scale-bench"), marker),
        "the scale bench runs the simulated driver, so its name is in it"
    );
    for name in PLATFORM {
        assert!(
            !holds(&binary(name), marker),
            "{name} contains the simulated driver"
        );
    }
}

#[test]
fn no_flag_selects_another_driver() {
    for args in [
        &["dev", "--driver", "sim"][..],
        &["dev", "--runtime", "sim"][..],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success(), "capstan {args:?} ran");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("unexpected argument"), "{stderr}");
    }
    let agent = Path::new(BIN).with_file_name("capstan-agent");
    let help = Command::new(&agent).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_lowercase();
    assert!(help.contains("--no-docker"), "{help}");
    assert!(!help.contains("sim"), "capstan-agent --help offers: {help}");
}
