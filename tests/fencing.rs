//! Fencing (ADR lian-045): a worker frozen in the middle of a build step (SIGSTOP: as after a
//! NATS partition or a long pause, its ack wait runs out) loses the build to a second
//! worker, which claims it with `resumed` before its first effect. When the first worker
//! wakes up, its append is refused and it stops; nothing it tried to say reaches `lian.>`:
//! what a subscriber saw is exactly the stored history, and the build ends once.

mod common;

use std::time::Duration;

use common::{Fleet, history_all, text};

const ENV: [(&str, &str); 2] = [("LIAN_ACK_WAIT_SECS", "2"), ("LIAN_MAX_DELIVER", "5")];

#[test]
fn a_worker_that_lost_its_build_appends_nothing_and_the_wire_is_the_history() {
    let fleet = Fleet::new("fence");
    let log_a = fleet.state.path().join("worker-a.log");
    let worker_a = common::Running::start_logged(
        &[
            "--nats-url",
            &fleet.server.url,
            "worker",
            "--state-dir",
            fleet.state.path().to_str().unwrap(),
            "--name",
            "worker-a",
        ],
        &[ENV[0], ENV[1], ("LIAN_LOG", "info")],
        &log_a,
        "",
    );
    let mut wire = fleet.wire();
    // A build step that takes a few seconds, never cached (the value is new every run), so
    // the freeze lands while worker A is in it.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let (build, _context) = fleet.submit(
        "lian-test/fence:latest",
        &format!("RUN sleep 3 && echo {nonce} > /nonce\n"),
        &ENV,
    );
    let synced = fleet.event(&build, "context_synced");
    wire.wait_for(Duration::from_secs(90), "worker A to start the build step", |m| {
        m.subject == synced
    });
    worker_a.signal(libc::SIGSTOP);

    // Worker B gets the redelivery once A's ack wait runs out, claims the build, finishes it.
    let _worker_b = fleet.worker("worker-b", &ENV);
    let completed = fleet.event(&build, "completed");
    wire.wait_for(Duration::from_secs(120), "worker B to complete the build", |m| {
        m.subject == completed
    });

    // A wakes up, finishes its step, and tries to record it; stopping waits for that.
    worker_a.signal(libc::SIGCONT);
    let _ = worker_a.stop();
    let said = std::fs::read_to_string(&log_a).unwrap();
    assert!(
        said.contains("another worker owns this build") || said.contains("handing it back to the queue"),
        "worker A noticed it lost the build: {said}"
    );
    // Everything the server sent before this marker has reached us.
    wire.publish("lian.fence-marker.done", b"{}");
    wire.wait_for(Duration::from_secs(10), "the marker", |m| {
        m.subject == "lian.fence-marker.done"
    });

    let prefix = format!("lian.fence.build.{build}.");
    let on_wire: Vec<(String, String, u64)> = wire
        .seen
        .iter()
        .filter(|m| m.subject.starts_with(&prefix))
        .map(|m| {
            let v = m.json();
            (
                v["type"].as_str().unwrap_or("?").to_string(),
                v["worker"].as_str().unwrap_or("?").to_string(),
                v["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let stored: Vec<(String, String, u64)> = history_all(&fleet.server.url, &build)
        .into_iter()
        .zip(1..)
        .map(|((kind, worker), seq)| (kind, worker, seq))
        .collect();
    assert_eq!(on_wire, stored, "the wire carries exactly the stored history");
    assert_eq!(
        stored.iter().filter(|(k, _, _)| k == "completed").count(),
        1,
        "one end: {stored:?}"
    );
    let claim = stored
        .iter()
        .position(|(k, w, _)| k == "resumed" && w == "worker-b")
        .unwrap_or_else(|| panic!("worker B claimed the build: {stored:?}"));
    assert!(
        stored[claim..].iter().all(|(_, w, _)| w == "worker-b"),
        "after the claim only worker B appends: {stored:?}"
    );
    let status = common::lian(&["--nats-url", &fleet.server.url, "status", &build]);
    assert!(status.status.success(), "{}", text(&status));
    let leases = common::runners_left(fleet.state.path());
    assert!(leases.is_empty(), "no lease left: {leases:?}");
}
