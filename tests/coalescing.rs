//! Coalescing (issue 11): a burst of parent completions asks for one build per descendant.
//! A real `lian cascade` on a real nats-server hears three completions of the example
//! catalog's `tools` layer in a row, each with a new image, while nobody has taken the
//! requests for `app` yet: each newer request supersedes the queued one, the cascades of the
//! older ones wait on the newest build, and that build's end is every cascade's end for app.
//! Here this test plays the worker that ends builds (it appends their terminal events), so
//! the order is the test's and not a race; a real `lian worker` then drains the queue and
//! builds nothing that was superseded.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, cascade_service, end_build, history_kinds, layer_completed, nats_streams, staged_examples};
use lian_test_support::{RawMessage, RawNats};
use serde_json::json;

fn kind(m: &RawMessage) -> &str {
    m.subject.rsplit('.').next().unwrap()
}

fn tools_completed(wire: &mut RawNats, build: &str, image_id: &str) {
    layer_completed(wire, "tools", build, image_id);
}

fn cascade_events(wire: &RawNats, cascade: &str) -> Vec<serde_json::Value> {
    wire.seen
        .iter()
        .filter(|m| m.subject.contains(&format!(".cascade.{cascade}.")))
        .map(|m| m.json())
        .collect()
}

#[test]
fn a_burst_of_parent_completions_builds_each_descendant_once() {
    let fleet = Fleet::new("examples");
    let catalog = staged_examples();
    let cascade = cascade_service(&fleet.server.url, catalog.path(), &["--log-format", "json"]);
    let mut wire = fleet.wire();
    let within = Duration::from_secs(30);

    tools_completed(&mut wire, "t1", "sha256:0001");
    wire.wait_for(within, "c-t1 asks for app", |m| {
        m.subject == "lian.examples.cascade.c-t1.layer_requested"
    });
    tools_completed(&mut wire, "t2", "sha256:0002");
    let superseded = wire.wait_for(within, "c-t1-app superseded", |m| {
        m.subject == "lian.examples.build.c-t1-app.superseded"
    });
    assert_eq!(superseded.json()["by"], "c-t2-app", "{}", superseded.json());
    assert_eq!(superseded.json()["cascade"]["id"], "c-t1");
    tools_completed(&mut wire, "t3", "sha256:0003");
    wire.wait_for(within, "c-t2-app superseded", |m| {
        m.subject == "lian.examples.build.c-t2-app.superseded"
    });
    // Both older cascades now wait on the newest build: c-t1 was moved along the chain.
    for older in ["c-t1", "c-t2"] {
        wire.wait_for(within, "the older cascade follows c-t3-app", |m| {
            m.subject == format!("lian.examples.cascade.{older}.layer_superseded") && m.json()["by"] == "c-t3-app"
        });
    }

    // The newest build ends (here: it fails, as a worker would report it): every cascade
    // that waited on it takes that as its own app's end, and ends.
    end_build(
        &mut wire,
        "examples",
        "c-t3-app",
        json!({"type": "failed", "reason": "no such base image", "layer": "app",
               "cascade": {"id": "c-t3", "root": "tools"}}),
    );
    for cascade in ["c-t1", "c-t2", "c-t3"] {
        let end = wire.wait_for(within, "a cascade's end", |m| {
            m.subject.contains(&format!(".cascade.{cascade}.")) && matches!(kind(m), "completed" | "failed")
        });
        assert_eq!(kind(&end), "failed", "{}", end.json());
        assert_eq!(end.json()["failed"], json!(["app"]), "{}", end.json());
        let story = cascade_events(&wire, cascade);
        let app_end = story.iter().find(|e| e["type"] == "layer_failed").unwrap();
        assert_eq!(
            app_end["build_id"], "c-t3-app",
            "{cascade} ends with the build that ran: {story:?}"
        );
        assert_eq!(app_end["cause"]["build_id"], "c-t3-app", "{app_end}");
    }
    let requested: usize = ["c-t1", "c-t2", "c-t3"]
        .iter()
        .map(|c| {
            cascade_events(&wire, c)
                .iter()
                .filter(|e| e["type"] == "layer_requested")
                .count()
        })
        .sum();
    assert_eq!(requested, 3, "each cascade asked for app once");

    // The cascade's log lines carry the cascade, layer and build they are about.
    let line = cascade.wait_stderr(within, "\"cascade_id\":\"c-t2\"");
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    let span = line["spans"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(span["name"], "cascade", "{line}");
    assert_eq!(span["workspace"], "examples", "{line}");
    assert!(
        ["t2", "c-t3-app"].contains(&span["build_id"].as_str().unwrap()),
        "{line}"
    );

    // A real worker drains the three requests: the superseded ones end where they are.
    let _worker = fleet.worker("worker-a", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let streams = nats_streams(&fleet.server.url);
        let queued = &streams.iter().find(|s| s["stream"] == "LIAN_REQUESTS").unwrap()["messages"];
        if *queued == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "requests still queued: {queued}");
    }
    for build in ["c-t1-app", "c-t2-app"] {
        let kinds: Vec<String> = history_kinds(&fleet.server.url, build)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kinds, ["superseded"], "{build} was never built");
    }

    // A build that has begun (here: ended) is not superseded: the next request is its own.
    tools_completed(&mut wire, "t4", "sha256:0004");
    wire.wait_for(within, "c-t4 asks for app", |m| {
        m.subject == "lian.examples.cascade.c-t4.layer_requested"
    });
    let kinds: Vec<String> = history_kinds(&fleet.server.url, "c-t3-app")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(kinds, ["failed"], "an ended build keeps its end");
    assert!(
        cascade_events(&wire, "c-t3")
            .iter()
            .all(|e| e["type"] != "layer_superseded"),
        "nothing superseded c-t3's app"
    );
}
