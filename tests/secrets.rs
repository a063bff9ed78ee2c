//! Build secrets: a request names a secret id, the worker mounts its file into the RUN step
//! that asks for it, and the value appears in no event, no log and no image layer.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Running, context_with, lian, text};
use lian_test_support::{NatsServer, RawNats, Sshd, docker_available, docker_cli};

const SECRET: &str = "s3cr3t-sccache-7f3a9";

#[test]
fn a_secret_reaches_its_run_step_and_nothing_else() {
    check_secret_build("docker_local", "", "lian-test/secret");
}

#[test]
fn on_an_ssh_pool_host_a_secret_is_there_for_the_build_only() {
    let sshd = Sshd::start();
    let work_dir = tempfile::tempdir().unwrap();
    let pool = format!(
        "[[ssh_hosts]]\nname = \"loopback\"\naddress = \"127.0.0.1:{}\"\nuser = \"{}\"\nkey = \"{}\"\nhost_key = \"{}\"\ntier = \"cax41\"\nwork_dir = \"{}\"\n",
        sshd.port,
        sshd.user,
        sshd.client_key.display(),
        sshd.host_key,
        work_dir.path().display()
    );
    check_secret_build("ssh_pool", &pool, "lian-test/secret-ssh");
    let left: Vec<_> = std::fs::read_dir(work_dir.path()).unwrap().flatten().collect();
    assert!(
        left.is_empty(),
        "nothing (no secret file) is left on the host: {left:?}"
    );
}

/// A build on `provider` whose RUN step reads a secret: the step sees it, and the value is in
/// no layer, no event, no `lian status` and no worker log; an unknown secret id fails the build.
fn check_secret_build(provider: &str, extra_config: &str, image: &str) {
    assert!(
        docker_available(),
        "this test builds an image: start a Docker engine (see .ci/run)"
    );
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("sccache");
    std::fs::write(&secret, SECRET).unwrap();
    let config = dir.path().join("lian.toml");
    std::fs::write(
        &config,
        format!(
            "build_network = \"none\"\n\n[secrets]\nsccache_creds = \"{}\"\n\n{extra_config}",
            secret.display()
        ),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let _worker = Running::start_logged(
        &[
            "--nats-url",
            &server.url,
            "--config",
            config.to_str().unwrap(),
            "worker",
            "--state-dir",
            state.path().to_str().unwrap(),
        ],
        &[("LIAN_LOG", "debug,async_nats=warn")],
        &log,
        "",
    );
    let mut wire = RawNats::subscribe(server.port, "lian.>");
    let context =
        context_with("RUN --mount=type=secret,id=sccache_creds wc -c < /run/secrets/sccache_creds > /secret-length\n");
    let submit = |image: &str, secret_id: &str| {
        let directives = dir.path().join(format!("{secret_id}.json"));
        let json = serde_json::json!({
            "workspace": "sec",
            "artifact": {"image": image, "language": "other", "secrets": [secret_id]},
            "compute_provider": provider,
            "registry_provider": "zot",
            "cache_policy": {"actor": "ci", "cache_from": [], "cache_to": []}
        });
        std::fs::write(&directives, json.to_string()).unwrap();
        lian(&[
            "--nats-url",
            &server.url,
            "submit",
            directives.to_str().unwrap(),
            "--context",
            context.path().to_str().unwrap(),
            "--wait",
            "--timeout",
            "120",
        ])
    };

    let tagged = format!("{image}:latest");
    let out = submit(&tagged, "sccache_creds");
    assert!(out.status.success(), "{}", text(&out));
    let build = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    let done = format!("lian.sec.build.{build}.completed");
    wire.wait_for(Duration::from_secs(10), "completion", |m| m.subject == done);

    let run = Command::new(docker_cli())
        .args(["run", "--rm", "--network=none", &tagged, "cat", "/secret-length"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        SECRET.len().to_string(),
        "the RUN step read the secret"
    );
    let saved = Command::new(docker_cli()).args(["save", &tagged]).output().unwrap();
    assert!(saved.status.success());
    assert!(!contains(&saved.stdout, SECRET.as_bytes()), "the secret is in no layer");
    assert!(
        wire.seen.iter().all(|m| !contains(&m.payload, SECRET.as_bytes())),
        "the secret is in no event"
    );
    let status = lian(&["--nats-url", &server.url, "status", &build, "--json"]);
    assert!(!text(&status).contains(SECRET));

    let unknown = submit(&format!("{image}-unknown:latest"), "nope");
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("secret nope is not configured on this worker"),
        "{}",
        text(&unknown)
    );

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("completed"), "the log is the worker's");
    assert!(!logged.contains(SECRET), "the secret is in no log");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
