//! Both drivers against the real thing: real processes, and the real Docker
//! engine with an image built here from a static busybox.

use capstan_runtime::contract::{self, Programs};
use capstan_runtime::{
    DockerDriver, Driver, ProcessDriver, Program, Sandbox, WorkloadSpec, WorkloadStatus,
};
use capstan_types::InstanceId;

fn id(text: &str) -> InstanceId {
    InstanceId::parse("instance_id", text).unwrap()
}

fn busybox() -> String {
    capstan_testkit::require_tool("/bin/busybox", "apt-get install -y busybox-static");
    "/bin/busybox".to_string()
}

/// A process workload of `argv` with `memory_mb`.
fn workload(id: &InstanceId, argv: Vec<String>, memory_mb: u32) -> WorkloadSpec {
    WorkloadSpec {
        instance_id: id.clone(),
        app: "a".into(),
        spec_hash: "h".into(),
        program: Program::Process { argv },
        env: Default::default(),
        host_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        host_port: 1,
        cpu_millis: 1,
        memory_mb,
    }
}

/// Runs `argv` as a one-shot process workload until it exits; returns its output.
async fn run_to_exit(driver: &ProcessDriver, id: &InstanceId, argv: Vec<String>) -> String {
    driver.start(&workload(id, argv, 4)).await.unwrap();
    for _ in 0..50 {
        if matches!(
            driver.status(id).await.unwrap(),
            WorkloadStatus::Exited { .. }
        ) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    std::fs::read_to_string(driver.log_path(id)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn process_driver_passes_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hi").unwrap();
    let state = dir.path().join("state");
    let driver = ProcessDriver::new(&state, Sandbox::same_user(&dir.path().join("work"))).unwrap();
    let programs = Programs {
        serve: Program::Process {
            argv: vec![
                busybox(),
                "httpd".into(),
                "-f".into(),
                "-p".into(),
                "127.0.0.1:${PORT}".into(),
                "-h".into(),
                www.display().to_string(),
            ],
        },
        crash: Program::Process {
            argv: vec![busybox(), "sh".into(), "-c".into(), "exit 3".into()],
        },
        counts_network: false,
    };
    let work = dir.path().join("work");
    let reopen = || {
        Box::new(ProcessDriver::new(&state, Sandbox::same_user(&work)).unwrap()) as Box<dyn Driver>
    };
    contract::run(&driver, reopen, programs, "proc").await;
}

/// A workload learns where it serves: `PORT`, `CAPSTAN_HOST_IP` and
/// `CAPSTAN_ADDR` in its environment, and the same `${...}` in its argv.
#[tokio::test(flavor = "multi_thread")]
async fn process_workloads_are_told_the_node_address_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let driver =
        ProcessDriver::new(dir.path(), Sandbox::same_user(&dir.path().join("work"))).unwrap();
    let argv = vec![
        busybox(),
        "sh".into(),
        "-c".into(),
        "echo \"env $PORT $CAPSTAN_HOST_IP $CAPSTAN_ADDR\"; echo \"argv $0\"".into(),
        "${CAPSTAN_HOST_IP}|${PORT}|${CAPSTAN_ADDR}|${HOME}".into(),
    ];
    let log = run_to_exit(&driver, &id("addr"), argv).await;
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [
            "env 1 127.0.0.1 127.0.0.1:1",
            "argv 127.0.0.1|1|127.0.0.1:1|${HOME}"
        ],
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn process_driver_never_uses_a_shell() {
    let dir = tempfile::tempdir().unwrap();
    let driver =
        ProcessDriver::new(dir.path(), Sandbox::same_user(&dir.path().join("work"))).unwrap();
    let marker = dir.path().join("pwned");
    // Were this run through `sh -c`, the `;` would create the marker file.
    let argv = vec![
        "/bin/echo".to_string(),
        format!("hello; touch {}", marker.display()),
    ];
    let log = run_to_exit(&driver, &id("noshell"), argv).await;
    assert_eq!(log.trim(), format!("hello; touch {}", marker.display()));
    assert!(!marker.exists());
    driver
        .stop(&id("noshell"), std::time::Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_driver_passes_the_contract() {
    let image = capstan_testkit::docker::busybox_image();
    let node = format!("contract{}", std::process::id());
    let driver = DockerDriver::connect(&node)
        .await
        .expect("connect to the Docker engine");
    let programs = Programs {
        serve: Program::Image {
            image: image.to_string(),
            args: vec![
                "httpd".into(),
                "-f".into(),
                "-p".into(),
                "8080".into(),
                "-h".into(),
                "/www".into(),
            ],
            container_port: 8080,
        },
        crash: Program::Image {
            image: image.to_string(),
            args: vec!["sh".into(), "-c".into(), "exit 3".into()],
            container_port: 8080,
        },
        counts_network: true,
    };
    let runtime = tokio::runtime::Handle::current();
    let reopen = move || {
        let node = node.clone();
        let driver = std::thread::scope(|s| {
            s.spawn(|| runtime.block_on(DockerDriver::connect(&node)))
                .join()
                .expect("connect thread")
        });
        Box::new(driver.expect("reconnect")) as Box<dyn Driver>
    };
    contract::run(&driver, reopen, programs, "dock").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn process_workloads_run_in_their_own_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let driver = ProcessDriver::new(&state, Sandbox::same_user(&dir.path().join("work"))).unwrap();
    let argv = vec![
        busybox(),
        "ls".into(),
        "-a".into(),
        "-1".into(),
        "/proc/self/cwd/".into(),
    ];
    let listing = run_to_exit(&driver, &id("cwd"), argv).await;
    let entries: Vec<&str> = listing
        .lines()
        .filter(|l| *l != "." && *l != "..")
        .collect();
    assert!(
        entries.is_empty(),
        "the workload sees files in its working directory: {entries:?}"
    );
    assert!(
        driver
            .work_dir(&id("cwd"))
            .starts_with(dir.path().join("work"))
    );
    assert!(!driver.work_dir(&id("cwd")).starts_with(&state));
    driver
        .stop(&id("cwd"), std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        !driver.work_dir(&id("cwd")).exists(),
        "the working directory is removed on stop"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandboxed_workload_runs_unprivileged_and_cannot_read_the_agents_files() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches users, so it must run as root (CI does); run it with sudo"
    );
    let dir = tempfile::tempdir().unwrap();
    // The workload must be able to pass through to its own directory.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let state = dir.path().join("state");
    let work = dir.path().join("work");
    let driver = ProcessDriver::new(&state, Sandbox::as_user("nobody", &work).unwrap()).unwrap();
    let secret = state.join("signing.key");
    std::fs::write(&secret, "top-secret-canary").unwrap();
    // A world-readable file in a directory only the agent may enter.
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let argv = vec![
        busybox(),
        "sh".into(),
        "-c".into(),
        format!(
            "{} id -u; {} cat {}; true",
            busybox(),
            busybox(),
            secret.display()
        ),
    ];
    let log = run_to_exit(&driver, &id("sandboxed"), argv).await;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        log.lines().next(),
        Some(nobody.uid.to_string().as_str()),
        "the workload did not run as nobody: {log}"
    );
    assert!(
        !log.contains("top-secret-canary"),
        "the workload read the agent's file: {log}"
    );
    assert!(log.contains("Permission denied"), "{log}");
    assert!(!driver.work_dir(&id("sandboxed")).starts_with(&state));
    driver
        .stop(&id("sandboxed"), std::time::Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_process_always_reports_its_exit_code() {
    // A process that died but is not reaped yet is a zombie; polling its
    // status right then once reported "process is gone" with no exit code.
    let dir = tempfile::tempdir().unwrap();
    let driver =
        ProcessDriver::new(dir.path(), Sandbox::same_user(&dir.path().join("work"))).unwrap();
    for round in 0..40 {
        let instance = id(&format!("crash-{round}"));
        let spec = WorkloadSpec {
            instance_id: instance.clone(),
            app: "a".into(),
            spec_hash: "h".into(),
            program: Program::Process {
                argv: vec![busybox(), "sh".into(), "-c".into(), "exit 3".into()],
            },
            env: Default::default(),
            host_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            host_port: 1,
            cpu_millis: 1,
            memory_mb: 4,
        };
        driver.start(&spec).await.unwrap();
        loop {
            match driver.status(&instance).await.unwrap() {
                WorkloadStatus::Exited { code, reason } => {
                    assert_eq!(code, Some(3), "round {round}: {reason}");
                    break;
                }
                _ => tokio::task::yield_now().await,
            }
        }
        driver
            .stop(&instance, std::time::Duration::from_secs(1))
            .await
            .unwrap();
    }
}

/// Starts `argv` with `memory_mb` and waits for it to exit; its status.
async fn exit_of(
    driver: &ProcessDriver,
    instance: &InstanceId,
    argv: Vec<String>,
    memory_mb: u32,
) -> (Option<i64>, String) {
    driver
        .start(&workload(instance, argv, memory_mb))
        .await
        .unwrap();
    for _ in 0..200 {
        if let WorkloadStatus::Exited { code, reason } = driver.status(instance).await.unwrap() {
            return (code, reason);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{instance} did not exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_holds_more_than_memory_mb_is_killed_out_of_memory() {
    capstan_testkit::require_tool("python3", "apt-get install -y python3");
    let dir = tempfile::tempdir().unwrap();
    let driver =
        ProcessDriver::new(dir.path(), Sandbox::same_user(&dir.path().join("work"))).unwrap();
    let python = |code: &str| vec!["python3".to_string(), "-c".into(), code.into()];
    // 200 MiB held, in 10 MiB steps: the watchdog kills it.
    let hold = python(
        "import time\nheld = [bytearray(10 * 1024 * 1024) for _ in range(20)]\nprint('holding', flush=True)\ntime.sleep(30)\n",
    );
    let (code, reason) = exit_of(&driver, &id("hog-held"), hold, 64).await;
    assert_eq!(code, None, "killed, not exited: {reason}");
    assert!(reason.starts_with("out of memory: it held "), "{reason}");
    assert!(
        reason.ends_with("over its memory_mb (64 MiB), and was killed"),
        "{reason}"
    );
    // One allocation far past the limit fails at once (the backstop).
    let burst = python("x = bytearray(4 * 1024 * 1024 * 1024)\n");
    let (code, reason) = exit_of(&driver, &id("hog-burst"), burst, 64).await;
    assert_eq!(code, Some(1), "{reason}");
    assert!(
        reason.starts_with("out of memory: an allocation failed at its limit"),
        "{reason}"
    );
    // The same 200 MiB within a roomier limit runs to the end.
    let roomy = python("held = [bytearray(10 * 1024 * 1024) for _ in range(20)]\nprint('done')\n");
    let (code, reason) = exit_of(&driver, &id("hog-roomy"), roomy, 512).await;
    assert_eq!(code, Some(0), "{reason}");
    // Threads reserve stacks they do not use: 50 of them (400 MiB of
    // address space) fit a 64 MiB app. RLIMIT_DATA at memory_mb refused
    // them, and a threaded server failed under a burst of connections.
    let threads = python(
        "import threading, time\nts = [threading.Thread(target=time.sleep, args=(1,)) for _ in range(50)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n",
    );
    let (code, reason) = exit_of(&driver, &id("threads"), threads, 64).await;
    assert_eq!(code, Some(0), "{reason}");
    // A plain crash is not called out of memory.
    let (code, reason) = exit_of(&driver, &id("crash"), python("raise SystemExit(3)"), 64).await;
    assert_eq!((code, reason.as_str()), (Some(3), "exited with code 3"));
}

/// A double of a delegated cgroup v2 directory: the interface files the
/// kernel makes for a cgroup and its children (cgroup-v2.rst), as plain
/// files. It shows what the driver writes and reads; the kernel's
/// enforcement is what `cgroup_live` checks where the host has cgroup v2.
fn cgroupfs_double(root: &std::path::Path, children: &[&InstanceId]) {
    std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
    for child in children {
        let dir = root.join(child.as_str());
        std::fs::create_dir_all(&dir).unwrap();
        for (file, content) in [
            ("cgroup.procs", ""),
            ("memory.max", "max\n"),
            ("cpu.max", "max 100000\n"),
            ("memory.current", "0\n"),
            ("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"),
            ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"),
        ] {
            std::fs::write(dir.join(file), content).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_cgroups_each_process_joins_its_own_cgroup_with_its_limits() {
    use capstan_runtime::cgroup::Cgroups;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cgroup");
    std::fs::create_dir_all(&root).unwrap();
    let instance = id("limited");
    cgroupfs_double(&root, &[&instance]);
    let driver = ProcessDriver::new(
        &dir.path().join("state"),
        Sandbox::same_user(&dir.path().join("work")),
    )
    .unwrap()
    .with_cgroups(Cgroups::at(&root).unwrap());
    assert_eq!(
        std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
        "+memory +cpu",
        "the children get the memory and cpu controllers"
    );
    assert!(
        driver.limits().starts_with("cgroup v2 under "),
        "{}",
        driver.limits()
    );

    let mut spec = workload(&instance, vec![busybox(), "sleep".into(), "30".into()], 64);
    spec.cpu_millis = 250;
    driver.start(&spec).await.unwrap();
    let cgroup = root.join(instance.as_str());
    let read = |file: &str| std::fs::read_to_string(cgroup.join(file)).unwrap();
    assert_eq!(read("memory.max"), (64u64 << 20).to_string());
    assert_eq!(read("cpu.max"), "25000 100000");
    // The child wrote itself ("0") into cgroup.procs before it exec'd.
    assert_eq!(read("cgroup.procs"), "0");
    assert_eq!(
        driver.status(&instance).await.unwrap(),
        WorkloadStatus::Running
    );

    // Usage is the cgroup's.
    std::fs::write(cgroup.join("memory.current"), "123456789\n").unwrap();
    std::fs::write(
        cgroup.join("cpu.stat"),
        "usage_usec 2500000\nuser_usec 2000000\n",
    )
    .unwrap();
    let usage = driver.usage().await.unwrap();
    let (_, usage) = usage.iter().find(|(i, _)| *i == instance).unwrap();
    assert_eq!(usage.memory_bytes, 123_456_789);
    assert!(
        (usage.cpu_seconds - 2.5).abs() < 1e-9,
        "{}",
        usage.cpu_seconds
    );

    // The kernel's OOM killer, as memory.events records it.
    std::fs::write(
        cgroup.join("memory.events"),
        "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
    )
    .unwrap();
    let pid: i32 = {
        let record =
            std::fs::read_to_string(dir.path().join("state").join("limited.json")).unwrap();
        let record: serde_json::Value = serde_json::from_str(&record).unwrap();
        record["pid"].as_i64().unwrap() as i32
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut reason = String::new();
    for _ in 0..100 {
        if let WorkloadStatus::Exited { reason: r, .. } = driver.status(&instance).await.unwrap() {
            reason = r;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        reason.starts_with(
            "out of memory: it reached its memory_mb (64 MiB) and the kernel killed it"
        ),
        "{reason}"
    );
}

#[test]
fn a_cgroup_root_that_is_not_cgroup_v2_is_refused_by_name() {
    use capstan_runtime::cgroup::CgroupMode;
    let dir = tempfile::tempdir().unwrap();
    let mode = CgroupMode::parse("--cgroup-root", dir.path().to_str().unwrap()).unwrap();
    let reason = mode.resolve().unwrap_err();
    assert!(
        reason.contains("is not on a cgroup v2 file system"),
        "{reason}"
    );
    assert!(reason.contains(dir.path().to_str().unwrap()), "{reason}");
    assert_eq!(
        CgroupMode::Off.resolve().unwrap_err(),
        "turned off (--cgroup-root off)"
    );
}

/// On a host with cgroup v2: CAPSTAN_TEST_CGROUP2_ROOT names a directory
/// on it the test may write (a delegated one, or one made by root):
///
///   CAPSTAN_TEST_CGROUP2_ROOT=/sys/fs/cgroup/capstan-test cargo test -p capstan-runtime --test drivers -- --ignored cgroup_live
#[tokio::test(flavor = "multi_thread")]
#[ignore = "live cgroup v2: set CAPSTAN_TEST_CGROUP2_ROOT and run with --ignored"]
async fn cgroup_live_the_kernel_kills_a_process_over_memory_max() {
    capstan_testkit::require_tool("python3", "apt-get install -y python3");
    let root = std::env::var("CAPSTAN_TEST_CGROUP2_ROOT")
        .expect("CAPSTAN_TEST_CGROUP2_ROOT=a writable cgroup v2 directory");
    let cgroups = capstan_runtime::cgroup::CgroupMode::At(root.into())
        .resolve()
        .expect("a usable cgroup v2 root");
    let dir = tempfile::tempdir().unwrap();
    let driver = ProcessDriver::new(dir.path(), Sandbox::same_user(&dir.path().join("work")))
        .unwrap()
        .with_cgroups(cgroups);
    let hold = vec![
        "python3".to_string(),
        "-c".into(),
        "import time\nheld = [bytearray(10 * 1024 * 1024) for _ in range(20)]\ntime.sleep(30)\n"
            .into(),
    ];
    let (code, reason) = exit_of(&driver, &id("cg-hog"), hold, 64).await;
    assert_eq!(code, None, "{reason}");
    assert!(
        reason.starts_with("out of memory: it reached its memory_mb (64 MiB)"),
        "{reason}"
    );
    driver
        .stop(&id("cg-hog"), std::time::Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn through_the_log_writer_output_is_stamped_and_the_writer_ends_with_the_app() {
    capstan_testkit::require_tool("python3", "apt-get install -y python3");
    let dir = tempfile::tempdir().unwrap();
    let driver = ProcessDriver::new(dir.path(), Sandbox::same_user(&dir.path().join("work")))
        .unwrap()
        .with_log_writer(env!("CARGO_BIN_EXE_capstan-log-writer").into());
    let instance = id("logged");
    let before = now_ms();
    let program = vec![
        "python3".to_string(),
        "-c".into(),
        "import sys\nprint('to stdout', flush=True)\nprint('to stderr', file=sys.stderr, flush=True)\n".into(),
    ];
    let (code, _) = exit_of(&driver, &instance, program, 64).await;
    assert_eq!(code, Some(0));
    let log = driver.log_path(&instance);
    let writer_running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(log.to_str().unwrap()))
        })
    };
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = capstan_runtime::logs::read(&log, 0, 0);
        if lines.len() == 2 && !writer_running() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["to stdout", "to stderr"], "both streams, in order");
    assert!(lines.iter().all(|l| l.at_ms >= before), "{lines:?}");
    assert!(!writer_running(), "the writer ends once the app has");
    driver
        .stop(&instance, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert!(!log.exists(), "stopping removes the logs");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_logs_keep_the_two_streams_apart_with_their_times() {
    let image = capstan_testkit::docker::busybox_image();
    let node = format!("logs{}", std::process::id());
    let driver = DockerDriver::connect(&node)
        .await
        .expect("connect to the Docker engine");
    let instance = id("talker");
    let spec = WorkloadSpec {
        program: Program::Image {
            image: image.to_string(),
            args: vec![
                "sh".into(),
                "-c".into(),
                "echo hello; echo oops >&2; echo bye; sleep 30".into(),
            ],
            container_port: 8080,
        },
        // 1 millicore: under the kernel's CFS floor, which Docker refused
        // (cpu.cfs_quota_us 100: invalid argument) until the driver capped
        // reservations like this at the floor.
        ..workload(&instance, vec![], 64)
    };
    assert_eq!(spec.cpu_millis, 1);
    let before = now_ms() - 1_000;
    driver.start(&spec).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..100 {
        let mut lines = driver.logs(&instance, 0, 0, false);
        seen.clear();
        while let Some(line) = lines.recv().await {
            let (stream, line) = line.unwrap();
            assert!(line.at_ms >= before, "{line:?}");
            seen.push((stream, line.text));
        }
        if seen.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = driver
        .stop(&instance, std::time::Duration::from_secs(1))
        .await;
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            ("stderr", "oops".to_string()),
            ("stdout", "bye".to_string()),
            ("stdout", "hello".to_string())
        ]
    );
    let tail: Vec<&str> = seen
        .iter()
        .filter(|(s, _)| *s == "stdout")
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(tail, ["hello", "bye"], "each stream in order");
}
