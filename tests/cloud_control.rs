//! `lian control` leasing hcloud and proxmox runners, against strict local fakes of their
//! APIs (neither can be reached from here), called with a plain HTTP client: each lease gets
//! an SSH host key pair of its own, whose private half only the runner gets and whose public
//! half the lease records for workers to pin; a refusal by the provider is a 502 with its
//! own message and leaves nothing behind; the tokens appear nowhere.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Running;

use lian_test_support::{
    FakeHcloud, FakeProxmox, HcloudBehaviour, NatsServer, ProxmoxBehaviour, free_port, http, workspace_root,
};

const TOKEN: &str = "test-control-token-c10d";
const CLIENT_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient lian-worker";
const HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key";

/// A `lian control` at debug level, its log (stderr) in a file.
struct Control {
    running: Running,
    url: String,
    log: PathBuf,
}

impl Control {
    fn start(nats: &NatsServer, dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> Self {
        let config_file = dir.join(format!("{name}.toml"));
        std::fs::write(&config_file, config).unwrap();
        let state = dir.join(format!("{name}-state"));
        let log = dir.join(format!("{name}.log"));
        let env: Vec<(&str, &str)> = [("LIAN_LOG", "debug"), ("LIAN_CONTROL_TOKEN", TOKEN)]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
        let running = Running::start_logged(
            &[
                "--nats-url",
                &nats.url,
                "--config",
                config_file.to_str().unwrap(),
                "control",
                "--name",
                name,
                "--state-dir",
                state.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ],
            &env,
            &log,
            "serving http://",
        );
        let url = running.served_url();
        Self { running, url, log }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> lian_test_support::HttpAnswer {
        http(method, &format!("{}{path}", self.url), Some(TOKEN), body)
    }

    /// Stops it and answers everything it printed.
    fn stop(self) -> String {
        let stdout = self.running.stop().join("\n");
        stdout + "\n" + &std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn lease_body(key: &str, provider: &str) -> String {
    let build = key.split("-r").next().unwrap();
    format!(
        r#"{{"lease_key":"{key}","provider":"{provider}","runner_type":"cax21","workspace":"cloud","build_id":"{build}","owner":"test-worker"}}"#
    )
}

/// `ssh-ed25519 AAAA...` without the comment.
fn key_only(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// The public half of an OpenSSH private key, as `ssh-keygen -y` derives it.
fn public_half(private_pem: &str, dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join(format!("key-{}", free_port()));
    std::fs::write(&file, format!("{}\n", private_pem.trim())).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&file)
        .output()
        .expect("ssh-keygen runs (apt-get install openssh-client)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    key_only(&String::from_utf8_lossy(&out.stdout))
}

/// The private key block of a cloud-init document.
fn private_key_in(user_data: &str) -> String {
    user_data
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"))
        .take_while(|l| !l.is_empty() && !l.starts_with("ed25519_public"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A listening port standing in for the new runner's sshd.
fn runner_sshd() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn hcloud_config(fake: &FakeHcloud, ssh_port: u16) -> String {
    format!(
        "runner_isolation = \"shared\"\nbuild_network = \"none\"\n\n[hcloud]\nendpoint = \"{}\"\nlocation = \"fsn1\"\nauthorized_key = \"{CLIENT_KEY}\"\nssh_port = {ssh_port}\nready_timeout_secs = 10\npoll_interval_ms = 20\n",
        fake.url
    )
}

#[test]
fn hcloud_leases_pin_a_host_key_of_their_own_and_refusals_leave_nothing() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (_sshd, port) = runner_sshd();
    let fake = FakeHcloud::start(HcloudBehaviour {
        action_polls: 2,
        ip: "127.0.0.1".into(),
        ..Default::default()
    });
    let token_env = [("LIAN_HCLOUD_TOKEN", fake.token.as_str())];
    let control = Control::start(&nats, dir.path(), "hc", &hcloud_config(&fake, port), &token_env);

    let leased = control.call("POST", "/api/v1/vm-pool", Some(&lease_body("hc1-r1", "hcloud")));
    assert_eq!(leased.status, 201, "{leased:?}");
    let lease = leased.json();
    assert_eq!(
        (
            lease["host"].as_str(),
            lease["ssh_port"].as_u64(),
            lease["state"].as_str()
        ),
        (Some("127.0.0.1"), Some(u64::from(port)), Some("ready"))
    );
    assert!(lease["provider_id"].as_str().unwrap().starts_with("hcloud:"), "{lease}");
    let host_key = lease["host_key"].as_str().expect("a pinned host key").to_string();
    assert!(host_key.starts_with("ssh-ed25519 "), "{host_key}");

    // The server is labelled with the lease key, and got the private half in cloud-init.
    let servers = fake.servers();
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].labels.get("lian-lease").map(String::as_str), Some("hc1-r1"));
    assert_eq!(servers[0].server_type, "cax21");
    let private = private_key_in(&servers[0].user_data);
    assert_eq!(public_half(&private, dir.path()), key_only(&host_key));
    assert!(
        servers[0].user_data.contains(CLIENT_KEY),
        "the workers' client key is authorised"
    );

    // Asked again (a worker that took the build over): the same runner and key.
    let again = control.call("POST", "/api/v1/vm-pool", Some(&lease_body("hc1-r1", "hcloud")));
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json()["host_key"].as_str(), Some(host_key.as_str()));
    assert_eq!(fake.servers().len(), 1);

    // A worker reads the lease, host key included, by its id.
    let read = control.call("GET", "/api/v1/vm-pool/hc1-r1", None);
    assert_eq!(read.status, 200, "{read:?}");
    let read = read.json();
    assert_eq!(read["host_key"].as_str(), Some(host_key.as_str()));
    assert_eq!(
        (read["lease_id"].as_str(), read["ssh_port"].as_u64()),
        (Some("hc1-r1"), Some(u64::from(port)))
    );
    assert!(read["age_secs"].as_u64().is_some(), "{read}");
    let unknown = control.call("GET", "/api/v1/vm-pool/never-r1", None);
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(
        unknown.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no lease never-r1")
    );
    assert_eq!(
        http("GET", &format!("{}/api/v1/vm-pool/hc1-r1", control.url), None, None).status,
        401
    );

    let released = control.call("DELETE", "/api/v1/vm-pool/hc1-r1", None);
    assert_eq!(released.status, 204, "{released:?}");
    assert!(fake.servers().is_empty(), "the server is deleted");
    assert_eq!(control.call("GET", "/api/v1/vm-pool/hc1-r1", None).status, 404);

    // Out of quota: Hetzner's refusal, as a 502, and nothing left.
    let full = FakeHcloud::start(HcloudBehaviour {
        quota_exceeded: true,
        ip: "127.0.0.1".into(),
        ..Default::default()
    });
    let full_env = [("LIAN_HCLOUD_TOKEN", full.token.as_str())];
    let refusing = Control::start(&nats, dir.path(), "hc-full", &hcloud_config(&full, port), &full_env);
    let refused = refusing.call("POST", "/api/v1/vm-pool", Some(&lease_body("hc2-r1", "hcloud")));
    assert_eq!(refused.status, 502, "{refused:?}");
    let error = &refused.json()["error"];
    assert_eq!(error["code"], "provider_failed");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("resource_limit_exceeded") && message.contains("server limit exceeded for this project"),
        "Hetzner's own message: {message}"
    );
    assert!(full.servers().is_empty());
    assert_eq!(
        refusing.call("GET", "/api/v1/vm-pool", None).json(),
        serde_json::json!([])
    );

    for (logs, token) in [(control.stop(), &fake.token), (refusing.stop(), &full.token)] {
        assert!(logs.contains("lian control: serving"), "{logs}");
        assert!(
            !logs.contains(token.as_str()),
            "the hcloud token is in control's output: {logs}"
        );
    }
    assert!(!refused.body.contains(&full.token) && !leased.body.contains(&fake.token));
}

fn proxmox_config(fake: &FakeProxmox, ssh_port: u16) -> String {
    format!(
        "runner_isolation = \"shared\"\nbuild_network = \"none\"\n\n[proxmox]\nendpoint = \"{}\"\ntoken_id = \"{}\"\nnode = \"{}\"\ntemplate_vmid = {}\npool = \"ci\"\nstorage = \"fast\"\nauthorized_key = \"{CLIENT_KEY}\"\nssh_port = {ssh_port}\nready_timeout_secs = 10\npoll_interval_ms = 20\n",
        fake.url, fake.token_id, fake.node, fake.template_vmid
    )
}

#[test]
fn proxmox_leases_get_their_host_key_through_the_guest_agent_and_refusals_leave_nothing() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (_sshd, port) = runner_sshd();
    let fake = FakeProxmox::start(ProxmoxBehaviour {
        task_polls: 2,
        ip: "127.0.0.1".into(),
        ..Default::default()
    });
    let secret_env = [("LIAN_PROXMOX_TOKEN_SECRET", fake.token_secret.as_str())];
    let control = Control::start(&nats, dir.path(), "pve", &proxmox_config(&fake, port), &secret_env);

    let leased = control.call("POST", "/api/v1/vm-pool", Some(&lease_body("pv1-r1", "proxmox")));
    assert_eq!(leased.status, 201, "{leased:?}");
    let lease = leased.json();
    assert_eq!(
        (lease["host"].as_str(), lease["ssh_port"].as_u64()),
        (Some("127.0.0.1"), Some(u64::from(port)))
    );
    let host_key = lease["host_key"].as_str().expect("a pinned host key").to_string();

    let vms = fake.vms();
    assert_eq!(vms.len(), 1);
    let vm = &vms[0];
    assert!(
        vm.description.lines().any(|l| l == "lian-lease=pv1-r1"),
        "{}",
        vm.description
    );
    assert_eq!((vm.cores, vm.memory), (4, 8 * 1024), "sized by the cax21 tier");
    assert_eq!(vm.sshkeys_decoded, CLIENT_KEY, "the workers' client key is authorised");
    assert_eq!(
        lease["provider_id"].as_str(),
        Some(format!("proxmox:pve1/{}", vm.vmid).as_str())
    );
    // The pair written through the guest agent: the private half derives the lease's key.
    let private = vm.files.get(HOST_KEY_PATH).expect("the host key was written");
    assert_eq!(public_half(private, dir.path()), key_only(&host_key));
    assert_eq!(
        vm.files.get(&format!("{HOST_KEY_PATH}.pub")).map(|s| s.trim()),
        Some(host_key.as_str())
    );

    let read = control.call("GET", "/api/v1/vm-pool/pv1-r1", None);
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(read.json()["host_key"].as_str(), Some(host_key.as_str()));

    let released = control.call("DELETE", "/api/v1/vm-pool/pv1-r1", None);
    assert_eq!(released.status, 204, "{released:?}");
    assert!(fake.vms().is_empty(), "the VM is deleted");
    assert!(fake.template_intact());

    // A full storage: Proxmox's own message, as a 502, and no VM left.
    let full = FakeProxmox::start(ProxmoxBehaviour {
        task_polls: 2,
        storage_full: true,
        ip: "127.0.0.1".into(),
        ..Default::default()
    });
    let full_env = [("LIAN_PROXMOX_TOKEN_SECRET", full.token_secret.as_str())];
    let refusing = Control::start(&nats, dir.path(), "pve-full", &proxmox_config(&full, port), &full_env);
    let refused = refusing.call("POST", "/api/v1/vm-pool", Some(&lease_body("pv2-r1", "proxmox")));
    assert_eq!(refused.status, 502, "{refused:?}");
    let error = &refused.json()["error"];
    assert_eq!(error["code"], "provider_failed");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("clone failed: lvcreate") && message.contains("insufficient free space"),
        "Proxmox's own message: {message}"
    );
    assert!(full.vms().is_empty(), "nothing left behind");
    assert!(full.template_intact());
    assert_eq!(
        refusing.call("GET", "/api/v1/vm-pool", None).json(),
        serde_json::json!([])
    );

    for (logs, secret) in [
        (control.stop(), &fake.token_secret),
        (refusing.stop(), &full.token_secret),
    ] {
        assert!(logs.contains("lian control: serving"), "{logs}");
        assert!(
            !logs.contains(secret.as_str()),
            "the proxmox token secret is in control's output: {logs}"
        );
    }
    assert!(!refused.body.contains(&full.token_secret));
}

#[test]
fn a_cloud_provider_with_no_token_keeps_control_from_starting() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHcloud::start(HcloudBehaviour::default());
    let config = dir.path().join("no-token.toml");
    std::fs::write(&config, hcloud_config(&fake, 22)).unwrap();
    let out = Command::new(common::lian_bin())
        .current_dir(workspace_root())
        .args(["--nats-url", &nats.url, "--config", config.to_str().unwrap()])
        .args(["control", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .env("LIAN_CONTROL_TOKEN", TOKEN)
        .env_remove("LIAN_HCLOUD_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("LIAN_HCLOUD_TOKEN"), "{text}");
}
