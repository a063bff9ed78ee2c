//! Settings of the long-running roles, from one loader: defaults, then the config file,
//! then `LIAN_*` environment variables (flags override what they name).

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The docker CLI used for builds; Debian's builds with BuildKit without buildx.
    pub docker_cli: PathBuf,
    /// DOCKER_HOST for builds; empty for the default socket.
    pub docker_host: String,
    /// `--network` of RUN steps: "host" (steps may reach package registries) or "none".
    pub build_network: String,
    /// Work-queue ack wait in seconds; workers heartbeat at a third of it.
    pub ack_wait_secs: u64,
    /// Deliveries of a request before it is given up.
    pub max_deliver: i64,
    /// Copies of every stream and bucket: 0 (the default) is as many as the cluster has
    /// servers, up to 3 (1 on a lone server).
    pub nats_replicas: usize,
    /// Seconds between reaper passes over this host's runners.
    pub reap_every_secs: u64,
    /// docker_local runners: "shared" (the host's engine, no limits) or "engine" (an engine
    /// per lease under a cgroup with the tier's limits).
    pub runner_isolation: String,
    /// With "engine": the fraction of a tier's memory a lease gets (1.0 on a real host).
    pub memory_scale: f64,
    /// With "engine": engines per tier kept started, so a lease does not wait for one.
    pub warm_pool: u32,
    /// A build whose context has more entries than this fails before it is read.
    pub max_context_files: u64,
    /// A build whose context has more bytes than this fails before it is read.
    pub max_context_bytes: u64,
    /// Build secrets this worker can mount: id -> file (its content never leaves the file).
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, PathBuf>,
    /// The ssh_pool provider's hosts.
    #[serde(default)]
    pub ssh_hosts: Vec<lian_runner::SshHost>,
    /// The control plane workers lease through (`http://host:port`); empty: workers use
    /// their own providers.
    pub control_url: String,
    /// The control plane's bearer token (`LIAN_CONTROL_TOKEN`); never logged.
    pub control_token: String,
    /// The hcloud provider (`[hcloud]`), for `lian control` only: workers lease cloud
    /// runners through it and never hold the token (`LIAN_HCLOUD_TOKEN` overrides `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hcloud: Option<lian_runner::HcloudConfig>,
    /// The proxmox provider (`[proxmox]`), for `lian control` only
    /// (`LIAN_PROXMOX_TOKEN_SECRET` overrides `token_secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxmox: Option<lian_runner::ProxmoxConfig>,
    /// Workers: the private key they reach cloud runners with, as user `lian` (its public
    /// half is `authorized_key` in the control plane's `[hcloud]` / `[proxmox]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_ssh_key: Option<PathBuf>,
    /// The OCI registry (`[registry]`); absent, `lian up` starts one of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistrySettings>,
    /// The S3 bucket for sccache (`[sccache]`); absent, `lian up` starts a store of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sccache: Option<SccacheSettings>,
}

/// `[registry]`: a user's own registry. The password comes from `password`,
/// `password_file` or `LIAN_REGISTRY_PASSWORD` and is never printed.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct RegistrySettings {
    /// `https://registry.example` or `http://127.0.0.1:5000` (plain HTTP: loopback only).
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// `[sccache]`: an S3-compatible bucket. The secret key comes from `secret_access_key`,
/// `secret_access_key_file` or `LIAN_SCCACHE_SECRET_ACCESS_KEY` and is never printed.
#[derive(Clone, Serialize, Deserialize)]
pub struct SccacheSettings {
    /// `https://s3.eu-central-1.amazonaws.com` or `http://127.0.0.1:8333`.
    pub endpoint: String,
    #[serde(default = "default_bucket")]
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub access_key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
}

fn default_bucket() -> String {
    "sccache".into()
}

fn default_region() -> String {
    "us-east-1".into()
}

impl std::fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl std::fmt::Debug for SccacheSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SccacheSettings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("secret_access_key_file", &self.secret_access_key_file)
            .finish()
    }
}

/// A configured endpoint that cannot be used as given.
#[derive(Debug)]
pub enum EndpointError {
    Scheme {
        table: &'static str,
        field: &'static str,
        value: String,
    },
    Incomplete {
        table: &'static str,
        what: &'static str,
    },
    SecretFile {
        table: &'static str,
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Display for EndpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scheme { table, field, value } => {
                write!(
                    f,
                    "[{table}] {field} must start with http:// or https://, not {value:?}"
                )
            }
            Self::Incomplete { table, what } => write!(f, "[{table}] {what}"),
            Self::SecretFile {
                table,
                field,
                path,
                source,
            } => write!(f, "cannot read [{table}] {field} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for EndpointError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::SecretFile { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Debug without the tokens (the cloud configs redact their own).
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("docker_cli", &self.docker_cli)
            .field("docker_host", &self.docker_host)
            .field("build_network", &self.build_network)
            .field("ack_wait_secs", &self.ack_wait_secs)
            .field("max_deliver", &self.max_deliver)
            .field("nats_replicas", &self.nats_replicas)
            .field("reap_every_secs", &self.reap_every_secs)
            .field("runner_isolation", &self.runner_isolation)
            .field("memory_scale", &self.memory_scale)
            .field("warm_pool", &self.warm_pool)
            .field("secrets", &self.secrets)
            .field("ssh_hosts", &self.ssh_hosts)
            .field("control_url", &self.control_url)
            .field("control_token", &"<redacted>")
            .field("hcloud", &self.hcloud)
            .field("proxmox", &self.proxmox)
            .field("runner_ssh_key", &self.runner_ssh_key)
            .field("registry", &self.registry)
            .field("sccache", &self.sccache)
            .finish_non_exhaustive()
    }
}

impl Default for Settings {
    fn default() -> Self {
        let debian = PathBuf::from("/usr/bin/docker");
        Self {
            docker_cli: if debian.exists() { debian } else { "docker".into() },
            docker_host: String::new(),
            build_network: "host".into(),
            ack_wait_secs: 30,
            max_deliver: 5,
            nats_replicas: 0,
            reap_every_secs: 60,
            ssh_hosts: Vec::new(),
            runner_isolation: "engine".into(),
            secrets: Default::default(),
            memory_scale: 1.0,
            warm_pool: 0,
            max_context_files: lian_bus::ContextLimits::default().max_files,
            max_context_bytes: lian_bus::ContextLimits::default().max_bytes,
            control_url: String::new(),
            control_token: String::new(),
            hcloud: None,
            proxmox: None,
            runner_ssh_key: None,
            registry: None,
            sccache: None,
        }
    }
}

impl Settings {
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let mut settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::file(file))
            .merge(Env::prefixed("LIAN_"))
            .extract()
            .map_err(|e| anyhow::Error::new(e).context(format!("invalid settings ({}, LIAN_*)", file.display())))?;
        settings.cloud_tokens_from(|name| std::env::var(name).ok());
        settings.stores_from(|name| std::env::var(name).ok());
        if !matches!(settings.runner_isolation.as_str(), "shared" | "engine") {
            anyhow::bail!(
                "runner_isolation must be \"shared\" or \"engine\", not {:?}",
                settings.runner_isolation
            );
        }
        if !(settings.memory_scale > 0.0 && settings.memory_scale <= 1.0) {
            anyhow::bail!("memory_scale must be in (0, 1], not {}", settings.memory_scale);
        }
        if !matches!(settings.build_network.as_str(), "host" | "none") {
            anyhow::bail!(
                "build_network must be \"host\" or \"none\", not {:?}",
                settings.build_network
            );
        }
        Ok(settings)
    }

    /// The cloud tokens from `LIAN_HCLOUD_TOKEN` and `LIAN_PROXMOX_TOKEN_SECRET` (read by
    /// `env`), over the config file's: figment's `LIAN_*` mapping would want
    /// `LIAN_HCLOUD__TOKEN`.
    fn cloud_tokens_from(&mut self, env: impl Fn(&str) -> Option<String>) {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if let (Some(hcloud), Some(token)) = (self.hcloud.as_mut(), set("LIAN_HCLOUD_TOKEN")) {
            hcloud.token = token;
        }
        if let (Some(proxmox), Some(secret)) = (self.proxmox.as_mut(), set("LIAN_PROXMOX_TOKEN_SECRET")) {
            proxmox.token_secret = secret;
        }
    }

    /// The endpoints from `LIAN_REGISTRY_*` and `LIAN_SCCACHE_*` (read by `env`), over the
    /// config file's; this is also how `lian up` hands the stores it started to its workers
    /// (the S3 secret as a file name, never as a value in a child's environment).
    fn stores_from(&mut self, env: impl Fn(&str) -> Option<String>) {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if let Some(url) = set("LIAN_REGISTRY_URL") {
            self.registry.get_or_insert_with(Default::default).url = url;
        }
        if let Some(registry) = self.registry.as_mut() {
            if let Some(user) = set("LIAN_REGISTRY_USERNAME") {
                registry.username = Some(user);
            }
            if let Some(password) = set("LIAN_REGISTRY_PASSWORD") {
                registry.password = Some(password);
            }
        }
        if let Some(endpoint) = set("LIAN_SCCACHE_ENDPOINT") {
            let sccache = self.sccache.get_or_insert_with(|| SccacheSettings {
                endpoint: String::new(),
                bucket: default_bucket(),
                region: default_region(),
                access_key_id: String::new(),
                secret_access_key: None,
                secret_access_key_file: None,
            });
            sccache.endpoint = endpoint;
        }
        if let Some(sccache) = self.sccache.as_mut() {
            if let Some(bucket) = set("LIAN_SCCACHE_BUCKET") {
                sccache.bucket = bucket;
            }
            if let Some(region) = set("LIAN_SCCACHE_REGION") {
                sccache.region = region;
            }
            if let Some(key) = set("LIAN_SCCACHE_ACCESS_KEY_ID") {
                sccache.access_key_id = key;
            }
            if let Some(secret) = set("LIAN_SCCACHE_SECRET_ACCESS_KEY") {
                sccache.secret_access_key = Some(secret);
            }
            if let Some(file) = set("LIAN_SCCACHE_SECRET_ACCESS_KEY_FILE") {
                sccache.secret_access_key_file = Some(file.into());
            }
        }
    }

    /// The registry, when one is configured (or handed down by `lian up`).
    pub fn registry_endpoint(&self) -> Result<Option<lian_worker::RegistryEndpoint>, EndpointError> {
        let Some(r) = &self.registry else { return Ok(None) };
        check_scheme("registry", "url", &r.url)?;
        if r.password.is_some() && r.password_file.is_some() {
            return Err(EndpointError::Incomplete {
                table: "registry",
                what: "set password or password_file, not both",
            });
        }
        let password = match (&r.password, &r.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => Some(read_secret("registry", "password_file", path)?),
            (None, None) => None,
        };
        if password.is_some() != r.username.is_some() {
            return Err(EndpointError::Incomplete {
                table: "registry",
                what: "username and password go together",
            });
        }
        Ok(Some(lian_worker::RegistryEndpoint {
            url: r.url.trim_end_matches('/').to_string(),
            username: r.username.clone(),
            password: password.map(lian_worker::Secret::new),
        }))
    }

    /// The sccache bucket, when one is configured (or handed down by `lian up`).
    pub fn sccache_endpoint(&self) -> Result<Option<lian_worker::S3Endpoint>, EndpointError> {
        let Some(s) = &self.sccache else { return Ok(None) };
        check_scheme("sccache", "endpoint", &s.endpoint)?;
        let secret = match (&s.secret_access_key, &s.secret_access_key_file) {
            (Some(v), _) => v.clone(),
            (None, Some(path)) => read_secret("sccache", "secret_access_key_file", path)?,
            (None, None) => String::new(),
        };
        if s.access_key_id.is_empty() || secret.is_empty() || s.bucket.is_empty() {
            return Err(EndpointError::Incomplete {
                table: "sccache",
                what: "needs bucket, access_key_id and secret_access_key (or secret_access_key_file)",
            });
        }
        Ok(Some(lian_worker::S3Endpoint {
            endpoint: s.endpoint.trim_end_matches('/').to_string(),
            bucket: s.bucket.clone(),
            region: s.region.clone(),
            access_key_id: s.access_key_id.clone(),
            secret_access_key: lian_worker::Secret::new(secret),
        }))
    }

    /// The control plane client, when one is configured.
    pub fn control(&self) -> anyhow::Result<Option<lian_runner::ControlClient>> {
        if self.control_url.is_empty() {
            return Ok(None);
        }
        if self.control_token.is_empty() {
            anyhow::bail!("control_url is set but control_token is not: set it in lian.toml or LIAN_CONTROL_TOKEN");
        }
        Ok(Some(lian_runner::ControlClient::new(
            &self.control_url,
            &self.control_token,
        )))
    }

    /// The providers of this host, with runners under `state_dir/runners`.
    pub fn providers(&self, state_dir: &Path) -> lian_runner::Providers {
        lian_runner::Providers::on_host(
            &state_dir.join("runners"),
            self.isolation(),
            &self.docker_cli,
            self.ssh_hosts.clone(),
            &self.build_network,
        )
    }

    pub fn isolation(&self) -> lian_runner::Isolation {
        match self.runner_isolation.as_str() {
            "engine" => lian_runner::Isolation::Engine {
                memory_scale: self.memory_scale,
                warm_pool: self.warm_pool,
            },
            _ => lian_runner::Isolation::Shared,
        }
    }

    pub fn topology(&self) -> lian_bus::Topology {
        lian_bus::Topology {
            ack_wait: Duration::from_secs(self.ack_wait_secs.max(1)),
            max_deliver: self.max_deliver,
            replicas: self.nats_replicas,
            ..Default::default()
        }
    }
}

fn check_scheme(table: &'static str, field: &'static str, value: &str) -> Result<(), EndpointError> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(())
    } else {
        Err(EndpointError::Scheme {
            table,
            field,
            value: value.to_string(),
        })
    }
}

/// A secret kept in a file: its content, without the trailing newline editors add.
fn read_secret(table: &'static str, field: &'static str, path: &Path) -> Result<String, EndpointError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| EndpointError::SecretFile {
            table,
            field,
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod cloud_tests {
    use super::*;

    const TOML: &str = r#"
[hcloud]
endpoint = "https://api.hetzner.cloud/v1"
token = "hc-token-from-file"
authorized_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient lian-worker"

[proxmox]
endpoint = "https://pve.example:8006/api2/json"
token_id = "lian@pve!control"
node = "pve1"
template_vmid = 9000
authorized_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient lian-worker"
"#;

    fn parsed() -> Settings {
        Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(TOML))
            .extract()
            .unwrap()
    }

    #[test]
    fn cloud_tables_are_optional_and_their_tokens_come_from_the_environment() {
        let none: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .extract()
            .unwrap();
        assert!(none.hcloud.is_none() && none.proxmox.is_none() && none.runner_ssh_key.is_none());

        let mut settings = parsed();
        let hcloud = settings.hcloud.as_ref().unwrap();
        assert_eq!((hcloud.token.as_str(), hcloud.ssh_port), ("hc-token-from-file", 22));
        assert_eq!(settings.proxmox.as_ref().unwrap().token_secret, "");

        settings.cloud_tokens_from(|name| match name {
            "LIAN_HCLOUD_TOKEN" => Some("hc-token-from-env".into()),
            "LIAN_PROXMOX_TOKEN_SECRET" => Some("pve-secret-from-env".into()),
            _ => None,
        });
        assert_eq!(settings.hcloud.as_ref().unwrap().token, "hc-token-from-env");
        assert_eq!(settings.proxmox.as_ref().unwrap().token_secret, "pve-secret-from-env");

        // A token set for a provider that is not configured configures nothing.
        let mut none = none;
        none.cloud_tokens_from(|_| Some("stray".into()));
        assert!(none.hcloud.is_none() && none.proxmox.is_none());
    }

    #[test]
    fn debug_output_shows_no_token() {
        let mut settings = parsed();
        settings.control_token = "control-token-1234".into();
        settings.cloud_tokens_from(|name| (name == "LIAN_PROXMOX_TOKEN_SECRET").then(|| "pve-secret-5678".into()));
        let debug = format!("{settings:?}");
        for secret in ["control-token-1234", "hc-token-from-file", "pve-secret-5678"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(
            debug.contains("lian@pve!control") && debug.contains("api.hetzner.cloud"),
            "{debug}"
        );
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    fn parsed(toml: &str) -> Settings {
        Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap()
    }

    #[test]
    fn no_store_is_configured_by_default() {
        let settings = parsed("");
        assert!(settings.registry_endpoint().unwrap().is_none());
        assert!(settings.sccache_endpoint().unwrap().is_none());
    }

    #[test]
    fn a_users_own_stores_come_from_the_file_and_the_environment() {
        let secret_file = std::env::temp_dir().join(format!("lian-config-test-{}", std::process::id()));
        std::fs::write(&secret_file, "s3-secret-from-file\n").unwrap();
        let mut settings = parsed(&format!(
            "[registry]\nurl = \"https://registry.example/\"\nusername = \"ci\"\npassword = \"registry-pass\"\n\n\
             [sccache]\nendpoint = \"https://s3.example\"\naccess_key_id = \"AKID\"\nsecret_access_key_file = \"{}\"\n",
            secret_file.display()
        ));
        let registry = settings.registry_endpoint().unwrap().unwrap();
        assert_eq!(
            (registry.url.as_str(), registry.host()),
            ("https://registry.example", "registry.example")
        );
        assert_eq!(registry.password.as_ref().unwrap().expose(), "registry-pass");
        let s3 = settings.sccache_endpoint().unwrap().unwrap();
        assert_eq!((s3.bucket.as_str(), s3.region.as_str()), ("sccache", "us-east-1"));
        assert_eq!(s3.secret_access_key.expose(), "s3-secret-from-file");
        assert!(s3.use_ssl());

        // `lian up` hands its own stores down through the environment.
        let mut fresh = parsed("");
        fresh.stores_from(|name| match name {
            "LIAN_REGISTRY_URL" => Some("http://127.0.0.1:5000".into()),
            "LIAN_SCCACHE_ENDPOINT" => Some("http://127.0.0.1:8333".into()),
            "LIAN_SCCACHE_ACCESS_KEY_ID" => Some("LIANKEY".into()),
            "LIAN_SCCACHE_SECRET_ACCESS_KEY_FILE" => Some(secret_file.display().to_string()),
            _ => None,
        });
        let local = fresh.sccache_endpoint().unwrap().unwrap();
        assert_eq!((local.access_key_id.as_str(), local.use_ssl()), ("LIANKEY", false));
        assert!(fresh.registry_endpoint().unwrap().unwrap().plain_http());

        let shown = format!("{settings:?} {s3:?} {registry:?}");
        for secret in ["registry-pass", "s3-secret-from-file"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        settings.sccache.as_mut().unwrap().access_key_id.clear();
        assert!(
            settings.sccache_endpoint().is_err(),
            "a bucket without a key is refused"
        );
        let _ = std::fs::remove_file(&secret_file);
    }

    #[test]
    fn an_endpoint_without_a_scheme_is_refused() {
        let settings = parsed("[registry]\nurl = \"registry.example\"\n");
        let err = settings.registry_endpoint().unwrap_err().to_string();
        assert!(err.contains("http:// or https://"), "{err}");
    }
}
