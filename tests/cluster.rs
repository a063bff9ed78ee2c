//! A fleet on a three-node NATS cluster on loopback (routes, JetStream on each with its own
//! store, `sync_interval: always`): every stream and bucket has three copies, and killing
//! the node that leads the event stream in the middle of a build (and leaving it down)
//! loses no acknowledged event: that build and one submitted while the node is gone both
//! complete once, through workers that were given the seed list and reconnect by themselves.
//! Roles starting on a cluster whose leaders all sit on one node spread them over the nodes.

mod common;

use std::time::Duration;

use common::{Running, STEPS, history_kinds, lian, nats_streams, submit_to, text};
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
    let workers: Vec<Running> = ["worker-a", "worker-b"]
        .iter()
        .map(|name| {
            Running::start_hearing(
                &[
                    "--nats-url",
                    &seeds,
                    "worker",
                    "--state-dir",
                    state.path().to_str().unwrap(),
                    "--name",
                    name,
                ],
                &[env[0], ("LIAN_LOG", "info,async_nats=warn")],
                "",
            )
        })
        .collect();
    // Workers spread the leaders as they start: the event stream's leader is read after.
    for w in &workers {
        w.wait_stderr(Duration::from_secs(60), "serving build requests");
    }
    let leader = events(&nats_streams(&seeds))["leader"].as_str().unwrap().to_string();
    assert!(!leader.is_empty(), "{before:?}");
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

/// Leaders per node, from `lian nats status --json`.
fn leaders_per_node(streams: &[serde_json::Value]) -> std::collections::BTreeMap<String, usize> {
    let mut load = std::collections::BTreeMap::new();
    for s in streams {
        *load.entry(s["leader"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    load
}

#[test]
fn roles_starting_together_spread_the_stream_leaders_over_the_nodes() {
    let cluster = NatsCluster::start(3);
    let seeds = cluster.seeds();
    // The topology, as a client command creates it (clients do not move leaders).
    let streams = nats_streams(&seeds);
    assert_eq!(streams.len(), 10, "{streams:?}");

    // Every leader on n1, as NATS often leaves them on a fresh cluster: asked with the same
    // stepdown request the spread uses, through a client that is not lian.
    let mut api = RawNats::subscribe(cluster.nodes[0].port, "_INBOX.skew.>");
    for (i, s) in streams.iter().enumerate().filter(|(_, s)| s["leader"] != "n1") {
        let reply = format!("_INBOX.skew.{i}");
        api.publish_with_reply(
            &format!("$JS.API.STREAM.LEADER.STEPDOWN.{}", s["stream"].as_str().unwrap()),
            &reply,
            br#"{"placement":{"preferred":"n1"}}"#,
        );
        let answer = api.wait_for(Duration::from_secs(10), "a stepdown's answer", |m| m.subject == reply);
        assert_eq!(answer.json()["success"], true, "{}", answer.json());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let load = leaders_per_node(&nats_streams(&seeds));
        if load.get("n1") == Some(&10) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not all on n1 within 30 s: {load:?}"
        );
    }

    // Two workers starting at once: both may plan the same moves; the result must still be
    // every node within its share, ceil(10 / 3) = 4.
    let state = tempfile::tempdir().unwrap();
    let workers: Vec<Running> = ["spread-a", "spread-b"]
        .iter()
        .map(|name| {
            let args = [
                "--nats-url",
                &seeds,
                "worker",
                "--state-dir",
                state.path().to_str().unwrap(),
                "--name",
                name,
            ];
            // At info: the line this waits for, and each move, are info lines.
            Running::start_hearing(&args, &[("LIAN_LOG", "info,async_nats=warn")], "")
        })
        .collect();
    for w in &workers {
        // A role spreads the leaders (and waits for the elections) before it serves.
        w.wait_stderr(Duration::from_secs(60), "serving build requests");
    }
    let streams = nats_streams(&seeds);
    let load = leaders_per_node(&streams);
    assert!(!load.contains_key(""), "every stream has a leader: {streams:#?}");
    assert!(load.len() >= 2, "leaders on at least two nodes: {load:?}");
    assert!(load.values().all(|&n| n <= 4), "no node over its share of 4: {load:?}");

    // An operator's rebalance finds nothing to move, and says how the leaders sit.
    let out = lian(&["--nats-url", &seeds, "--output", "json", "nats", "rebalance"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["moves"], serde_json::json!([]), "{report}");
    let per_node = report["leaders_per_node"].as_object().unwrap();
    assert_eq!(per_node.len(), 3, "{report}");
    assert_eq!(
        per_node.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        10,
        "{report}"
    );
    drop(workers);
}
