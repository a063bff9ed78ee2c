//! Out of memory on docker_local runners with an engine and a cgroup per lease: tier memory
//! scaled by 1/64 (cax11 64 MiB, cax21 128 MiB, cax31 256 MiB) so this machine can exercise
//! the escalation of ADR-039. A build that needs ~40 MB is killed on cax11 and completes on
//! cax21; one that needs ~200 MB is killed twice and fails with the hint.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Fleet, history_kinds, runners_left};
use lian_test_support::docker_cli;

const ENV: [(&str, &str); 2] = [("LIAN_RUNNER_ISOLATION", "engine"), ("LIAN_MEMORY_SCALE", "0.015625")];

/// A RUN step that holds `mb` megabytes in a shell variable.
fn hog(mb: u32) -> String {
    format!("RUN x=$(head -c {mb}000000 /dev/zero | tr \"\\\\0\" a); echo ${{#x}}\n")
}

/// Nothing of the build's leases is left: runner directories, cgroups, engine sockets.
fn assert_no_leftovers(f: &Fleet, build: &str) {
    assert!(
        runners_left(f.state.path()).is_empty(),
        "{:?}",
        runners_left(f.state.path())
    );
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for lease in std::fs::read_dir(hierarchy.path()).into_iter().flatten().flatten() {
            let name = lease.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(&format!("lian-{build}")),
                "cgroup left: {}",
                lease.path().display()
            );
        }
    }
    for sock in std::fs::read_dir("/run/lian").into_iter().flatten().flatten() {
        assert!(
            !sock.file_name().to_string_lossy().starts_with(build),
            "engine socket left: {:?}",
            sock.path()
        );
    }
}

#[test]
fn an_oom_killed_build_is_retried_once_on_the_next_tier_and_completes() {
    let f = Fleet::new("oom");
    let _worker = f.worker("w", &ENV);
    let mut wire = f.wire();
    let (build, _ctx) = f.submit("lian-test/oom-once:latest", &hog(40), &[]);
    let done = format!("lian.oom.build.{build}.completed");
    let end = wire.wait_for(Duration::from_secs(180), "completion", |m| {
        m.subject == done || m.subject.ends_with(&format!("{build}.failed"))
    });
    assert_eq!(end.subject, done, "{}", String::from_utf8_lossy(&end.payload));

    let kinds: Vec<String> = history_kinds(&f.server.url, &build)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        kinds,
        [
            "accepted",
            "sized",
            "started",
            "runner_requested",
            "runner_leased",
            "context_synced",
            "step_failed",
            "runner_destroyed",
            "oom_escalated",
            "runner_requested",
            "runner_leased",
            "context_synced",
            "image_built",
            "metrics_recorded",
            "runner_destroyed",
            "completed"
        ],
    );
    let event = |kind: &str| {
        wire.seen
            .iter()
            .find(|m| m.subject == format!("lian.oom.build.{build}.{kind}"))
            .unwrap()
            .json()
    };
    assert_eq!(event("step_failed")["oom"], true);
    assert_eq!(event("oom_escalated")["from"], "cax11");
    assert_eq!(event("oom_escalated")["to"], "cax21");
    let metrics = event("metrics_recorded");
    let mem = metrics["mem_p95_gb"]
        .as_f64()
        .expect("memory sampled from the lease cgroup");
    assert!(mem > 0.0 && mem <= 0.125, "P95 within the cax21 lease's 128 MiB: {mem}");

    let id = event("completed")["image_id"].as_str().unwrap().to_string();
    let inspect = Command::new(docker_cli())
        .args(["image", "inspect", "--format", "{{.Id}}", "lian-test/oom-once:latest"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        id,
        "the image reached the host engine"
    );
    assert_no_leftovers(&f, &build);

    // Sizing learned: the workspace's next build starts on the tier that succeeded, and
    // `lian sizing explain` says why.
    let (next, next_ctx) = f.submit("lian-test/oom-next:latest", &hog(40), &[]);
    let sized_subject = format!("lian.oom.build.{next}.sized");
    let sized = wire.wait_for(Duration::from_secs(60), "the next build sized", |m| {
        m.subject == sized_subject
    });
    let sized = sized.json();
    assert_eq!(sized["runner_type"], "cax21", "{sized}");
    assert_eq!(sized["tier"], "learned", "{sized}");
    assert!(sized["reason"].as_str().unwrap().contains(&build), "{sized}");
    let done = format!("lian.oom.build.{next}.completed");
    let end = wire.wait_for(Duration::from_secs(180), "the next build's end", |m| {
        m.subject == done || m.subject.ends_with(&format!("{next}.failed"))
    });
    assert_eq!(
        end.subject,
        done,
        "no OOM this time: {}",
        String::from_utf8_lossy(&end.payload)
    );
    let directives = common::directives_json(next_ctx.path(), "oom", "lian-test/oom-next:latest");
    let explain = common::lian(&[
        "--nats-url",
        &f.server.url,
        "sizing",
        "explain",
        directives.to_str().unwrap(),
        "--context",
        next_ctx.path().to_str().unwrap(),
    ]);
    let said = common::text(&explain);
    assert!(
        said.contains(&format!(
            "build {build} ran out of memory on cax11 and succeeded on cax21"
        )),
        "{said}"
    );
    assert!(said.contains("=> cax21 (tier 3, learned from an OOM)"), "{said}");
}

#[test]
fn a_second_oom_fails_with_the_runner_type_hint() {
    let f = Fleet::new("oom");
    let _worker = f.worker("w", &ENV);
    let mut wire = f.wire();
    let (build, _ctx) = f.submit("lian-test/oom-twice:latest", &hog(200), &[]);
    let failed = format!("lian.oom.build.{build}.failed");
    let end = wire.wait_for(Duration::from_secs(180), "the failure", |m| {
        m.subject == failed || m.subject.ends_with(&format!("{build}.completed"))
    });
    assert_eq!(end.subject, failed);
    let reason = end.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("out of memory on cax21") && reason.contains("set runner_type in .build-spec.ncl"),
        "{reason}"
    );
    let kinds: Vec<String> = history_kinds(&f.server.url, &build)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "runner_destroyed").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| *k == "oom_escalated").count(), 1, "{kinds:?}");
    assert_no_leftovers(&f, &build);
}
