//! Helpers shared by the end-to-end tests: running `lian` as a user would.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lian_test_support::workspace_root;

/// The `lian` binary Cargo built for these tests.
pub fn lian_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lian"))
}

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(lian_bin());
    cmd.args(args)
        .current_dir(workspace_root())
        // An empty config file: no lian.toml of the tree is read.
        .env("LIAN_CONFIG", "/dev/null")
        .env("LIAN_BUILD_NETWORK", "none")
        .env("LIAN_LOG", "warn")
        .envs(env.iter().copied());
    cmd
}

pub fn lian(args: &[&str]) -> Output {
    lian_with(args, &[])
}

/// `lian ARGS` with extra environment (settings such as LIAN_ACK_WAIT_SECS).
pub fn lian_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).output().expect("lian runs")
}

pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A `lian` process stopped with SIGTERM on drop, the way Ctrl-C stops it.
pub struct Running {
    child: Option<Child>,
    pub stdout_lines: Vec<String>,
    /// What it prints on stdout after `ready`, read by `stop`.
    rest: std::sync::mpsc::Receiver<String>,
    /// Its stderr, line by line, when started with `start_hearing`.
    stderr: Option<std::sync::mpsc::Receiver<String>>,
}

impl Running {
    /// Starts `lian ARGS` and waits (bounded) until it prints a line containing `ready`;
    /// with an empty `ready` it returns at once.
    pub fn start(args: &[&str], ready: &str) -> Self {
        Self::start_with(args, &[], ready)
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)], ready: &str) -> Self {
        Self::spawn(command(args, env).stderr(Stdio::inherit()), args, ready)
    }

    /// Like `start_with`, with the process's log (stderr) written to `log`.
    pub fn start_logged(args: &[&str], env: &[(&str, &str)], log: &Path, ready: &str) -> Self {
        let file = std::fs::File::create(log).expect("a log file");
        Self::spawn(command(args, env).stderr(file), args, ready)
    }

    /// Like `start_with`, with its stderr kept line by line for `wait_stderr` (and echoed).
    pub fn start_hearing(args: &[&str], env: &[(&str, &str)], ready: &str) -> Self {
        let mut running = Self::spawn(command(args, env).stderr(Stdio::piped()), args, ready);
        running.stderr = running
            .child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .map(|stderr| lines_of(stderr, |line| eprintln!("{line}")));
        running
    }

    /// Waits (bounded) for a line on its stderr containing `want`; every line seen before it
    /// is passed over. Needs `start_hearing`.
    pub fn wait_stderr(&self, within: Duration, want: &str) -> String {
        let lines = self.stderr.as_ref().expect("started with start_hearing");
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(want) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no {want:?} on stderr within {within:?}; saw {seen:#?}"),
            }
        }
    }

    fn spawn(cmd: &mut Command, args: &[&str], ready: &str) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("lian starts");
        let stdout = child.stdout.take().unwrap();
        let rx = lines_of(stdout, |_| {});
        let mut lines = Vec::new();
        if !ready.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) => {
                        let done = line.contains(ready);
                        lines.push(line);
                        if done {
                            break;
                        }
                    }
                    Err(_) => panic!("lian {args:?} did not print {ready:?} within 60 s; printed {lines:#?}"),
                }
            }
        }
        Self {
            child: Some(child),
            stdout_lines: lines,
            rest: rx,
            stderr: None,
        }
    }

    /// Stops it as `drop` does and returns every line it printed on stdout.
    pub fn stop(mut self) -> Vec<String> {
        self.terminate();
        let mut lines = std::mem::take(&mut self.stdout_lines);
        // The reader thread ends at the exited process's end of file.
        while let Ok(line) = self.rest.recv_timeout(Duration::from_secs(10)) {
            lines.push(line);
        }
        lines
    }

    /// SIGTERM, as Ctrl-C; waits (20 s at most) for the exit, then SIGKILL.
    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id() as i32;
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        // Wait for the exit itself, bounded; a process that ignores SIGTERM is killed.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = child.wait();
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            // SAFETY: as above; the waiter thread reaps it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = waiter.join();
    }

    /// The URL a `lian control` printed it serves on.
    pub fn served_url(&self) -> String {
        let line = self
            .stdout_lines
            .iter()
            .find(|l| l.contains("serving http://"))
            .expect("a control plane that said where it serves");
        line[line.find("http://").unwrap()..].trim().to_string()
    }
}

impl Running {
    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the process.
    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("a running process");
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
    }

    /// SIGKILL: the process gets no chance to clean up, as in a crash.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines of `from`, read by a thread of their own (each also given to `echo`).
fn lines_of(
    from: impl std::io::Read + Send + 'static,
    echo: impl Fn(&str) + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            echo(&line);
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Drop for Running {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A copy of the example catalog with the static busybox its root layer needs.
pub fn staged_examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&workspace_root().join("examples/catalog"), dir.path());
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("a static busybox (apt-get install busybox-static)");
    std::fs::copy(busybox, dir.path().join("base/busybox")).unwrap();
    dir
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Directives for a test build of `image` in `workspace`, written as JSON into `dir`.
pub fn directives_json(dir: &Path, workspace: &str, image: &str) -> PathBuf {
    let path = dir.join(format!("{}.json", image.replace(['/', ':'], "-")));
    let json = serde_json::json!({
        "workspace": workspace,
        "artifact": {"image": image, "language": "other"},
        "compute_provider": "docker_local",
        "registry_provider": "zot",
        "cache_policy": {"actor": "ci", "cache_from": [], "cache_to": []}
    });
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

/// The example root layer's context (FROM scratch + busybox) with extra Dockerfile lines.
pub fn context_with(extra: &str) -> tempfile::TempDir {
    let catalog = staged_examples();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&catalog.path().join("base"), dir.path());
    let dockerfile = dir.path().join("Dockerfile");
    let text = std::fs::read_to_string(&dockerfile).unwrap() + extra;
    std::fs::write(dockerfile, text).unwrap();
    dir
}

/// The event kinds of a build in order, as `lian status --json` reports its history, and who
/// appended each; without the `resumed` claims of a worker taking the build over, which are
/// ownership, not steps (`history_all` keeps them).
pub fn history_kinds(nats_url: &str, build_id: &str) -> Vec<(String, String)> {
    let mut all = history_all(nats_url, build_id);
    all.retain(|(kind, _)| kind != "resumed");
    all
}

/// Every event kind of a build in order, with who appended it.
pub fn history_all(nats_url: &str, build_id: &str) -> Vec<(String, String)> {
    let out = lian(&["--nats-url", nats_url, "status", build_id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["worker"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The lifecycle of a build that completed, event by event.
pub const STEPS: [&str; 10] = [
    "accepted",
    "sized",
    "started",
    "runner_requested",
    "runner_leased",
    "context_synced",
    "image_built",
    "metrics_recorded",
    "runner_destroyed",
    "completed",
];

/// The runners left under a fleet's state directory.
/// (Entries starting with '.' are the host's own, such as its engine stores, not leases.)
pub fn runners_left(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("runners"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// What a lease leaves on the host if it is not destroyed: its dockerd, its mounts under
/// the state directory, its cgroup.
pub fn leaks(state: &Path, lease_keys: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let marker = state.to_str().unwrap();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("dockerd") && cmdline.contains(marker) {
            found.push(format!("engine: {cmdline}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains(marker))
            .map(|l| format!("mount: {l}")),
    );
    for key in lease_keys {
        let name = format!("lian-{}", lian_core::names::path_token(key));
        let mut places = vec![PathBuf::from("/sys/fs/cgroup").join(&name)];
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            places.extend(controllers.flatten().map(|c| c.path().join(&name)));
        }
        found.extend(
            places
                .into_iter()
                .filter(|p| p.exists())
                .map(|p| format!("cgroup: {}", p.display())),
        );
    }
    found
}

/// A nats-server, a state directory for workers, and the workspace builds are submitted to.
pub struct Fleet {
    pub server: lian_test_support::NatsServer,
    pub state: tempfile::TempDir,
    pub workspace: &'static str,
}

impl Fleet {
    pub fn new(workspace: &'static str) -> Self {
        assert!(
            lian_test_support::docker_available(),
            "these tests build images: start a Docker engine (see .ci/run)"
        );
        Self {
            server: lian_test_support::NatsServer::start(),
            state: tempfile::tempdir().unwrap(),
            workspace,
        }
    }

    /// A `lian worker` on this fleet's server and state directory.
    pub fn worker(&self, name: &str, env: &[(&str, &str)]) -> Running {
        let state = self.state.path().to_str().unwrap();
        Running::start_with(
            &[
                "--nats-url",
                &self.server.url,
                "worker",
                "--state-dir",
                state,
                "--name",
                name,
            ],
            env,
            "",
        )
    }

    /// A `lian control` on this fleet's server and state directory, on a free port; returns
    /// it and its base URL.
    pub fn control(&self, token: &str, env: &[(&str, &str)]) -> (Running, String) {
        let state = self.state.path().to_str().unwrap();
        let env: Vec<(&str, &str)> = [("LIAN_CONTROL_TOKEN", token)]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
        let control = Running::start_with(
            &[
                "--nats-url",
                &self.server.url,
                "control",
                "--state-dir",
                state,
                "--listen",
                "127.0.0.1:0",
            ],
            &env,
            "serving http://",
        );
        let url = control.served_url();
        (control, url)
    }

    /// A raw-protocol subscriber to everything on `lian.>`.
    pub fn wire(&self) -> lian_test_support::RawNats {
        lian_test_support::RawNats::subscribe(self.server.port, "lian.>")
    }

    /// Submits a build of `image` whose Dockerfile ends with `extra`; returns its id and
    /// its context (kept alive by the caller).
    pub fn submit(&self, image: &str, extra: &str, env: &[(&str, &str)]) -> (String, tempfile::TempDir) {
        submit_to(&self.server.url, self.workspace, image, extra, env)
    }

    /// The subject of one event of a build.
    pub fn event(&self, build: &str, kind: &str) -> String {
        format!("lian.{}.build.{build}.{kind}", self.workspace)
    }
}

/// Every entry under `ctx/` of an image's filesystem: path -> (kind, mode, size, sha256 or
/// link target), and each one's modification time, read from `docker export` of a container created from it.
pub fn image_tree(
    image: &str,
) -> (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, u64>,
) {
    let docker = lian_test_support::docker_cli();
    let created = Command::new(&docker)
        .args(["create", "--entrypoint", "/none", image])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let id = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let export = Command::new(&docker).args(["export", &id]).output().unwrap();
    let _ = Command::new(&docker).args(["rm", &id]).output();
    assert!(export.status.success());
    let (mut tree, mut mtimes) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    let mut archive = tar::Archive::new(export.stdout.as_slice());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let Some(rel) = path.strip_prefix("ctx/") else { continue };
        let header = entry.header().clone();
        let mode = header.mode().unwrap() & 0o7777;
        let mtime = header.mtime().unwrap();
        let what = match header.entry_type() {
            tar::EntryType::Directory => format!("dir {mode:o}"),
            tar::EntryType::Symlink => format!("symlink -> {}", header.link_name().unwrap().unwrap().display()),
            _ => {
                let mut content = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
                let sha: String = <sha2::Sha256 as sha2::Digest>::digest(&content)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("file {mode:o} {} {sha}", content.len())
            }
        };
        tree.insert(rel.to_string(), what);
        mtimes.insert(rel.to_string(), mtime);
    }
    (tree, mtimes)
}

/// Submits, through the NATS at `url` (one URL or seeds), a build in `workspace` of `image`
/// whose Dockerfile ends with `extra`; returns its id and its context (kept alive by the
/// caller).
pub fn submit_to(
    url: &str,
    workspace: &str,
    image: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> (String, tempfile::TempDir) {
    let context = context_with(extra);
    let out = submit_context(url, workspace, image, &context, &[], env);
    assert!(out.status.success(), "{}", text(&out));
    (String::from_utf8_lossy(&out.stdout).trim().to_string(), context)
}

/// `lian submit` of a test build of `image` in `workspace` (the example root layer's
/// context) through the NATS at `url`, with more arguments (`--wait`, `--timeout`, ...).
pub fn submit_with(url: &str, workspace: &str, image: &str, args: &[&str]) -> Output {
    submit_context(url, workspace, image, &context_with(""), args, &[])
}

/// `lian submit` of a test build of `image` in `workspace` from `context`.
fn submit_context(
    url: &str,
    workspace: &str,
    image: &str,
    context: &tempfile::TempDir,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let directives = directives_json(context.path(), workspace, image);
    let mut all = vec![
        "--nats-url",
        url,
        "submit",
        directives.to_str().unwrap(),
        "--context",
        context.path().to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    lian_with(&all, env)
}

/// `lian nats status --json`: every stream and bucket with its copies, leader, followers
/// and message count.
pub fn nats_streams(url: &str) -> Vec<serde_json::Value> {
    let out = lian(&["--nats-url", url, "nats", "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("nats status --json")
}

/// `lian submit DIRECTIVES --context CONTEXT` against a NATS URL nothing listens on: for
/// requests the client must refuse before it connects.
pub fn submit_unreachable(directives: &Path, context: &Path) -> Output {
    lian(&[
        "--nats-url",
        "nats://127.0.0.1:1",
        "submit",
        directives.to_str().unwrap(),
        "--context",
        context.to_str().unwrap(),
    ])
}

/// Appends a build's terminal event (`event`: its `type` and fields) as a worker would,
/// through the append subject: for tests that play the worker to a real cascade.
pub fn end_build(wire: &mut lian_test_support::RawNats, workspace: &str, build: &str, event: serde_json::Value) {
    let mut envelope = serde_json::json!({
        "build_id": build, "workspace": workspace, "seq": 1,
        "at": "2026-12-05T08:00:00Z", "worker": "test",
    });
    let fields = envelope.as_object_mut().unwrap();
    fields.extend(event.as_object().unwrap().clone());
    let kind = event["type"].as_str().unwrap();
    wire.publish(
        &format!("_lian.append.lian.{workspace}.build.{build}.{kind}"),
        envelope.to_string().as_bytes(),
    );
}

/// A catalog layer's build of the example catalog completed with `image_id`, as a worker
/// would append it: a cascade starts from it.
pub fn layer_completed(wire: &mut lian_test_support::RawNats, layer: &str, build: &str, image_id: &str) {
    let image = format!("lian-example/{layer}:latest");
    end_build(
        wire,
        "examples",
        build,
        serde_json::json!({"type": "completed", "image": image, "image_id": image_id, "layer": layer}),
    );
}

/// A `lian cascade` on `nats_url` following `catalog`, with `args` after the role; returned
/// once it serves.
pub fn cascade_service(nats_url: &str, catalog: &Path, args: &[&str]) -> Running {
    let mut all = vec![
        "--nats-url",
        nats_url,
        "cascade",
        "--catalog",
        catalog.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let cascade = Running::start_hearing(&all, &[("LIAN_LOG", "info")], "");
    cascade.wait_stderr(Duration::from_secs(60), "cascade serving");
    cascade
}
