//! Settings of the long-running roles, from one loader: defaults, then the config file,
//! then the `LIAN_*` environment variables of `ENV` (flags override what they name). Every
//! table refuses a key it does not know, naming it, the file and the keys it takes; secrets
//! are `SecretString`s, so `Debug`, logs and `lian config show` never print one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The file read when `--config` (or `LIAN_CONFIG`) names none, if it exists.
pub const DEFAULT_FILE: &str = "lian.toml";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Builds one worker drives at once.
    pub builds_in_flight: usize,
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
    /// The control plane's bearer token (`LIAN_CONTROL_TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "redacted")]
    pub control_token: Option<SecretString>,
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
/// `password_file` or `LIAN_REGISTRY_PASSWORD`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// `https://registry.example` or `http://127.0.0.1:5000` (plain HTTP: loopback only).
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "redacted")]
    pub password: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// `[sccache]`: an S3-compatible bucket. The secret key comes from `secret_access_key`,
/// `secret_access_key_file` or `LIAN_SCCACHE_SECRET_ACCESS_KEY`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SccacheSettings {
    /// `https://s3.eu-central-1.amazonaws.com` or `http://127.0.0.1:8333`.
    pub endpoint: String,
    #[serde(default = "default_bucket")]
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub access_key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "redacted")]
    pub secret_access_key: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
}

fn default_bucket() -> String {
    "sccache".into()
}

fn default_region() -> String {
    "us-east-1".into()
}

/// Serializing a set secret writes a mark, never the value: the only serializations are
/// the defaults (which hold none) and `lian config show`.
fn redacted<S: serde::Serializer>(secret: &Option<SecretString>, serializer: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => lian_runner::cloud::serialize_redacted(secret, serializer),
        None => serializer.serialize_none(),
    }
}

/// A secret's value, unless it is unset or blank.
fn exposed(secret: &Option<SecretString>) -> Option<&str> {
    secret
        .as_ref()
        .map(|s| s.expose_secret())
        .filter(|s| !s.trim().is_empty())
}

/// Settings that cannot be used as given.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} does not exist (named by --config or LIAN_CONFIG)", path.display())]
    Missing { path: PathBuf },
    #[error("{0}")]
    Incomplete(&'static str),
    #[error("{key} must be {allowed}, not {value}")]
    Value {
        key: &'static str,
        allowed: &'static str,
        value: String,
    },
}

/// A configured endpoint that cannot be used as given.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("[{table}] {field} must start with http:// or https://, not {value:?}")]
    Scheme {
        table: &'static str,
        field: &'static str,
        value: String,
    },
    #[error("[{table}] {what}")]
    Incomplete { table: &'static str, what: &'static str },
    #[error("cannot read [{table}] {field} {}: {source}", path.display())]
    SecretFile {
        table: &'static str,
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
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
            builds_in_flight: 1,
            ssh_hosts: Vec::new(),
            runner_isolation: "engine".into(),
            secrets: Default::default(),
            memory_scale: 1.0,
            warm_pool: 0,
            max_context_files: lian_bus::ContextLimits::default().max_files,
            max_context_bytes: lian_bus::ContextLimits::default().max_bytes,
            control_url: String::new(),
            control_token: None,
            hcloud: None,
            proxmox: None,
            runner_ssh_key: None,
            registry: None,
            sccache: None,
        }
    }
}

/// An environment variable a setting is read from.
struct EnvVar {
    name: &'static str,
    /// The setting's key, dotted for a table's (`registry.url`).
    key: &'static str,
    /// Parsed as a number or boolean; otherwise taken as text, so a token of digits stays
    /// a string.
    parsed: bool,
    /// Only when this table is configured already: a token for a provider that is not
    /// configured configures nothing.
    within: Option<&'static str>,
}

const fn var(name: &'static str, key: &'static str, parsed: bool, within: Option<&'static str>) -> EnvVar {
    EnvVar {
        name,
        key,
        parsed,
        within,
    }
}

/// Every environment variable settings are read from, in the order they are applied.
/// `LIAN_REGISTRY_*` and `LIAN_SCCACHE_*` are also how `lian up` hands the stores it started
/// to its workers (the S3 secret as a file name, never as a value in a child's environment).
const ENV: &[EnvVar] = &[
    var("LIAN_DOCKER_CLI", "docker_cli", false, None),
    var("LIAN_DOCKER_HOST", "docker_host", false, None),
    var("LIAN_BUILD_NETWORK", "build_network", false, None),
    var("LIAN_ACK_WAIT_SECS", "ack_wait_secs", true, None),
    var("LIAN_MAX_DELIVER", "max_deliver", true, None),
    var("LIAN_NATS_REPLICAS", "nats_replicas", true, None),
    var("LIAN_REAP_EVERY_SECS", "reap_every_secs", true, None),
    var("LIAN_BUILDS_IN_FLIGHT", "builds_in_flight", true, None),
    var("LIAN_RUNNER_ISOLATION", "runner_isolation", false, None),
    var("LIAN_MEMORY_SCALE", "memory_scale", true, None),
    var("LIAN_WARM_POOL", "warm_pool", true, None),
    var("LIAN_MAX_CONTEXT_FILES", "max_context_files", true, None),
    var("LIAN_MAX_CONTEXT_BYTES", "max_context_bytes", true, None),
    var("LIAN_CONTROL_URL", "control_url", false, None),
    var("LIAN_CONTROL_TOKEN", "control_token", false, None),
    var("LIAN_RUNNER_SSH_KEY", "runner_ssh_key", false, None),
    var("LIAN_REGISTRY_URL", "registry.url", false, None),
    var("LIAN_REGISTRY_USERNAME", "registry.username", false, Some("registry")),
    var("LIAN_REGISTRY_PASSWORD", "registry.password", false, Some("registry")),
    var("LIAN_SCCACHE_ENDPOINT", "sccache.endpoint", false, None),
    var("LIAN_SCCACHE_BUCKET", "sccache.bucket", false, Some("sccache")),
    var("LIAN_SCCACHE_REGION", "sccache.region", false, Some("sccache")),
    var(
        "LIAN_SCCACHE_ACCESS_KEY_ID",
        "sccache.access_key_id",
        false,
        Some("sccache"),
    ),
    var(
        "LIAN_SCCACHE_SECRET_ACCESS_KEY",
        "sccache.secret_access_key",
        false,
        Some("sccache"),
    ),
    var(
        "LIAN_SCCACHE_SECRET_ACCESS_KEY_FILE",
        "sccache.secret_access_key_file",
        false,
        Some("sccache"),
    ),
    var("LIAN_HCLOUD_TOKEN", "hcloud.token", false, Some("hcloud")),
    var(
        "LIAN_PROXMOX_TOKEN_SECRET",
        "proxmox.token_secret",
        false,
        Some("proxmox"),
    ),
];

/// One environment variable's value as a figment provider, so each value keeps the name
/// of the variable it came from (`lian config show`, and errors).
struct FromEnv {
    var: &'static EnvVar,
    value: String,
}

impl Provider for FromEnv {
    fn metadata(&self) -> Metadata {
        let name = self.var.name;
        Metadata::from(format!("environment variable {name}"), Source::Custom(name.into()))
            .interpolater(move |_: &Profile, _: &[&str]| name.to_string())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let value = if self.var.parsed {
            self.value.parse().expect("parsing a Value is infallible")
        } else {
            Value::from(self.value.clone())
        };
        let dict = figment::util::nest(self.var.key, value)
            .into_dict()
            .expect("a non-empty key nests into a dict");
        Ok(Profile::Default.collect(dict))
    }
}

/// The settings and where each came from.
pub struct Loaded {
    pub settings: Settings,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    figment: Figment,
}

/// The config file to read: the one named (which must exist), else `lian.toml` if there is one.
pub fn config_file(named: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    match named {
        Some(path) if path.exists() => Ok(Some(path.to_path_buf())),
        Some(path) => Err(ConfigError::Missing {
            path: path.to_path_buf(),
        }),
        None => Ok(Path::new(DEFAULT_FILE).is_file().then(|| PathBuf::from(DEFAULT_FILE))),
    }
}

impl Settings {
    /// The settings from `named` (`--config`; else `lian.toml` if it exists) and the
    /// process's environment.
    pub fn load(named: Option<&Path>) -> anyhow::Result<Self> {
        Ok(Self::load_from(named, &|name| std::env::var(name).ok())?.settings)
    }

    pub fn load_from(named: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Loaded> {
        let file = config_file(named)?;
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = &file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let figment = with_env(figment, env);
        let shown = match &file {
            Some(file) => format!("{}, LIAN_*", file.display()),
            None => "LIAN_*".into(),
        };
        let settings: Settings = figment
            .extract()
            .map_err(|e| anyhow::Error::new(e).context(format!("invalid settings ({shown})")))?;
        settings.check()?;
        Ok(Loaded {
            settings,
            file,
            figment,
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !matches!(self.runner_isolation.as_str(), "shared" | "engine") {
            return Err(ConfigError::Value {
                key: "runner_isolation",
                allowed: "\"shared\" or \"engine\"",
                value: format!("{:?}", self.runner_isolation),
            });
        }
        if !(self.memory_scale > 0.0 && self.memory_scale <= 1.0) {
            return Err(ConfigError::Value {
                key: "memory_scale",
                allowed: "in (0, 1]",
                value: self.memory_scale.to_string(),
            });
        }
        if !matches!(self.build_network.as_str(), "host" | "none") {
            return Err(ConfigError::Value {
                key: "build_network",
                allowed: "\"host\" or \"none\"",
                value: format!("{:?}", self.build_network),
            });
        }
        Ok(())
    }

    /// The control plane's token, unless none is set.
    pub fn control_token(&self) -> Option<&str> {
        exposed(&self.control_token)
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
            (Some(p), _) => Some(p.expose_secret().to_string()),
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
            (Some(v), _) => v.expose_secret().to_string(),
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
        let Some(token) = self.control_token() else {
            return Err(ConfigError::Incomplete(
                "control_url is set but control_token is not: set it in lian.toml or LIAN_CONTROL_TOKEN",
            )
            .into());
        };
        Ok(Some(lian_runner::ControlClient::new(&self.control_url, token)))
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

/// `figment` with the environment's settings merged in (`env` reads a variable); a blank
/// variable counts as unset.
fn with_env(mut figment: Figment, env: &dyn Fn(&str) -> Option<String>) -> Figment {
    for var in ENV {
        if var.within.is_some_and(|table| !figment.contains(table)) {
            continue;
        }
        if let Some(value) = env(var.name).filter(|v| !v.trim().is_empty()) {
            figment = figment.merge(FromEnv { var, value });
        }
    }
    figment
}

/// One effective setting, as `lian config show` prints it.
#[derive(Debug, Serialize)]
pub struct Shown {
    /// Dotted, with `[i]` for an element of a list: `ssh_hosts[0].address`.
    pub key: String,
    /// Secrets as `<redacted>`.
    pub value: serde_json::Value,
    /// `default`, `file PATH` or `env NAME`.
    pub source: String,
}

impl Loaded {
    /// Every effective setting with where it came from; secrets redacted.
    pub fn shown(&self) -> Vec<Shown> {
        let tree = serde_json::to_value(&self.settings).expect("settings serialize");
        let mut out = Vec::new();
        self.walk(String::new(), None, &tree, &mut out);
        out
    }

    /// `owner`: the key of the list an element is in, whose source the element shares
    /// (figment keeps a list as one value).
    fn walk(&self, key: String, owner: Option<&str>, value: &serde_json::Value, out: &mut Vec<Shown>) {
        match value {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let child = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    self.walk(child, owner, v, out);
                }
            }
            serde_json::Value::Array(items) if !items.is_empty() => {
                for (i, v) in items.iter().enumerate() {
                    self.walk(format!("{key}[{i}]"), Some(owner.unwrap_or(&key)), v, out);
                }
            }
            _ => {
                let source = self
                    .figment
                    .find_metadata(owner.unwrap_or(&key))
                    .and_then(|md| md.source.as_ref())
                    .map_or_else(|| "default".to_string(), source_name);
                out.push(Shown {
                    key,
                    value: value.clone(),
                    source,
                });
            }
        }
    }
}

fn source_name(source: &Source) -> String {
    match source {
        Source::File(path) => format!("file {}", path.display()),
        Source::Custom(var) => format!("env {var}"),
        // The defaults, given in code.
        _ => "default".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings from `toml` as a config file and `env` as the environment.
    fn load(toml: &str, env: &[(&str, &str)]) -> anyhow::Result<Loaded> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), toml).unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::load_from(Some(file.path()), &move |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    fn settings(toml: &str, env: &[(&str, &str)]) -> Settings {
        load(toml, env).unwrap().settings
    }

    const CLOUDS: &str = r#"
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

    #[test]
    fn cloud_tables_are_optional_and_their_tokens_come_from_the_environment() {
        let none = settings("", &[]);
        assert!(none.hcloud.is_none() && none.proxmox.is_none() && none.runner_ssh_key.is_none());

        let file = settings(CLOUDS, &[]);
        let hcloud = file.hcloud.as_ref().unwrap();
        assert_eq!(
            (hcloud.token.expose_secret(), hcloud.ssh_port),
            ("hc-token-from-file", 22)
        );
        assert_eq!(file.proxmox.as_ref().unwrap().token_secret.expose_secret(), "");

        let env = settings(
            CLOUDS,
            &[
                ("LIAN_HCLOUD_TOKEN", "hc-token-from-env"),
                ("LIAN_PROXMOX_TOKEN_SECRET", "pve-secret-from-env"),
            ],
        );
        assert_eq!(env.hcloud.unwrap().token.expose_secret(), "hc-token-from-env");
        assert_eq!(env.proxmox.unwrap().token_secret.expose_secret(), "pve-secret-from-env");

        // A token set for a provider that is not configured configures nothing.
        let stray = settings(
            "",
            &[("LIAN_HCLOUD_TOKEN", "stray"), ("LIAN_PROXMOX_TOKEN_SECRET", "stray")],
        );
        assert!(stray.hcloud.is_none() && stray.proxmox.is_none());
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let settings = settings(
            &format!("control_token = \"control-token-1234\"\n{CLOUDS}"),
            &[("LIAN_PROXMOX_TOKEN_SECRET", "pve-secret-5678")],
        );
        let debug = format!("{settings:?}");
        for secret in ["control-token-1234", "hc-token-from-file", "pve-secret-5678"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(
            debug.contains("lian@pve!control") && debug.contains("api.hetzner.cloud"),
            "{debug}"
        );
    }

    #[test]
    fn no_store_is_configured_by_default() {
        let settings = settings("", &[]);
        assert!(settings.registry_endpoint().unwrap().is_none());
        assert!(settings.sccache_endpoint().unwrap().is_none());
    }

    #[test]
    fn a_users_own_stores_come_from_the_file_and_the_environment() {
        let secret_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret_file.path(), "s3-secret-from-file\n").unwrap();
        let secret_path = secret_file.path().display().to_string();
        let mut settings = settings(
            &format!(
                "[registry]\nurl = \"https://registry.example/\"\nusername = \"ci\"\npassword = \"registry-pass\"\n\n\
                 [sccache]\nendpoint = \"https://s3.example\"\naccess_key_id = \"AKID\"\nsecret_access_key_file = \"{secret_path}\"\n",
            ),
            &[],
        );
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
        let fresh = self::settings(
            "",
            &[
                ("LIAN_REGISTRY_URL", "http://127.0.0.1:5000"),
                ("LIAN_SCCACHE_ENDPOINT", "http://127.0.0.1:8333"),
                ("LIAN_SCCACHE_ACCESS_KEY_ID", "LIANKEY"),
                ("LIAN_SCCACHE_SECRET_ACCESS_KEY_FILE", &secret_path),
            ],
        );
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
    }

    #[test]
    fn an_endpoint_without_a_scheme_is_refused() {
        let settings = settings("[registry]\nurl = \"registry.example\"\n", &[]);
        let err = settings.registry_endpoint().unwrap_err().to_string();
        assert!(err.contains("http:// or https://"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_refused_naming_it_the_file_and_the_keys_allowed() {
        for (toml, key, allowed) in [
            ("contrl_token = \"x\"\n", "contrl_token", "control_token"),
            (
                "[registry]\nurl = \"https://r.example\"\npasword = \"x\"\n",
                "pasword",
                "password",
            ),
            (
                "[hcloud]\nendpoint = \"https://h\"\nauthorized_key = \"k\"\nlocaton = \"fsn1\"\n",
                "locaton",
                "location",
            ),
            (
                "[[ssh_hosts]]\nname = \"b\"\naddress = \"a:22\"\nuser = \"u\"\nkey = \"/k\"\nhost_key = \"h\"\ntier = \"cax11\"\nwork_dri = \"/x\"\n",
                "work_dri",
                "work_dir",
            ),
        ] {
            let err = format!("{:#}", load(toml, &[]).err().expect(key));
            assert!(
                err.contains(key) && err.contains(allowed) && err.contains(".tmp"),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn a_named_config_file_must_exist_and_the_default_one_may_not() {
        let missing = Path::new("/nonexistent/lian.toml");
        let err = Settings::load_from(Some(missing), &|_| None).err().unwrap();
        assert!(matches!(err.downcast_ref(), Some(ConfigError::Missing { .. })), "{err}");
        assert!(config_file(None).is_ok());
    }

    #[test]
    fn shown_settings_say_where_each_came_from_and_hide_secrets() {
        let loaded = load(
            "ack_wait_secs = 7\n[registry]\nurl = \"https://r.example\"\nusername = \"ci\"\npassword = \"file-pass-0042\"\n",
            &[("LIAN_CONTROL_TOKEN", "env-token-0099"), ("LIAN_MAX_DELIVER", "9")],
        )
        .unwrap();
        let file = loaded.file.clone().unwrap();
        let shown = loaded.shown();
        let text = serde_json::to_string(&shown).unwrap();
        assert!(
            !text.contains("file-pass-0042") && !text.contains("env-token-0099"),
            "{text}"
        );
        let find = |key: &str| {
            shown
                .iter()
                .find(|s| s.key == key)
                .unwrap_or_else(|| panic!("{key}: {text}"))
        };
        let from_file = format!("file {}", file.display());
        assert_eq!(
            (
                find("ack_wait_secs").value.clone(),
                find("ack_wait_secs").source.as_str()
            ),
            (7.into(), from_file.as_str())
        );
        assert_eq!(find("max_deliver").source, "env LIAN_MAX_DELIVER");
        assert_eq!(find("control_token").source, "env LIAN_CONTROL_TOKEN");
        assert_eq!(find("control_token").value, "<redacted>");
        assert_eq!(find("registry.password").value, "<redacted>");
        assert_eq!(find("registry.password").source, from_file);
        assert_eq!(find("reap_every_secs").source, "default");
    }
}
