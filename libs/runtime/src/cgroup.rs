//! cgroup v2 limits for process workloads, where the host delegates a
//! cgroup to the agent.
//!
//! Each instance gets its own cgroup under the agent's (`<root>/<instance>`)
//! with `memory.max` (and `memory.swap.max` = 0) from `memory_mb` and
//! `cpu.max` from `cpu_millis`; the child joins it before exec, so the
//! program never runs outside it. The kernel then enforces both: a
//! workload over its memory is OOM-killed (counted in `memory.events`),
//! and one over its CPU is throttled. Usage is read from `memory.current`
//! and `cpu.stat`.
//!
//! Everything here is files, as the kernel's cgroup v2 interface is
//! (Documentation/admin-guide/cgroup-v2.rst); [`Cgroups::at`] takes any
//! directory, which is what the tests use as a double of cgroupfs. Only
//! [`Cgroups::detect`] looks at the real one.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use capstan_types::InstanceId;

use crate::DriverError;

/// The scheduling period `cpu.max` quotas are counted in, microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// A cgroup v2 directory the agent owns, whose children may use the
/// memory and cpu controllers.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
}

/// How the agent picks where process limits come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v2 when the agent's own cgroup is delegated to it, else
    /// rlimits and the memory watchdog.
    Auto,
    /// Never cgroups: rlimits and the memory watchdog.
    Off,
    /// This directory, which must be a cgroup v2 the agent may write.
    At(PathBuf),
}

impl CgroupMode {
    /// `auto`, `off` or an absolute path.
    pub fn parse(field: &str, text: &str) -> Result<CgroupMode, capstan_types::Error> {
        match text {
            "auto" => Ok(CgroupMode::Auto),
            "off" => Ok(CgroupMode::Off),
            path if path.starts_with('/') => Ok(CgroupMode::At(PathBuf::from(path))),
            _ => Err(capstan_types::Error::invalid(
                field,
                format!(
                    "`{text}`: expected auto, off, or an absolute path to a cgroup v2 directory"
                ),
            )),
        }
    }

    /// The cgroups to use, or why there are none (for the agent's log).
    pub fn resolve(&self) -> Result<Cgroups, String> {
        match self {
            CgroupMode::Off => Err("turned off (--cgroup-root off)".into()),
            CgroupMode::Auto => Cgroups::detect(),
            CgroupMode::At(path) => {
                if !is_cgroup2(path) {
                    return Err(format!(
                        "{} is not on a cgroup v2 file system",
                        path.display()
                    ));
                }
                Cgroups::at(path).map_err(|e| e.to_string())
            }
        }
    }
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn io(path: &Path, e: std::io::Error) -> DriverError {
    DriverError::Io(format!("{}: {e}", path.display()))
}

/// Enables the memory and cpu controllers for the children of `dir`.
fn delegate_controllers(dir: &Path) -> Result<(), DriverError> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).unwrap_or_default();
    let has = |c: &str| enabled.split_whitespace().any(|e| e == c);
    if has("memory") && has("cpu") {
        return Ok(());
    }
    std::fs::write(&control, "+memory +cpu").map_err(|e| io(&control, e))
}

impl Cgroups {
    /// Workloads' cgroups go under `root`, which must exist; its children
    /// get the memory and cpu controllers.
    pub fn at(root: &Path) -> Result<Cgroups, DriverError> {
        if !root.is_dir() {
            return Err(DriverError::Io(format!(
                "{}: no such cgroup directory",
                root.display()
            )));
        }
        delegate_controllers(root)?;
        Ok(Cgroups {
            root: root.to_path_buf(),
        })
    }

    /// The agent's own cgroup, when the host delegates it (systemd's
    /// `Delegate=yes`, or a container with its own cgroup namespace): the
    /// agent moves itself into `<own>/agent` (cgroup v2 lets only a cgroup
    /// without processes hand controllers to its children) and puts
    /// workloads under `<own>/workloads`.
    pub fn detect() -> Result<Cgroups, String> {
        let mount = Path::new("/sys/fs/cgroup");
        if !is_cgroup2(mount) {
            return Err("the host's /sys/fs/cgroup is not cgroup v2".into());
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let own = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or("/proc/self/cgroup names no cgroup v2 path")?;
        let own = mount.join(own.trim_start_matches('/'));
        let writable = nix::unistd::access(&own, nix::unistd::AccessFlags::W_OK).is_ok();
        if !writable {
            return Err(format!("{} is not delegated to this agent", own.display()));
        }
        let agent = own.join("agent");
        let setup = || -> Result<Cgroups, DriverError> {
            std::fs::create_dir_all(&agent).map_err(|e| io(&agent, e))?;
            let procs = agent.join("cgroup.procs");
            std::fs::write(&procs, std::process::id().to_string()).map_err(|e| io(&procs, e))?;
            delegate_controllers(&own)?;
            let workloads = own.join("workloads");
            std::fs::create_dir_all(&workloads).map_err(|e| io(&workloads, e))?;
            Cgroups::at(&workloads)
        };
        setup().map_err(|e| e.to_string())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: &InstanceId) -> PathBuf {
        // Instance ids are checked DNS-label-like names: one path component.
        self.root.join(id.as_str())
    }

    /// Makes the instance's cgroup with its limits (0: none) and opens its
    /// `cgroup.procs`, which the child writes itself into before exec.
    pub fn create(
        &self,
        id: &InstanceId,
        memory_bytes: u64,
        cpu_millis: u32,
    ) -> Result<std::fs::File, DriverError> {
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let write = |name: &str, value: String| {
            let path = dir.join(name);
            std::fs::write(&path, value).map_err(|e| io(&path, e))
        };
        write(
            "memory.max",
            if memory_bytes == 0 {
                "max".into()
            } else {
                memory_bytes.to_string()
            },
        )?;
        // Limited memory is not to be dodged by swapping; a kernel without
        // swap accounting has no such file, which is as good.
        if memory_bytes > 0 && dir.join("memory.swap.max").exists() {
            write("memory.swap.max", "0".into())?;
        }
        write("cpu.max", cpu_max(cpu_millis))?;
        let procs = dir.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|e| io(&procs, e))
    }

    /// Bytes the instance's cgroup holds (`memory.current`).
    pub fn memory_current(&self, id: &InstanceId) -> Option<u64> {
        std::fs::read_to_string(self.dir(id).join("memory.current"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// CPU seconds the instance's cgroup used (`cpu.stat`'s usage_usec).
    pub fn cpu_seconds(&self, id: &InstanceId) -> Option<f64> {
        let stat = std::fs::read_to_string(self.dir(id).join("cpu.stat")).ok()?;
        let usec: u64 = keyed(&stat, "usage_usec")?;
        Some(usec as f64 / 1e6)
    }

    /// How many times the kernel OOM-killed in the instance's cgroup
    /// (`memory.events`' oom_kill).
    pub fn oom_kills(&self, id: &InstanceId) -> u64 {
        std::fs::read_to_string(self.dir(id).join("memory.events"))
            .ok()
            .and_then(|events| keyed(&events, "oom_kill"))
            .unwrap_or(0)
    }

    /// Kills what is left in the instance's cgroup (`cgroup.kill`, Linux
    /// 5.14) and removes it. A cgroup still holding processes stays.
    pub fn remove(&self, id: &InstanceId) {
        let dir = self.dir(id);
        let kill = dir.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, "1");
        }
        if let Err(e) = std::fs::remove_dir(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!("cgroup {} not removed: {e}", dir.display());
        }
    }
}

/// The least CPU a cap can hold: the kernel refuses a CFS quota under
/// 1 ms a period (100 ms), so a reservation below 10 millicores is capped
/// at 10, by cgroups here and by Docker alike.
pub const MIN_CPU_MILLIS: u32 = 10;

/// The CPU cap, in millicores, of a reservation of `millis` (0: none).
pub fn enforced_cpu_millis(millis: u32) -> u32 {
    if millis == 0 {
        0
    } else {
        millis.max(MIN_CPU_MILLIS)
    }
}

/// `cpu.max` for a reservation of `millis` thousandths of a core.
pub fn cpu_max(millis: u32) -> String {
    match enforced_cpu_millis(millis) {
        0 => format!("max {CPU_PERIOD_US}"),
        millis => format!(
            "{} {CPU_PERIOD_US}",
            u64::from(millis) * CPU_PERIOD_US / 1000
        ),
    }
}

/// The value of `key` in a flat-keyed cgroup file ("key value" lines).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Puts the child `command` starts into the cgroup whose `cgroup.procs`
/// is `procs` before it execs: writing "0" moves the writer.
#[allow(unsafe_code)]
pub(crate) fn join_before_exec(command: &mut tokio::process::Command, procs: std::fs::File) {
    let fd = procs.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec. It makes
    // one async-signal-safe system call (write) on a descriptor opened by
    // the parent, allocates nothing and touches no lock. `procs` is moved
    // into the closure, so the descriptor stays open until the command is
    // dropped after spawning.
    unsafe {
        command.pre_exec(move || {
            let _keep = &procs;
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_is_a_quota_per_period() {
        assert_eq!(cpu_max(0), "max 100000");
        assert_eq!(cpu_max(500), "50000 100000");
        assert_eq!(cpu_max(2000), "200000 100000");
        assert_eq!(cpu_max(1), "1000 100000");
    }

    #[test]
    fn keyed_files_are_read_by_key() {
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(1));
        assert_eq!(keyed(events, "missing"), None);
    }

    #[test]
    fn modes_parse_with_the_field_named() {
        assert_eq!(CgroupMode::parse("f", "auto").unwrap(), CgroupMode::Auto);
        assert_eq!(CgroupMode::parse("f", "off").unwrap(), CgroupMode::Off);
        assert_eq!(
            CgroupMode::parse("f", "/sys/fs/cgroup/x").unwrap(),
            CgroupMode::At("/sys/fs/cgroup/x".into())
        );
        let error = CgroupMode::parse("--cgroup-root", "relative").unwrap_err();
        assert!(error.to_string().contains("--cgroup-root"), "{error}");
    }
}
