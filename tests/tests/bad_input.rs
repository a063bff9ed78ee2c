//! Requests published by a client that is not ours (raw NATS protocol): a contract
//! violation and a malformed payload each end as one `failed` event naming the problem,
//! and the worker goes on serving.

mod common;

use std::time::Duration;

use common::{Running, lian, text};
use lian_test_support::{NatsServer, RawNats};

fn request(workspace_in_directives: &str, build_id: &str) -> Vec<u8> {
    serde_json::json!({
        "build_id": build_id,
        "directives": {
            "workspace": workspace_in_directives,
            "artifact": {"image": "example/app:1"},
            "compute_provider": "docker_local",
            "registry_provider": "zot",
            "cache_policy": {"actor": "ci", "cache_from": [], "cache_to": []}
        },
        "context": {"manifest": "manifest-none"}
    })
    .to_string()
    .into_bytes()
}

#[test]
fn bad_requests_fail_with_a_reason_and_the_worker_keeps_serving() {
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let _worker = Running::start(
        &[
            "--nats-url",
            &server.url,
            "worker",
            "--state-dir",
            state.path().to_str().unwrap(),
            "--name",
            "w1",
        ],
        "",
    );
    let mut client = RawNats::subscribe(server.port, "lian.>");
    // A core-NATS publish before the requests stream exists would be lost: every lian command
    // creates the topology (idempotently) before it does anything, so ask lian once.
    let none = lian(&["--nats-url", &server.url, "status", "nobody"]);
    assert!(text(&none).contains("no build nobody"), "{}", text(&none));

    // 1. A contract violation: the workspace inside the directives is not one subject token.
    client.publish("lian.ws.build.request", &request("a.b", "bad-contract"));
    let failed = client.wait_for(Duration::from_secs(30), "the contract violation's failed event", |m| {
        m.subject == "lian.ws.build.bad-contract.failed"
    });
    let reason = failed.json()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("workspace"), "the reason names the field: {reason}");
    assert!(reason.contains("a.b"), "the reason shows the value: {reason}");

    // 2. The same worker serves the next request: malformed JSON this time.
    client.publish("lian.ws.build.request", b"{not json");
    let malformed = client.wait_for(Duration::from_secs(30), "the malformed request's failed event", |m| {
        m.subject.starts_with("lian.ws.build.q") && m.subject.ends_with(".failed")
    });
    assert!(malformed.json()["reason"].as_str().unwrap().contains("not valid JSON"));

    // 3. `lian status` shows the reason.
    let status = lian(&["--nats-url", &server.url, "status", "bad-contract"]);
    assert_eq!(status.status.code(), Some(1), "a failed build's status exits 1");
    let shown = text(&status);
    assert!(
        shown.contains("state: failed") && shown.contains("workspace"),
        "{shown}"
    );
}
