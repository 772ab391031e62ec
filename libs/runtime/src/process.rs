use std::collections::HashMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capstan_types::InstanceId;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroup::{Cgroups, join_before_exec};
use crate::logs;
use crate::{
    Driver, DriverError, Program, Usage, Workload, WorkloadSpec, WorkloadStatus, substitute,
};

/// Who process workloads run as, and where their working directories are.
///
/// Nomad's `exec` driver is the model: an agent running as root starts each
/// workload as an unprivileged user, in a directory outside the agent's data
/// dir, so an app cannot read the platform's keys or state.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// `(uid, gid)` to run as; `None` runs as the agent's own user.
    pub user: Option<(u32, u32)>,
    /// Parent of the workloads' working directories.
    pub work_root: PathBuf,
}

impl Sandbox {
    /// As the agent's own user (what a non-root agent can do).
    pub fn same_user(work_root: &Path) -> Sandbox {
        Sandbox {
            user: None,
            work_root: work_root.to_path_buf(),
        }
    }

    /// As the named user, looked up in the system's user database.
    pub fn as_user(name: &str, work_root: &Path) -> Result<Sandbox, DriverError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| DriverError::Io(format!("look up user `{name}`: {e}")))?
            .ok_or_else(|| DriverError::Io(format!("no user `{name}` on this node")))?;
        if user.uid.is_root() {
            return Err(DriverError::Io(format!(
                "user `{name}` is root: workloads must run unprivileged"
            )));
        }
        Ok(Sandbox {
            user: Some((user.uid.as_raw(), user.gid.as_raw())),
            work_root: work_root.to_path_buf(),
        })
    }
}

/// Runs programs as child processes. State (one JSON file per workload)
/// lives in `state_dir`, so a restarted agent finds its processes again.
pub struct ProcessDriver {
    state_dir: PathBuf,
    sandbox: Sandbox,
    /// Exit statuses of the processes this driver started, delivered by
    /// their reaper tasks (`None` until the process is reaped).
    exits: Arc<Mutex<HashMap<InstanceId, ExitReceiver>>>,
    /// The memory watchdog's view: what it watches, and what it killed.
    memory: Arc<MemoryWatch>,
    /// Where limits come from when the host delegates a cgroup v2 to the
    /// agent; else rlimits and the memory watchdog.
    cgroups: Option<Cgroups>,
    /// A binary that runs the log writer when called with
    /// [`logs::WRITER_ARG`]; `None`: output goes straight to the log,
    /// unstamped and unrotated.
    log_writer: Option<PathBuf>,
}

/// How often resident memory is compared with each workload's limit.
pub const MEMORY_CHECK_EVERY: Duration = Duration::from_millis(500);

/// The memory limit of process workloads. What a process holds resident
/// (its process group's RSS) is what `memory_mb` limits, as a cgroup's
/// memory.max would: every [`MEMORY_CHECK_EVERY`] a group over its limit
/// is killed (SIGKILL) and reported out of memory. Between two checks a
/// backstop holds: RLIMIT_DATA at [`data_backstop`], set by the child on
/// itself, past which an allocation fails at once. RLIMIT_DATA alone would
/// count virtual memory (every thread's 8 MiB stack), which is not what
/// an app uses.
#[derive(Default)]
struct MemoryWatch {
    /// instance -> (pid = process group, start ticks, limit in bytes)
    watched: Mutex<HashMap<InstanceId, (i32, u64, u64)>>,
    /// instance -> the resident bytes it was killed at
    killed: Mutex<HashMap<InstanceId, u64>>,
    started: std::sync::OnceLock<()>,
}

/// The RLIMIT_DATA backstop for a `memory_mb` limit of `limit` bytes: room
/// for thread stacks and allocator slack, still bounded.
pub fn data_backstop(limit: u64) -> u64 {
    limit.saturating_add((limit.saturating_mul(3)).max(1 << 30))
}

impl MemoryWatch {
    fn watch(self: &Arc<Self>, id: &InstanceId, pid: i32, start_ticks: u64, limit: u64) {
        self.watched
            .lock()
            .expect("memory watch lock poisoned")
            .insert(id.clone(), (pid, start_ticks, limit));
        self.started.get_or_init(|| {
            tokio::spawn(Arc::clone(self).run());
        });
    }

    fn is_watched(&self, id: &InstanceId) -> bool {
        self.watched
            .lock()
            .expect("memory watch lock poisoned")
            .contains_key(id)
    }

    fn forget(&self, id: &InstanceId) {
        self.watched
            .lock()
            .expect("memory watch lock poisoned")
            .remove(id);
        self.killed
            .lock()
            .expect("memory watch lock poisoned")
            .remove(id);
    }

    fn killed_at(&self, id: &InstanceId) -> Option<u64> {
        self.killed
            .lock()
            .expect("memory watch lock poisoned")
            .get(id)
            .copied()
    }

    async fn run(self: Arc<Self>) {
        let (_, page) = tick_and_page();
        loop {
            tokio::time::sleep(MEMORY_CHECK_EVERY).await;
            let watched: Vec<(InstanceId, (i32, u64, u64))> = self
                .watched
                .lock()
                .expect("memory watch lock poisoned")
                .iter()
                .map(|(id, w)| (id.clone(), *w))
                .collect();
            if watched.is_empty() {
                continue;
            }
            let Ok(groups) = blocking(|| Ok(usage_by_group())).await else {
                continue;
            };
            for (id, (pid, start_ticks, limit)) in watched {
                let alive = matches!(proc_start_ticks(pid), Some((t, false)) if t == start_ticks);
                if !alive {
                    self.watched
                        .lock()
                        .expect("memory watch lock poisoned")
                        .remove(&id);
                    continue;
                }
                let resident = groups.get(&pid).map_or(0, |(_, pages)| pages * page);
                if resident > limit {
                    tracing::warn!(instance = %id, resident, limit, "killing a workload over its memory limit");
                    self.killed
                        .lock()
                        .expect("memory watch lock poisoned")
                        .insert(id.clone(), resident);
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    self.watched
                        .lock()
                        .expect("memory watch lock poisoned")
                        .remove(&id);
                }
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ProcessRecord {
    workload: Workload,
    pid: i32,
    /// Start time in clock ticks since boot, from /proc: tells our process
    /// from another that reused the pid.
    start_ticks: u64,
    /// Its `memory_mb` in bytes; 0: none set.
    #[serde(default)]
    memory_limit: u64,
    /// Whether it runs in its own cgroup v2 (the kernel enforces its
    /// limits) rather than under rlimits and the memory watchdog.
    #[serde(default)]
    cgroup: bool,
}

/// Caps what the process `command` starts may allocate (the backstop of
/// [`MemoryWatch`]): RLIMIT_DATA
/// (heap and private mappings, since Linux 4.7), soft and hard, set by the
/// child on itself just before exec (lowering a limit needs no
/// privilege), so the program never runs without it. An allocation past
/// it fails. Address space (RLIMIT_AS) is left alone: runtimes that
/// reserve large ranges (Go, the JVM) would not start under it.
#[allow(unsafe_code)]
fn limit_memory(command: &mut tokio::process::Command, bytes: u64) {
    use nix::sys::resource::{Resource, setrlimit};
    // SAFETY: the closure runs in the forked child before exec. It makes
    // one async-signal-safe system call (setrlimit), allocates nothing and
    // touches no lock, which is what pre_exec requires.
    unsafe {
        command.pre_exec(move || {
            setrlimit(Resource::RLIMIT_DATA, bytes, bytes).map_err(std::io::Error::from)
        });
    }
}

/// Whether the end of a workload's log says an allocation failed: what
/// common runtimes print when RLIMIT_DATA refuses memory.
pub fn says_out_of_memory(log_tail: &str) -> bool {
    const MARKERS: [&str; 6] = [
        "memoryerror",
        "cannot allocate memory",
        "out of memory",
        "memory allocation of",
        "std::bad_alloc",
        "enomem",
    ];
    let tail = log_tail.to_ascii_lowercase();
    MARKERS.iter().any(|m| tail.contains(m))
}

impl ProcessDriver {
    pub fn new(state_dir: &Path, sandbox: Sandbox) -> Result<Self, DriverError> {
        let io =
            |path: &Path, e: std::io::Error| DriverError::Io(format!("{}: {e}", path.display()));
        // State (records, logs) is the agent's alone.
        std::fs::create_dir_all(state_dir).map_err(|e| io(state_dir, e))?;
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(state_dir, e))?;
        // Workloads may pass through the work root to their own directory,
        // but not list it.
        std::fs::create_dir_all(&sandbox.work_root).map_err(|e| io(&sandbox.work_root, e))?;
        if sandbox.user.is_some() {
            std::fs::set_permissions(&sandbox.work_root, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| io(&sandbox.work_root, e))?;
        }
        Ok(ProcessDriver {
            state_dir: state_dir.to_path_buf(),
            sandbox,
            exits: Arc::default(),
            memory: Arc::default(),
            cgroups: None,
            log_writer: None,
        })
    }

    /// Apps' output goes through a log writer (`binary __log-writer ...`,
    /// see [`logs`]): stamped per line and rotated by size.
    pub fn with_log_writer(mut self, binary: PathBuf) -> Self {
        self.log_writer = Some(binary);
        self
    }

    /// Starts the log writer of `instance_id` and returns the two ends the
    /// app writes to (stdout, stderr: one pipe).
    fn start_log_writer(
        &self,
        binary: &Path,
        instance_id: &InstanceId,
    ) -> std::io::Result<(Stdio, Stdio)> {
        let (reader, writer) = std::io::pipe()?;
        let mut command = tokio::process::Command::new(binary);
        command
            .arg(logs::WRITER_ARG)
            .arg(self.log_path(instance_id))
            .arg(logs::MAX_BYTES.to_string())
            .arg(logs::KEEP.to_string())
            .env_clear()
            .stdin(Stdio::from(reader))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Not in the app's group: it outlives the app's last line.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn()?;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok((Stdio::from(writer.try_clone()?), Stdio::from(writer)))
    }

    /// Limits from cgroup v2: each workload in its own cgroup under
    /// `cgroups`, with memory.max and cpu.max.
    pub fn with_cgroups(mut self, cgroups: Cgroups) -> Self {
        self.cgroups = Some(cgroups);
        self
    }

    /// What enforces `memory_mb` and `cpu_millis`, in a line for the log
    /// and the docs.
    pub fn limits(&self) -> String {
        match &self.cgroups {
            Some(cgroups) => format!(
                "cgroup v2 under {} (memory.max, cpu.max)",
                cgroups.root().display()
            ),
            None => "memory: resident-memory watchdog with an RLIMIT_DATA backstop; cpu: reserved, not capped".into(),
        }
    }

    fn record_path(&self, instance_id: &InstanceId) -> PathBuf {
        self.state_dir.join(format!("{instance_id}.json"))
    }

    /// The workload's own, initially empty working directory: it must not
    /// see the agent's (which may hold keys and state).
    pub fn work_dir(&self, instance_id: &InstanceId) -> PathBuf {
        self.sandbox.work_root.join(instance_id.as_str())
    }

    pub fn log_path(&self, instance_id: &InstanceId) -> PathBuf {
        self.state_dir.join(format!("{instance_id}.log"))
    }

    /// The last `bytes` of an instance's log (lossy UTF-8; empty if none).
    async fn log_tail(&self, instance_id: &InstanceId, bytes: u64) -> String {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let Ok(mut file) = tokio::fs::File::open(self.log_path(instance_id)).await else {
            return String::new();
        };
        let length = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let _ = file
            .seek(std::io::SeekFrom::Start(length.saturating_sub(bytes)))
            .await;
        let mut tail = Vec::new();
        let _ = file.take(bytes).read_to_end(&mut tail).await;
        String::from_utf8_lossy(&tail).into_owned()
    }

    async fn read_record(&self, instance_id: &InstanceId) -> Option<ProcessRecord> {
        let bytes = tokio::fs::read(self.record_path(instance_id)).await.ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Runs blocking file-system work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DriverError::Io(format!("driver task failed: {e}")))?
}

/// Makes a workload's private working directory (owned by `user` when it
/// runs as another user).
fn prepare(work_dir: &Path, user: Option<(u32, u32)>) -> Result<(), DriverError> {
    let io = |e: std::io::Error| DriverError::Io(format!("{}: {e}", work_dir.display()));
    std::fs::create_dir_all(work_dir).map_err(io)?;
    std::fs::set_permissions(work_dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(work_dir, Some(uid), Some(gid)).map_err(io)?;
    }
    Ok(())
}

/// Opens a workload's log for it to write straight into (no log writer),
/// 0600 and the agent's: it holds what the app prints, env values
/// included. The app writes it through the descriptor it inherits.
fn open_log(log_path: &Path) -> Result<std::fs::File, DriverError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(log_path)
        .map_err(|e| DriverError::Io(format!("{}: {e}", log_path.display())))
}

/// Field 22 of /proc/<pid>/stat, and whether the process is a zombie.
fn proc_start_ticks(pid: i32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: parse after the last ')'.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = *fields.first()?;
    let ticks = fields.get(19)?.parse().ok()?;
    Some((ticks, state == "Z"))
}

/// CPU ticks (utime + stime) and resident pages of each process, by its
/// process group: one pass over /proc.
fn usage_by_group() -> HashMap<i32, (u64, u64)> {
    let mut groups: HashMap<i32, (u64, u64)> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return groups;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((group, ticks, pages)) = parse_usage(&stat) {
            let total = groups.entry(group).or_default();
            total.0 += ticks;
            total.1 += pages;
        }
    }
    groups
}

/// (process group, utime + stime, rss pages) from a /proc/<pid>/stat line.
fn parse_usage(stat: &str) -> Option<(i32, u64, u64)> {
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the name, from 0: state ppid pgrp ... utime(11) stime(12) ... rss(21).
    let group = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss: i64 = fields.get(21)?.parse().ok()?;
    Some((group, utime + stime, rss.max(0) as u64))
}

/// Clock ticks per second and the page size, for /proc's numbers.
fn tick_and_page() -> (f64, u64) {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|v| *v > 0)
        .unwrap_or(100);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .filter(|v| *v > 0)
        .unwrap_or(4096);
    (hz as f64, page as u64)
}

type ExitReceiver = tokio::sync::watch::Receiver<Option<std::process::ExitStatus>>;

/// How long `status` waits for the reaper of a process that just died.
const REAP_WAIT: Duration = Duration::from_secs(2);

fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

fn is_alive(record: &ProcessRecord) -> bool {
    matches!(proc_start_ticks(record.pid), Some((ticks, false)) if ticks == record.start_ticks)
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, spec: &WorkloadSpec) -> Result<Workload, DriverError> {
        let Program::Process { argv } = &spec.program else {
            return Err(DriverError::Start {
                program: spec.app.clone(),
                reason: "not a process workload".into(),
            });
        };
        if let Some(existing) = self.read_record(&spec.instance_id).await
            && is_alive(&existing)
        {
            return Ok(existing.workload);
        }
        let vars = crate::platform_env(spec, spec.host_port);
        let argv = substitute(argv, &vars);
        let (program, args) = argv.split_first().ok_or_else(|| DriverError::Start {
            program: String::new(),
            reason: "empty command".into(),
        })?;
        let work_dir = self.work_dir(&spec.instance_id);
        {
            let work_dir = work_dir.clone();
            let user = self.sandbox.user;
            blocking(move || prepare(&work_dir, user)).await?;
        }
        let through_writer = match &self.log_writer {
            Some(binary) => match self.start_log_writer(binary, &spec.instance_id) {
                Ok(ends) => Some(ends),
                Err(e) => {
                    tracing::warn!(instance = %spec.instance_id, "log writer {} did not start, output goes to the log unstamped: {e}", binary.display());
                    None
                }
            },
            None => None,
        };
        let (stdout, stderr) = match through_writer {
            Some(ends) => ends,
            None => {
                let log_path = self.log_path(&spec.instance_id);
                let log = blocking(move || open_log(&log_path)).await?;
                let log_err = log
                    .try_clone()
                    .map_err(|e| DriverError::Io(e.to_string()))?;
                (Stdio::from(log), Stdio::from(log_err))
            }
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("LANG", "C.UTF-8")
            .envs(&spec.env)
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .current_dir(&work_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own group: signals reach its children too, and a crash of
            // the agent does not take the workload with it.
            .process_group(0)
            .kill_on_drop(false);
        if let Some((uid, gid)) = self.sandbox.user {
            // std drops supplementary groups too when switching from root.
            command.uid(uid).gid(gid);
        }
        let memory_limit = u64::from(spec.memory_mb) * 1024 * 1024;
        if let Some(cgroups) = &self.cgroups {
            let (cgroups, id, cpu) = (cgroups.clone(), spec.instance_id.clone(), spec.cpu_millis);
            let procs = blocking(move || cgroups.create(&id, memory_limit, cpu)).await?;
            join_before_exec(&mut command, procs);
        } else if memory_limit > 0 {
            limit_memory(&mut command, data_backstop(memory_limit));
        }
        let mut child = command.spawn().map_err(|e| DriverError::Start {
            program: program.clone(),
            reason: e.to_string(),
        })?;
        let pid = child.id().ok_or_else(|| DriverError::Start {
            program: program.clone(),
            reason: "exited at once".into(),
        })? as i32;
        let start_ticks = proc_start_ticks(pid).map(|(t, _)| t).unwrap_or_default();
        let workload = Workload {
            instance_id: spec.instance_id.clone(),
            app: spec.app.clone(),
            spec_hash: spec.spec_hash.clone(),
            host_port: spec.host_port,
        };
        let record = ProcessRecord {
            workload: workload.clone(),
            pid,
            start_ticks,
            memory_limit,
            cgroup: self.cgroups.is_some(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| DriverError::Io(e.to_string()))?;
        let path = self.record_path(&spec.instance_id);
        blocking(move || {
            write_owner_only(&path, &bytes).map_err(|e| DriverError::Io(e.to_string()))
        })
        .await?;
        if memory_limit > 0 && self.cgroups.is_none() {
            self.memory
                .watch(&spec.instance_id, pid, start_ticks, memory_limit);
        }
        let (exited, receiver) = tokio::sync::watch::channel(None);
        self.exits
            .lock()
            .expect("exits lock poisoned")
            .insert(spec.instance_id.clone(), receiver);
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = exited.send(Some(status));
            }
        });
        Ok(workload)
    }

    async fn stop(&self, instance_id: &InstanceId, grace: Duration) -> Result<(), DriverError> {
        if let Some(record) = self.read_record(instance_id).await {
            if is_alive(&record) {
                let group = Pid::from_raw(record.pid);
                let _ = killpg(group, Signal::SIGTERM);
                let deadline = tokio::time::Instant::now() + grace;
                while is_alive(&record) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if is_alive(&record) {
                    let _ = killpg(group, Signal::SIGKILL);
                }
            }
            if record.cgroup
                && let Some(cgroups) = self.cgroups.clone()
            {
                let id = instance_id.clone();
                let _ = blocking(move || {
                    cgroups.remove(&id);
                    Ok(())
                })
                .await;
            }
            let _ = tokio::fs::remove_file(self.record_path(instance_id)).await;
            for log in logs::files(&self.log_path(instance_id)) {
                let _ = tokio::fs::remove_file(log).await;
            }
            let _ = tokio::fs::remove_dir_all(self.work_dir(instance_id)).await;
        }
        self.exits
            .lock()
            .expect("exits lock poisoned")
            .remove(instance_id);
        self.memory.forget(instance_id);
        Ok(())
    }

    async fn status(&self, instance_id: &InstanceId) -> Result<WorkloadStatus, DriverError> {
        let Some(record) = self.read_record(instance_id).await else {
            return Ok(WorkloadStatus::Missing);
        };
        let receiver = self
            .exits
            .lock()
            .expect("exits lock poisoned")
            .get(instance_id)
            .cloned();
        if let Some(mut receiver) = receiver {
            // Dead (or a zombie) but not reaped yet: its reaper delivers the
            // status in a moment, and the exit code is what a user debugs a
            // crash with, so wait for it rather than report none.
            if receiver.borrow().is_none() {
                // One look decides: a second one could see it die between.
                if is_alive(&record) {
                    return Ok(WorkloadStatus::Running);
                }
                let _ = tokio::time::timeout(REAP_WAIT, receiver.wait_for(Option::is_some)).await;
            }
            let exited = *receiver.borrow();
            if let Some(status) = exited {
                let mut reason = match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exited with code {code}"),
                    (None, Some(signal)) => format!("killed by signal {signal}"),
                    _ => "exited".to_string(),
                };
                let mib = |bytes: u64| bytes / (1024 * 1024);
                let oom_kills = match (&self.cgroups, record.cgroup) {
                    (Some(cgroups), true) => cgroups.oom_kills(instance_id),
                    _ => 0,
                };
                if oom_kills > 0 {
                    reason = format!(
                        "out of memory: it reached its memory_mb ({} MiB) and the kernel killed it ({reason})",
                        mib(record.memory_limit)
                    );
                } else if let Some(resident) = self.memory.killed_at(instance_id) {
                    reason = format!(
                        "out of memory: it held {} MiB, over its memory_mb ({} MiB), and was killed",
                        mib(resident),
                        mib(record.memory_limit)
                    );
                } else if record.memory_limit > 0 && !status.success() {
                    let tail = self.log_tail(instance_id, 8 * 1024).await;
                    if says_out_of_memory(&tail) {
                        reason = format!(
                            "out of memory: an allocation failed at its limit ({} MiB of private memory for memory_mb {} MiB) and it {reason}",
                            mib(data_backstop(record.memory_limit)),
                            mib(record.memory_limit)
                        );
                    }
                }
                return Ok(WorkloadStatus::Exited {
                    code: status.code().map(i64::from),
                    reason,
                });
            }
        }
        if is_alive(&record) {
            // Adopted after a restart: watched from here on.
            if record.memory_limit > 0 && !record.cgroup && !self.memory.is_watched(instance_id) {
                self.memory.watch(
                    instance_id,
                    record.pid,
                    record.start_ticks,
                    record.memory_limit,
                );
            }
            Ok(WorkloadStatus::Running)
        } else {
            Ok(WorkloadStatus::Exited {
                code: None,
                reason: "process is gone".into(),
            })
        }
    }

    async fn list(&self) -> Result<Vec<Workload>, DriverError> {
        let state_dir = self.state_dir.clone();
        blocking(move || {
            let entries =
                std::fs::read_dir(&state_dir).map_err(|e| DriverError::Io(e.to_string()))?;
            let mut out = Vec::new();
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "json")
                    && let Ok(bytes) = std::fs::read(&path)
                    && let Ok(record) = serde_json::from_slice::<ProcessRecord>(&bytes)
                {
                    out.push(record.workload);
                }
            }
            out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
            Ok(out)
        })
        .await
    }

    async fn usage(&self) -> Result<Vec<(InstanceId, Usage)>, DriverError> {
        let state_dir = self.state_dir.clone();
        let cgroups = self.cgroups.clone();
        blocking(move || {
            let entries =
                std::fs::read_dir(&state_dir).map_err(|e| DriverError::Io(e.to_string()))?;
            let records: Vec<ProcessRecord> = entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|bytes| serde_json::from_slice::<ProcessRecord>(&bytes).ok())
                .filter(is_alive)
                .collect();
            if records.is_empty() {
                return Ok(Vec::new());
            }
            let groups = usage_by_group();
            let (hz, page) = tick_and_page();
            Ok(records
                .into_iter()
                .filter_map(|record| {
                    // In its own cgroup, the cgroup counts what its
                    // processes used, also those that left the group.
                    if record.cgroup
                        && let Some(cgroups) = &cgroups
                        && let (Some(cpu_seconds), Some(memory_bytes)) = (
                            cgroups.cpu_seconds(&record.workload.instance_id),
                            cgroups.memory_current(&record.workload.instance_id),
                        )
                    {
                        return Some((
                            record.workload.instance_id,
                            Usage {
                                cpu_seconds,
                                memory_bytes,
                                network: None,
                            },
                        ));
                    }
                    let (ticks, pages) = *groups.get(&record.pid)?;
                    Some((
                        record.workload.instance_id,
                        Usage {
                            cpu_seconds: ticks as f64 / hz,
                            memory_bytes: pages * page,
                            network: None,
                        },
                    ))
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_parsed_after_the_last_parenthesis() {
        // A command name with spaces and a ')' in it.
        let stat = "4242 (we ird) (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5000 1000000 250 18446744073709551615";
        assert_eq!(parse_usage(stat), Some((4242, 10, 250)));
        assert_eq!(parse_usage("garbage"), None);
        assert_eq!(parse_usage("1 (x) S 1"), None);
    }

    #[test]
    fn reads_start_time_of_this_process() {
        let me = std::process::id() as i32;
        let (ticks, zombie) = proc_start_ticks(me).unwrap();
        assert!(ticks > 0);
        assert!(!zombie);
        assert!(proc_start_ticks(i32::MAX).is_none());
    }
}
