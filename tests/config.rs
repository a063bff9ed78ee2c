//! `lian config show` and the loader behind every command's settings, as a user meets them:
//! secrets never printed, every value's source named, a mistyped key and a missing named
//! file refused with exit 2.

mod common;

use common::{lian_with, text};

const FILE_PASSWORD: &str = "file-password-8c1e5b";
const ENV_TOKEN: &str = "env-token-33a9f0";

fn config_file(dir: &tempfile::TempDir, toml: &str) -> String {
    let path = dir.path().join("lian.toml");
    std::fs::write(&path, toml).unwrap();
    path.display().to_string()
}

#[test]
fn config_show_names_every_source_and_prints_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(
        &dir,
        &format!(
            "ack_wait_secs = 17\n\n[registry]\nurl = \"https://registry.example\"\nusername = \"ci\"\npassword = \"{FILE_PASSWORD}\"\n"
        ),
    );
    let env = [
        ("LIAN_CONFIG", file.as_str()),
        ("LIAN_CONTROL_TOKEN", ENV_TOKEN),
        ("LIAN_MAX_DELIVER", "9"),
    ];

    let out = lian_with(&["config", "show", "--nats-url", "nats://127.0.0.1:4999"], &env);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(!shown.contains(FILE_PASSWORD) && !shown.contains(ENV_TOKEN), "{shown}");
    let row = |key: &str| {
        shown
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} in {shown}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(row("ack_wait_secs"), ["ack_wait_secs", "17", "file", &file]);
    assert_eq!(row("max_deliver"), ["max_deliver", "9", "env", "LIAN_MAX_DELIVER"]);
    assert_eq!(
        row("control_token"),
        ["control_token", "<redacted>", "env", "LIAN_CONTROL_TOKEN"]
    );
    assert_eq!(
        row("registry.password"),
        ["registry.password", "<redacted>", "file", &file]
    );
    assert_eq!(row("reap_every_secs"), ["reap_every_secs", "60", "default"]);
    assert_eq!(
        row("nats_url"),
        ["nats_url", "nats://127.0.0.1:4999", "flag", "--nats-url"]
    );
    assert_eq!(row("config"), ["config", &file, "env", "LIAN_CONFIG"]);

    let out = lian_with(&["--output", "json", "config", "show"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !text(&out).contains(FILE_PASSWORD) && !text(&out).contains(ENV_TOKEN),
        "{}",
        text(&out)
    );
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(doc["file"], file.as_str());
    let settings = &doc["settings"];
    assert_eq!(settings["control_token"]["value"], "<redacted>");
    assert_eq!(settings["control_token"]["source"], "env LIAN_CONTROL_TOKEN");
    assert_eq!(settings["registry.username"]["value"], "ci");
    assert_eq!(settings["registry.username"]["source"], format!("file {file}"));
    assert_eq!(settings["ack_wait_secs"]["value"], 17);
}

#[test]
fn a_mistyped_key_is_refused_with_exit_2_naming_it_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&dir, "ack_wait_secs = 17\ncontrol_tokn = \"t\"\n");
    for args in [&["config", "show"][..], &["dead-letters"][..]] {
        let out = lian_with(args, &[("LIAN_CONFIG", &file)]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(
            said.contains("control_tokn") && said.contains(&file) && said.contains("control_token"),
            "the key, the file and the keys allowed: {said}"
        );
    }
    let out = lian_with(&["--output", "json", "config", "show"], &[("LIAN_CONFIG", &file)]);
    let last = String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let error: serde_json::Value = serde_json::from_str(&last).expect("a JSON error line");
    assert_eq!(error["error"]["exit_code"], 2);
    assert!(
        error["error"]["message"].as_str().unwrap().contains("control_tokn"),
        "{error}"
    );
}

#[test]
fn a_config_file_named_but_missing_is_refused_with_exit_2() {
    let out = lian_with(&["config", "show"], &[("LIAN_CONFIG", "/nonexistent/lian.toml")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("/nonexistent/lian.toml") && text(&out).contains("does not exist"),
        "{}",
        text(&out)
    );
}
