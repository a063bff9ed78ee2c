//! `lian cache gc` against a real registry: session (`dev/`) tags made before the cutoff go,
//! `ci/` stays whatever its age, and a dry run deletes nothing.

mod common;

use std::process::Command;

use common::{lian, text};
use lian_test_support::{Registry, docker_cli, http};

fn push(registry: &Registry, repository: &str, tag: &str, content: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPY f /f\n").unwrap();
    // Content of this run only: the same bytes built before would come out of the engine's
    // build cache with that earlier build's creation time, which is what gc reads.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::fs::write(dir.path().join("f"), format!("{content} {nonce}")).unwrap();
    let host = registry.url.trim_start_matches("http://");
    let reference = format!("{host}/{repository}:{tag}");
    let docker = docker_cli();
    let built = Command::new(&docker)
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "-q", "-t", &reference])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let pushed = Command::new(&docker).args(["push", &reference]).output().unwrap();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    let _ = Command::new(&docker).args(["rmi", &reference]).output();
}

fn tags(registry: &Registry, repository: &str) -> Vec<String> {
    let answer = http(
        "GET",
        &format!("{}/v2/{repository}/tags/list", registry.url),
        None,
        None,
    );
    answer.json()["tags"]
        .as_array()
        .map(|t| t.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn old_session_caches_go_and_ci_stays() {
    let registry = Registry::start();
    push(&registry, "dev/jpl-ws/app", "s1", "session");
    push(&registry, "ci/ws/app", "c1", "ci");
    let gc = |args: &[&str]| {
        let mut all = vec!["cache", "gc", "--registry", registry.url.as_str()];
        all.extend_from_slice(args);
        let out = lian(&all);
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };

    let recent = gc(&["--older-than", "1h"]);
    assert!(recent.contains("removed 0 tag(s)"), "{recent}");
    assert_eq!(tags(&registry, "dev/jpl-ws/app"), ["s1"]);

    let dry = gc(&["--older-than", "0s", "--dry-run"]);
    assert!(dry.contains("would remove dev/jpl-ws/app:s1"), "{dry}");
    assert_eq!(tags(&registry, "dev/jpl-ws/app"), ["s1"], "a dry run deletes nothing");

    let done = gc(&["--older-than", "0s"]);
    assert!(done.contains("removed dev/jpl-ws/app:s1"), "{done}");
    assert!(
        tags(&registry, "dev/jpl-ws/app").is_empty(),
        "the session's tag is gone"
    );
    assert_eq!(tags(&registry, "ci/ws/app"), ["c1"], "ci/ is never collected");
}
