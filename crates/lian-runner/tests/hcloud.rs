//! The hcloud provider against a strict local fake of the Hetzner Cloud API (Hetzner cannot
//! be reached from here): success, slow provisioning, quota errors, rate limits, bad
//! tokens, and servers that never become ready (deleted, with a clear error). Each lease
//! gets a host key pair of its own, and the server carries its public half.

use std::net::TcpListener;

use lian_core::LeaseKey;
use lian_core::sizing::RunnerType;
use lian_runner::hcloud::{HOST_KEY_LABEL, Hcloud, HcloudConfig, HcloudError, LEASE_LABEL};
use lian_runner::ssh::{HostKeyPair, generate_host_key};
use lian_test_support::{FakeHcloud, HcloudBehaviour};

/// A listening port standing in for the new server's sshd.
fn ssh_port() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn provider(fake: &FakeHcloud, ssh_port: u16, ready_secs: u64) -> Hcloud {
    Hcloud::new(HcloudConfig {
        endpoint: fake.url.clone(),
        token: fake.token.clone().into(),
        image: "debian-12".into(),
        location: Some("fsn1".into()),
        authorized_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient lian-worker".into(),
        ssh_port,
        ready_timeout_secs: ready_secs,
        poll_interval_ms: 20,
    })
}

fn behaviour() -> HcloudBehaviour {
    HcloudBehaviour {
        action_polls: 2,
        ip: "127.0.0.1".into(),
        ..Default::default()
    }
}

fn key(s: &str) -> LeaseKey {
    LeaseKey::new(s).unwrap()
}

fn pair() -> HostKeyPair {
    generate_host_key("lian-runner test").unwrap()
}

/// `ssh-ed25519 AAAA...` without the comment.
fn key_only(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// The public key of the private key cloud-init got in `user_data`.
fn public_of_user_data(user_data: &str) -> String {
    let doc: serde_json::Value = serde_norway::from_str(user_data).expect("user_data is YAML");
    assert_eq!(doc["users"][0]["name"], "lian", "{doc}");
    assert_eq!(doc["runcmd"][0][3], "buildkit", "{doc}");
    let pem = doc["ssh_keys"]["ed25519_private"]
        .as_str()
        .expect("a private key in user_data");
    let private = russh::keys::PrivateKey::from_openssh(pem).expect("an OpenSSH private key");
    key_only(&private.public_key().to_openssh().unwrap())
}

#[tokio::test]
async fn a_lease_is_a_labelled_server_found_again_by_its_key_and_deleted() {
    let fake = FakeHcloud::start(behaviour());
    let (_sshd, port) = ssh_port();
    let hc = provider(&fake, port, 10);
    let host_keys = pair();
    let server = hc.spawn(&key("b1-r1"), RunnerType::Cax21, &host_keys).await.unwrap();
    assert_eq!((server.status.as_str(), server.ip.as_str()), ("running", "127.0.0.1"));
    assert_eq!(
        server.host_key.as_deref().map(key_only),
        Some(key_only(&host_keys.public_key))
    );
    let servers = fake.servers();
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].server_type, "cax21");
    assert_eq!(servers[0].labels.get(LEASE_LABEL).map(String::as_str), Some("b1-r1"));
    let ud = &servers[0].user_data;
    assert!(
        ud.starts_with("#cloud-config") && ud.contains("buildkit") && ud.contains(host_keys.public_key.trim()),
        "{ud}"
    );
    // The server got the lease's private key, and carries the public half as a label.
    assert_eq!(public_of_user_data(ud), key_only(&host_keys.public_key));
    assert!(
        servers[0].labels.contains_key(HOST_KEY_LABEL),
        "{:?}",
        servers[0].labels
    );

    // Whoever takes over finds the same server instead of creating another, and learns its
    // host key from the label, not from the pair it brought.
    let again = hc.spawn(&key("b1-r1"), RunnerType::Cax21, &pair()).await.unwrap();
    assert_eq!(again.id, server.id);
    assert_eq!(
        again.host_key.as_deref().map(key_only),
        Some(key_only(&host_keys.public_key))
    );
    assert_eq!(fake.requests().iter().filter(|r| *r == "POST /v1/servers").count(), 1);

    hc.destroy(&key("b1-r1")).await.unwrap();
    assert!(fake.servers().is_empty());
    hc.destroy(&key("b1-r1")).await.unwrap();
}

#[tokio::test]
async fn slow_provisioning_is_waited_for() {
    let fake = FakeHcloud::start(HcloudBehaviour {
        action_polls: 10,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let server = provider(&fake, port, 10)
        .spawn(&key("slow-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap();
    assert_eq!(server.status, "running");
    assert!(
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("GET /v1/actions/"))
            .count()
            >= 10
    );
}

#[tokio::test]
async fn a_quota_error_is_reported_and_nothing_is_created() {
    let fake = FakeHcloud::start(HcloudBehaviour {
        quota_exceeded: true,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let err = provider(&fake, port, 10)
        .spawn(&key("q-r1"), RunnerType::Cax41, &pair())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HcloudError::Api { code, .. } if code == "resource_limit_exceeded"),
        "{err}"
    );
    assert!(err.to_string().contains("server limit exceeded"), "{err}");
    assert!(fake.servers().is_empty());
}

#[tokio::test]
async fn a_server_that_never_runs_is_deleted_with_a_clear_error() {
    let fake = FakeHcloud::start(HcloudBehaviour {
        never_running: true,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let err = provider(&fake, port, 1)
        .spawn(&key("stuck-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap_err();
    assert!(matches!(err, HcloudError::NeverReady { .. }), "{err}");
    assert!(
        err.to_string().contains("status initializing") && err.to_string().contains("it was deleted"),
        "{err}"
    );
    assert!(fake.servers().is_empty(), "the stuck server was deleted");
}

#[tokio::test]
async fn a_running_server_whose_ssh_never_answers_is_deleted() {
    let fake = FakeHcloud::start(behaviour());
    let closed = {
        let (l, port) = ssh_port();
        drop(l);
        port
    };
    let err = provider(&fake, closed, 1)
        .spawn(&key("nossh-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not answer"), "{err}");
    assert!(fake.servers().is_empty());
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried() {
    let fake = FakeHcloud::start(HcloudBehaviour {
        flaky_first: true,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let server = provider(&fake, port, 10)
        .spawn(&key("flaky-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap();
    assert_eq!(server.status, "running");
    assert!(fake.requests().len() >= 3);
}

#[tokio::test]
async fn a_wrong_token_is_refused_clearly() {
    let fake = FakeHcloud::start(behaviour());
    let (_sshd, port) = ssh_port();
    let wrong = Hcloud::new(HcloudConfig {
        endpoint: fake.url.clone(),
        token: "wrong".into(),
        image: "debian-12".into(),
        location: None,
        authorized_key: "ssh-ed25519 AAAA k".into(),
        ssh_port: port,
        ready_timeout_secs: 5,
        poll_interval_ms: 20,
    });
    let err = wrong
        .spawn(&key("tok-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HcloudError::Api { code, .. } if code == "unauthorized"),
        "{err}"
    );
    assert!(!err.to_string().contains("wrong"), "the token is never shown: {err}");
    let debug = format!("{wrong:?}");
    assert!(debug.contains("<redacted>") && !debug.contains("\"wrong\""), "{debug}");
}
