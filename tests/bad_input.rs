//! The bad-input battery. Requests come from a client that is not ours (the raw NATS
//! protocol); each bad one ends as one `failed` event whose reason names the problem, the
//! worker keeps serving (same PID, resident memory under `WORKER_RSS_CEILING_KIB`), `lian
//! status` shows the reason, a good build completes after the battery with nothing of its
//! lease left (engine, mount, cgroup), and no byte of a host file shows in any event or log.
//!
//! Kinds covered (56):
//! - requests (29): workspace with a dot, `*`, `>`, a space, empty, too long; workspace not
//!   the subject's; subject workspace invalid; unknown compute provider; unknown registry
//!   provider; image with shell syntax, a space, `$(...)`, a newline, too long; Dockerfile
//!   path climbing out, absolute; wrong-shaped context, context manifest of the wrong type;
//!   unknown field; unknown layer; cache namespace not readable, not writable; unknown actor;
//!   build args of the wrong type; bytes that are not JSON; JSON without directives; an
//!   oversized request; JSON nested a thousand levels deep;
//! - identifiers (4): build id with a dot, a wildcard, 57 characters, not a string;
//! - specs, a context's `.build-spec.ncl` on the worker (11): import of an absolute host
//!   path, of a relative path climbing out, of a directory; never terminating; allocating
//!   without end; nested past the evaluator's stack; oversized; a negative time budget; an
//!   unknown tier; an unbound name; not a record;
//! - directives given to `lian submit` (8): import of an absolute host path, climbing out;
//!   never terminating; allocating; nested; oversized; JSON nested deep; a workspace that is
//!   not valid;
//! - contexts (4): a symlink leaving the context; a FIFO; over the file-count limit; a
//!   manifest that is not in the store (fails with its runner destroyed).
mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Running, context_with, directives_json, history_kinds, leaks, lian, submit_unreachable, text};
use lian_test_support::{NatsServer, RawNats, docker_available};
use serde_json::{Value, json};

fn request(build_id: &str) -> Value {
    json!({
        "build_id": build_id,
        "directives": {
            "workspace": "ws",
            "artifact": {"image": "example/app:1"},
            "compute_provider": "docker_local",
            "registry_provider": "zot",
            "cache_policy": {"actor": "ci", "cache_from": [], "cache_to": []}
        },
        "context": {"manifest": "manifest-none"}
    })
}

/// The good request with the field at `pointer` set (added if absent) to `value`.
fn with(build_id: &str, pointer: &str, value: Value) -> Vec<u8> {
    let mut r = request(build_id);
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    r.pointer_mut(parent).unwrap_or_else(|| panic!("{pointer}"))[key] = value;
    r.to_string().into_bytes()
}

struct Battery {
    server: NatsServer,
    client: RawNats,
    _worker: Running,
    state: tempfile::TempDir,
}

impl Battery {
    fn start() -> Self {
        let server = NatsServer::start();
        let state = tempfile::tempdir().unwrap();
        // Every lian command creates the topology first, so a core publish after this is stored.
        let none = lian(&["--nats-url", &server.url, "status", "nobody"]);
        assert!(text(&none).contains("no build nobody"), "{}", text(&none));
        let log = state.path().join("worker.log");
        let worker = Running::start_logged(
            &[
                "--nats-url",
                &server.url,
                "worker",
                "--state-dir",
                state.path().to_str().unwrap(),
                "--name",
                "w1",
                "--catalog",
                "examples/catalog",
            ],
            &[("LIAN_LOG", "info")],
            &log,
            "",
        );
        let client = RawNats::subscribe(server.port, "lian.>");
        Self {
            server,
            client,
            _worker: worker,
            state,
        }
    }

    /// The worker's process id, found by the state directory only it names; `None` once it
    /// has exited.
    fn worker_pid(&self) -> Option<u32> {
        let state = self.state.path().as_os_str().as_bytes();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (args.contains(&b"worker".as_slice()) && args.contains(&state)).then_some(pid)
        })
    }

    fn worker_log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("worker.log")).unwrap()
    }

    /// Submits a context whose `.build-spec.ncl` is `spec` and returns the reason of the
    /// build's failed event, which must come at the size step.
    fn spec_refused(&mut self, spec: &str) -> (String, String) {
        let context = tempfile::tempdir().unwrap();
        std::fs::write(context.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(context.path().join(".build-spec.ncl"), spec).unwrap();
        let directives = directives_json(context.path(), "ws", "lian-test/hostile-spec:latest");
        let out = lian(&[
            "--nats-url",
            &self.server.url,
            "submit",
            directives.to_str().unwrap(),
            "--context",
            context.path().to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let build = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let failed = format!("lian.ws.build.{build}.failed");
        let m = self
            .client
            .wait_for(Duration::from_secs(60), "the spec's failed event", |m| {
                m.subject == failed
            });
        assert_eq!(m.json()["step"], "size", "{}", String::from_utf8_lossy(&m.payload));
        (build, m.json()["reason"].as_str().unwrap().to_string())
    }

    /// Publishes `payload` on `subject` and returns the reason of the failed event on `failed`.
    fn refused(&mut self, subject: &str, payload: &[u8], failed: impl Fn(&str) -> bool) -> String {
        self.client.publish(subject, payload);
        let m = self
            .client
            .wait_for(Duration::from_secs(30), "a failed event", |m| failed(&m.subject));
        assert_eq!(m.json()["step"], "validate", "{}", String::from_utf8_lossy(&m.payload));
        m.json()["reason"].as_str().unwrap().to_string()
    }
}

#[test]
fn every_kind_of_bad_request_fails_with_its_reason_and_the_worker_keeps_serving() {
    let mut b = Battery::start();
    let long = "a".repeat(300);
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("ws-dot", "/directives/workspace", json!("a.b"), "workspace"),
        ("ws-star", "/directives/workspace", json!("*"), "workspace"),
        ("ws-gt", "/directives/workspace", json!(">"), "workspace"),
        ("ws-space", "/directives/workspace", json!("has space"), "workspace"),
        ("ws-empty", "/directives/workspace", json!(""), "workspace"),
        ("ws-long", "/directives/workspace", json!(long), "workspace"),
        (
            "compute",
            "/directives/compute_provider",
            json!("aws"),
            "compute_provider must be one of",
        ),
        (
            "registry",
            "/directives/registry_provider",
            json!("quay"),
            "registry_provider must be one of",
        ),
        (
            "image-shell",
            "/directives/artifact/image",
            json!("x;rm -rf /"),
            "image",
        ),
        ("image-space", "/directives/artifact/image", json!("my image"), "image"),
        ("image-subst", "/directives/artifact/image", json!("$(id)"), "image"),
        (
            "dockerfile-escape",
            "/directives/artifact/dockerfile",
            json!("../../etc/passwd"),
            "must stay inside the build context",
        ),
        ("shape", "/context", json!(5), "wrong shape"),
        ("unknown-field", "/directives/artifact/imgae", json!("x"), "imgae"),
        ("layer", "/layer", json!("nope"), "layer nope is not in the catalog"),
        (
            "pin-tag",
            "/parents",
            json!({"lamina/rust:latest": "ci/lamina/lamina/rust:latest"}),
            "must be a registry reference by digest",
        ),
        (
            "pin-option",
            "/parents",
            json!({"lamina/rust:latest": format!("--all-tags@sha256:{}", "0".repeat(64))}),
            "must be a registry reference by digest",
        ),
        (
            "mismatch",
            "/directives/workspace",
            json!("other"),
            "published on lian.ws.build.request",
        ),
        (
            "cache",
            "/directives/cache_policy/cache_from",
            json!(["dev/jpl-ws"]),
            "may not read cache namespace",
        ),
    ];
    for (id, pointer, value, expect) in &cases {
        let payload = with(id, pointer, value.clone());
        let subject = format!("lian.ws.build.{id}.failed");
        let reason = b.refused("lian.ws.build.request", &payload, |s| s == subject);
        assert!(reason.contains(expect), "{id}: {reason}");
    }

    let q = |s: &str| s.starts_with("lian.ws.build.q") && s.ends_with(".failed");
    let reason = b.refused("lian.ws.build.request", b"{not json", q);
    assert!(reason.contains("not valid JSON"), "{reason}");
    b.client.seen.clear();
    let reason = b.refused("lian.ws.build.request", b"[1, 2]", q);
    assert!(reason.contains("no `directives`"), "{reason}");
    b.client.seen.clear();
    let mut big = request("big");
    big["padding"] = json!("x".repeat(300 * 1024));
    let reason = b.refused("lian.ws.build.request", big.to_string().as_bytes(), q);
    assert!(reason.contains("over the 262144-byte limit"), "{reason}");
    let reason = b.refused(
        "lian.Upper.build.request",
        &request("bad-subject").to_string().into_bytes(),
        |s| s == "lian.invalid.build.bad-subject.failed",
    );
    assert!(reason.contains("workspace `Upper` is not valid"), "{reason}");

    for (id, expect) in [
        ("ws-dot", "workspace `a.b` is not valid"),
        ("layer", "not in the catalog"),
    ] {
        let status = lian(&["--nats-url", &b.server.url, "status", id]);
        assert_eq!(status.status.code(), Some(1));
        assert!(text(&status).contains(expect), "{}", text(&status));
    }
}

#[test]
fn the_worker_still_builds_after_the_battery_and_a_repeated_request_id_is_one_build() {
    assert!(
        docker_available(),
        "this test builds an image: start a Docker engine (see .ci/run)"
    );
    let mut b = Battery::start();
    let reason = b.refused("lian.ws.build.request", b"{not json", |s| s.ends_with(".failed"));
    assert!(reason.contains("not valid JSON"));

    let context = context_with("");
    let directives = directives_json(context.path(), "ws", "lian-test/after-battery:latest");
    let submit = || {
        lian(&[
            "--nats-url",
            &b.server.url,
            "submit",
            directives.to_str().unwrap(),
            "--context",
            context.path().to_str().unwrap(),
            "--request-id",
            "ci-pipeline/42 job:build",
            "--wait",
            "--timeout",
            "120",
        ])
    };
    let first = submit();
    assert!(first.status.success(), "{}", text(&first));
    let second = submit();
    assert!(second.status.success(), "{}", text(&second));
    let id = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).lines().next().unwrap().to_string();
    assert_eq!(id(&first), id(&second), "the same request id names the same build");
    assert!(text(&second).contains("already submitted"), "{}", text(&second));
    let build = id(&first);
    let accepted = format!("lian.ws.build.{build}.accepted");
    b.client
        .wait_for(Duration::from_secs(10), "the accepted event", |m| m.subject == accepted);
    assert_eq!(
        b.client.seen.iter().filter(|m| m.subject == accepted).count(),
        1,
        "one build"
    );
}

#[test]
fn submit_refuses_bad_directives_and_escaping_contexts_before_publishing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.ncl");
    std::fs::write(
        &bad,
        "let D = import \"defaults/build_directives.ncl\" in\nD.make_ci_build { workspace = \"a b\", artifact = { image = \"x:1\" } }\n",
    )
    .unwrap();
    let out = submit_unreachable(&bad, Path::new("."));
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("workspace `a b` is not valid") && said.contains("bad.ncl"),
        "{said}"
    );

    let server = NatsServer::start();
    let context = context_with("");
    std::os::unix::fs::symlink("/etc/passwd", context.path().join("passwd")).unwrap();
    let directives = directives_json(dir.path(), "ws", "lian-test/escape:latest");
    let out = lian(&[
        "--nats-url",
        &server.url,
        "submit",
        directives.to_str().unwrap(),
        "--context",
        context.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("leaves the context"), "{}", text(&out));
}

/// A file outside every context, holding a value nobody may ever see on the bus or in a log.
fn host_secret() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("host-secret-{nanos:x}-{}", std::process::id());
    let path = dir.path().join("secret.txt");
    std::fs::write(&path, &secret).unwrap();
    (dir, path, secret)
}

/// `path` reached from anywhere by climbing to the root first.
fn climbing(path: &Path) -> String {
    format!("{}{}", "../".repeat(16), path.strip_prefix("/").unwrap().display())
}

/// A spec (or directives file) that grows a string until memory runs out.
const ALLOCATING: &str = "let rec grow = fun s n => if n == 0 then s else grow (s ++ s) (n - 1) in";

#[test]
fn hostile_specs_and_deep_json_are_refused_by_name_and_the_worker_lives() {
    let (_outside, secret_path, secret) = host_secret();
    let mut b = Battery::start();
    // The worker is up once it has refused something.
    b.refused("lian.ws.build.request", b"{not json", |s| s.ends_with(".failed"));
    let pid = b.worker_pid().expect("the worker runs");

    let read_it = |import: &str| format!("{{ cpu = std.string.length (import \"{import}\" as 'Text) }}");
    let absolute = secret_path.display().to_string();
    let cases: Vec<(&str, String, String)> = vec![
        (
            "absolute",
            read_it(&absolute),
            format!("import of `{absolute}` refused: imports may only name the bundled schemas"),
        ),
        (
            "relative",
            read_it(&climbing(&secret_path)),
            "refused: imports may only name the bundled schemas".into(),
        ),
        (
            "endless",
            // Forcing `x` each round keeps memory flat: only the clock can stop it.
            "let rec f = fun x => if x < 0 then 1 else f (x + 1) in { cpu = f 0 }".into(),
            "ran past its 10 s wall-clock limit".into(),
        ),
        (
            "allocating",
            format!("{ALLOCATING} {{ cpu = std.string.length (grow \"x\" 40) }}"),
            "ran out of its 1024 MiB memory limit".into(),
        ),
        (
            "nested",
            format!("{{ cpu = 1, x = {}1{} }}", "[".repeat(50_000), "]".repeat(50_000)),
            "overflowed its stack".into(),
        ),
        (
            "oversized",
            format!("# {}\n{{ cpu = 2 }}", "x".repeat(1 << 21)),
            "over the limit of 1048576".into(),
        ),
    ];
    let mut builds = Vec::new();
    for (kind, spec, expect) in &cases {
        let started = Instant::now();
        let (build, reason) = b.spec_refused(spec);
        assert!(reason.contains(expect.as_str()), "{kind}: {reason}");
        assert!(reason.contains(".build-spec.ncl"), "{kind} names the file: {reason}");
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "{kind} took {:?}",
            started.elapsed()
        );
        assert_eq!(b.worker_pid(), Some(pid), "{kind}: the worker lives");
        builds.push(build);
    }

    // A request nested a thousand levels deep: refused before anything recurses into it.
    // Built as text: serde_json itself refuses to build a value this deep.
    let payload = request("deep").to_string().replacen(
        "\"artifact\":{",
        &format!("\"artifact\":{{\"labels\":{}1{},", "[".repeat(1000), "]".repeat(1000)),
        1,
    );
    let earlier: Vec<String> = b.client.seen.iter().map(|m| m.subject.clone()).collect();
    let reason = b.refused("lian.ws.build.request", payload.as_bytes(), |s| {
        s.starts_with("lian.ws.build.q") && s.ends_with(".failed") && !earlier.iter().any(|e| e == s)
    });
    assert!(
        reason.contains("request is nested more than 64 levels deep"),
        "{reason}"
    );
    assert_eq!(b.worker_pid(), Some(pid), "the worker lives after deep JSON");

    for build in &builds {
        let failed = history_kinds(&b.server.url, build)
            .iter()
            .filter(|(kind, _)| kind == "failed")
            .count();
        assert_eq!(failed, 1, "one failed event for {build}");
    }
    for m in &b.client.seen {
        assert!(
            !String::from_utf8_lossy(&m.payload).contains(&secret),
            "the host file leaked on {}",
            m.subject
        );
    }
    let log = b.worker_log();
    assert!(log.contains("serving build requests"), "the log is the worker's: {log}");
    assert!(!log.contains(&secret), "the host file leaked into the worker's log");
}

#[test]
fn submit_refuses_hostile_directives_quickly_and_quotes_no_host_file() {
    let (_outside, secret_path, secret) = host_secret();
    let dir = tempfile::tempdir().unwrap();
    let directives = |body: &str| {
        format!(
            "let D = import \"defaults/build_directives.ncl\" in\nD.make_ci_build {{ workspace = {body}, artifact = {{ image = \"x:1\" }} }}\n"
        )
    };
    let cases: Vec<(&str, String, String)> = vec![
        (
            "absolute.ncl",
            directives(&format!("import \"{}\" as 'Text", secret_path.display())),
            "absolute.ncl:2: import of".into(),
        ),
        (
            "relative.ncl",
            directives(&format!("import \"{}\" as 'Text", climbing(&secret_path))),
            "imports may only name the bundled schemas or files under".into(),
        ),
        (
            "endless.ncl",
            format!(
                "let rec f = fun x => if x < 0 then \"ws\" else f (x + 1) in\n{}",
                directives("f 0")
            ),
            "ran past its 10 s wall-clock limit".into(),
        ),
        (
            "allocating.ncl",
            format!(
                "{ALLOCATING}\n{}",
                directives("if std.string.length (grow \"x\" 40) > 0 then \"ws\" else \"x\"")
            ),
            "ran out of its 1024 MiB memory limit".into(),
        ),
        (
            "nested.ncl",
            directives(&format!("\"ws\", x = {}1{}", "[".repeat(50_000), "]".repeat(50_000))),
            "overflowed its stack".into(),
        ),
        (
            "oversized.ncl",
            format!("# {}\n{}", "x".repeat(1 << 21), directives("\"ws\"")),
            "over the 1048576-byte limit".into(),
        ),
        (
            "deep.json",
            format!("{{\"workspace\": {}1{}}}", "[".repeat(100_000), "]".repeat(100_000)),
            "is nested more than 64 levels deep".into(),
        ),
    ];
    for (name, body, expect) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let started = Instant::now();
        let out = submit_unreachable(&path, dir.path());
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {said}");
        assert!(said.contains(expect.as_str()), "{name}: {said}");
        assert!(!said.contains(&secret), "{name}: the host file leaked: {said}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name} took {:?}",
            started.elapsed()
        );
    }
}

/// The worker's resident set, in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The documented ceiling of a worker's resident memory while it refuses the battery
/// (README, "Directives files, specs and request JSON are user input"): user documents are
/// evaluated in `lian __eval` children, contexts are streamed, so the worker itself stays small.
const WORKER_RSS_CEILING_KIB: u64 = 128 * 1024;

/// The kinds the other tests of this file do not cover, then the battery's invariants over
/// all of it: the worker keeps its PID and stays under its memory ceiling, a good build
/// completes afterwards, nothing of a lease is left, and no host byte is in any event or log.
#[test]
fn more_kinds_then_a_good_build_with_the_same_worker_small_and_nothing_leaked() {
    assert!(
        docker_available(),
        "this test builds an image: start a Docker engine (see .ci/run)"
    );
    let (_outside, secret_path, secret) = host_secret();
    let mut b = Battery::start();
    b.refused("lian.ws.build.request", b"{not json", |s| s.ends_with(".failed"));
    let pid = b.worker_pid().expect("the worker runs");
    let mut peak = rss_kib(pid);
    let mut refused_kinds = 0;

    // Requests, from a client that is not ours.
    let long_id = "b".repeat(57);
    let long_image = format!("example/{}:1", "x".repeat(300));
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("id-dot", "/build_id", json!("a.b"), "build_id"),
        ("id-long", "/build_id", json!(long_id), "build_id"),
        ("id-wild", "/build_id", json!("a*"), "build_id"),
        ("id-number", "/build_id", json!(7), "build_id must be a string"),
        (
            "dockerfile-absolute",
            "/directives/artifact/dockerfile",
            json!("/etc/passwd"),
            "must stay inside the build context",
        ),
        ("image-long", "/directives/artifact/image", json!(long_image), "image"),
        ("image-newline", "/directives/artifact/image", json!("a\nb:1"), "image"),
        (
            "build-args",
            "/directives/artifact/build_args",
            json!({"A": 5}),
            "build_args",
        ),
        (
            "cache-to",
            "/directives/cache_policy/cache_to",
            json!(["ci/other"]),
            "cache policy refused",
        ),
        ("actor", "/directives/cache_policy/actor", json!("root"), "actor"),
        ("context-shape", "/context/manifest", json!(["x"]), "wrong shape"),
    ];
    for (id, pointer, value, expect) in &cases {
        let mut payload = request(&format!("k-{id}"));
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        payload.pointer_mut(parent).unwrap_or_else(|| panic!("{pointer}"))[key] = value.clone();
        let earlier: Vec<String> = b.client.seen.iter().map(|m| m.subject.clone()).collect();
        let own = format!("lian.ws.build.k-{id}.failed");
        let reason = b.refused("lian.ws.build.request", payload.to_string().as_bytes(), |s| {
            s == own || (s.starts_with("lian.ws.build.q") && s.ends_with(".failed") && !earlier.iter().any(|e| e == s))
        });
        assert!(reason.contains(expect), "{id}: {reason}");
        eprintln!("{id}: {reason}");
        assert_eq!(b.worker_pid(), Some(pid), "{id}: the worker lives");
        peak = peak.max(rss_kib(pid));
        refused_kinds += 1;
    }

    // Specs, as a context's `.build-spec.ncl`.
    let specs: Vec<(&str, String, &str)> = vec![
        ("spec-budget", "{ time_budget_min = -1 }".into(), "time_budget_min"),
        ("spec-tier", "{ runner_type = 'huge }".into(), "runner_type"),
        ("spec-unbound", "{ cpu = nope }".into(), "nope"),
        ("spec-not-a-record", "42".into(), ".build-spec.ncl"),
        (
            "spec-import-dir",
            format!(
                "{{ cpu = std.string.length (import \"{}\" as 'Text) }}",
                secret_path.parent().unwrap().display()
            ),
            "refused",
        ),
    ];
    for (kind, spec, expect) in &specs {
        let (_build, reason) = b.spec_refused(spec);
        assert!(reason.contains(expect), "{kind}: {reason}");
        assert!(reason.contains(".build-spec.ncl"), "{kind} names the file: {reason}");
        eprintln!("{kind}: {reason}");
        assert_eq!(b.worker_pid(), Some(pid), "{kind}: the worker lives");
        peak = peak.max(rss_kib(pid));
        refused_kinds += 1;
    }

    // Contexts `lian submit` refuses by name before a byte is sent.
    let context = context_with("");
    let directives = directives_json(context.path(), "ws", "lian-test/bad-context:latest");
    let fifo = context.path().join("a-fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let submit = |extra: &[&str]| {
        let mut args = vec![
            "--nats-url",
            b.server.url.as_str(),
            "submit",
            directives.to_str().unwrap(),
            "--context",
            context.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        lian(&args)
    };
    let out = submit(&[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("a-fifo") && text(&out).contains("FIFO"),
        "{}",
        text(&out)
    );
    std::fs::remove_file(&fifo).unwrap();
    let out = submit(&["--max-context-files", "2"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--max-context-files"), "{}", text(&out));
    refused_kinds += 2;

    // A context that is not in the store: the build fails naming it, its runner destroyed.
    let mut missing = request("k-ctx-missing");
    missing["context"] = json!({"manifest": format!("manifest-{}", "0".repeat(64))});
    b.client
        .publish("lian.ws.build.request", missing.to_string().as_bytes());
    let m = b
        .client
        .wait_for(Duration::from_secs(90), "the missing context's end", |m| {
            m.subject == "lian.ws.build.k-ctx-missing.failed"
        });
    let reason = m.json()["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("context") || reason.contains("manifest"), "{reason}");
    eprintln!("missing context: {reason}");
    assert_eq!(b.worker_pid(), Some(pid), "missing context: the worker lives");
    refused_kinds += 1;
    assert!(refused_kinds >= 19, "{refused_kinds} kinds here");

    // A good build after all of it, by the same worker.
    let good = context_with("");
    let directives = directives_json(good.path(), "ws", "lian-test/after-everything:latest");
    let out = lian(&[
        "--nats-url",
        &b.server.url,
        "submit",
        directives.to_str().unwrap(),
        "--context",
        good.path().to_str().unwrap(),
        "--wait",
        "--timeout",
        "180",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let build = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    assert_eq!(b.worker_pid(), Some(pid), "the same worker built it");
    peak = peak.max(rss_kib(pid));
    eprintln!("worker peak RSS during the battery: {} KiB", peak);
    assert!(
        peak > 0 && peak < WORKER_RSS_CEILING_KIB,
        "worker RSS {peak} KiB over the {WORKER_RSS_CEILING_KIB} KiB ceiling"
    );

    // Nothing of either lease is left: the missing context's runner, if one was leased,
    // and the good build's.
    let keys = [format!("{build}-r1"), "k-ctx-missing-r1".to_string()];
    let left = leaks(b.state.path(), &keys);
    assert!(left.is_empty(), "leaked: {left:#?}");

    for m in &b.client.seen {
        assert!(
            !String::from_utf8_lossy(&m.payload).contains(&secret),
            "the host file leaked on {}",
            m.subject
        );
    }
    assert!(
        !b.worker_log().contains(&secret),
        "the host file leaked into the worker's log"
    );
}
