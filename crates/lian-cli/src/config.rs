//! Settings of the long-running roles, from one loader: defaults, then the config file,
//! then `LIAN_*` environment variables (flags override what they name).

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
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
            control_url: String::new(),
            control_token: String::new(),
        }
    }
}

impl Settings {
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::file(file))
            .merge(Env::prefixed("LIAN_"))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid settings ({}, LIAN_*): {e}", file.display()))?;
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
