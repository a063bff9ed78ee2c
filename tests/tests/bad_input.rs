//! The bad-input battery. Requests come from a client that is not ours (the raw NATS
//! protocol); each bad one ends as one `failed` event whose reason names the problem, the
//! worker keeps serving, and `lian status` shows the reason.
//!
//! Kinds covered: invalid workspace (dot, wildcards, space, empty, too long), unknown compute
//! and registry providers, image names with shell syntax or spaces, a Dockerfile path
//! escaping the context, a wrong-shaped field, an unknown field, an unknown layer, a
//! workspace that is not the subject's, a cache namespace not allowed, bytes that are not
//! JSON, JSON without directives, an oversized request, an invalid subject workspace, JSON
//! nested a thousand levels deep; and hostile Nickel, as a context's `.build-spec.ncl` on the
//! worker and as a directives file given to `lian submit`: an import of an absolute host
//! path, a relative import climbing out, a spec that never terminates, one that allocates
//! without end, one nested deep enough to overflow the evaluator's stack, an oversized one
//! (and, for submit, deep JSON). Each ends with one clear
//! refusal, the worker lives on (same PID), and no byte of the host file shows anywhere.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Running, context_with, directives_json, history_kinds, lian, text};
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
    let out = lian(&[
        "--nats-url",
        "nats://127.0.0.1:1",
        "submit",
        bad.to_str().unwrap(),
        "--context",
        ".",
    ]);
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
        let out = lian(&[
            "--nats-url",
            "nats://127.0.0.1:1",
            "submit",
            path.to_str().unwrap(),
            "--context",
            dir.path().to_str().unwrap(),
        ]);
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
