//! One worker drives several builds at once (`builds_in_flight`), takes no more requests than
//! it has slots for, and a worker that dies holding several hands every one of them over.

mod common;

use std::time::Duration;

use common::{Fleet, STEPS, history_kinds, runners_left};

/// Short ack wait so the takeover after the kill comes quickly.
const ACK: (&str, &str) = ("LIAN_ACK_WAIT_SECS", "2");

#[test]
fn a_worker_with_two_slots_drives_two_builds_and_leaves_the_third_to_another() {
    let fleet = Fleet::new("slots");
    let mut wire = fleet.wire();
    // Two slots, and every build stops before its image is built: both are held at once.
    let worker_a = fleet.worker(
        "worker-a",
        &[
            ACK,
            ("LIAN_BUILDS_IN_FLIGHT", "2"),
            ("LIAN_FAILPOINT", "pause_before:run_build"),
        ],
    );
    let (first, _c1) = fleet.submit("lian-test/slots-1:latest", "", &[ACK]);
    let (second, _c2) = fleet.submit("lian-test/slots-2:latest", "", &[ACK]);
    for build in [&first, &second] {
        let synced = fleet.event(build, "context_synced");
        wire.wait_for(Duration::from_secs(90), &synced, |m| m.subject == synced);
    }
    for build in [&first, &second] {
        let story = history_kinds(&fleet.server.url, build);
        assert!(
            story.iter().all(|(_, worker)| worker == "worker-a"),
            "{build}: {story:?}"
        );
    }

    // Its slots are full: a third request stays in the queue, and a second worker builds it.
    let worker_b = fleet.worker("worker-b", &[ACK]);
    let (third, _c3) = fleet.submit("lian-test/slots-3:latest", "", &[ACK]);
    let done = fleet.event(&third, "completed");
    wire.wait_for(Duration::from_secs(120), &done, |m| m.subject == done);
    let story = history_kinds(&fleet.server.url, &third);
    assert!(
        story.iter().all(|(_, worker)| worker == "worker-b"),
        "the third build was never taken by the full worker: {story:?}"
    );

    // The first worker dies holding two builds: the other finishes both, each once.
    worker_a.kill9();
    for build in [&first, &second] {
        let done = fleet.event(build, "completed");
        wire.wait_for(Duration::from_secs(120), &done, |m| m.subject == done);
        let kinds: Vec<String> = history_kinds(&fleet.server.url, build)
            .into_iter()
            .map(|(kind, _)| kind)
            .filter(|kind| kind != "resumed")
            .collect();
        assert_eq!(kinds, STEPS, "{build}: one story, each step once");
    }
    drop(worker_b);
    assert!(
        runners_left(fleet.state.path()).is_empty(),
        "every runner was destroyed: {:?}",
        runners_left(fleet.state.path())
    );
}
