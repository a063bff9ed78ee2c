//! Every failure path ends with exactly one terminal event and a destroyed runner. A worker
//! whose effect fails at one step, every time (`LIAN_FAILPOINT=fail_at:<effect>`), with two
//! deliveries: the first delivery hands the build back, the second, the last, ends it
//! `failed` (abandoned, naming the step it stopped before) with a dead letter, whatever the
//! step. A destroy that keeps failing is retried
//! with backoff, then left to the reaper, and the build still ends (completed) once; the
//! reaper then destroys the runner. After each: one terminal event on the wire and in the
//! history, no lease engine, mount or cgroup left.

mod common;

use std::time::Duration;

use common::{Fleet, history_all, leaks, lian, nats_streams, runners_left, text};

fn fail_at(effect: &str) {
    let fleet = Fleet::new("ends");
    let failpoint = format!("fail_at:{effect}");
    let env = [
        ("LIAN_ACK_WAIT_SECS", "2"),
        ("LIAN_MAX_DELIVER", "2"),
        ("LIAN_REAP_EVERY_SECS", "1"),
        ("LIAN_FAILPOINT", failpoint.as_str()),
    ];
    let _worker = fleet.worker("worker-a", &env);
    let mut wire = fleet.wire();
    let (build, _context) = fleet.submit(&format!("lian-test/ends-{}:latest", effect.replace('_', "-")), "", &env);
    let (completed, failed) = (fleet.event(&build, "completed"), fleet.event(&build, "failed"));
    let end = wire.wait_for(Duration::from_secs(150), "the build's end", |m| {
        m.subject == completed || m.subject == failed
    });
    let lease = format!("{build}-r1");
    if effect == "destroy_runner" {
        assert_eq!(end.subject, completed, "{}", String::from_utf8_lossy(&end.payload));
        let reaped = format!("lian.ends.reaped.{lease}");
        wire.wait_for(Duration::from_secs(60), "the reaper to destroy the runner", |m| {
            m.subject == reaped
        });
        let destroyed = fleet.event(&build, "runner_destroyed");
        let left = wire.wait_for(Duration::from_secs(5), "the destroy record", |m| m.subject == destroyed);
        let why = left.json()["left_to_reaper"].as_str().unwrap_or_default().to_string();
        assert!(why.contains("failpoint"), "{why}");
    } else {
        let reason = end.json()["reason"].as_str().unwrap_or_default().to_string();
        assert_eq!(end.subject, failed, "{reason}");
        // The last delivery ends it at the safe point before the step that kept failing.
        assert!(
            reason.contains("delivered 2 times") && reason.contains(&format!("last stopped before {effect}")),
            "{reason}"
        );
        assert_eq!(end.json()["step"], "abandoned");
        let letters = lian(&["--nats-url", &fleet.server.url, "dead-letters"]);
        assert!(text(&letters).contains(&build), "{}", text(&letters));
    }
    // The wire carries nothing after the end for this build except what is stored.
    wire.publish("lian.ends-marker.done", b"{}");
    wire.wait_for(Duration::from_secs(10), "the marker", |m| {
        m.subject == "lian.ends-marker.done"
    });
    let prefix = format!("lian.ends.build.{build}.");
    let terminal_on_wire = wire
        .seen
        .iter()
        .filter(|m| {
            m.subject.starts_with(&prefix) && (m.subject.ends_with(".completed") || m.subject.ends_with(".failed"))
        })
        .count();
    assert_eq!(terminal_on_wire, 1, "one terminal event on the wire");
    let story = history_all(&fleet.server.url, &build);
    let terminal = story.iter().filter(|(k, _)| k == "completed" || k == "failed").count();
    assert_eq!(terminal, 1, "one terminal event in the history: {story:?}");
    assert_eq!(
        story.last().map(|(k, _)| k.as_str()),
        Some(end.subject.rsplit('.').next().unwrap())
    );
    assert!(
        runners_left(fleet.state.path()).is_empty(),
        "{:?}",
        runners_left(fleet.state.path())
    );
    let left = leaks(fleet.state.path(), &[lease]);
    assert!(left.is_empty(), "leaked: {left:#?}");
}

#[test]
fn failing_to_size_ends_failed_once() {
    fail_at("resolve_size");
}

#[test]
fn failing_to_spawn_ends_failed_once() {
    fail_at("spawn_runner");
}

#[test]
fn failing_to_sync_ends_failed_once_with_the_runner_destroyed() {
    fail_at("sync_context");
}

#[test]
fn failing_to_build_ends_failed_once_with_the_runner_destroyed() {
    fail_at("run_build");
}

#[test]
fn failing_to_record_metrics_ends_failed_once_with_the_runner_destroyed() {
    fail_at("record_metrics");
}

#[test]
fn a_destroy_that_keeps_failing_is_left_to_the_reaper_and_the_build_ends_once() {
    fail_at("destroy_runner");
}

/// The worker holding a build's last delivery is killed: the server never delivers the
/// request again, and says so in a max-deliveries advisory. Another worker takes the request
/// back from the stream and ends the build `failed` (abandoned) once, its runner destroyed,
/// with a dead letter. Two deliveries: worker-a dies building on the first; worker-b takes
/// the second (the last), abandons the build and dies destroying its runner; worker-c, idle,
/// gets nothing from the queue and ends the build from the advisory.
#[test]
fn killed_on_its_last_delivery_the_build_still_ends_once() {
    let fleet = Fleet::new("orphan");
    let env = |failpoint| {
        [
            ("LIAN_ACK_WAIT_SECS", "2"),
            ("LIAN_MAX_DELIVER", "2"),
            ("LIAN_FAILPOINT", failpoint),
        ]
    };
    let worker_a = fleet.worker("worker-a", &env("pause_before:run_build"));
    let mut wire = fleet.wire();
    let (build, _context) = fleet.submit("lian-test/orphan:latest", "", &env(""));
    let synced = fleet.event(&build, "context_synced");
    wire.wait_for(Duration::from_secs(60), "worker-a to reach the build", |m| {
        m.subject == synced
    });

    let worker_b = fleet.worker("worker-b", &env("pause_before:destroy_runner"));
    worker_a.kill9();
    let abandoned = fleet.event(&build, "step_failed");
    let last = wire.wait_for(Duration::from_secs(60), "worker-b to abandon the build", |m| {
        m.subject == abandoned
    });
    assert_eq!(
        last.json()["worker"],
        "worker-b",
        "{}",
        String::from_utf8_lossy(&last.payload)
    );
    let _worker_c = fleet.worker("worker-c", &env(""));
    worker_b.kill9();

    let (completed, failed) = (fleet.event(&build, "completed"), fleet.event(&build, "failed"));
    let end = wire.wait_for(Duration::from_secs(60), "the build's end", |m| {
        m.subject == completed || m.subject == failed
    });
    let said = String::from_utf8_lossy(&end.payload).to_string();
    assert_eq!(end.subject, failed, "{said}");
    assert_eq!(end.json()["step"], "abandoned", "{said}");
    assert_eq!(end.json()["worker"], "worker-c", "{said}");
    let story = history_all(&fleet.server.url, &build);
    let kinds: Vec<&str> = story.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "failed").count(), 1, "{story:?}");
    assert!(kinds.contains(&"runner_destroyed"), "{story:?}");
    let letters = lian(&["--nats-url", &fleet.server.url, "dead-letters"]);
    assert!(text(&letters).contains(&build), "{}", text(&letters));
    assert!(runners_left(fleet.state.path()).is_empty());
    let left = leaks(fleet.state.path(), &[format!("{build}-r1")]);
    assert!(left.is_empty(), "leaked: {left:#?}");
    // The work queue keeps a request that was never acked: the worker that ended the build
    // removed it (right after the end, so this waits, bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let streams = nats_streams(&fleet.server.url);
        let queued = streams.iter().find(|s| s["stream"] == "LIAN_REQUESTS").unwrap()["messages"].clone();
        if queued == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the expired request is still queued: {queued}"
        );
    }
}
