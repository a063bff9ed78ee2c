//! `--output json`, the same global flag for every command: JSON lines for streams, one
//! document otherwise, errors as JSON on stderr.

mod common;

use std::time::Duration;

use common::{Fleet, Running, lian, submit_with, text};

/// Every line of `out`, each parsed as JSON (a line that is not JSON fails the test).
fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

#[test]
fn a_waited_submit_watch_and_status_print_json_only() {
    let fleet = Fleet::new("output-json");
    let _worker = fleet.worker("json-worker", &[]);
    let url = fleet.server.url.clone();
    let watch = Running::start_hearing(&["--output", "json", "--nats-url", &url, "watch"], &[], "");
    watch.wait_stderr(Duration::from_secs(20), "watching lian.>");

    let out = submit_with(
        &url,
        fleet.workspace,
        "lian-test/output-json:latest",
        &["--output", "json", "--wait", "--timeout", "180"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let lines = json_lines(&out.stdout);
    let build = lines[0]["build_id"]
        .as_str()
        .expect("the first line names the build")
        .to_string();
    assert_eq!(lines[0]["duplicate"], false);
    let events = &lines[1..];
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"accepted"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");
    assert!(events.iter().all(|e| e["build_id"] == build.as_str()), "{events:#?}");

    // One document for a one-shot command; `--json` is the same thing.
    let status = lian(&["--nats-url", &url, "--output", "json", "status", &build]);
    assert!(status.status.success(), "{}", text(&status));
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).expect("one JSON document");
    assert_eq!(doc["state"], "completed");
    let alias = lian(&["--nats-url", &url, "status", &build, "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&alias.stdout).unwrap()["history"],
        doc["history"]
    );

    // The watcher saw the same build, one JSON line per message.
    let watched: Vec<serde_json::Value> = watch
        .stop()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let completed = format!("lian.{}.build.{build}.completed", fleet.workspace);
    assert!(
        watched.iter().any(|m| m["subject"] == completed.as_str()),
        "{watched:#?}"
    );
}

#[test]
fn one_shot_commands_print_one_document_and_errors_are_json_on_stderr() {
    let graph = lian(&["--output", "json", "catalog", "--catalog", "examples/catalog", "graph"]);
    assert!(graph.status.success(), "{}", text(&graph));
    let doc: serde_json::Value = serde_json::from_slice(&graph.stdout).expect("one JSON document");
    assert_eq!(doc["format"], "dot");
    assert!(doc["graph"].as_str().unwrap().contains("digraph"), "{doc}");

    let valid = lian(&[
        "--output",
        "json",
        "catalog",
        "--catalog",
        "examples/catalog",
        "validate",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&valid.stdout).expect("one JSON document");
    assert_eq!((doc["valid"].as_bool(), doc["layers"].as_u64()), (Some(true), Some(4)));

    let out = lian(&[
        "--output",
        "json",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--connect-timeout",
        "1s",
        "dead-letters",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty(), "{}", text(&out));
    // Its last line (logs may come before it).
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error: serde_json::Value =
        serde_json::from_str(stderr.lines().last().expect("an error on stderr")).expect("a JSON error");
    assert_eq!(error["error"]["exit_code"], 3);
    assert_eq!(error["error"]["kind"], "unreachable");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach NATS")
    );
}
