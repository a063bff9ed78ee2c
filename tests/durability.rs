//! Heartbeats, a NATS restart mid-build, cancel, and bounded redelivery, each with real
//! processes: nats-server, `lian worker`, the Docker engine.

mod common;

use std::time::Duration;

use common::{Fleet, STEPS, history_kinds, lian, runners_left, text};
use lian_test_support::RawNats;

#[test]
fn heartbeats_keep_a_build_longer_than_the_ack_wait_with_its_worker() {
    let fleet = Fleet::new("dur");
    let env = [("LIAN_ACK_WAIT_SECS", "2")];
    let _a = fleet.worker("worker-a", &env);
    let _b = fleet.worker("worker-b", &env);
    let mut wire = RawNats::subscribe(fleet.server.port, "lian.>");
    // The build step alone lasts three ack waits.
    let (build, _ctx) = fleet.submit("lian-test/heartbeat:latest", "RUN sleep 6\n", &env);
    let done = fleet.event(&build, "completed");
    wire.wait_for(Duration::from_secs(90), "completion", |m| m.subject == done);
    let story = history_kinds(&fleet.server.url, &build);
    assert_eq!(story.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), STEPS);
    let owner = &story[0].1;
    assert!(
        story.iter().all(|(_, w)| w == owner),
        "no takeover while heartbeating: {story:?}"
    );
}

#[test]
fn a_nats_restart_mid_build_loses_no_event_and_the_build_completes() {
    let mut fleet = Fleet::new("dur");
    let env = [("LIAN_ACK_WAIT_SECS", "2")];
    let _worker = fleet.worker("worker-a", &env);
    let mut wire = RawNats::subscribe(fleet.server.port, "lian.>");
    let (build, _ctx) = fleet.submit("lian-test/restart:latest", "RUN sleep 3\n", &env);
    let synced = fleet.event(&build, "context_synced");
    wire.wait_for(Duration::from_secs(60), "the build step to start", |m| {
        m.subject == synced
    });
    fleet.server.restart();
    // `status --follow` reads the stored history, then waits for the end.
    let out = lian(&["--nats-url", &fleet.server.url, "status", &build, "--follow"]);
    assert!(out.status.success(), "{}", text(&out));
    let story = history_kinds(&fleet.server.url, &build);
    assert_eq!(
        story.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        STEPS,
        "every event, once"
    );
    assert!(runners_left(fleet.state.path()).is_empty());
}

#[test]
fn cancel_stops_a_build_at_its_next_step_and_destroys_its_runner() {
    let fleet = Fleet::new("dur");
    let _worker = fleet.worker("worker-a", &[]);
    let mut wire = RawNats::subscribe(fleet.server.port, "lian.>");
    let (build, _ctx) = fleet.submit("lian-test/cancel:latest", "RUN sleep 3\n", &[]);
    let synced = fleet.event(&build, "context_synced");
    wire.wait_for(Duration::from_secs(60), "the build step to start", |m| {
        m.subject == synced
    });
    let out = lian(&[
        "--nats-url",
        &fleet.server.url,
        "cancel",
        &build,
        "--reason",
        "wrong branch",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let failed = fleet.event(&build, "failed");
    let end = wire.wait_for(Duration::from_secs(60), "the cancelled build's end", |m| {
        m.subject == failed
    });
    let reason = end.json()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("cancelled: wrong branch"), "{reason}");
    let kinds: Vec<String> = history_kinds(&fleet.server.url, &build)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(kinds.iter().any(|k| k == "runner_destroyed"), "{kinds:?}");
    assert!(!kinds.iter().any(|k| k == "completed"));
    assert!(runners_left(fleet.state.path()).is_empty());
    let status = lian(&["--nats-url", &fleet.server.url, "status", &build]);
    assert_eq!(status.status.code(), Some(1));
    assert!(text(&status).contains("cancelled"), "{}", text(&status));
    let again = lian(&["--nats-url", &fleet.server.url, "cancel", &build]);
    assert!(
        !again.status.success() && text(&again).contains("already ended"),
        "{}",
        text(&again)
    );
}

#[test]
fn a_request_out_of_deliveries_ends_failed_with_its_runner_destroyed_and_a_dead_letter() {
    let fleet = Fleet::new("dur");
    // Two deliveries; every worker of this test dies before building.
    let env = [
        ("LIAN_ACK_WAIT_SECS", "2"),
        ("LIAN_MAX_DELIVER", "2"),
        ("LIAN_FAILPOINT", "pause_before:run_build"),
    ];
    let worker_a = fleet.worker("worker-a", &env);
    let mut wire = RawNats::subscribe(fleet.server.port, "lian.>");
    let (build, _ctx) = fleet.submit("lian-test/abandon:latest", "", &env);
    let synced = fleet.event(&build, "context_synced");
    wire.wait_for(Duration::from_secs(60), "worker-a to reach the build step", |m| {
        m.subject == synced
    });
    let _worker_b = fleet.worker("worker-b", &env);
    worker_a.kill9();
    let failed = fleet.event(&build, "failed");
    let end = wire.wait_for(Duration::from_secs(60), "the abandoned build's end", |m| {
        m.subject == failed
    });
    let reason = end.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("abandoned") && reason.contains("delivered 2 times"),
        "{reason}"
    );
    assert_eq!(end.json()["step"], "abandoned");
    assert!(runners_left(fleet.state.path()).is_empty(), "the runner was destroyed");
    let letters = lian(&["--nats-url", &fleet.server.url, "dead-letters"]);
    assert!(text(&letters).contains(&build), "{}", text(&letters));
}

#[test]
fn the_reaper_destroys_a_runner_whose_build_already_ended_and_records_it() {
    let fleet = Fleet::new("dur");
    let env = [("LIAN_REAP_EVERY_SECS", "1")];
    let _worker = fleet.worker("worker-a", &env);
    let mut wire = RawNats::subscribe(fleet.server.port, "lian.>");
    let (build, _ctx) = fleet.submit("lian-test/reaper:latest", "", &env);
    let done = fleet.event(&build, "completed");
    wire.wait_for(Duration::from_secs(60), "completion", |m| m.subject == done);
    // A runner of this build that the lifecycle never recorded (as if a worker died right
    // after spawning it on a path that then ended the build).
    let stray = fleet.state.path().join("runners").join(format!("{build}-r7"));
    std::fs::create_dir_all(stray.join("context")).unwrap();
    std::fs::write(
        stray.join("lease.json"),
        format!("{{\"lease_key\":\"{build}-r7\",\"runner_type\":\"cax11\"}}"),
    )
    .unwrap();
    let reaped = format!("lian.dur.reaped.{build}-r7");
    let record = wire.wait_for(Duration::from_secs(30), "the reaper's record", |m| m.subject == reaped);
    assert!(record.json()["reason"].as_str().unwrap().contains("already ended"));
    assert!(!stray.exists(), "the stray runner is gone");
}
