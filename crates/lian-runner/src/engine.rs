//! A Docker engine per lease: its own data root, exec root, socket and pid file, its build
//! containers under the lease's cgroup (`--cgroup-parent`), so the tier's memory and cpu
//! limits apply to the build and its counters measure it. Images move between the host
//! engine and the lease engine with `docker save | docker load`: parents in before the
//! build, the result out after it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lian_core::names::path_token;

use crate::cgroup::LeaseCgroup;

/// Sockets and exec roots (containerd's sockets are in it) live here, named by a short
/// token of the lease, not under the state directory: a unix socket path has 108 bytes.
const SOCKETS: &str = "/run/lian";

#[derive(Debug, Clone)]
pub struct LeaseEngine {
    root: PathBuf,
    /// Names its socket and cgroup: the lease key, or a warm pool slot.
    name: String,
    pub cgroup: LeaseCgroup,
}

impl LeaseEngine {
    /// The engine kept in `root`, named `name`.
    pub fn at(root: &Path, name: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            name: name.to_string(),
            cgroup: LeaseCgroup::named(&format!("lian-{}", path_token(name))),
        }
    }

    /// Its Docker data root: images, layers, BuildKit's cache.
    pub fn data_root(&self) -> PathBuf {
        self.root.join("data")
    }

    fn socket_path(&self) -> PathBuf {
        Path::new(SOCKETS).join(format!("{}.sock", path_token(&self.name)))
    }

    fn exec_root(&self) -> PathBuf {
        Path::new(SOCKETS).join(path_token(&self.name))
    }

    /// Whether its dockerd process is alive.
    pub fn running(&self) -> bool {
        self.pid().is_some_and(Self::alive)
    }

    /// `DOCKER_HOST` for this engine.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.root.join("docker.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn alive(pid: i32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    }

    async fn answers(&self, cli: &Path) -> bool {
        tokio::process::Command::new(cli)
            .args(["-H", &self.host(), "version", "--format", "{{.Server.Version}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    /// Starts the engine unless it runs already; returns once it answers.
    pub(crate) async fn start(&self, cli: &Path, memory_bytes: u64, cpus: u32) -> Result<(), String> {
        if self.pid().is_some_and(Self::alive) && self.answers(cli).await {
            return Ok(());
        }
        self.cgroup
            .create(memory_bytes, cpus)
            .map_err(|e| format!("cannot create the lease cgroup: {e}"))?;
        std::fs::create_dir_all(SOCKETS).map_err(|e| format!("{SOCKETS}: {e}"))?;
        let log = std::fs::File::create(self.root.join("dockerd.log")).map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(self.data_root())
            .arg("--exec-root")
            .arg(self.exec_root())
            .arg("--pidfile")
            .arg(self.root.join("docker.pid"))
            .arg("-H")
            .arg(self.host())
            .arg(format!("--cgroup-parent={}", self.cgroup.parent_arg()))
            .args(["--iptables=false", "--bridge=none"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // Its own process group: the engine outlives a worker that dies, so the worker
        // taking over the build finds it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn()
            .map_err(|e| format!("cannot start dockerd (apt-get install docker.io): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers(cli).await {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(format!("the lease's dockerd did not answer within 30 s: {tail}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Stops the engine and removes its cgroup; stopping a stopped engine succeeds. `true`
    /// when it shut down by itself (not killed): its data root is whole.
    pub(crate) async fn stop(&self) -> Result<bool, String> {
        let mut clean = true;
        if let Some(pid) = self.pid() {
            // SAFETY: signalling a process by pid.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Self::alive(pid) {
                if self.shut_down(pid) {
                    // Its stores are closed and its containerd is gone; what dockerd does
                    // next (about 2.5 s of waiting on the containerd it already stopped)
                    // holds nothing of the data root.
                    // SAFETY: as above.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                } else if Instant::now() > deadline {
                    // SAFETY: as above.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    clean = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let _ = std::fs::remove_file(self.socket_path());
        let _ = std::fs::remove_dir_all(self.exec_root());
        let mut last = Ok(());
        for _ in 0..50 {
            last = self.cgroup.remove();
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last.map(|()| clean)
            .map_err(|e| format!("cannot remove the lease cgroup: {e}"))
    }

    /// Whether dockerd `pid` has logged the end of its shutdown and has no child left.
    fn shut_down(&self, pid: i32) -> bool {
        let no_children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).is_ok_and(|c| c.trim().is_empty());
        no_children && log_tail(&self.root.join("dockerd.log")).contains("Daemon shutdown complete")
    }

    /// Copies `image` from the engine at `from` to the engine at `to` (`None`: the host's).
    pub(crate) async fn copy_image(
        cli: &Path,
        image: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<(), String> {
        let with_host = |host: Option<&str>| {
            let mut c = tokio::process::Command::new(cli);
            if let Some(h) = host {
                c.args(["-H", h]);
            }
            c
        };
        let mut save = with_host(from)
            .args(["save", image])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out: Stdio = save
            .stdout
            .take()
            .expect("piped")
            .try_into()
            .map_err(|e: std::io::Error| e.to_string())?;
        let load = with_host(to).arg("load").stdin(out).stdout(Stdio::null()).output();
        let (saved, loaded) = tokio::join!(save.wait(), load);
        let loaded = loaded.map_err(|e| e.to_string())?;
        if !saved.map_err(|e| e.to_string())?.success() || !loaded.status.success() {
            return Err(format!(
                "cannot copy image {image}: {}",
                String::from_utf8_lossy(&loaded.stderr).trim()
            ));
        }
        Ok(())
    }
}

/// The last few KiB of a log file.
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let _ = file
        .seek(SeekFrom::End(-4096))
        .or_else(|_| file.seek(SeekFrom::Start(0)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).into_owned()
}
