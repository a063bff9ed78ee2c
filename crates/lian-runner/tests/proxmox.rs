//! The proxmox provider against a strict local fake of the Proxmox VE API (no Proxmox can
//! be reached from here): success, recovery by lease key, slow tasks, a full storage, a
//! refused clone, a guest agent that never answers, SSH that never answers, a bad token
//! and a server error.

use std::net::TcpListener;

use lian_core::LeaseKey;
use lian_core::sizing::RunnerType;
use lian_runner::proxmox::{HOST_KEY_PATH, LEASE_TAG, Proxmox, ProxmoxConfig, ProxmoxError};
use lian_runner::ssh::{HostKeyPair, generate_host_key};
use lian_test_support::{FakeProxmox, ProxmoxBehaviour};

const CLIENT_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient+key/with=base64 lian-worker@host";

fn pair() -> HostKeyPair {
    generate_host_key("lian-runner test").unwrap()
}

/// A listening port standing in for the new VM's sshd.
fn ssh_port() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn config(fake: &FakeProxmox, ssh_port: u16, ready_secs: u64) -> ProxmoxConfig {
    ProxmoxConfig {
        endpoint: fake.url.clone(),
        token_id: fake.token_id.clone(),
        token_secret: fake.token_secret.clone().into(),
        node: fake.node.clone(),
        template_vmid: fake.template_vmid,
        pool: Some("ci".into()),
        storage: Some("fast".into()),
        ca_cert_pem: None,
        authorized_key: CLIENT_KEY.into(),
        ssh_port,
        ready_timeout_secs: ready_secs,
        poll_interval_ms: 20,
    }
}

fn provider(fake: &FakeProxmox, ssh_port: u16, ready_secs: u64) -> Proxmox {
    Proxmox::new(config(fake, ssh_port, ready_secs)).unwrap()
}

fn behaviour() -> ProxmoxBehaviour {
    ProxmoxBehaviour {
        task_polls: 2,
        ip: "127.0.0.1".into(),
        ..Default::default()
    }
}

fn key(s: &str) -> LeaseKey {
    LeaseKey::new(s).unwrap()
}

fn clones(fake: &FakeProxmox) -> usize {
    fake.requests().iter().filter(|r| r.ends_with("/clone")).count()
}

#[tokio::test]
async fn a_lease_is_a_tier_sized_clone_found_again_by_its_key_and_deleted() {
    let fake = FakeProxmox::start(behaviour());
    let (_sshd, port) = ssh_port();
    let pve = provider(&fake, port, 10);
    let host_keys = pair();
    let vm = pve.spawn(&key("b1-r1"), RunnerType::Cax21, &host_keys).await.unwrap();
    assert_eq!((vm.status.as_str(), vm.ip.as_str()), ("running", "127.0.0.1"));
    assert_eq!((vm.name.as_str(), vm.node.as_str()), ("lian-b1-r1", "pve1"));

    let vms = fake.vms();
    assert_eq!(vms.len(), 1);
    let made = &vms[0];
    assert_eq!(made.vmid, vm.vmid);
    assert_eq!((made.cores, made.memory), (4, 8 * 1024), "sized by the cax21 tier");
    assert!(made.full && made.pool.as_deref() == Some("ci") && made.storage.as_deref() == Some("fast"));
    assert_eq!(made.tags, vec![LEASE_TAG.to_string()]);
    assert!(
        made.description.lines().any(|l| l == "lian-lease=b1-r1"),
        "{}",
        made.description
    );
    assert_eq!(
        (made.ciuser.as_str(), made.ipconfig0.as_str(), made.agent.as_str()),
        ("lian", "ip=dhcp", "1")
    );
    // The key went through Proxmox's `urlencoded` format intact.
    assert_eq!(made.sshkeys_decoded, CLIENT_KEY);
    assert!(
        !made.sshkeys.contains(' ') && !made.sshkeys.contains('+'),
        "{}",
        made.sshkeys
    );

    // The lease's host key pair was put in place through the guest agent and sshd restarted.
    assert_eq!(
        made.files.get(HOST_KEY_PATH).map(|s| s.trim()),
        Some(host_keys.private_key.trim())
    );
    assert_eq!(
        made.files.get(&format!("{HOST_KEY_PATH}.pub")).map(|s| s.trim()),
        Some(host_keys.public_key.as_str())
    );
    let last = made.execs.last().expect("a command ran through the agent");
    assert_eq!(&last[..2], ["sh", "-c"]);
    assert!(
        last[2].contains("chmod 600") && last[2].contains("restart ssh"),
        "{last:?}"
    );

    // Whoever takes over finds the same VM instead of cloning another, and pins the pair
    // it brought.
    let other_keys = pair();
    let again = pve.spawn(&key("b1-r1"), RunnerType::Cax21, &other_keys).await.unwrap();
    assert_eq!(again.vmid, vm.vmid);
    assert_eq!(clones(&fake), 1);
    assert_eq!(
        fake.vms()[0]
            .files
            .get(&format!("{HOST_KEY_PATH}.pub"))
            .map(|s| s.trim()),
        Some(other_keys.public_key.as_str())
    );
    assert_eq!(pve.find(&key("b1-r1")).await.unwrap().map(|v| v.vmid), Some(vm.vmid));
    assert_eq!(pve.find(&key("b1-r2")).await.unwrap(), None);

    pve.destroy(&key("b1-r1")).await.unwrap();
    assert!(fake.vms().is_empty(), "the VM was deleted");
    assert!(fake.template_intact());
    pve.destroy(&key("b1-r1")).await.unwrap();
}

#[tokio::test]
async fn leases_of_different_keys_are_different_vms() {
    let fake = FakeProxmox::start(behaviour());
    let (_sshd, port) = ssh_port();
    let pve = provider(&fake, port, 10);
    let a = pve.spawn(&key("b2-r1"), RunnerType::Cax11, &pair()).await.unwrap();
    let b = pve.spawn(&key("b2_r1"), RunnerType::Cax41, &pair()).await.unwrap();
    assert_ne!(a.vmid, b.vmid);
    let sizes: Vec<(u32, u32)> = fake.vms().iter().map(|v| (v.cores, v.memory)).collect();
    assert_eq!(sizes, vec![(2, 4096), (16, 32768)]);
    // `_` is not allowed in a Proxmox VM name; the description tells the two apart.
    pve.destroy(&key("b2_r1")).await.unwrap();
    assert_eq!(fake.vms().iter().map(|v| v.vmid).collect::<Vec<_>>(), vec![a.vmid]);
}

#[tokio::test]
async fn slow_provisioning_is_waited_for() {
    let fake = FakeProxmox::start(ProxmoxBehaviour {
        task_polls: 10,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let vm = provider(&fake, port, 10)
        .spawn(&key("slow-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap();
    assert_eq!(vm.status, "running");
    let task_polls = fake
        .requests()
        .iter()
        .filter(|r| r.contains("/tasks/UPID:") && r.ends_with("/status"))
        .count();
    // clone, config and start each took ten polls.
    assert!(task_polls >= 30, "{task_polls} task polls");
}

#[tokio::test]
async fn a_full_storage_fails_the_clone_with_proxmox_message_and_leaves_nothing() {
    let fake = FakeProxmox::start(ProxmoxBehaviour {
        storage_full: true,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let err = provider(&fake, port, 10)
        .spawn(&key("full-r1"), RunnerType::Cax41, &pair())
        .await
        .unwrap_err();
    assert!(matches!(err, ProxmoxError::Task { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("clone failed: lvcreate") && text.contains("insufficient free space"),
        "Proxmox's own message: {text}"
    );
    assert!(fake.vms().is_empty(), "nothing left behind");
    assert!(fake.template_intact());
}

#[tokio::test]
async fn a_refused_clone_is_reported_and_not_retried() {
    let fake = FakeProxmox::start(ProxmoxBehaviour {
        clone_forbidden: true,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let err = provider(&fake, port, 10)
        .spawn(&key("deny-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap_err();
    assert!(matches!(&err, ProxmoxError::Api { status: 403, .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("Permission check failed (/vms/100, VM.Allocate)"),
        "{text}"
    );
    assert!(text.contains("VM.Clone"), "says which privileges are needed: {text}");
    assert_eq!(clones(&fake), 1, "a 4xx is not retried");
    assert!(fake.vms().is_empty());
}

#[tokio::test]
async fn a_vm_whose_guest_agent_never_answers_is_deleted_with_a_clear_error() {
    let fake = FakeProxmox::start(ProxmoxBehaviour {
        agent_never_ready: true,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let err = provider(&fake, port, 1)
        .spawn(&key("mute-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap_err();
    assert!(matches!(err, ProxmoxError::NeverReady { secs: 1, .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("never became ready within 1 s")
            && text.contains("QEMU guest agent is not running")
            && text.contains("it was deleted"),
        "{text}"
    );
    assert!(fake.vms().is_empty(), "the VM was deleted");
    let reqs = fake.requests();
    assert!(
        reqs.iter().any(|r| r.ends_with("/status/stop")),
        "stopped before the delete"
    );
    assert!(reqs.iter().any(|r| r.starts_with("DELETE ")));
}

#[tokio::test]
async fn a_running_vm_whose_ssh_never_answers_is_deleted() {
    let fake = FakeProxmox::start(behaviour());
    let closed = {
        let (l, port) = ssh_port();
        drop(l);
        port
    };
    let err = provider(&fake, closed, 1)
        .spawn(&key("nossh-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("does not answer") && text.contains("it was deleted"),
        "{text}"
    );
    assert!(fake.vms().is_empty());
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_never_shown() {
    let fake = FakeProxmox::start(behaviour());
    let (_sshd, port) = ssh_port();
    let secret = "0bad0bad-dead-beef-0000-123456789abc";
    let wrong = Proxmox::new(ProxmoxConfig {
        token_secret: secret.into(),
        ..config(&fake, port, 5)
    })
    .unwrap();
    let err = wrong
        .spawn(&key("tok-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap_err();
    assert!(matches!(&err, ProxmoxError::Api { status: 401, .. }), "{err}");
    let text = format!("{err} {err:?}");
    assert!(
        text.contains("invalid token value") && text.contains("token_id"),
        "{text}"
    );
    assert!(
        !text.contains(secret) && !text.contains(&fake.token_secret),
        "the token is never shown: {text}"
    );
    assert!(fake.vms().is_empty());

    let debug = format!("{:?}", config(&fake, port, 5));
    assert!(!debug.contains(&fake.token_secret), "{debug}");
    let debug = format!("{wrong:?}");
    assert!(!debug.contains(secret) && debug.contains("<redacted>"), "{debug}");

    let malformed = Proxmox::new(ProxmoxConfig {
        token_id: "lian-workers".into(),
        ..config(&fake, port, 5)
    });
    let Err(err) = malformed else {
        panic!("a token id without USER@REALM!NAME is refused")
    };
    assert!(err.to_string().contains("USER@REALM!TOKENID"), "{err}");
}

#[tokio::test]
async fn a_server_error_is_retried() {
    let fake = FakeProxmox::start(ProxmoxBehaviour {
        flaky_first: true,
        ..behaviour()
    });
    let (_sshd, port) = ssh_port();
    let vm = provider(&fake, port, 10)
        .spawn(&key("flaky-r1"), RunnerType::Cax11, &pair())
        .await
        .unwrap();
    assert_eq!(vm.status, "running");
    let reqs = fake.requests();
    assert_eq!(
        reqs.iter().take(2).collect::<Vec<_>>(),
        ["GET /api2/json/cluster/resources", "GET /api2/json/cluster/resources"],
        "the 503 was retried"
    );
}

/// The fake refuses what Proxmox refuses, so the tests above cannot pass on a sloppy client.
#[tokio::test]
async fn the_fake_refuses_what_proxmox_refuses() {
    // The same crypto backend the provider installs (reqwest is built without one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = FakeProxmox::start(behaviour());
    let http = reqwest::Client::new();
    let auth = format!("PVEAPIToken={}={}", fake.token_id, fake.token_secret);
    let clone = format!("{}/nodes/pve1/qemu/9000/clone", fake.url);

    let no_auth = http.get(format!("{}/cluster/nextid", fake.url)).send().await.unwrap();
    assert_eq!(no_auth.status(), 401);

    let unknown = http
        .post(&clone)
        .header("Authorization", &auth)
        .form(&[("newid", "100"), ("cpus", "4")])
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert!(
        body["errors"]["cpus"]
            .as_str()
            .unwrap()
            .contains("not defined in schema"),
        "{body}"
    );

    let bad_name = http
        .post(&clone)
        .header("Authorization", &auth)
        .form(&[("newid", "100"), ("name", "lian_b1")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_name.status(), 400);

    let json = http
        .post(&clone)
        .header("Authorization", &auth)
        .json(&serde_json::json!({"newid": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 415, "POST bodies are form-encoded");

    // A clone exists once its task ran; a key not URL-encoded is refused.
    let upid: serde_json::Value = http
        .post(&clone)
        .header("Authorization", &auth)
        .form(&[("newid", "100"), ("name", "lian-b1"), ("full", "1")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let upid = upid["data"]
        .as_str()
        .unwrap()
        .replace(':', "%3A")
        .replace('!', "%21")
        .replace('@', "%40");
    for _ in 0..2 {
        http.get(format!("{}/nodes/pve1/tasks/{upid}/status", fake.url))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap();
    }
    let raw_key = http
        .post(format!("{}/nodes/pve1/qemu/100/config", fake.url))
        .header("Authorization", &auth)
        .form(&[("sshkeys", CLIENT_KEY)])
        .send()
        .await
        .unwrap();
    assert_eq!(raw_key.status(), 400);
    let body: serde_json::Value = raw_key.json().await.unwrap();
    assert!(
        body["errors"]["sshkeys"]
            .as_str()
            .unwrap()
            .contains("invalid urlencoded string"),
        "{body}"
    );
    assert_eq!(fake.vms().len(), 1);
}
