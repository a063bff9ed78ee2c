//! `lian up`'s supervisor: it starts the fleet's children (nats-server, the registry, the S3
//! store, the control plane, workers, the cascade), watches each one, restarts one that
//! dies with exponential backoff (`backon`) and says so on stderr and in `logs/up.log`, gives
//! up on a child that keeps failing fast (the fleet then stops with an error naming it), and
//! stops them all in parallel with a grace period: the roles first, then the stores they
//! talk to. Nothing here blocks the runtime: waits are tokio timers and `Child::wait`.
//!
//! Ports stay what `lian up` printed. A child of ours (the control plane) gets its listening
//! sockets from `lian up` as inherited descriptors, bound once and held for the fleet's life,
//! so a restart finds its port still ours. A child that cannot take a descriptor
//! (nats-server, docker-registry, weed) is started on a port picked free and, when it fails
//! before it listens, on a fresh one (`start_on_free_ports`); a restart reuses its port.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use backon::BackoffBuilder;
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The order children stop in: roles (which talk to the stores) before the stores.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tier {
    Store,
    Role,
}

/// How a fleet reacts to a child's death.
#[derive(Clone, Copy, Debug)]
pub struct RestartPolicy {
    /// The first delay; each fast failure in a row doubles it, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Restarts after fast failures in a row before the fleet gives up.
    pub max_fast_failures: usize,
    /// A child that ran this long before it died was healthy: its backoff starts over.
    pub healthy_after: Duration,
    /// SIGTERM, then this long, then SIGKILL.
    pub grace: Duration,
    /// How long a starting child may take to be ready.
    pub ready_within: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_fast_failures: 5,
            healthy_after: Duration::from_secs(60),
            grace: Duration::from_secs(10),
            ready_within: Duration::from_secs(30),
        }
    }
}

impl RestartPolicy {
    fn backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.first_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_max_times(self.max_fast_failures)
            .build()
    }
}

/// How to start one child, again and again.
pub struct Spec {
    pub name: String,
    pub tier: Tier,
    /// A fresh command for every start.
    pub command: Box<dyn Fn() -> std::process::Command + Send + Sync>,
    /// Its stdout and stderr (appended to on a restart).
    pub log: PathBuf,
    /// Files it leaves behind when killed, removed after each exit.
    pub cleanup: Vec<PathBuf>,
    /// Listening sockets held by the supervisor, given to the child as these descriptors.
    pub fds: Vec<(Arc<std::net::TcpListener>, RawFd)>,
}

impl Spec {
    pub fn new(
        name: &str,
        tier: Tier,
        log: &Path,
        command: impl Fn() -> std::process::Command + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.to_string(),
            tier,
            command: Box::new(command),
            log: log.to_path_buf(),
            cleanup: Vec::new(),
            fds: Vec::new(),
        }
    }

    pub fn cleanup(mut self, paths: Vec<PathBuf>) -> Self {
        self.cleanup = paths;
        self
    }

    /// Hands `listener` to every start of the child as descriptor `target`.
    pub fn pass(mut self, listener: Arc<std::net::TcpListener>, target: RawFd) -> Self {
        self.fds.push((listener, target));
        self
    }

    fn spawn(&self, append: bool) -> anyhow::Result<Child> {
        let out = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = (self.command)();
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let fds: Vec<(RawFd, RawFd)> = self.fds.iter().map(|(l, target)| (l.as_raw_fd(), *target)).collect();
        // SAFETY: only async-signal-safe calls (prctl, fcntl, dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Killed with us if we die first (the tokio worker thread that forks lives
                // as long as the runtime).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // Out of the way first, so a source that is another's target is not lost.
                let mut high = Vec::with_capacity(fds.len());
                for (source, _) in &fds {
                    let fd = libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, 64);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(fd);
                }
                for (fd, (_, target)) in high.iter().zip(&fds) {
                    // dup2 leaves the new descriptor open across exec.
                    if libc::dup2(*fd, *target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))
    }

    fn remove_leftovers(&self) {
        for path in &self.cleanup {
            let _ = fs::remove_file(path).or_else(|_| fs::remove_dir_all(path));
        }
    }
}

/// Why the fleet gave up.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name} failed {failures} times in a row, each within {healthy:?} of starting (last: {status}); the fleet stops. Its log: {log}"
)]
pub struct GaveUp {
    pub name: String,
    pub failures: usize,
    pub status: String,
    pub healthy: Duration,
    pub log: String,
}

struct Watched {
    tier: Tier,
    task: tokio::task::JoinHandle<()>,
}

/// The children of one `lian up`.
pub struct Supervisor {
    policy: RestartPolicy,
    log: PathBuf,
    children: Vec<Watched>,
    stop_roles: watch::Sender<bool>,
    stop_stores: watch::Sender<bool>,
    gave_up_tx: mpsc::UnboundedSender<GaveUp>,
    gave_up: mpsc::UnboundedReceiver<GaveUp>,
}

impl Supervisor {
    /// A supervisor writing what it does to stderr and to `log`.
    pub fn new(policy: RestartPolicy, log: &Path) -> Self {
        let (gave_up_tx, gave_up) = mpsc::unbounded_channel();
        Self {
            policy,
            log: log.to_path_buf(),
            children: Vec::new(),
            stop_roles: watch::channel(false).0,
            stop_stores: watch::channel(false).0,
            gave_up_tx,
            gave_up,
        }
    }

    /// Starts a child and watches it from now on; with `ready`, first waits (bounded by the
    /// policy) until it holds, and fails with the child's log if the child exits or never
    /// gets there (the child is then stopped and not watched).
    pub async fn start(&mut self, spec: Spec, ready: Option<Ready>) -> anyhow::Result<u32> {
        let mut child = spec.spawn(false)?;
        let pid = child.id().unwrap_or(0);
        if let Some(ready) = ready
            && let Err(err) = wait_ready(&mut child, &spec, &ready, self.policy.ready_within).await
        {
            terminate(&mut child, &spec.name, self.policy.grace, &self.log).await;
            spec.remove_leftovers();
            return Err(err);
        }
        let stop = match spec.tier {
            Tier::Role => self.stop_roles.subscribe(),
            Tier::Store => self.stop_stores.subscribe(),
        };
        let tier = spec.tier;
        let task = tokio::spawn(watch_child(
            child,
            spec,
            self.policy,
            self.log.clone(),
            stop,
            self.gave_up_tx.clone(),
        ));
        self.children.push(Watched { tier, task });
        Ok(pid)
    }

    /// Resolves when a child has failed too often; the caller then stops the fleet.
    pub async fn gave_up(&mut self) -> GaveUp {
        match self.gave_up.recv().await {
            Some(gave_up) => gave_up,
            // The supervisor holds a sender itself: the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// Stops every child: the roles in parallel, then the stores in parallel, each with
    /// SIGTERM and, after the policy's grace, SIGKILL.
    pub async fn stop(self) {
        let (roles, stores): (Vec<_>, Vec<_>) = self.children.into_iter().partition(|w| w.tier == Tier::Role);
        for (signal, tasks) in [(&self.stop_roles, roles), (&self.stop_stores, stores)] {
            let _ = signal.send(true);
            futures::future::join_all(tasks.into_iter().map(|w| w.task)).await;
        }
    }
}

/// What a starting child must do before it counts as started.
pub struct Ready {
    /// Said in the error: "it never {what}".
    pub what: String,
    /// Checked every 50 ms, off the runtime (it may block on a socket).
    pub check: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Ready {
    pub fn new(what: impl Into<String>, check: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self {
            what: what.into(),
            check: Arc::new(check),
        }
    }
}

async fn wait_ready(child: &mut Child, spec: &Spec, ready: &Ready, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let tail = fs::read_to_string(&spec.log).unwrap_or_default();
            bail!(
                "{} did not start: it exited ({}) before it {}; its log ({}):\n{tail}",
                spec.name,
                describe(status),
                ready.what,
                spec.log.display()
            );
        }
        let check = ready.check.clone();
        if tokio::task::spawn_blocking(move || check()).await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let tail = fs::read_to_string(&spec.log).unwrap_or_default();
            bail!(
                "{} did not start: it never {} within {within:?}; its log ({}):\n{tail}",
                spec.name,
                ready.what,
                spec.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// "exit status 3", "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Appends `line` to the supervisor's log, then says it on stderr: whoever reads it on
/// stderr finds it in the log already.
fn say(log: &Path, line: &str) {
    let stamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    if let Ok(mut file) = fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(file, "{stamp} {line}");
    }
    eprintln!("lian up: {line}");
}

/// Watches one child until the fleet stops: restarts it when it dies, gives up after too
/// many fast failures in a row.
async fn watch_child(
    mut child: Child,
    spec: Spec,
    policy: RestartPolicy,
    log: PathBuf,
    mut stop: watch::Receiver<bool>,
    gave_up: mpsc::UnboundedSender<GaveUp>,
) {
    let mut backoff = policy.backoff();
    let mut fast_failures = 0;
    let mut started = Instant::now();
    // Kept here: the child forgets its pid once reaped.
    let mut pid = child.id().unwrap_or(0);
    loop {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stopped(&mut stop) => {
                terminate(&mut child, &spec.name, policy.grace, &log).await;
                spec.remove_leftovers();
                return;
            }
        };
        spec.remove_leftovers();
        let mut status = status.map(describe).unwrap_or_else(|e| format!("unknown status ({e})"));
        let mut ran = started.elapsed();
        loop {
            if ran >= policy.healthy_after {
                backoff = policy.backoff();
                fast_failures = 0;
            }
            let Some(delay) = backoff.next() else {
                let err = GaveUp {
                    name: spec.name.clone(),
                    failures: fast_failures + 1,
                    status,
                    healthy: policy.healthy_after,
                    log: spec.log.display().to_string(),
                };
                say(&log, &format!("giving up: {err}"));
                let _ = gave_up.send(err);
                return;
            };
            fast_failures += 1;
            say(
                &log,
                &format!(
                    "{} (pid {pid}) exited ({status}) after {:.1} s; restarting it in {:.1} s (attempt {fast_failures} of {})",
                    spec.name,
                    ran.as_secs_f64(),
                    delay.as_secs_f64(),
                    policy.max_fast_failures
                ),
            );
            let _ = append_line(
                &spec.log,
                &format!("--- lian up: exited ({status}); restarting in {delay:?}"),
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut stop) => return,
            }
            started = Instant::now();
            match spec.spawn(true) {
                Ok(new) => {
                    pid = new.id().unwrap_or(0);
                    say(&log, &format!("{} restarted (pid {pid})", spec.name));
                    child = new;
                    break;
                }
                Err(err) => {
                    status = format!("{err:#}");
                    ran = Duration::ZERO;
                }
            }
        }
    }
}

/// Resolves once the fleet stops (the guard `wait_for` returns is not held across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    writeln!(fs::OpenOptions::new().append(true).open(path)?, "{line}")
}

/// SIGTERM; after `grace`, SIGKILL.
async fn terminate(child: &mut Child, name: &str, grace: Duration, log: &Path) {
    let Some(pid) = child.id() else { return };
    // SAFETY: signalling our own child, not yet reaped (`id` is None once it is).
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        say(log, &format!("{name} did not stop within {grace:?}; killing it"));
        let _ = child.kill().await;
    }
}

/// Starts a child that takes its ports on its command line, on ports picked free, and on
/// fresh ones when it fails before it is ready (another process took one in between): up
/// to three tries. `make` turns the ports into the child's spec and readiness check.
pub async fn start_on_free_ports<T>(
    supervisor: &mut Supervisor,
    count: usize,
    fixed_first: Option<u16>,
    make: impl Fn(&[u16]) -> anyhow::Result<(Spec, Ready, T)>,
) -> anyhow::Result<T> {
    let mut last = None;
    for _ in 0..3 {
        let mut ports = free_ports(count)?;
        if let Some(port) = fixed_first {
            ports[0] = port;
        }
        let (spec, ready, value) = make(&ports)?;
        match supervisor.start(spec, Some(ready)).await {
            Ok(_) => return Ok(value),
            // A port the user chose is not ours to change.
            Err(err) if fixed_first.is_some() && count == 1 => return Err(err),
            Err(err) => last = Some(err),
        }
    }
    Err(last.expect("three tries").context("three tries on fresh ports failed"))
}

/// `n` distinct ports free on 127.0.0.1 now: all held at once, so none is handed out twice.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> RestartPolicy {
        RestartPolicy {
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            max_fast_failures: 3,
            healthy_after: Duration::from_secs(60),
            grace: Duration::from_millis(300),
            ready_within: Duration::from_secs(5),
        }
    }

    fn sh(dir: &Path, name: &str, script: &'static str) -> Spec {
        Spec::new(name, Tier::Role, &dir.join(format!("{name}.log")), move || {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", script]);
            cmd
        })
    }

    #[tokio::test]
    async fn a_child_that_keeps_failing_fast_is_restarted_then_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("up.log");
        let mut sup = Supervisor::new(quick(), &log);
        sup.start(sh(dir.path(), "flaky", "echo ran; exit 3"), None)
            .await
            .unwrap();
        let gave_up = tokio::time::timeout(Duration::from_secs(10), sup.gave_up())
            .await
            .expect("a verdict within 10 s");
        assert_eq!((gave_up.name.as_str(), gave_up.failures), ("flaky", 4));
        assert_eq!(gave_up.status, "exit status 3");
        let said = fs::read_to_string(&log).unwrap();
        assert_eq!(said.matches("restarting it in").count(), 3, "{said}");
        assert!(said.contains("attempt 3 of 3") && said.contains("giving up"), "{said}");
        // The first start and three restarts ran, each appending to the child's log.
        let runs = fs::read_to_string(dir.path().join("flaky.log")).unwrap();
        assert_eq!(runs.lines().filter(|l| *l == "ran").count(), 4, "{runs}");
        sup.stop().await;
    }

    #[tokio::test]
    async fn stopping_terms_every_child_at_once_and_kills_one_that_ignores_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = Supervisor::new(quick(), &dir.path().join("up.log"));
        let mut pids = Vec::new();
        for i in 0..3 {
            pids.push(
                sup.start(sh(dir.path(), &format!("stubborn-{i}"), "trap '' TERM; sleep 5"), None)
                    .await
                    .unwrap(),
            );
        }
        let polite = sup
            .start(sh(dir.path(), "polite", "exec sleep 60"), None)
            .await
            .unwrap();
        // Started: each is a live process.
        for pid in pids.iter().chain([&polite]) {
            assert!(Path::new(&format!("/proc/{pid}")).exists());
        }
        let began = std::time::Instant::now();
        sup.stop().await;
        let took = began.elapsed();
        // In parallel: three graces of 300 ms in a row would take 900 ms.
        assert!(took < Duration::from_millis(800), "stopping took {took:?}");
        assert!(took >= Duration::from_millis(300), "the grace was not given: {took:?}");
        for pid in pids.iter().chain([&polite]) {
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{pid} still runs");
        }
    }

    #[tokio::test]
    async fn a_child_that_exits_before_it_is_ready_fails_the_start_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = Supervisor::new(quick(), &dir.path().join("up.log"));
        let err = sup
            .start(
                sh(dir.path(), "broken", "echo cannot bind; exit 1"),
                Some(Ready::new("answers", || false)),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("exit status 1") && err.contains("cannot bind"), "{err}");
    }

    #[tokio::test]
    async fn a_passed_listener_is_the_childs_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let listener = Arc::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let port = listener.local_addr().unwrap().port();
        let mut sup = Supervisor::new(quick(), &dir.path().join("up.log"));
        let out = dir.path().join("fd");
        let target = out.clone();
        let spec = Spec::new("fd", Tier::Role, &dir.path().join("fd.log"), move || {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", "readlink /proc/self/fd/3 > \"$1\"; exec sleep 60", "sh"])
                .arg(&target);
            cmd
        })
        .pass(listener.clone(), 3);
        let check = out.clone();
        // The shell creates the file before readlink writes to it: ready once it holds a line.
        let written = move || fs::read_to_string(&check).is_ok_and(|s| s.ends_with('\n'));
        sup.start(spec, Some(Ready::new("wrote", written))).await.unwrap();
        let link = fs::read_to_string(&out).unwrap();
        assert!(link.starts_with("socket:"), "{link}");
        // The supervisor still holds the port.
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
        sup.stop().await;
    }
}
