//! JSON logs (`LIAN_LOG_FORMAT=json`): one build's lines pulled out of a worker's and the
//! control plane's logs by its id, every line about it carrying the id as a field, and no
//! secret in any line.

mod common;

use common::{Fleet, Running, submit_with, text};

const TOKEN: &str = "log-json-token-5d2c7e";

/// Each line of a log, parsed as JSON (a line that is not JSON fails the test).
fn json_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    let log = std::fs::read_to_string(path).unwrap();
    assert!(!log.contains(TOKEN), "a secret in {}: {log}", path.display());
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// The build id a line carries as a field: its own, or one of its spans'.
fn build_id_of(line: &serde_json::Value) -> Option<&str> {
    line["build_id"].as_str().or_else(|| {
        line["spans"]
            .as_array()?
            .iter()
            .find_map(|span| span["build_id"].as_str())
    })
}

/// Every line that names `build` (in its message or any field) carries it as a field, and
/// at least `least` do; returns them.
fn lines_of<'a>(log: &'a [serde_json::Value], build: &str, least: usize, who: &str) -> Vec<&'a serde_json::Value> {
    let about: Vec<_> = log.iter().filter(|l| l.to_string().contains(build)).collect();
    for line in &about {
        assert_eq!(
            build_id_of(line),
            Some(build),
            "{who}: a line about the build without its id: {line}"
        );
    }
    assert!(
        about.len() >= least,
        "{who}: {} lines about {build}: {about:#?}",
        about.len()
    );
    about
}

#[test]
fn one_builds_lines_carry_its_id_in_the_worker_and_the_control_plane() {
    let fleet = Fleet::new("log-json");
    let logs = tempfile::tempdir().unwrap();
    let (control_log, worker_log) = (logs.path().join("control.log"), logs.path().join("worker.log"));
    let state = fleet.state.path().to_str().unwrap();
    let json_logs = [("LIAN_LOG_FORMAT", "json"), ("LIAN_LOG", "info,async_nats=warn")];
    let control = Running::start_logged(
        &[
            "--nats-url",
            &fleet.server.url,
            "control",
            "--state-dir",
            state,
            "--listen",
            "127.0.0.1:0",
        ],
        &[json_logs.as_slice(), &[("LIAN_CONTROL_TOKEN", TOKEN)]].concat(),
        &control_log,
        "serving http://",
    );
    let url = control.served_url();
    let worker = Running::start_logged(
        &[
            "--nats-url",
            &fleet.server.url,
            "worker",
            "--state-dir",
            state,
            "--name",
            "json-logs",
        ],
        &[
            json_logs.as_slice(),
            &[("LIAN_CONTROL_URL", url.as_str()), ("LIAN_CONTROL_TOKEN", TOKEN)],
        ]
        .concat(),
        &worker_log,
        "",
    );

    let out = submit_with(
        &fleet.server.url,
        fleet.workspace,
        "lian-test/log-json:latest",
        &["--output", "json", "--wait", "--timeout", "180"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    let build = first["build_id"].as_str().unwrap().to_string();
    // Stopped, so every line is written out before the logs are read.
    worker.stop();
    control.stop();

    let worker_lines = json_log(&worker_log);
    let about = lines_of(&worker_lines, &build, 8, "worker");
    // The effects' lines carry their step too.
    assert!(
        about.iter().any(|l| l["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|s| s["name"] == "step" && s["step"].is_string()))),
        "{about:#?}"
    );
    assert!(about.iter().all(|l| {
        l["spans"].as_array().is_none_or(|spans| {
            spans
                .iter()
                .all(|s| s["name"] != "build" || s["workspace"] == fleet.workspace)
        })
    }));

    let control_lines = json_log(&control_log);
    let leased = lines_of(&control_lines, &build, 2, "control");
    assert!(
        leased.iter().any(|l| l["message"] == "leased") && leased.iter().any(|l| l["message"] == "released"),
        "{leased:#?}"
    );
}
