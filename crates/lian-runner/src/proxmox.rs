//! The proxmox provider, written from Proxmox VE's published API (api-viewer, and the
//! qemu-server / pve-manager / pve-http-server sources behind it). It cannot be reached
//! from the project's machines: tests run it against a strict local fake of the API
//! (lian-test-support's `FakeProxmox`).
//!
//! A lease is a QEMU VM cloned from a template. Proxmox cannot take cloud-init user-data
//! through the API (`cicustom` only points at a snippet file on a storage, and the storage
//! upload endpoint accepts `iso`, `vztmpl` and `import` content, not `snippets`), so the
//! template carries buildkitd, buildctl, cloud-init and qemu-guest-agent; the provider only
//! sets what Proxmox's own cloud-init options can (`ciuser`, `sshkeys`, `ipconfig0`).
//!
//! How it talks to Proxmox:
//! - `https://<host>:8006/api2/json`; every answer is `{"data": ...}`; an error is an HTTP
//!   status whose reason line carries the message; current pve-http-server also puts it in
//!   the body as `message`, and parameter errors (400) add `{"errors": {param: message}}`.
//!   We read `message` and `errors` from the body (the reason line is not exposed by our
//!   HTTP client).
//! - Authentication is an API token in `Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET`
//!   (no ticket, no CSRF token). The header is marked sensitive and the secret is never
//!   logged or put in an error.
//! - POST/PUT parameters are form-encoded (Proxmox also accepts a JSON body); GET/DELETE
//!   parameters go in the query string. Repeated keys make an array (`command` of
//!   `agent/exec`). `sshkeys` must itself be URL-encoded (its format is `urlencoded`:
//!   only `[-%a-zA-Z0-9_.!~*'()]`), so its value is encoded twice on the wire.
//! - Long operations (clone, config, start, stop, delete) return a task UPID, polled on
//!   `/nodes/{node}/tasks/{upid}/status` until `stopped`; `exitstatus` is `OK`,
//!   `WARNINGS: n` (a success) or the error text, which we report verbatim.
//!
//! A lease, step by step:
//! - found again by listing `/cluster/resources?type=vm`, matching the VM name
//!   `lian-<lease key>` and confirming `lian-lease=<key>` in its description, so a worker
//!   that takes over a build gets the same VM (one clone only);
//! - else `GET /cluster/nextid`, then a full clone of the template with name, description
//!   (set at clone time: the clone endpoint takes it) and the optional pool and storage;
//! - then `POST .../config` with the tier's cores and memory (MiB), `ciuser=lian`, our
//!   client key, `ipconfig0=ip=dhcp`, the tag `lian` and `agent=1`; then start;
//! - ready = status `running`, the guest agent reports an IPv4 address (not loopback when
//!   another one exists), the host key pair generated for this spawn is written to
//!   `/etc/ssh/ssh_host_ed25519_key` and `.pub` through the agent (after cloud-init finished, so its first boot cannot
//!   regenerate the keys afterwards) and sshd restarted, and the SSH port answers.
//!
//! A VM not ready in time, or any failure after the clone, deletes the VM (stop, then
//! `DELETE` with `purge=1` and `destroy-unreferenced-disks=1`). Proxmox has no quota API:
//! the limits a user meets are a clone task ending with an error exit status (a full
//! storage) or a 403 refusing it (permissions, pool limits); both are reported with
//! Proxmox's own message and leave nothing behind.

use std::fmt;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use lian_core::LeaseKey;
use lian_core::sizing::RunnerType;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ssh::HostKeyPair;

/// The tag every lian VM carries.
pub const LEASE_TAG: &str = "lian";
/// The description line that records the lease key: `lian-lease=<key>`.
pub const LEASE_DESCRIPTION: &str = "lian-lease";
/// The user cloud-init creates with our client key.
pub const CI_USER: &str = "lian";
/// Where the pinned host key goes (and `.pub` beside it).
pub const HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key";

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxConfig {
    /// `https://<host>:8006/api2/json`.
    pub endpoint: String,
    /// The API token's id, `USER@REALM!TOKENID`.
    pub token_id: String,
    /// The token's secret; read from config or `LIAN_PROXMOX_TOKEN_SECRET`, never logged.
    #[serde(
        default = "crate::cloud::no_secret",
        serialize_with = "crate::cloud::serialize_redacted"
    )]
    pub token_secret: SecretString,
    /// The node the template lives on and the clones are made on.
    pub node: String,
    /// The VMID of the template (buildkitd, buildctl, cloud-init, qemu-guest-agent).
    pub template_vmid: u32,
    /// A resource pool the clones join (the token may hold VM.Allocate on the pool only).
    #[serde(default)]
    pub pool: Option<String>,
    /// The storage for the clones' disks (full clone).
    #[serde(default)]
    pub storage: Option<String>,
    /// PEM of the CA that signed pveproxy's certificate (`/etc/pve/pve-root-ca.pem` for the
    /// self-signed default); without it the system roots are used.
    #[serde(default)]
    pub ca_cert_pem: Option<String>,
    /// The public key of the client key runners accept (cloud-init `sshkeys`).
    pub authorized_key: String,
    #[serde(default = "crate::cloud::default_ssh_port")]
    pub ssh_port: u16,
    /// How long a VM may take to be ready, and each Proxmox task to finish.
    #[serde(default = "crate::cloud::default_ready_secs")]
    pub ready_timeout_secs: u64,
    #[serde(default = "crate::cloud::default_poll_ms")]
    pub poll_interval_ms: u64,
}

/// Debug without the secret, so a logged config shows no token.
impl fmt::Debug for ProxmoxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxmoxConfig")
            .field("endpoint", &self.endpoint)
            .field("token_id", &self.token_id)
            .field("token_secret", &"<redacted>")
            .field("node", &self.node)
            .field("template_vmid", &self.template_vmid)
            .field("pool", &self.pool)
            .field("storage", &self.storage)
            .field("ca_cert_pem", &self.ca_cert_pem.as_ref().map(|_| "<set>"))
            .field("authorized_key", &self.authorized_key)
            .field("ssh_port", &self.ssh_port)
            .field("ready_timeout_secs", &self.ready_timeout_secs)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxmoxError {
    #[error("proxmox is not configured right: {0}")]
    Config(String),
    #[error("proxmox refused {what}: HTTP {status}: {message}{}", hint(.status))]
    Api { what: String, status: u16, message: String },
    #[error("proxmox {what}: {message}")]
    Transport { what: String, message: String },
    #[error("proxmox task {what} failed: {exitstatus}")]
    Task {
        what: String,
        upid: String,
        exitstatus: String,
    },
    #[error("proxmox VM {name} (vmid {vmid}) never became ready within {secs} s ({last}); it was deleted")]
    NeverReady {
        name: String,
        vmid: u32,
        secs: u64,
        last: String,
    },
}

fn hint(status: &u16) -> &'static str {
    match status {
        401 => {
            " (check token_id, USER@REALM!TOKENID, and token_secret; tokens are made under \
             Datacenter > Permissions > API Tokens)"
        }
        403 => {
            " (the token, and with privilege separation its user too, needs VM.Clone on the \
             template, VM.Allocate on /vms or the pool, Datastore.AllocateSpace on the storage, \
             VM.Config.*, VM.PowerMgmt, VM.Audit and VM.Monitor for the guest agent)"
        }
        _ => "",
    }
}

/// A VM the provider created or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxmoxVm {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    /// Empty until the guest agent reported an address.
    pub ip: String,
    pub status: String,
}

/// The VM name of a lease: `lian-<key>` as a DNS name (Proxmox's `dns-name` format has no
/// `_`, and a label holds 63 characters); the description carries the exact key.
pub fn vm_name(key: &LeaseKey) -> String {
    let mut name: String = format!("lian-{key}").replace('_', "-").chars().take(63).collect();
    while name.ends_with('-') {
        name.pop();
    }
    name
}

fn lease_line(key: &LeaseKey) -> String {
    format!("{LEASE_DESCRIPTION}={key}")
}

/// Percent-encodes everything but RFC 3986's unreserved characters: for path segments
/// (UPIDs hold `:`, `@` and `!`) and for `sshkeys`, whose `urlencoded` format allows no
/// space, `+`, `/` or `=`.
fn encode_component(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Everything but RFC 3986's unreserved characters is escaped.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The address to reach the VM on: the first IPv4 of a real interface, else a loopback
/// one if that is all the agent reports.
fn pick_ipv4(interfaces: &Value) -> Option<String> {
    const VIRTUAL: [&str; 5] = ["docker", "br-", "veth", "cni", "virbr"];
    let mut loopback = None;
    for iface in interfaces.as_array()? {
        let name = iface["name"].as_str().unwrap_or("");
        if VIRTUAL.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        for addr in iface["ip-addresses"].as_array().into_iter().flatten() {
            if addr["ip-address-type"] != "ipv4" {
                continue;
            }
            let Some(ip) = addr["ip-address"].as_str() else {
                continue;
            };
            let Ok(parsed) = ip.parse::<Ipv4Addr>() else { continue };
            if parsed.is_loopback() {
                loopback.get_or_insert_with(|| ip.to_string());
            } else if !parsed.is_link_local() && !parsed.is_unspecified() {
                return Some(ip.to_string());
            }
        }
    }
    loopback
}

/// The message of a refused request: the body's `message` (else the status' reason) and
/// the per-parameter `errors`.
fn error_message(status: reqwest::StatusCode, text: &str) -> String {
    let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let mut message = body
        .get("message")
        .and_then(Value::as_str)
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| {
            let reason = status.canonical_reason().unwrap_or("error").to_string();
            if body.is_null() && !text.trim().is_empty() {
                format!("{reason}: {}", text.trim().chars().take(200).collect::<String>())
            } else {
                reason
            }
        });
    if let Some(Value::Object(errors)) = body.get("errors")
        && !errors.is_empty()
    {
        let list: Vec<String> = errors
            .iter()
            .map(|(k, v)| match v.as_str() {
                Some(s) => format!("{k}: {}", s.trim()),
                None => format!("{k}: {v}"),
            })
            .collect();
        let _ = write!(message, " ({})", list.join("; "));
    }
    message
}

/// Attempts of a request answered 5xx (4xx are not retried).
const ATTEMPTS: usize = 3;

#[derive(Clone)]
pub struct Proxmox {
    config: ProxmoxConfig,
    http: reqwest::Client,
    auth: HeaderValue,
}

impl fmt::Debug for Proxmox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxmox")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Proxmox {
    pub fn new(config: ProxmoxConfig) -> Result<Self, ProxmoxError> {
        let id_ok = config
            .token_id
            .split_once('@')
            .and_then(|(user, rest)| rest.split_once('!').map(|(realm, name)| (user, realm, name)))
            .is_some_and(|(user, realm, name)| !user.is_empty() && !realm.is_empty() && !name.is_empty());
        if !id_ok {
            return Err(ProxmoxError::Config(format!(
                "token_id `{}` is not USER@REALM!TOKENID (for example lian@pve!workers)",
                config.token_id
            )));
        }
        if config.token_secret.expose_secret().trim().is_empty() {
            return Err(ProxmoxError::Config(
                "token_secret is empty: set it in the config or LIAN_PROXMOX_TOKEN_SECRET".into(),
            ));
        }
        let mut auth = HeaderValue::from_str(&format!(
            "PVEAPIToken={}={}",
            config.token_id,
            config.token_secret.expose_secret()
        ))
        .map_err(|_| ProxmoxError::Config("token_id or token_secret holds characters a header cannot".into()))?;
        auth.set_sensitive(true);
        // One crypto backend for the whole binary (ring), as for russh and async-nats.
        let mut builder = crate::http_client().timeout(Duration::from_secs(30));
        if let Some(pem) = &config.ca_cert_pem {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| ProxmoxError::Config(format!("ca_cert_pem is not a PEM certificate: {e}")))?;
            builder = builder.tls_certs_only([cert]);
        }
        let http = builder
            .build()
            .map_err(|e| ProxmoxError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { config, http, auth })
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.config.poll_interval_ms)
    }

    /// The port the VMs' sshd answers on.
    pub fn ssh_port(&self) -> u16 {
        self.config.ssh_port
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs(self.config.ready_timeout_secs)
    }

    /// Whatever Proxmox or the HTTP client said, without the secret in it.
    fn scrub(&self, text: String) -> String {
        text.replace(self.config.token_secret.expose_secret(), "<redacted>")
    }

    /// One API call, retried on 5xx (and a GET on a transport error) with exponential
    /// backoff from the poll interval; answers the `data` of the body.
    async fn call(&self, method: Method, path: &str, params: &[(&str, String)]) -> Result<Value, ProxmoxError> {
        use backon::{ExponentialBuilder, Retryable};
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.poll())
            .with_max_times(ATTEMPTS - 1);
        let get = method == Method::GET;
        (|| self.call_once(method.clone(), path, params))
            .retry(backoff)
            .when(|e| match e {
                ProxmoxError::Transport { .. } => get,
                ProxmoxError::Api { status, .. } => *status >= 500,
                _ => false,
            })
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "proxmox failed; retrying"))
            .await
    }

    /// One API call, not retried: for polls whose 5xx means "not yet".
    async fn call_once(&self, method: Method, path: &str, params: &[(&str, String)]) -> Result<Value, ProxmoxError> {
        let what = format!("{method} {path}");
        let url = format!("{}{path}", self.config.endpoint.trim_end_matches('/'));
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header(AUTHORIZATION, self.auth.clone());
        if method == Method::POST || method == Method::PUT {
            req = req.form(params);
        } else if !params.is_empty() {
            req = req.query(params);
        }
        let resp = req.send().await.map_err(|e| ProxmoxError::Transport {
            what: what.clone(),
            message: self.scrub(e.to_string()),
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            let body: Value = serde_json::from_str(&text).map_err(|e| ProxmoxError::Transport {
                what: what.clone(),
                message: format!("unexpected answer (not JSON): {e}"),
            })?;
            return Ok(body.get("data").cloned().unwrap_or(Value::Null));
        }
        Err(ProxmoxError::Api {
            what,
            status: status.as_u16(),
            message: self.scrub(error_message(status, &text)),
        })
    }

    fn qemu(&self, vm: &ProxmoxVm, rest: &str) -> String {
        format!("/nodes/{}/qemu/{}{rest}", vm.node, vm.vmid)
    }

    /// Polls a task to its end; its error exit status is reported verbatim.
    async fn wait_task(&self, node: &str, upid: &Value, what: &str) -> Result<(), ProxmoxError> {
        // POST .../config with background_delay may answer null once the task is done.
        let Some(upid) = upid.as_str() else { return Ok(()) };
        let deadline = self.deadline();
        let path = format!("/nodes/{node}/tasks/{}/status", encode_component(upid));
        loop {
            let v = self.call(Method::GET, &path, &[]).await?;
            if v["status"] == "stopped" {
                let exit = v["exitstatus"].as_str().unwrap_or("no exit status").trim().to_string();
                if exit == "OK" || exit.starts_with("WARNINGS") {
                    return Ok(());
                }
                return Err(ProxmoxError::Task {
                    what: what.to_string(),
                    upid: upid.to_string(),
                    exitstatus: exit,
                });
            }
            if Instant::now() > deadline {
                return Err(ProxmoxError::Transport {
                    what: format!("task {what}"),
                    message: format!(
                        "still running after {} s ({upid}); raise ready_timeout_secs",
                        self.config.ready_timeout_secs
                    ),
                });
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    /// Every QEMU VM the token can see.
    async fn list(&self) -> Result<Vec<Value>, ProxmoxError> {
        let v = self
            .call(Method::GET, "/cluster/resources", &[("type", "vm".into())])
            .await?;
        Ok(v.as_array()
            .map(|a| a.iter().filter(|r| r["type"] == "qemu").cloned().collect())
            .unwrap_or_default())
    }

    /// The VM recorded under the lease key, if any.
    pub async fn find(&self, key: &LeaseKey) -> Result<Option<ProxmoxVm>, ProxmoxError> {
        let name = vm_name(key);
        let line = lease_line(key);
        for r in self.list().await? {
            if r["name"] != name.as_str() || r["template"].as_u64() == Some(1) {
                continue;
            }
            let (Some(vmid), Some(node)) = (r["vmid"].as_u64(), r["node"].as_str()) else {
                continue;
            };
            let vm = ProxmoxVm {
                vmid: vmid as u32,
                name: name.clone(),
                node: node.to_string(),
                ip: String::new(),
                status: r["status"].as_str().unwrap_or("unknown").to_string(),
            };
            let config = self.call(Method::GET, &self.qemu(&vm, "/config"), &[]).await?;
            let description = config["description"].as_str().unwrap_or("");
            if description.lines().any(|l| l.trim() == line) {
                return Ok(Some(vm));
            }
        }
        Ok(None)
    }

    /// Finds the lease's VM or clones it, then configures, starts and waits until it is
    /// ready with `host_keys` as its SSH host key (a VM found again is given them too, so the
    /// key to pin is always `host_keys`' public half); a VM that fails after the clone or is
    /// not ready in time is deleted.
    pub async fn spawn(
        &self,
        key: &LeaseKey,
        tier: RunnerType,
        host_keys: &HostKeyPair,
    ) -> Result<ProxmoxVm, ProxmoxError> {
        let (vm, fresh) = match self.find(key).await? {
            Some(vm) => (vm, false),
            None => (self.create(key).await?, true),
        };
        let outcome = async {
            let running = if fresh {
                false
            } else {
                // A worker that died mid-spawn may have left it locked, stopped or bare.
                self.wait_unlocked(&vm).await?;
                let current = self.call(Method::GET, &self.qemu(&vm, "/status/current"), &[]).await?;
                current["status"] == "running"
            };
            if !running {
                self.configure(&vm, key, tier).await?;
                let upid = self.call(Method::POST, &self.qemu(&vm, "/status/start"), &[]).await?;
                self.wait_task(&vm.node, &upid, &format!("start of VM {}", vm.vmid))
                    .await?;
            }
            self.wait_ready(&vm, host_keys).await
        }
        .await;
        match outcome {
            Ok(ready) => Ok(ready),
            Err(e) => {
                if let Err(cleanup) = self.delete(&vm).await {
                    tracing::error!(vmid = vm.vmid, error = %cleanup, "could not delete a failed proxmox VM");
                }
                Err(e)
            }
        }
    }

    /// nextid + full clone of the template; a clone that fails leaves nothing behind.
    async fn create(&self, key: &LeaseKey) -> Result<ProxmoxVm, ProxmoxError> {
        let name = vm_name(key);
        let node = self.config.node.clone();
        let mut tries = 0;
        loop {
            tries += 1;
            let next = self.call(Method::GET, "/cluster/nextid", &[]).await?;
            let vmid = next
                .as_str()
                .and_then(|s| s.parse::<u32>().ok())
                .or_else(|| next.as_u64().map(|n| n as u32))
                .ok_or_else(|| ProxmoxError::Transport {
                    what: "GET /cluster/nextid".into(),
                    message: format!("unexpected answer {next}"),
                })?;
            let mut params = vec![
                ("newid", vmid.to_string()),
                ("name", name.clone()),
                ("description", lease_line(key)),
                ("full", "1".to_string()),
            ];
            if let Some(pool) = &self.config.pool {
                params.push(("pool", pool.clone()));
            }
            if let Some(storage) = &self.config.storage {
                params.push(("storage", storage.clone()));
            }
            let path = format!("/nodes/{node}/qemu/{}/clone", self.config.template_vmid);
            let upid = match self.call(Method::POST, &path, &params).await {
                Ok(upid) => upid,
                // Another client took the VMID between nextid and clone: take the next one.
                Err(ProxmoxError::Api {
                    status: 500, message, ..
                }) if message.contains("already exists") && tries < 3 => {
                    tracing::warn!(vmid, %message, "proxmox VMID taken meanwhile; asking for another");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let vm = ProxmoxVm {
                vmid,
                name: name.clone(),
                node: node.clone(),
                ip: String::new(),
                status: "stopped".into(),
            };
            tracing::info!(vmid, %name, template = self.config.template_vmid, "proxmox clone started");
            let what = format!("clone of template {} to VM {vmid} ({name})", self.config.template_vmid);
            if let Err(e) = self.wait_task(&node, &upid, &what).await {
                // Proxmox removes a failed clone itself; make sure of it.
                if let Err(cleanup) = self.delete(&vm).await {
                    tracing::error!(vmid, error = %cleanup, "could not delete a failed proxmox clone");
                }
                return Err(e);
            }
            return Ok(vm);
        }
    }

    /// Waits while the VM's config is locked (a clone still copying disks).
    async fn wait_unlocked(&self, vm: &ProxmoxVm) -> Result<(), ProxmoxError> {
        let deadline = self.deadline();
        loop {
            let config = self.call(Method::GET, &self.qemu(vm, "/config"), &[]).await?;
            let Some(lock) = config["lock"].as_str() else {
                return Ok(());
            };
            if Instant::now() > deadline {
                return Err(ProxmoxError::Transport {
                    what: format!("VM {}", vm.vmid),
                    message: format!("still locked ({lock}) after {} s", self.config.ready_timeout_secs),
                });
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    /// Tier size, cloud-init user and key, DHCP, tag and guest agent.
    async fn configure(&self, vm: &ProxmoxVm, key: &LeaseKey, tier: RunnerType) -> Result<(), ProxmoxError> {
        let params = [
            ("cores", tier.cpu().to_string()),
            ("memory", (tier.memory_gb() * 1024).to_string()),
            ("ciuser", CI_USER.to_string()),
            // `urlencoded` format: encoded here, and once more by the form encoding.
            ("sshkeys", encode_component(self.config.authorized_key.trim())),
            ("ipconfig0", "ip=dhcp".to_string()),
            ("tags", LEASE_TAG.to_string()),
            ("agent", "1".to_string()),
        ];
        let upid = self.call(Method::POST, &self.qemu(vm, "/config"), &params).await?;
        let what = format!("config of VM {} for lease {key} ({})", vm.vmid, tier.as_str());
        self.wait_task(&vm.node, &upid, &what).await
    }

    async fn wait_ready(&self, vm: &ProxmoxVm, host_keys: &HostKeyPair) -> Result<ProxmoxVm, ProxmoxError> {
        let secs = self.config.ready_timeout_secs;
        let deadline = self.deadline();
        let mut last = "not started".to_string();
        let mut pinned = false;
        loop {
            let current = self.call(Method::GET, &self.qemu(vm, "/status/current"), &[]).await?;
            let status = current["status"].as_str().unwrap_or("unknown").to_string();
            if status != "running" {
                last = format!("status {status}");
            } else {
                match self
                    .call_once(Method::GET, &self.qemu(vm, "/agent/network-get-interfaces"), &[])
                    .await
                {
                    Err(ProxmoxError::Api { status, message, .. }) if status >= 500 => {
                        last = format!("running, guest agent: {message}");
                    }
                    Err(e) => return Err(e),
                    Ok(v) => match pick_ipv4(&v["result"]) {
                        None => last = "running, the guest agent reports no IPv4 address yet".into(),
                        Some(ip) => {
                            if !pinned {
                                match self.pin_host_key(vm, host_keys, deadline).await? {
                                    Ok(()) => pinned = true,
                                    Err(why) => last = format!("running at {ip}, pinning the SSH host key: {why}"),
                                }
                            }
                            if pinned {
                                let addr = (ip.as_str(), self.config.ssh_port);
                                match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                                    .await
                                {
                                    Ok(Ok(_)) => {
                                        tracing::info!(vmid = vm.vmid, %ip, "proxmox VM ready");
                                        return Ok(ProxmoxVm {
                                            ip,
                                            status,
                                            ..vm.clone()
                                        });
                                    }
                                    _ => {
                                        last = format!(
                                            "running at {ip}, SSH on {ip}:{} does not answer",
                                            self.config.ssh_port
                                        )
                                    }
                                }
                            }
                        }
                    },
                }
            }
            if Instant::now() > deadline {
                return Err(ProxmoxError::NeverReady {
                    name: vm.name.clone(),
                    vmid: vm.vmid,
                    secs,
                    last,
                });
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    /// Writes the host key pair through the guest agent and restarts sshd. The outer error
    /// is fatal (a 4xx: missing privileges); the inner one means "not yet, try again".
    async fn pin_host_key(
        &self,
        vm: &ProxmoxVm,
        host_keys: &HostKeyPair,
        deadline: Instant,
    ) -> Result<Result<(), String>, ProxmoxError> {
        // cloud-init's first boot deletes and regenerates host keys: let it finish first.
        let settle =
            "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1; fi; true";
        if let Err(why) = self.agent_exec(vm, settle, deadline).await? {
            return Ok(Err(why));
        }
        let mut private = host_keys.private_key.trim().to_string();
        private.push('\n');
        let public = format!("{}\n", host_keys.public_key.trim());
        for (file, content) in [
            (HOST_KEY_PATH.to_string(), private),
            (format!("{HOST_KEY_PATH}.pub"), public),
        ] {
            let params = [("file", file), ("content", content)];
            match self
                .call_once(Method::POST, &self.qemu(vm, "/agent/file-write"), &params)
                .await
            {
                Ok(_) => {}
                Err(ProxmoxError::Api { status, message, .. }) if status >= 500 => return Ok(Err(message)),
                Err(e) => return Err(e),
            }
        }
        let restart = format!(
            "chmod 600 {HOST_KEY_PATH} && chmod 644 {HOST_KEY_PATH}.pub && \
             (systemctl restart ssh || systemctl restart sshd)"
        );
        self.agent_exec(vm, &restart, deadline).await
    }

    /// Runs `sh -c script` through the guest agent and waits for it to exit 0.
    async fn agent_exec(
        &self,
        vm: &ProxmoxVm,
        script: &str,
        deadline: Instant,
    ) -> Result<Result<(), String>, ProxmoxError> {
        let params = [
            ("command", "sh".to_string()),
            ("command", "-c".to_string()),
            ("command", script.to_string()),
        ];
        let started = match self
            .call_once(Method::POST, &self.qemu(vm, "/agent/exec"), &params)
            .await
        {
            Ok(v) => v,
            Err(ProxmoxError::Api { status, message, .. }) if status >= 500 => return Ok(Err(message)),
            Err(e) => return Err(e),
        };
        let Some(pid) = started["pid"].as_u64() else {
            return Ok(Err(format!("agent/exec answered {started}")));
        };
        loop {
            let status = match self
                .call_once(
                    Method::GET,
                    &self.qemu(vm, "/agent/exec-status"),
                    &[("pid", pid.to_string())],
                )
                .await
            {
                Ok(v) => v,
                Err(ProxmoxError::Api { status, message, .. }) if status >= 500 => return Ok(Err(message)),
                Err(e) => return Err(e),
            };
            if status["exited"].as_u64() == Some(1) || status["exited"] == true {
                let code = status["exitcode"].as_i64().unwrap_or(-1);
                if code == 0 {
                    return Ok(Ok(()));
                }
                let err = status["err-data"].as_str().unwrap_or("").trim().to_string();
                return Ok(Err(format!("`{script}` exited {code}: {err}")));
            }
            if Instant::now() > deadline {
                return Ok(Err(format!("`{script}` still running")));
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    /// Stops (if running) and deletes a VM; a VM that is gone already is fine.
    async fn delete(&self, vm: &ProxmoxVm) -> Result<(), ProxmoxError> {
        let Some(entry) = self
            .list()
            .await?
            .into_iter()
            .find(|r| r["vmid"].as_u64() == Some(u64::from(vm.vmid)))
        else {
            return Ok(());
        };
        let node = entry["node"].as_str().unwrap_or(&vm.node).to_string();
        let vm = ProxmoxVm { node, ..vm.clone() };
        let current = self.call(Method::GET, &self.qemu(&vm, "/status/current"), &[]).await?;
        if current["status"] == "running" {
            let upid = self.call(Method::POST, &self.qemu(&vm, "/status/stop"), &[]).await?;
            self.wait_task(&vm.node, &upid, &format!("stop of VM {}", vm.vmid))
                .await?;
        }
        let params = [
            ("purge", "1".to_string()),
            ("destroy-unreferenced-disks", "1".to_string()),
        ];
        let upid = self.call(Method::DELETE, &self.qemu(&vm, ""), &params).await?;
        self.wait_task(&vm.node, &upid, &format!("delete of VM {}", vm.vmid))
            .await?;
        tracing::info!(vmid = vm.vmid, name = %vm.name, "proxmox VM deleted");
        Ok(())
    }

    /// Deletes the lease's VM; a lease without a VM is destroyed already.
    pub async fn destroy(&self, key: &LeaseKey) -> Result<(), ProxmoxError> {
        match self.find(key).await? {
            Some(vm) => self.delete(&vm).await,
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl crate::Provider for Proxmox {
    fn kind(&self) -> lian_core::directives::ComputeProvider {
        lian_core::directives::ComputeProvider::Proxmox
    }

    /// A VM given a host key pair generated here for the lease; its public half is the
    /// one to pin.
    async fn lease(&self, ask: &lian_core::control::LeaseRequest) -> Result<crate::Runner, crate::RunnerError> {
        let key = &ask.lease_key;
        let pair = crate::lease_host_key(key)?;
        let vm = self
            .spawn(key, ask.runner_type, &pair)
            .await
            .map_err(|e| fault(key, e))?;
        Ok(crate::Runner {
            lease_key: key.clone(),
            lease_id: format!("proxmox:{}/{}", vm.node, vm.vmid),
            host: vm.ip,
            runner_type: ask.runner_type,
            host_key: Some(pair.public_key),
            ssh_port: Some(self.ssh_port()),
        })
    }

    async fn reach(&self, _: crate::Held<'_>) -> Result<Box<dyn crate::RunnerHandle>, crate::RunnerError> {
        Err(crate::RunnerError::ReachedByWorkers { provider: "proxmox" })
    }

    async fn release(&self, lease: crate::Held<'_>) -> Result<(), crate::RunnerError> {
        self.destroy(lease.key).await.map_err(|e| fault(lease.key, e))
    }
}

/// The API not answering is worth another try; anything it answered is not.
fn fault(key: &LeaseKey, e: ProxmoxError) -> crate::RunnerError {
    let message = e.to_string();
    let lease_key = key.clone();
    match e {
        ProxmoxError::Transport { .. } => crate::RunnerError::Remote { lease_key, message },
        _ => crate::RunnerError::Failed { lease_key, message },
    }
}
