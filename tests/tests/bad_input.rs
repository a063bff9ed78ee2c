//! The bad-input battery. Requests come from a client that is not ours (the raw NATS
//! protocol); each bad one ends as one `failed` event whose reason names the problem, the
//! worker keeps serving, and `lian status` shows the reason.

mod common;

use std::time::Duration;

use common::{Running, context_with, directives_json, lian, text};
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
    _state: tempfile::TempDir,
}

impl Battery {
    fn start() -> Self {
        let server = NatsServer::start();
        let state = tempfile::tempdir().unwrap();
        // Every lian command creates the topology first, so a core publish after this is stored.
        let none = lian(&["--nats-url", &server.url, "status", "nobody"]);
        assert!(text(&none).contains("no build nobody"), "{}", text(&none));
        let worker = Running::start(
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
            "",
        );
        let client = RawNats::subscribe(server.port, "lian.>");
        Self {
            server,
            client,
            _worker: worker,
            _state: state,
        }
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
