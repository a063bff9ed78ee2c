//! Every documented exit code of `lian`, produced the way a user would meet it (README,
//! "Exit codes"; `lian --help`).

mod common;

use std::time::{Duration, Instant};

use common::{Running, lian, submit_unreachable, submit_with, text};

#[test]
fn help_lists_the_exit_codes_and_exits_0() {
    let out = lian(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let help = text(&out);
    for line in [
        "Exit codes:",
        "  1  the build failed",
        "  2  usage",
        "  3  cannot reach NATS",
        "  4  timed out",
        "  5  refused by policy",
    ] {
        assert!(help.contains(line), "{line:?} in {help}");
    }
}

#[test]
fn a_bad_flag_is_2() {
    let out = lian(&["submit", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn an_unreachable_nats_is_3() {
    let started = Instant::now();
    let out = lian(&[
        "--nats-url",
        "nats://127.0.0.1:1",
        "--connect-timeout",
        "1s",
        "dead-letters",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("cannot reach NATS"), "{}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_cache_policy_the_actor_may_not_have_is_5() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.json");
    let directives = serde_json::json!({
        "workspace": "ws",
        "artifact": {"image": "lian-test/refused:latest", "language": "other"},
        "compute_provider": "docker_local",
        "registry_provider": "zot",
        "cache_policy": {"actor": "ci", "cache_from": [], "cache_to": ["dev/jpl-ws"]}
    });
    std::fs::write(&path, directives.to_string()).unwrap();
    let out = submit_unreachable(&path, dir.path());
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("may not write cache namespace"), "{}", text(&out));
}

#[test]
fn waiting_past_the_timeout_is_4_and_an_unknown_build_is_2() {
    let server = lian_test_support::NatsServer::start();
    // No worker: the build is never taken.
    let out = submit_with(
        &server.url,
        "exit-codes",
        "lian-test/timeout:latest",
        &["--wait", "--timeout", "1"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("gave up waiting"), "{}", text(&out));

    let out = lian(&["--nats-url", &server.url, "status", "no-such-build"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no build no-such-build"), "{}", text(&out));
}

#[test]
fn a_waited_build_that_fails_is_1() {
    let server = lian_test_support::NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    // This worker refuses a layer its catalog does not have: the build fails at intake.
    let _worker = Running::start(
        &[
            "--nats-url",
            &server.url,
            "worker",
            "--state-dir",
            state.path().to_str().unwrap(),
            "--catalog",
            "examples/catalog",
        ],
        "",
    );
    let out = submit_with(
        &server.url,
        "exit-codes",
        "lian-test/fails:latest",
        &["--layer", "no-such-layer", "--wait", "--timeout", "60"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not in the catalog"), "{}", text(&out));
}
