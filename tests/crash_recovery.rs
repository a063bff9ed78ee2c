//! Kill a worker with SIGKILL at each step of the lifecycle while a second worker runs: the
//! build completes exactly once, one runner was spawned and destroyed, and the history reads
//! as one coherent story. The worker is stopped at a named step by the failpoint
//! `LIAN_FAILPOINT=pause_before:<effect>`, so the kill lands exactly there.

mod common;

use std::time::Duration;

use common::{Running, STEPS, context_with, directives_json, history_kinds, lian_with, runners_left, text};
use lian_test_support::{NatsServer, RawNats, docker_available};

/// Short ack wait so the redelivery after the kill comes quickly.
const ENV: [(&str, &str); 2] = [("LIAN_ACK_WAIT_SECS", "2"), ("LIAN_MAX_DELIVER", "5")];

fn kill_before(effect: &str, after_event: &str) {
    assert!(
        docker_available(),
        "this test builds images: start a Docker engine (see .ci/run)"
    );
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let context = context_with("");
    let directives = directives_json(
        context.path(),
        "crash",
        &format!("lian-test/crash-{}:latest", effect.replace('_', "-")),
    );
    let mut wire = RawNats::subscribe(server.port, "lian.>");

    let failpoint = format!("pause_before:{effect}");
    let env_a = [ENV[0], ENV[1], ("LIAN_FAILPOINT", failpoint.as_str())];
    let worker_a = Running::start_with(
        &[
            "--nats-url",
            &server.url,
            "worker",
            "--state-dir",
            state_dir,
            "--name",
            "worker-a",
        ],
        &env_a,
        "",
    );
    let submitted = lian_with(
        &[
            "--nats-url",
            &server.url,
            "submit",
            directives.to_str().unwrap(),
            "--context",
            context.path().to_str().unwrap(),
        ],
        &ENV,
    );
    assert!(submitted.status.success(), "{}", text(&submitted));
    let build = String::from_utf8_lossy(&submitted.stdout).trim().to_string();

    let paused_at = format!("lian.crash.build.{build}.{after_event}");
    wire.wait_for(Duration::from_secs(60), &paused_at, |m| m.subject == paused_at);
    let worker_b = Running::start_with(
        &[
            "--nats-url",
            &server.url,
            "worker",
            "--state-dir",
            state_dir,
            "--name",
            "worker-b",
        ],
        &ENV,
        "",
    );
    worker_a.kill9();

    let end = wire.wait_for(Duration::from_secs(90), "the build's end", |m| {
        m.subject == format!("lian.crash.build.{build}.completed")
            || m.subject == format!("lian.crash.build.{build}.failed")
    });
    assert!(
        end.subject.ends_with(".completed"),
        "{}",
        String::from_utf8_lossy(&end.payload)
    );
    drop(worker_b);

    let story = history_kinds(&server.url, &build);
    let kinds: Vec<&str> = story.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds, STEPS,
        "one coherent story, each step once (killed before {effect})"
    );
    let cut = STEPS.iter().position(|s| *s == after_event).unwrap();
    assert!(story[..=cut].iter().all(|(_, w)| w == "worker-a"), "{story:?}");
    assert!(story[cut + 1..].iter().all(|(_, w)| w == "worker-b"), "{story:?}");
    let completions = wire
        .seen
        .iter()
        .filter(|m| m.subject.starts_with(&format!("lian.crash.build.{build}.")) && m.subject.ends_with(".completed"))
        .count();
    assert_eq!(completions, 1, "completed exactly once");
    assert!(
        runners_left(state.path()).is_empty(),
        "the runner was destroyed: {:?}",
        runners_left(state.path())
    );
}

#[test]
fn killed_before_resolving_the_size() {
    kill_before("resolve_size", "accepted");
}

#[test]
fn killed_before_spawning_the_runner() {
    kill_before("spawn_runner", "runner_requested");
}

#[test]
fn killed_before_syncing_the_context() {
    kill_before("sync_context", "runner_leased");
}

#[test]
fn killed_before_building() {
    kill_before("run_build", "context_synced");
}

#[test]
fn killed_before_recording_metrics() {
    kill_before("record_metrics", "image_built");
}

#[test]
fn killed_before_destroying_the_runner() {
    kill_before("destroy_runner", "metrics_recorded");
}
