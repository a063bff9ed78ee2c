//! Tier-2 sizing from recorded usage: builds on docker_local runners record the cpu and
//! memory P95 sampled from their lease cgroup; once a workspace has enough of them and an
//! operator approved it, its next build is sized from that history.

mod common;

use std::time::Duration;

use common::{Fleet, context_with, directives_json, lian, text};
use lian_test_support::RawNats;

#[test]
fn an_approved_workspace_is_sized_from_its_history_and_explain_says_why() {
    let fleet = Fleet::new("sizing");
    let server = &fleet.server;
    let _worker = fleet.worker("w", &[]);
    let mut wire = fleet.wire();
    // `round` changes before every build, so its RUN really runs (a warm engine store would
    // otherwise serve it from cache, and a cached step uses no memory to sample).
    let context = context_with("COPY round /round\nRUN x=$(head -c 20000000 /dev/zero | tr \"\\\\0\" a); echo ${#x}\n");
    let directives = directives_json(context.path(), "sizing", "lian-test/sizing:latest");
    let ctx = context.path().to_str().unwrap();
    let d = directives.to_str().unwrap();
    let mut round = 0;
    let mut build = |wire: &mut RawNats| {
        round += 1;
        std::fs::write(context.path().join("round"), round.to_string()).unwrap();
        let out = lian(&[
            "--nats-url",
            &server.url,
            "submit",
            d,
            "--context",
            ctx,
            "--wait",
            "--timeout",
            "120",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let id = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
        let completed = format!("lian.sizing.build.{id}.completed");
        wire.wait_for(Duration::from_secs(10), "the completed event", |m| {
            m.subject == completed
        });
        let sized = format!("lian.sizing.build.{id}.sized");
        wire.wait_for(Duration::from_secs(10), "the sized event", |m| m.subject == sized)
            .json()
    };
    let explain = || {
        let out = lian(&["--nats-url", &server.url, "sizing", "explain", d, "--context", ctx]);
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };

    for _ in 0..3 {
        assert_eq!(build(&mut wire)["tier"], "default");
    }
    let recorded = wire
        .seen
        .iter()
        .filter(|m| m.subject.ends_with(".metrics_recorded"))
        .filter(|m| m.json()["mem_p95_gb"].as_f64().is_some_and(|g| g > 0.0))
        .count();
    assert_eq!(recorded, 3, "every build recorded its memory P95");

    let before = explain();
    assert!(
        before.contains("not approved") && before.contains("(tier 3, default)"),
        "{before}"
    );

    let approve = lian(&["--nats-url", &server.url, "sizing", "approve", "sizing"]);
    assert!(approve.status.success(), "{}", text(&approve));
    let after = explain();
    assert!(
        after.contains("approved") && after.contains("(tier 2, history)"),
        "{after}"
    );
    let sized = build(&mut wire);
    assert_eq!(sized["tier"], "history", "{sized}");
    assert_eq!(sized["runner_type"], "cax11", "tiny usage is floored at 2 cpu / 4 GB");

    let revoke = lian(&["--nats-url", &server.url, "sizing", "revoke", "sizing"]);
    assert!(revoke.status.success());
    assert!(explain().contains("(tier 3, default)"));
}
