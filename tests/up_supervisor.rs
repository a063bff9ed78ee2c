//! `lian up` supervises its fleet: a child killed under it is restarted, said so on stderr
//! and in `logs/up.log`, and the fleet builds again; Ctrl-C (SIGTERM) stops every child.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Running, history_kinds, staged_examples, submit_with, text};

/// The pids of processes whose command line has every one of `words` as an argument.
fn pids_with(words: &[&str]) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if words.iter().all(|w| args.iter().any(|a| a == w)) {
            found.push(pid);
        }
    }
    found
}

/// The NATS URL (a seed list for a cluster) `lian up` printed.
fn nats_url_of(fleet: &Running) -> String {
    fleet
        .stdout_lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("nats"))
        .expect("lian up prints its NATS URL")
        .trim()
        .to_string()
}

/// Processes whose command line mentions `marker` anywhere.
fn processes_mentioning(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect()
}

#[test]
fn a_killed_worker_is_restarted_and_the_fleet_builds_again() {
    assert!(
        lian_test_support::docker_available(),
        "this test builds an image: start a Docker engine (see .ci/run)"
    );
    let catalog = staged_examples();
    let state = tempfile::tempdir().unwrap();
    let state_path = state.path().to_str().unwrap();
    let fleet = Running::start_hearing(
        &[
            "up",
            "--nats-port",
            "0",
            "--workers",
            "1",
            "--state-dir",
            state_path,
            "--catalog",
            catalog.path().to_str().unwrap(),
        ],
        &[],
        "Ctrl-C stops everything",
    );
    let nats_url = nats_url_of(&fleet);

    let state_canonical = std::fs::canonicalize(state.path()).unwrap();
    let state_arg = state_canonical.to_str().unwrap();
    let workers = pids_with(&["worker", "--name", "worker-1", state_arg]);
    assert_eq!(workers.len(), 1, "one worker-1 under this fleet: {workers:?}");
    let killed = workers[0];
    // SAFETY: a process this test's fleet started; SIGKILL, as a crash.
    assert_eq!(unsafe { libc::kill(killed as i32, libc::SIGKILL) }, 0);

    let said = fleet.wait_stderr(Duration::from_secs(20), &format!("worker-1 (pid {killed}) exited"));
    assert!(
        said.contains("killed by signal 9") && said.contains("restarting it in"),
        "{said}"
    );
    let restarted = fleet.wait_stderr(Duration::from_secs(20), "worker-1 restarted (pid ");
    let new_pid: u32 = restarted
        .rsplit("(pid ")
        .next()
        .and_then(|p| p.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("a pid in {restarted:?}"));
    assert_ne!(new_pid, killed);
    assert_eq!(pids_with(&["worker", "--name", "worker-1", state_arg]), vec![new_pid]);
    let log = std::fs::read_to_string(state.path().join("logs/up.log")).unwrap();
    assert!(
        log.contains(&format!("worker-1 (pid {killed}) exited (killed by signal 9)"))
            && log.contains(&format!("worker-1 restarted (pid {new_pid})")),
        "up.log: {log}"
    );

    // The restarted worker is the fleet's only one: a build submitted now completes.
    let out = submit_with(
        &nats_url,
        "supervised",
        "lian-test/supervised:latest",
        &["--wait", "--timeout", "180"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let build = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    let kinds = history_kinds(&nats_url, &build);
    assert_eq!(
        kinds.last().map(|(k, w)| (k.as_str(), w.as_str())),
        Some(("completed", "worker-1"))
    );

    // SIGTERM, as Ctrl-C: every child of the fleet is gone once lian up has exited.
    fleet.stop();
    let left = processes_mentioning(state_arg);
    assert!(left.is_empty(), "still running after lian up stopped: {left:#?}");
    assert!(!Path::new(&format!("/proc/{new_pid}")).exists());
}

#[test]
fn up_with_a_three_member_nats_cluster_replicates_everything_and_builds() {
    assert!(
        lian_test_support::docker_available(),
        "this test builds an image: start a Docker engine (see .ci/run)"
    );
    let catalog = staged_examples();
    let state = tempfile::tempdir().unwrap();
    let fleet = Running::start(
        &[
            "up",
            "--nats-cluster",
            "3",
            "--nats-port",
            "0",
            "--workers",
            "1",
            "--state-dir",
            state.path().to_str().unwrap(),
            "--catalog",
            catalog.path().to_str().unwrap(),
        ],
        "Ctrl-C stops everything",
    );
    let nats_url = nats_url_of(&fleet);
    assert_eq!(
        nats_url.split(',').count(),
        3,
        "a seed list of the three members: {nats_url}"
    );

    // Every stream and bucket has three copies, one on each member.
    let streams = common::nats_streams(&nats_url);
    assert_eq!(streams.len(), 10, "{streams:#?}");
    for s in &streams {
        assert_eq!(s["replicas"], 3, "{s}");
    }
    // The roles spread the leaders as they start: on at least two members once every
    // stream has one (read until then, bounded; a role may still be starting).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let leaders: std::collections::BTreeSet<String> = common::nats_streams(&nats_url)
            .iter()
            .map(|s| s["leader"].as_str().unwrap().to_string())
            .collect();
        if !leaders.contains("") && leaders.len() >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leaders not spread within 30 s: {leaders:?}"
        );
    }
    let out = submit_with(
        &nats_url,
        "clustered",
        "lian-test/clustered:latest",
        &["--wait", "--timeout", "180"],
    );
    assert!(out.status.success(), "{}", text(&out));

    let state_arg = std::fs::canonicalize(state.path()).unwrap();
    let state_arg = state_arg.to_str().unwrap().to_string();
    fleet.stop();
    let left = processes_mentioning(&state_arg);
    assert!(left.is_empty(), "still running after lian up stopped: {left:#?}");
}
