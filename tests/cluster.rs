//! A fleet on a three-node NATS cluster on loopback (routes, JetStream on each with its own
//! store, `sync_interval: always`): every stream and bucket has three copies, and killing
//! the node that leads the event stream in the middle of a build (and leaving it down)
//! loses no acknowledged event: that build and one submitted while the node is gone both
//! complete once, through workers that were given the seed list and reconnect by themselves.

mod common;

use std::time::Duration;

use common::{Running, STEPS, history_kinds, nats_streams, submit_to};
use lian_test_support::{NatsCluster, RawNats};

const WS: &str = "clu";

fn submit(seeds: &str, image: &str, extra: &str, env: &[(&str, &str)]) -> (String, tempfile::TempDir) {
    submit_to(seeds, WS, image, extra, env)
}

#[test]
fn a_build_completes_once_after_the_event_stream_leader_is_killed() {
    assert!(
        lian_test_support::docker_available(),
        "this test builds images: start a Docker engine (see .ci/run)"
    );
    let mut cluster = NatsCluster::start(3);
    let seeds = cluster.seeds();
    let state = tempfile::tempdir().unwrap();
    let env = [("LIAN_ACK_WAIT_SECS", "2")];

    // The topology, as any `lian` command creates it: three copies of everything.
    let before = nats_streams(&seeds);
    assert_eq!(before.len(), 10, "{before:?}");
    for s in &before {
        assert_eq!(s["replicas"], 3, "{s}");
        assert_eq!(s["followers"].as_array().unwrap().len(), 2, "{s}");
    }
    let events = |all: &[serde_json::Value]| {
        all.iter()
            .find(|s| s["stream"] == "LIAN_EVENTS")
            .expect("the event stream")
            .clone()
    };
    let leader = events(&before)["leader"].as_str().unwrap().to_string();
    assert!(!leader.is_empty(), "{before:?}");

    let workers: Vec<Running> = ["worker-a", "worker-b"]
        .iter()
        .map(|name| {
            Running::start_with(
                &[
                    "--nats-url",
                    &seeds,
                    "worker",
                    "--state-dir",
                    state.path().to_str().unwrap(),
                    "--name",
                    name,
                ],
                &env,
                "",
            )
        })
        .collect();
    // Watch from a node that stays up.
    let survivor = cluster.nodes.iter().find(|n| n.name != leader).unwrap().port;
    let mut wire = RawNats::subscribe(survivor, "lian.>");

    let (first, _ctx1) = submit(&seeds, "lian-test/cluster-a:latest", "RUN sleep 3\n", &env);
    let synced = format!("lian.{WS}.build.{first}.context_synced");
    wire.wait_for(Duration::from_secs(90), "the first build's context", |m| {
        m.subject == synced
    });
    cluster.kill(&leader);

    // Submitted with the full seed list while one seed is dead.
    let (second, _ctx2) = submit(&seeds, "lian-test/cluster-b:latest", "RUN true\n", &env);
    for build in [&first, &second] {
        let done = format!("lian.{WS}.build.{build}.completed");
        wire.wait_for(Duration::from_secs(120), "a completion after the node died", |m| {
            m.subject == done
        });
        let story = history_kinds(&seeds, build);
        assert_eq!(
            story.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            STEPS,
            "every acknowledged event of {build}, once"
        );
    }
    let ended: Vec<&str> = wire
        .seen
        .iter()
        .filter(|m| m.subject.ends_with(".completed") || m.subject.ends_with(".failed"))
        .map(|m| m.subject.as_str())
        .collect();
    assert_eq!(ended.len(), 2, "one end per build on the wire: {ended:?}");

    // The cluster moved the stream's leadership and reports the dead node as not current.
    let after = nats_streams(&seeds);
    let now = events(&after);
    assert_ne!(now["leader"], leader.as_str(), "{now}");
    assert!(
        after.iter().all(|s| s["replicas"] == 3),
        "a node down shrinks no stream: {after:?}"
    );
    assert!(
        now["followers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["server"] == leader.as_str() && (f["offline"] == true || f["current"] == false)),
        "{now}"
    );

    // Back on its old store, the node catches up with what it missed.
    cluster.restart(&leader);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let all = nats_streams(&seeds);
        let behind: Vec<String> = all
            .iter()
            .flat_map(|s| s["followers"].as_array().unwrap().iter().map(move |f| (s, f)))
            .filter(|(_, f)| f["current"] != true || f["lag"] != 0 || f["offline"] == true)
            .map(|(s, f)| format!("{} {}", s["stream"], f))
            .collect();
        if behind.is_empty() && all.iter().all(|s| !s["leader"].as_str().unwrap().is_empty()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{leader} did not catch up within 60 s: {behind:?}"
        );
    }
    drop(workers);
}
