//! The hcloud provider, written from Hetzner Cloud's published API: a lease is a server of
//! the tier's type (cax11..cax41), labelled with its lease key so a worker that takes over a
//! build finds it instead of creating a second one. Creation is an async action polled to
//! its end; the server is ready when it runs and its SSH port answers; a server that does
//! not get there in time is deleted and the lease fails with the reason. cloud-init
//! installs buildkitd and buildctl and puts in the SSH host key pair generated for the
//! lease, so the first connection can pin it; the public half is also a label of the server
//! (`lian-host-key`, base32), so whoever finds the server again by its lease key knows the
//! key to pin without having seen the private half.
//!
//! It cannot be reached from the project's machines: tests run it against a strict local
//! fake of the API (lian-test-support's `FakeHcloud`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use lian_core::LeaseKey;
use lian_core::sizing::RunnerType;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::ssh::HostKeyPair;

/// The label every lian server carries: its lease key.
pub const LEASE_LABEL: &str = "lian-lease";
/// The label with the public half of the server's host key (the 32 key bytes in base32).
pub const HOST_KEY_LABEL: &str = "lian-host-key";

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HcloudConfig {
    /// `https://api.hetzner.cloud/v1` in production.
    pub endpoint: String,
    /// The API token; read from config or `LIAN_HCLOUD_TOKEN`, never logged.
    #[serde(
        default = "crate::cloud::no_secret",
        serialize_with = "crate::cloud::serialize_redacted"
    )]
    pub token: SecretString,
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default)]
    pub location: Option<String>,
    /// The public key of the client key runners accept (`authorized_keys` via cloud-init).
    pub authorized_key: String,
    #[serde(default = "crate::cloud::default_ssh_port")]
    pub ssh_port: u16,
    /// How long a server may take to run and answer on SSH.
    #[serde(default = "crate::cloud::default_ready_secs")]
    pub ready_timeout_secs: u64,
    #[serde(default = "crate::cloud::default_poll_ms")]
    pub poll_interval_ms: u64,
}

fn default_image() -> String {
    "debian-12".into()
}

/// The cloud-config `user_data` of a lease's server (cloud-init's module reference).
#[derive(Serialize)]
struct CloudConfig<'a> {
    ssh_deletekeys: bool,
    ssh_keys: SshKeys<'a>,
    users: [User<'a>; 1],
    package_update: bool,
    packages: [&'a str; 1],
    runcmd: [[&'a str; 4]; 1],
}

#[derive(Serialize)]
struct SshKeys<'a> {
    ed25519_private: &'a str,
    ed25519_public: &'a str,
}

#[derive(Serialize)]
struct User<'a> {
    name: &'a str,
    shell: &'a str,
    ssh_authorized_keys: [&'a str; 1],
}

/// Debug without the token, so a logged config shows none.
impl fmt::Debug for HcloudConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HcloudConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &"<redacted>")
            .field("image", &self.image)
            .field("location", &self.location)
            .field("authorized_key", &self.authorized_key)
            .field("ssh_port", &self.ssh_port)
            .field("ready_timeout_secs", &self.ready_timeout_secs)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HcloudError {
    #[error("hcloud refused {what}: {code}: {message}")]
    Api {
        what: String,
        code: String,
        message: String,
    },
    #[error("hcloud {what}: {message}")]
    Transport { what: String, message: String },
    #[error("hcloud action {id} ({command}) failed: {code}: {message}")]
    Action {
        id: u64,
        command: String,
        code: String,
        message: String,
    },
    #[error("hcloud server {name} never became ready within {secs} s ({last}); it was deleted")]
    NeverReady { name: String, secs: u64, last: String },
    #[error(
        "hcloud server {name} carries no valid {HOST_KEY_LABEL} label, so its SSH host key cannot be pinned; it was deleted"
    )]
    UnknownHostKey { name: String },
}

/// A server the provider created or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcloudServer {
    pub id: u64,
    pub name: String,
    pub ip: String,
    pub status: String,
    /// The public host key line the server was given (from its `lian-host-key` label).
    pub host_key: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

#[derive(Deserialize)]
struct ServerBody {
    id: u64,
    name: String,
    status: String,
    public_net: PublicNet,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct PublicNet {
    ipv4: Option<Ipv4>,
}

#[derive(Deserialize)]
struct Ipv4 {
    ip: String,
}

#[derive(Deserialize)]
struct ActionBody {
    id: u64,
    command: String,
    status: String,
    error: Option<ErrorDetail>,
}

impl From<ServerBody> for HcloudServer {
    fn from(s: ServerBody) -> Self {
        Self {
            id: s.id,
            name: s.name,
            ip: s.public_net.ipv4.map(|i| i.ip).unwrap_or_default(),
            status: s.status,
            host_key: s.labels.get(HOST_KEY_LABEL).and_then(|l| host_key_from_label(l)),
        }
    }
}

/// Lowercase base32 without padding (RFC 4648's alphabet, lowercased): label values may not
/// hold `=` and read better lowercase.
static LABEL_BASE32: std::sync::LazyLock<data_encoding::Encoding> = std::sync::LazyLock::new(|| {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.encoding().expect("32 distinct symbols")
});

/// The label value of a public host key: its 32 bytes in lowercase base32 (52 characters:
/// a label value holds at most 63 of `[a-z0-9A-Z._-]`, too few for base64 or hex).
pub fn host_key_label(public_key: &str) -> Option<String> {
    let key = russh::keys::PublicKey::from_openssh(public_key.trim()).ok()?;
    Some(LABEL_BASE32.encode(&key.key_data().ed25519()?.0))
}

/// The public host key line (`ssh-ed25519 AAAA...`) a `lian-host-key` label holds.
pub fn host_key_from_label(label: &str) -> Option<String> {
    let bytes = LABEL_BASE32.decode(label.as_bytes()).ok()?;
    let bytes: [u8; 32] = bytes.try_into().ok()?;
    let key = russh::keys::ssh_key::public::Ed25519PublicKey(bytes);
    russh::keys::PublicKey::from(key).to_openssh().ok()
}

/// Retries of a request answered 429 or 5xx.
const RETRIES: usize = 5;

/// How one API call failed: for good, or busy (429, 5xx) and worth asking again.
enum Failed {
    Now(HcloudError),
    Busy { error: HcloudError, reset: Option<u64> },
}

impl Failed {
    fn error(&self) -> &HcloudError {
        match self {
            Self::Now(error) | Self::Busy { error, .. } => error,
        }
    }

    fn into_error(self) -> HcloudError {
        match self {
            Self::Now(error) | Self::Busy { error, .. } => error,
        }
    }
}

#[derive(Clone)]
pub struct Hcloud {
    config: HcloudConfig,
    http: reqwest::Client,
}

impl fmt::Debug for Hcloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hcloud")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Hcloud {
    pub fn new(config: HcloudConfig) -> Self {
        // One crypto backend for the whole binary (ring), as for russh and async-nats.
        let http = crate::http_client()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client");
        Self { config, http }
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.config.poll_interval_ms)
    }

    /// The port the servers' sshd answers on.
    pub fn ssh_port(&self) -> u16 {
        self.config.ssh_port
    }

    /// One API call, retried on 429 (after the rate limit resets) and on 5xx, with
    /// exponential backoff from the poll interval.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, HcloudError> {
        use backon::{ExponentialBuilder, Retryable};
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.poll())
            .with_max_times(RETRIES - 1);
        let poll = self.poll();
        (|| self.call_once(method.clone(), path, body))
            .retry(backoff)
            .when(|failed| matches!(failed, Failed::Busy { .. }))
            // RateLimit-Reset is a UNIX timestamp: wait until then (at most a minute).
            .adjust(move |failed, backoff| match failed {
                Failed::Busy { reset: Some(at), .. } => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    backoff.map(|_| Duration::from_secs(at.saturating_sub(now).min(60)).max(poll))
                }
                _ => backoff,
            })
            .notify(|failed, wait| tracing::warn!(error = %failed.error(), ?wait, "hcloud asked us to wait; retrying"))
            .await
            .map_err(Failed::into_error)
    }

    async fn call_once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, Failed> {
        let what = format!("{method} {path}");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.config.endpoint.trim_end_matches('/')))
            .bearer_auth(self.config.token.expose_secret());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            Failed::Now(HcloudError::Transport {
                what: what.clone(),
                message: e.to_string(),
            })
        })?;
        let status = resp.status();
        let reset = resp
            .headers()
            .get("RateLimit-Reset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok(if text.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or_default()
            });
        }
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => (e.error.code, e.error.message),
            Err(_) => (status.as_u16().to_string(), text.chars().take(200).collect()),
        };
        let error = HcloudError::Api { what, code, message };
        Err(if status.as_u16() == 429 || status.is_server_error() {
            Failed::Busy { error, reset }
        } else {
            Failed::Now(error)
        })
    }

    /// The server recorded under the lease key, if any.
    pub async fn find(&self, key: &LeaseKey) -> Result<Option<HcloudServer>, HcloudError> {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/servers?label_selector={LEASE_LABEL}%3D%3D{key}"),
                None,
            )
            .await?;
        let servers: Vec<ServerBody> = serde_json::from_value(v["servers"].clone()).unwrap_or_default();
        Ok(servers.into_iter().next().map(Into::into))
    }

    /// The cloud-init document: buildkitd, our client key, the lease's host key pair.
    pub fn user_data(&self, host_keys: &HostKeyPair) -> String {
        let doc = CloudConfig {
            ssh_deletekeys: true,
            ssh_keys: SshKeys {
                ed25519_private: host_keys.private_key.trim(),
                ed25519_public: host_keys.public_key.trim(),
            },
            users: [User {
                name: crate::proxmox::CI_USER,
                shell: "/bin/sh",
                ssh_authorized_keys: [self.config.authorized_key.trim()],
            }],
            package_update: true,
            packages: ["buildkit"],
            runcmd: [["systemctl", "enable", "--now", "buildkit"]],
        };
        let yaml = serde_norway::to_string(&doc).expect("plain strings and lists serialize");
        format!("#cloud-config\n{yaml}")
    }

    /// Finds the lease's server or creates it with `host_keys`, then waits until it is
    /// ready; a server that is not ready in time is deleted. The server's `host_key` is the
    /// one to pin: `host_keys`' public half for a new server, its label's for one found.
    pub async fn spawn(
        &self,
        key: &LeaseKey,
        tier: RunnerType,
        host_keys: &HostKeyPair,
    ) -> Result<HcloudServer, HcloudError> {
        let server = match self.find(key).await? {
            Some(s) if s.host_key.is_some() => s,
            Some(s) => {
                let _ = self.delete(s.id).await;
                return Err(HcloudError::UnknownHostKey { name: s.name });
            }
            None => {
                let label = host_key_label(&host_keys.public_key).ok_or_else(|| HcloudError::Transport {
                    what: "host key".into(),
                    message: "the lease's host key is not an ed25519 public key".into(),
                })?;
                let mut labels = BTreeMap::new();
                labels.insert(LEASE_LABEL.to_string(), key.to_string());
                labels.insert(HOST_KEY_LABEL.to_string(), label);
                let mut body = serde_json::json!({
                    "name": format!("lian-{key}"),
                    "server_type": tier.as_str(),
                    "image": self.config.image,
                    "labels": labels,
                    "user_data": self.user_data(host_keys),
                    "start_after_create": true,
                });
                if let Some(loc) = &self.config.location {
                    body["location"] = loc.clone().into();
                }
                let v = self.call(reqwest::Method::POST, "/servers", Some(&body)).await?;
                let server: HcloudServer = serde_json::from_value::<ServerBody>(v["server"].clone())
                    .map_err(|e| HcloudError::Transport {
                        what: "POST /servers".into(),
                        message: format!("unexpected answer: {e}"),
                    })?
                    .into();
                if let Ok(action) = serde_json::from_value::<ActionBody>(v["action"].clone())
                    && let Err(e) = self.wait_action(action.id).await
                {
                    let _ = self.delete(server.id).await;
                    return Err(e);
                }
                server
            }
        };
        match self.wait_ready(&server).await {
            Ok(ready) => Ok(ready),
            Err(e) => {
                let _ = self.delete(server.id).await;
                Err(e)
            }
        }
    }

    async fn wait_action(&self, id: u64) -> Result<(), HcloudError> {
        let deadline = Instant::now() + Duration::from_secs(self.config.ready_timeout_secs);
        loop {
            let v = self.call(reqwest::Method::GET, &format!("/actions/{id}"), None).await?;
            let action: ActionBody =
                serde_json::from_value(v["action"].clone()).map_err(|e| HcloudError::Transport {
                    what: format!("GET /actions/{id}"),
                    message: e.to_string(),
                })?;
            match action.status.as_str() {
                "success" => return Ok(()),
                "error" => {
                    let e = action.error.unwrap_or(ErrorDetail {
                        code: "unknown".into(),
                        message: String::new(),
                    });
                    return Err(HcloudError::Action {
                        id,
                        command: action.command,
                        code: e.code,
                        message: e.message,
                    });
                }
                _ if Instant::now() > deadline => {
                    return Err(HcloudError::Transport {
                        what: format!("action {id}"),
                        message: "still running at the deadline".into(),
                    });
                }
                _ => tokio::time::sleep(self.poll()).await,
            }
        }
    }

    async fn wait_ready(&self, server: &HcloudServer) -> Result<HcloudServer, HcloudError> {
        let secs = self.config.ready_timeout_secs;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = server.status.clone();
        loop {
            let v = self
                .call(reqwest::Method::GET, &format!("/servers/{}", server.id), None)
                .await?;
            if let Ok(s) = serde_json::from_value::<ServerBody>(v["server"].clone()) {
                let s: HcloudServer = s.into();
                last = format!("status {}", s.status);
                if s.status == "running" && !s.ip.is_empty() {
                    let addr = (s.ip.as_str(), self.config.ssh_port);
                    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
                        Ok(Ok(_)) => return Ok(s),
                        _ => last = format!("running, SSH on {}:{} does not answer", s.ip, self.config.ssh_port),
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(HcloudError::NeverReady {
                    name: server.name.clone(),
                    secs,
                    last,
                });
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    async fn delete(&self, id: u64) -> Result<(), HcloudError> {
        match self
            .call(reqwest::Method::DELETE, &format!("/servers/{id}"), None)
            .await
        {
            Ok(v) => {
                if let Ok(action) = serde_json::from_value::<ActionBody>(v["action"].clone()) {
                    self.wait_action(action.id).await?;
                }
                Ok(())
            }
            Err(HcloudError::Api { code, .. }) if code == "not_found" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes the lease's server; a lease without a server is destroyed already.
    pub async fn destroy(&self, key: &LeaseKey) -> Result<(), HcloudError> {
        match self.find(key).await? {
            Some(server) => self.delete(server.id).await,
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl crate::Provider for Hcloud {
    fn kind(&self) -> lian_core::directives::ComputeProvider {
        lian_core::directives::ComputeProvider::Hcloud
    }

    /// A server with a host key pair generated here for the lease; its public half comes
    /// back to be pinned.
    async fn lease(&self, ask: &lian_core::control::LeaseRequest) -> Result<crate::Runner, crate::RunnerError> {
        let key = &ask.lease_key;
        let server = self
            .spawn(key, ask.runner_type, &crate::lease_host_key(key)?)
            .await
            .map_err(|e| fault(key, e))?;
        Ok(crate::Runner {
            lease_key: key.clone(),
            lease_id: format!("hcloud:{}", server.id),
            host: server.ip,
            runner_type: ask.runner_type,
            host_key: server.host_key,
            ssh_port: Some(self.ssh_port()),
        })
    }

    async fn reach(&self, _: crate::Held<'_>) -> Result<Box<dyn crate::RunnerHandle>, crate::RunnerError> {
        Err(crate::RunnerError::ReachedByWorkers { provider: "hcloud" })
    }

    async fn release(&self, lease: crate::Held<'_>) -> Result<(), crate::RunnerError> {
        self.destroy(lease.key).await.map_err(|e| fault(lease.key, e))
    }
}

/// The API not answering is worth another try; anything it answered is not.
fn fault(key: &LeaseKey, e: HcloudError) -> crate::RunnerError {
    let message = e.to_string();
    let lease_key = key.clone();
    match e {
        HcloudError::Transport { .. } => crate::RunnerError::Remote { lease_key, message },
        _ => crate::RunnerError::Failed { lease_key, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_key_survives_its_label() {
        let pair = crate::ssh::generate_host_key("lian-runner k").unwrap();
        let label = host_key_label(&pair.public_key).unwrap();
        assert_eq!(label.len(), 52);
        assert!(
            label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{label}"
        );
        let back = host_key_from_label(&label).unwrap();
        let without_comment: Vec<&str> = pair.public_key.split_whitespace().take(2).collect();
        assert_eq!(back.split_whitespace().collect::<Vec<_>>(), without_comment);
        assert_eq!(host_key_from_label("not-base32!"), None);
        assert_eq!(host_key_from_label(&label[..50]), None);
        assert_eq!(host_key_label("ssh-rsa AAAA nonsense"), None);
    }
}
