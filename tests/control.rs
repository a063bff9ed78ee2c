//! `lian control`: the control plane's API with a real NATS behind it and real docker_local
//! runners, called with a plain HTTP client; and a fleet whose workers lease through it.

mod common;

use std::time::Duration;

use common::{Fleet, STEPS, history_kinds, lian_with, runners_left, text};
use lian_test_support::http;

const TOKEN: &str = "test-control-token-5f1c";

fn lease_body(key: &str, build: &str, provider: &str) -> String {
    format!(
        r#"{{"lease_key":"{key}","provider":"{provider}","runner_type":"cax11","workspace":"ctl","build_id":"{build}","owner":"test-worker"}}"#
    )
}

#[test]
fn every_route_but_health_needs_the_token_and_bad_requests_say_what_is_wrong() {
    let fleet = Fleet::new("ctl");
    let (_control, url) = fleet.control(TOKEN, &[]);

    let health = http("GET", &format!("{url}/healthz"), None, None);
    assert_eq!((health.status, health.json()["status"].as_str()), (200, Some("ok")));

    for (method, path) in [
        ("GET", "/api/v1/vm-pool"),
        ("POST", "/api/v1/vm-pool"),
        ("DELETE", "/api/v1/vm-pool/b-r1"),
        ("POST", "/api/v1/metrics"),
        ("GET", "/api/v1/p95?workspace=ctl"),
        ("GET", "/metrics"),
    ] {
        for token in [None, Some("wrong-token")] {
            let answer = http(method, &format!("{url}{path}"), token, None);
            assert_eq!(answer.status, 401, "{method} {path} with {token:?}: {answer:?}");
            assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
            assert_eq!(answer.json()["error"]["code"], "unauthorized");
            assert!(!answer.body.contains(TOKEN));
        }
    }

    let call = |method: &str, path: &str, body: Option<&str>| http(method, &format!("{url}{path}"), Some(TOKEN), body);
    let refusals = [
        (call("POST", "/api/v1/vm-pool", Some("{not json")), 400, "lease request"),
        (
            call(
                "POST",
                "/api/v1/vm-pool",
                Some(&lease_body("b-r1", "b", "docker_local").replace("\"owner\"", "\"password\":\"x\",\"owner\"")),
            ),
            400,
            "unknown field `password`",
        ),
        (
            call(
                "POST",
                "/api/v1/vm-pool",
                Some(&lease_body("b-r1", "b", "docker_local").replace("\"ctl\"", "\"a.b\"")),
            ),
            400,
            "workspace",
        ),
        (
            call("POST", "/api/v1/vm-pool", Some(&lease_body("b-r1", "b", "hcloud"))),
            422,
            "hcloud",
        ),
        (
            call("DELETE", "/api/v1/vm-pool/never-leased-r1", None),
            404,
            "no lease never-leased-r1",
        ),
        (call("GET", "/api/v1/p95", None), 400, "workspace="),
        (call("GET", "/api/v1/p95?workspace=A*", None), 400, "workspace"),
        (
            call(
                "POST",
                "/api/v1/metrics",
                Some(
                    r#"{"workspace":"ctl","build_id":"b","runner_type":"cax11","duration_ms":5,"cpu_p95":-1.0,"mem_p95_gb":0.1}"#,
                ),
            ),
            400,
            "not negative",
        ),
        (call("GET", "/api/v2/nothing", None), 404, "no such route"),
    ];
    // A record from a newer worker, with a field this control plane does not know, is kept.
    let newer = call(
        "POST",
        "/api/v1/metrics",
        Some(
            r#"{"workspace":"ctl","build_id":"b-newer","runner_type":"cax11","duration_ms":5,"cpu_p95":0.5,"mem_p95_gb":0.1,"a_later_field":{"x":1}}"#,
        ),
    );
    assert_eq!(newer.status, 204, "{newer:?}");
    for (answer, status, says) in refusals {
        assert_eq!(answer.status, status, "{answer:?}");
        let message = answer.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }
    assert!(
        runners_left(fleet.state.path()).is_empty(),
        "a refused lease starts nothing"
    );

    // Without a token the control plane does not start at all.
    let out = lian_with(
        &["--nats-url", &fleet.server.url, "control", "--listen", "127.0.0.1:0"],
        &[("LIAN_CONTROL_TOKEN", "")],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("LIAN_CONTROL_TOKEN"), "{}", text(&out));
}

#[test]
fn leases_live_in_key_value_so_any_replica_lists_and_destroys_them() {
    let fleet = Fleet::new("ctl");
    let (_a, url_a) = fleet.control(TOKEN, &[]);
    let (_b, url_b) = fleet.control(TOKEN, &[]);
    let call = |url: &str, method: &str, path: &str, body: Option<&str>| {
        http(method, &format!("{url}{path}"), Some(TOKEN), body)
    };

    let leased = call(
        &url_a,
        "POST",
        "/api/v1/vm-pool",
        Some(&lease_body("ctl1-r1", "ctl1", "docker_local")),
    );
    assert_eq!(leased.status, 201, "{leased:?}");
    let lease = leased.json();
    assert_eq!(
        (lease["lease_id"].as_str(), lease["state"].as_str()),
        (Some("ctl1-r1"), Some("ready"))
    );
    assert_eq!(runners_left(fleet.state.path()), vec!["ctl1-r1".to_string()]);
    assert!(
        std::path::Path::new(&engine_socket("ctl1-r1")).exists(),
        "the lease has its own engine"
    );

    // Asked again (a worker that took the build over): the same runner, not a second one.
    let again = call(
        &url_b,
        "POST",
        "/api/v1/vm-pool",
        Some(&lease_body("ctl1-r1", "ctl1", "docker_local")),
    );
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json()["provider_id"], lease["provider_id"]);
    assert_eq!(runners_left(fleet.state.path()).len(), 1);

    let listed = call(&url_b, "GET", "/api/v1/vm-pool", None).json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["owner"], "test-worker");
    assert!(listed[0]["age_secs"].as_u64().is_some());

    let prom = call(&url_a, "GET", "/metrics", None);
    assert_eq!(prom.status, 200);
    assert!(prom.header("content-type").unwrap().starts_with("text/plain"));
    assert!(
        prom.body.contains("lian_control_leases_created_total 1\n"),
        "{}",
        prom.body
    );
    assert!(
        prom.body
            .contains("lian_control_leases{provider=\"docker_local\",runner_type=\"cax11\"} 1\n"),
        "{}",
        prom.body
    );

    let released = call(&url_b, "DELETE", "/api/v1/vm-pool/ctl1-r1", None);
    assert_eq!(released.status, 204, "{released:?}");
    assert!(runners_left(fleet.state.path()).is_empty());
    assert!(
        !std::path::Path::new(&engine_socket("ctl1-r1")).exists(),
        "its engine is gone"
    );
    assert_eq!(
        call(&url_a, "GET", "/api/v1/vm-pool", None).json(),
        serde_json::json!([])
    );
    assert_eq!(call(&url_a, "DELETE", "/api/v1/vm-pool/ctl1-r1", None).status, 404);
    let prom = call(&url_b, "GET", "/metrics", None).body;
    assert!(prom.contains("lian_control_leases_released_total 1\n"), "{prom}");
    assert!(!prom.contains("lian_control_leases{"), "no lease held: {prom}");
}

#[test]
fn workers_lease_and_record_through_the_control_plane_and_it_reaps_what_is_left() {
    let fleet = Fleet::new("ctl");
    let (_control, url) = fleet.control(TOKEN, &[("LIAN_REAP_EVERY_SECS", "1")]);
    let via_control = [("LIAN_CONTROL_URL", url.as_str()), ("LIAN_CONTROL_TOKEN", TOKEN)];
    let _worker = fleet.worker("w1", &via_control);
    let call = |method: &str, path: &str, body: Option<&str>| http(method, &format!("{url}{path}"), Some(TOKEN), body);

    let mut wire = fleet.wire();
    let mut builds = Vec::new();
    for i in 0..3 {
        let (build, _ctx) = fleet.submit("lian-test/ctl:latest", &format!("RUN echo {i} > /n"), &[]);
        let completed = fleet.event(&build, "completed");
        wire.wait_for(Duration::from_secs(120), "completion", |m| m.subject == completed);
        let kinds: Vec<String> = history_kinds(&fleet.server.url, &build)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kinds, STEPS.to_vec(), "{build}");
        builds.push(build);
    }
    let prom = call("GET", "/metrics", None).body;
    assert!(prom.contains("lian_control_leases_created_total 3\n"), "{prom}");
    assert!(prom.contains("lian_control_leases_released_total 3\n"), "{prom}");
    assert!(prom.contains("lian_control_metrics_recorded_total 3\n"), "{prom}");
    assert_eq!(call("GET", "/api/v1/vm-pool", None).json(), serde_json::json!([]));
    assert!(runners_left(fleet.state.path()).is_empty());

    // The metrics the workers recorded through it are what tier-2 sizing reads.
    let p95 = call("GET", "/api/v1/p95?workspace=ctl", None).json();
    assert!(
        p95["cpu_p95"].as_f64().is_some() && p95["mem_p95_gb"].as_f64().is_some(),
        "{p95}"
    );
    assert_eq!(p95["approved"], false);

    // A lease nobody gives back (its build has ended) is reaped, and the reaping recorded.
    let stray = format!("{}-r7", builds[0]);
    let leased = call(
        "POST",
        "/api/v1/vm-pool",
        Some(&lease_body(&stray, &builds[0], "docker_local")),
    );
    assert_eq!(leased.status, 201, "{leased:?}");
    let subject = format!("lian.ctl.reaped.{stray}");
    let record = wire.wait_for(Duration::from_secs(30), "the reaper's record", |m| m.subject == subject);
    assert!(record.json()["reason"].as_str().unwrap().contains("already ended"));
    assert_eq!(record.json()["by"], "control");
    assert_eq!(call("GET", "/api/v1/vm-pool", None).json(), serde_json::json!([]));
    assert!(runners_left(fleet.state.path()).is_empty());
}

#[test]
fn a_lease_takes_a_warm_engine_the_pool_refills_and_shutdown_stops_the_pool() {
    let fleet = Fleet::new("ctl");
    let warm = |tier: &str, n: u32| format!("lian_control_warm_engines{{runner_type=\"{tier}\"}} {n}\n");
    let all_warm = |text: &str| {
        ["cax11", "cax21", "cax31", "cax41"]
            .iter()
            .all(|t| text.contains(&warm(t, 1)))
    };
    let mut wire = fleet.wire();
    let (control, url) = fleet.control(TOKEN, &[("LIAN_WARM_POOL", "1"), ("LIAN_MEMORY_SCALE", "0.03125")]);
    // Each engine the pool starts is announced on lian._pool.<tier>.ready.
    let ready = |wire: &mut lian_test_support::RawNats, tier: &str, not: &[String]| {
        let subject = format!("lian._pool.{tier}.ready");
        let notice = wire.wait_for(Duration::from_secs(60), &subject, |m| {
            m.subject == subject && !not.iter().any(|s| m.json()["slot"] == s.as_str())
        });
        notice.json()["slot"].as_str().unwrap().to_string()
    };
    let slots_before: Vec<String> = ["cax11", "cax21", "cax31", "cax41"]
        .iter()
        .map(|tier| ready(&mut wire, tier, &[]))
        .collect();
    let prometheus = || http("GET", &format!("{url}/metrics"), Some(TOKEN), None).body;
    assert!(all_warm(&prometheus()), "{}", prometheus());
    for slot in &slots_before {
        assert!(fleet.state.path().join("runners/.warm").join(slot).is_dir(), "{slot}");
    }

    let leased = http(
        "POST",
        &format!("{url}/api/v1/vm-pool"),
        Some(TOKEN),
        Some(&lease_body("warm1-r1", "warm1", "docker_local")),
    );
    assert_eq!(leased.status, 201, "{leased:?}");
    let provider_id = leased.json()["provider_id"].as_str().unwrap().to_string();
    let slot = provider_id
        .split_once('@')
        .map(|(_, s)| s.to_string())
        .unwrap_or_default();
    assert!(
        slot.starts_with("w-cax11-") && slots_before.contains(&slot),
        "{provider_id} took a warm engine"
    );
    // The lease's engine is that started engine, and it answers.
    let socket = format!("unix://{}", engine_socket(&slot));
    let version = std::process::Command::new(lian_test_support::docker_cli())
        .args(["-H", &socket, "version", "--format", "{{.Server.Version}}"])
        .output()
        .unwrap();
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));

    // The pool is topped up behind the lease.
    let refill = ready(&mut wire, "cax11", &slots_before);
    assert_ne!(refill, slot);
    assert!(all_warm(&prometheus()), "{}", prometheus());

    let released = http("DELETE", &format!("{url}/api/v1/vm-pool/warm1-r1"), Some(TOKEN), None);
    assert_eq!(released.status, 204, "{released:?}");
    assert!(!std::path::Path::new(&engine_socket(&slot)).exists());

    // Stopping the control plane stops every engine left in the pool.
    let pool_sockets: Vec<String> = std::fs::read_dir(fleet.state.path().join("runners/.warm"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|s| s.starts_with("w-"))
        .map(|slot| engine_socket(&slot))
        .collect();
    assert_eq!(pool_sockets.len(), 4, "{pool_sockets:?}");
    drop(control);
    for s in &pool_sockets {
        assert!(!std::path::Path::new(s).exists(), "{s} still there after shutdown");
    }
    assert!(
        runners_left(fleet.state.path()).is_empty(),
        "{:?}",
        runners_left(fleet.state.path())
    );
}

/// Where a lease's (or a warm slot's) engine listens: named by a short token of it.
fn engine_socket(name: &str) -> String {
    format!("/run/lian/{}.sock", lian_core::names::path_token(name))
}
