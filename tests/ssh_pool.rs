//! The same build as the walking skeleton, through the ssh_pool provider: a real sshd on
//! 127.0.0.1, the context synced incrementally with russh, the build on the host's Docker
//! engine BuildKit, the lease directory removed at the end.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Running, STEPS, context_with, history_kinds, lian, text};
use lian_test_support::{NatsServer, RawNats, Sshd, docker_available, docker_cli};

#[test]
fn a_build_runs_through_the_ssh_pool_and_leaves_nothing_on_the_host() {
    assert!(
        docker_available(),
        "this test builds an image: start a Docker engine (see .ci/run)"
    );
    let server = NatsServer::start();
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let work_dir = dir.path().join("host-runners");
    let config = dir.path().join("lian.toml");
    std::fs::write(
        &config,
        format!(
            "build_network = \"none\"\n\n[[ssh_hosts]]\nname = \"loopback\"\naddress = \"127.0.0.1:{}\"\nuser = \"{}\"\nkey = \"{}\"\nhost_key = \"{}\"\ntier = \"cax41\"\nwork_dir = \"{}\"\n",
            sshd.port,
            sshd.user,
            sshd.client_key.display(),
            sshd.host_key,
            work_dir.display()
        ),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let _worker = Running::start(
        &[
            "--nats-url",
            &server.url,
            "--config",
            config.to_str().unwrap(),
            "worker",
            "--state-dir",
            state.path().to_str().unwrap(),
            "--name",
            "ssh-worker",
        ],
        "",
    );
    let mut wire = RawNats::subscribe(server.port, "lian.>");

    let context = context_with("RUN echo built over ssh > /etc/lian-ssh\n");
    let directives = dir.path().join("ssh.json");
    let json = serde_json::json!({
        "workspace": "pool",
        "artifact": {"image": "lian-test/ssh-pool:latest", "language": "other"},
        "compute_provider": "ssh_pool",
        "registry_provider": "zot",
        "cache_policy": {"actor": "ci", "cache_from": [], "cache_to": []}
    });
    std::fs::write(&directives, json.to_string()).unwrap();
    let out = lian(&[
        "--nats-url",
        &server.url,
        "submit",
        directives.to_str().unwrap(),
        "--context",
        context.path().to_str().unwrap(),
        "--wait",
        "--timeout",
        "120",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let build = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();

    let story = history_kinds(&server.url, &build);
    assert_eq!(story.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), STEPS);
    let leased = format!("lian.pool.build.{build}.runner_leased");
    let lease = wire.wait_for(Duration::from_secs(10), "the lease", |m| m.subject == leased);
    assert_eq!(lease.json()["host"], "loopback");
    assert!(
        lease.json()["lease_id"]
            .as_str()
            .unwrap()
            .starts_with("ssh_pool:loopback:")
    );

    let completed = format!("lian.pool.build.{build}.completed");
    let done = wire.wait_for(Duration::from_secs(10), "completion", |m| m.subject == completed);
    let id = done.json()["image_id"].as_str().unwrap().to_string();
    let inspect = Command::new(docker_cli())
        .args(["image", "inspect", "--format", "{{.Id}}", "lian-test/ssh-pool:latest"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&inspect.stdout).trim(), id);

    let left: Vec<_> = std::fs::read_dir(&work_dir)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the lease directory is gone from the host: {left:?}");
}
