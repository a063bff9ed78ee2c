//! The cascade gate (issue 11): a cascade planning more layers than the limit is held until
//! `lian cascade approve`, and says so on `lian.>`; with `--refuse-over-limit` it is refused.
//! A real `lian cascade` on a real nats-server; this test plays the worker that completes
//! the example catalog's root (`base`, three descendants).

mod common;

use std::time::Duration;

use common::{Fleet, cascade_service, layer_completed, lian, nats_streams, staged_examples, text};
use lian_test_support::RawMessage;

fn kind(m: &RawMessage) -> &str {
    m.subject.rsplit('.').next().unwrap()
}

fn queued(url: &str) -> serde_json::Value {
    nats_streams(url)
        .into_iter()
        .find(|s| s["stream"] == "LIAN_REQUESTS")
        .unwrap()["messages"]
        .clone()
}

#[test]
fn a_cascade_over_the_limit_waits_for_approval_or_is_refused() {
    let fleet = Fleet::new("examples");
    let url = fleet.server.url.clone();
    let catalog = staged_examples();
    let within = Duration::from_secs(30);
    let mut wire = fleet.wire();

    let held = cascade_service(&url, catalog.path(), &["--approve-over-layers", "2"]);
    layer_completed(&mut wire, "base", "b1", "sha256:0001");
    let waiting = wire.wait_for(within, "the cascade held at the gate", |m| {
        m.subject.starts_with("lian.examples.cascade.c-b1.") && kind(m) != "started"
    });
    assert_eq!(kind(&waiting), "awaiting_approval", "{}", waiting.json());
    assert_eq!(waiting.json()["layers"], 3);
    assert_eq!(waiting.json()["over"], "3 layers, over the limit of 2");
    // It was held before anything was asked for, and says so when asked.
    assert_eq!(queued(&url), 0, "nothing requested while held");
    let shown = lian(&["--nats-url", &url, "--output", "json", "cascade", "show", "c-b1"]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["state"], "awaiting_approval", "{shown}");

    let approved = lian(&["--nats-url", &url, "cascade", "approve", "c-b1", "--by", "alice"]);
    assert!(approved.status.success(), "{}", text(&approved));
    let said = wire.wait_for(within, "the approval", |m| {
        m.subject == "lian.examples.cascade.c-b1.approved"
    });
    assert_eq!(said.json()["by"], "alice");
    assert!(
        said.json().get("cause").is_none(),
        "a person, not a build: {}",
        said.json()
    );
    for layer in ["deps", "tools"] {
        wire.wait_for(within, "a layer requested after approval", |m| {
            m.subject == "lian.examples.cascade.c-b1.layer_requested" && m.json()["layer"] == layer
        });
    }
    let again = lian(&["--nats-url", &url, "cascade", "approve", "c-b1"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("not waiting for approval"), "{}", text(&again));
    drop(held);

    // Within the limit, a cascade goes on by itself.
    let roomy = cascade_service(&url, catalog.path(), &["--approve-over-layers", "3"]);
    layer_completed(&mut wire, "base", "b2", "sha256:0002");
    let next = wire.wait_for(within, "the cascade going on", |m| {
        m.subject.starts_with("lian.examples.cascade.c-b2.") && kind(m) != "started"
    });
    assert_eq!(kind(&next), "layer_requested", "{}", next.json());
    drop(roomy);

    // Refused: the cascade ends at once, nothing built.
    let strict = cascade_service(
        &url,
        catalog.path(),
        &["--approve-over-layers", "2", "--refuse-over-limit"],
    );
    layer_completed(&mut wire, "base", "b3", "sha256:0003");
    let end = wire.wait_for(within, "the refusal", |m| {
        m.subject.starts_with("lian.examples.cascade.c-b3.") && kind(m) != "started"
    });
    assert_eq!(kind(&end), "refused", "{}", end.json());
    let shown = lian(&["--nats-url", &url, "cascade", "show", "c-b3"]);
    assert_eq!(shown.status.code(), Some(1), "{}", text(&shown));
    assert!(text(&shown).contains("refused"), "{}", text(&shown));
    drop(strict);
}
