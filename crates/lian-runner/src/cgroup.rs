//! A cgroup per lease, with the tier's memory and cpu limits, on cgroup v1 or v2. The lease's
//! Docker engine runs its containers (BuildKit's RUN steps) below it, so its counters tell
//! whether the build ran out of memory and how much it used.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

fn version() -> Version {
    if Path::new(ROOT).join("cgroup.controllers").exists() {
        Version::V2
    } else {
        Version::V1
    }
}

#[derive(Debug, Clone)]
pub struct LeaseCgroup {
    name: String,
    version: Version,
}

fn write(path: PathBuf, value: &str) -> std::io::Result<()> {
    std::fs::write(&path, value).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn read_u64(path: PathBuf) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `key value` line of a flat-keyed cgroup file.
fn read_key(path: PathBuf, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

impl LeaseCgroup {
    /// The cgroup of a lease (whether or not it exists yet); `name` is a subject token.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            version: version(),
        }
    }

    /// The path the lease's engine is told with `--cgroup-parent`.
    pub fn parent_arg(&self) -> String {
        format!("/{}", self.name)
    }

    /// Creates the cgroup with a memory limit and a cpu quota.
    pub fn create(&self, memory_bytes: u64, cpus: u32) -> std::io::Result<()> {
        let quota = u64::from(cpus) * 100_000;
        match self.version {
            Version::V1 => {
                let mem = Path::new(ROOT).join("memory").join(&self.name);
                std::fs::create_dir_all(&mem)?;
                write(mem.join("memory.limit_in_bytes"), &memory_bytes.to_string())?;
                let cpu = Path::new(ROOT).join("cpu").join(&self.name);
                std::fs::create_dir_all(&cpu)?;
                write(cpu.join("cpu.cfs_period_us"), "100000")?;
                write(cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
            Version::V2 => {
                // Controllers must be enabled for the children of the root first.
                let _ = write(Path::new(ROOT).join("cgroup.subtree_control"), "+memory +cpu");
                let dir = Path::new(ROOT).join(&self.name);
                std::fs::create_dir_all(&dir)?;
                write(dir.join("memory.max"), &memory_bytes.to_string())?;
                write(dir.join("cpu.max"), &format!("{quota} 100000"))?;
                let _ = write(dir.join("cgroup.subtree_control"), "+memory +cpu");
            }
        }
        Ok(())
    }

    /// Memory in use now, in bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        match self.version {
            Version::V1 => read_u64(
                Path::new(ROOT)
                    .join("memory")
                    .join(&self.name)
                    .join("memory.usage_in_bytes"),
            ),
            Version::V2 => read_u64(Path::new(ROOT).join(&self.name).join("memory.current")),
        }
    }

    /// CPU time used so far, in nanoseconds.
    pub fn cpu_ns(&self) -> Option<u64> {
        match self.version {
            Version::V1 => {
                read_u64(Path::new(ROOT).join("cpuacct").join(&self.name).join("cpuacct.usage")).or_else(|| {
                    read_u64(
                        Path::new(ROOT)
                            .join("cpu,cpuacct")
                            .join(&self.name)
                            .join("cpuacct.usage"),
                    )
                })
            }
            Version::V2 => read_key(Path::new(ROOT).join(&self.name).join("cpu.stat"), "usage_usec").map(|u| u * 1000),
        }
    }

    /// Whether anything in the cgroup was OOM-killed or hit the memory limit. On v1 the
    /// killed step's own cgroup is gone by the time we look, so the limit's fail count of
    /// the lease cgroup is the evidence.
    pub fn hit_memory_limit(&self) -> bool {
        match self.version {
            Version::V1 => {
                let mem = Path::new(ROOT).join("memory").join(&self.name);
                read_key(mem.join("memory.oom_control"), "oom_kill").unwrap_or(0) > 0
                    || read_u64(mem.join("memory.failcnt")).unwrap_or(0) > 0
            }
            Version::V2 => {
                let events = Path::new(ROOT).join(&self.name).join("memory.events");
                read_key(events.clone(), "oom_kill").unwrap_or(0) > 0 || read_key(events, "oom ").unwrap_or(0) > 0
            }
        }
    }

    /// Every directory of this cgroup, deepest first, in every hierarchy.
    fn dirs(&self) -> Vec<PathBuf> {
        let tops: Vec<PathBuf> = match self.version {
            Version::V2 => vec![Path::new(ROOT).join(&self.name)],
            Version::V1 => std::fs::read_dir(ROOT)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join(&self.name))
                .filter(|p| p.is_dir())
                .collect(),
        };
        let mut all = Vec::new();
        for top in tops {
            let mut stack = vec![top];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.path().is_dir() {
                        stack.push(e.path());
                    }
                }
                all.push(d);
            }
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        all
    }

    pub fn exists(&self) -> bool {
        !self.dirs().is_empty()
    }

    /// Removes the cgroup (it must have no process left).
    pub fn remove(&self) -> std::io::Result<()> {
        for dir in self.dirs() {
            if let Err(e) = std::fs::remove_dir(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_cgroup_gets_its_limits_and_goes_away() {
        assert!(is_root(), "this test creates a cgroup: run it as root (CI does)");
        let cg = LeaseCgroup::named(&format!("lian-unit-{}", std::process::id()));
        cg.create(64 * 1024 * 1024, 2).unwrap();
        assert!(cg.exists());
        assert!(cg.memory_bytes().is_some());
        assert!(!cg.hit_memory_limit());
        let limit = match cg.version {
            Version::V1 => read_u64(
                Path::new(ROOT)
                    .join("memory")
                    .join(&cg.name)
                    .join("memory.limit_in_bytes"),
            ),
            Version::V2 => read_u64(Path::new(ROOT).join(&cg.name).join("memory.max")),
        };
        assert_eq!(limit, Some(64 * 1024 * 1024));
        cg.remove().unwrap();
        assert!(!cg.exists());
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }
}
