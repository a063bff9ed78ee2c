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
    /// Seconds between reaper passes over this host's runners.
    pub reap_every_secs: u64,
    /// docker_local runners: "shared" (the host's engine, no limits) or "engine" (an engine
    /// per lease under a cgroup with the tier's limits).
    pub runner_isolation: String,
    /// With "engine": the fraction of a tier's memory a lease gets (1.0 on a real host).
    pub memory_scale: f64,
    /// With "engine": engines per tier kept started, so a lease does not wait for one.
    pub warm_pool: u32,
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
            reap_every_secs: 60,
            ssh_hosts: Vec::new(),
            runner_isolation: "engine".into(),
            secrets: Default::default(),
            memory_scale: 1.0,
            warm_pool: 0,
            control_url: String::new(),
            control_token: String::new(),
            hcloud: None,
            proxmox: None,
            runner_ssh_key: None,
        }
    }
}

impl Settings {
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let mut settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::file(file))
            .merge(Env::prefixed("LIAN_"))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid settings ({}, LIAN_*): {e}", file.display()))?;
        settings.cloud_tokens_from(|name| std::env::var(name).ok());
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
            ..Default::default()
        }
    }
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
