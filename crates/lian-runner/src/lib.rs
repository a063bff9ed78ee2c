//! Compute providers (spawn / find-by-key / destroy a runner) and builders (run BuildKit on
//! a runner). Spawning is idempotent by lease key: a worker that takes over a build asks for
//! the runner recorded in the history and gets the same one back.

pub mod buildctl;
mod cgroup;
pub mod cloud;
pub mod control;
mod docker_build;
mod docker_local;
mod engine;
mod engine_store;
pub mod hcloud;
pub mod progress;
pub mod proxmox;
pub mod registry;
pub mod ssh;
mod ssh_pool;
pub mod sync;
mod usage;
pub mod warm;
mod warm_pool;

pub use cgroup::LeaseCgroup;
pub use cloud::CloudRunner;
pub use control::{ControlClient, ControlError};
pub use docker_build::{BuildFailure, BuildInvocation, BuildOutput, DockerBuilder, StepCounts};
pub use docker_local::{DockerLocal, Isolation};
pub use hcloud::{Hcloud, HcloudConfig};
pub use proxmox::{Proxmox, ProxmoxConfig};
pub use ssh_pool::{HostBuilder, SshHost, SshPool};
pub use usage::Sampler;
pub use warm_pool::WarmEngine;

use lian_core::LeaseKey;
use lian_core::directives::ComputeProvider;
use lian_core::sizing::RunnerType;

/// Every HTTP client of this crate starts here: reqwest is built without a default TLS
/// provider, so the process-wide one (ring) is installed first.
pub(crate) fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A runner the build holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    pub lease_key: LeaseKey,
    pub lease_id: String,
    /// Where the runner is reached ("local" for docker_local).
    pub host: String,
    pub runner_type: RunnerType,
    /// The public host key the runner was given for this lease (`ssh-ed25519 AAAA...`): the
    /// only one a client may accept from it. `None` for docker_local and ssh_pool.
    pub host_key: Option<String>,
    /// The port its sshd answers on at `host`. `None` for docker_local and ssh_pool.
    pub ssh_port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("compute provider {provider} is not configured on this worker: {hint}")]
    NotConfigured { provider: &'static str, hint: &'static str },
    #[error("{op} runner {lease_key}: {source}")]
    Io {
        op: &'static str,
        lease_key: LeaseKey,
        source: std::io::Error,
    },
    #[error("no ssh pool host serves tier {tier} (hosts: {hosts}): add one to ssh_hosts or ask for a smaller runner")]
    NoHost { tier: &'static str, hosts: String },
    #[error("runner {lease_key}: {message}")]
    Remote { lease_key: LeaseKey, message: String },
    #[error("compute provider {provider} is misconfigured: {message}")]
    Misconfigured { provider: &'static str, message: String },
    /// The runner did not show the host key pinned for its lease: nothing was sent to it.
    #[error("runner {lease_key}: {message}")]
    HostKey { lease_key: LeaseKey, message: String },
}

fn remote(key: &LeaseKey) -> impl FnOnce(String) -> RunnerError + '_ {
    move |message| RunnerError::Remote {
        lease_key: key.clone(),
        message,
    }
}

/// The providers this worker (or control plane) can lease from. Only the control plane
/// has hcloud and proxmox: it alone holds their credentials.
#[derive(Debug, Clone)]
pub struct Providers {
    pub docker_local: Option<DockerLocal>,
    pub ssh_pool: Option<SshPool>,
    pub hcloud: Option<Hcloud>,
    pub proxmox: Option<Proxmox>,
}

/// One provider, seen through what the lifecycle asks of every provider.
pub enum Backend<'a> {
    Local(&'a DockerLocal),
    Ssh(&'a SshPool),
    Hcloud(&'a Hcloud),
    Proxmox(&'a Proxmox),
}

impl Backend<'_> {
    /// Finds the runner leased under `key`, or creates it. A cloud runner is given a host
    /// key pair generated here for the lease; its public half comes back to be pinned. A
    /// docker_local engine starts from `engine_store`'s store (ADR lian-044).
    pub async fn spawn(
        &self,
        key: &LeaseKey,
        tier: RunnerType,
        engine_store: Option<&str>,
    ) -> Result<Runner, RunnerError> {
        let host_keys = || {
            ssh::generate_host_key(&format!("lian-runner {key}")).map_err(|source| RunnerError::Io {
                op: "generate a host key for",
                lease_key: key.clone(),
                source,
            })
        };
        match self {
            Backend::Local(p) => p.spawn(key, tier, engine_store).await,
            Backend::Ssh(p) => p.spawn(key, tier).await,
            Backend::Hcloud(p) => {
                let server = p
                    .spawn(key, tier, &host_keys()?)
                    .await
                    .map_err(|e| remote(key)(e.to_string()))?;
                Ok(Runner {
                    lease_key: key.clone(),
                    lease_id: format!("hcloud:{}", server.id),
                    host: server.ip,
                    runner_type: tier,
                    host_key: server.host_key,
                    ssh_port: Some(p.ssh_port()),
                })
            }
            Backend::Proxmox(p) => {
                let pair = host_keys()?;
                let vm = p
                    .spawn(key, tier, &pair)
                    .await
                    .map_err(|e| remote(key)(e.to_string()))?;
                Ok(Runner {
                    lease_key: key.clone(),
                    lease_id: format!("proxmox:{}/{}", vm.node, vm.vmid),
                    host: vm.ip,
                    runner_type: tier,
                    host_key: Some(pair.public_key),
                    ssh_port: Some(p.ssh_port()),
                })
            }
        }
    }

    /// Destroys the runner leased under `key`; `host` is where the lease said it was (an
    /// ssh_pool lease whose spawn was never recorded is on the host its key maps to).
    /// Destroying a runner that is gone succeeds.
    pub async fn destroy(&self, key: &LeaseKey, tier: RunnerType, host: Option<&str>) -> Result<(), RunnerError> {
        match self {
            Backend::Local(p) => p.destroy(key).await,
            Backend::Ssh(p) => {
                let host = match host.filter(|h| !h.is_empty()) {
                    Some(h) => h.to_string(),
                    None => p.host_for(key, tier)?.name.clone(),
                };
                p.destroy(key, &host).await
            }
            Backend::Hcloud(p) => p.destroy(key).await.map_err(|e| remote(key)(e.to_string())),
            Backend::Proxmox(p) => p.destroy(key).await.map_err(|e| remote(key)(e.to_string())),
        }
    }
}

impl Providers {
    /// The providers of one host: docker_local runners under `runners_dir`, and the ssh
    /// pool's hosts (staged through `runners_dir/ssh-staging`).
    pub fn on_host(
        runners_dir: &std::path::Path,
        isolation: Isolation,
        docker_cli: &std::path::Path,
        ssh_hosts: Vec<SshHost>,
        build_network: &str,
    ) -> Self {
        Self {
            docker_local: Some(DockerLocal::with_isolation(runners_dir, isolation, docker_cli)),
            ssh_pool: Some(SshPool::new(ssh_hosts, runners_dir.join("ssh-staging"), build_network)),
            hcloud: None,
            proxmox: None,
        }
    }

    /// These providers plus the cloud ones configured (the control plane's: it alone holds
    /// their credentials). A configuration that cannot work is refused here, at start.
    pub fn with_clouds(
        mut self,
        hcloud: Option<HcloudConfig>,
        proxmox: Option<ProxmoxConfig>,
    ) -> Result<Self, RunnerError> {
        if let Some(config) = hcloud {
            if config.token.trim().is_empty() {
                return Err(RunnerError::Misconfigured {
                    provider: "hcloud",
                    message: "the API token is empty: set LIAN_HCLOUD_TOKEN (or token in [hcloud])".into(),
                });
            }
            if config.authorized_key.trim().is_empty() {
                return Err(RunnerError::Misconfigured {
                    provider: "hcloud",
                    message: "authorized_key is empty: set it to the public half of the workers' runner_ssh_key".into(),
                });
            }
            self.hcloud = Some(Hcloud::new(config));
        }
        if let Some(config) = proxmox {
            if config.authorized_key.trim().is_empty() {
                return Err(RunnerError::Misconfigured {
                    provider: "proxmox",
                    message: "authorized_key is empty: set it to the public half of the workers' runner_ssh_key".into(),
                });
            }
            let proxmox = Proxmox::new(config).map_err(|e| RunnerError::Misconfigured {
                provider: "proxmox",
                message: e.to_string(),
            })?;
            self.proxmox = Some(proxmox);
        }
        Ok(self)
    }

    pub fn backend(&self, provider: ComputeProvider) -> Result<Backend<'_>, RunnerError> {
        match provider {
            ComputeProvider::DockerLocal => {
                self.docker_local
                    .as_ref()
                    .map(Backend::Local)
                    .ok_or(RunnerError::NotConfigured {
                        provider: "docker_local",
                        hint: "start the worker with a runner directory (`lian worker --state-dir DIR`)",
                    })
            }
            ComputeProvider::SshPool => self
                .ssh_pool
                .as_ref()
                .filter(|p| !p.is_empty())
                .map(Backend::Ssh)
                .ok_or(RunnerError::NotConfigured {
                    provider: "ssh_pool",
                    hint: "list the pool's hosts as [[ssh_hosts]] in lian.toml",
                }),
            ComputeProvider::Hcloud => self
                .hcloud
                .as_ref()
                .map(Backend::Hcloud)
                .ok_or(RunnerError::NotConfigured {
                    provider: "hcloud",
                    hint: "hcloud runners are leased through the control plane: configure [hcloud] in its lian.toml \
                       (the token in LIAN_HCLOUD_TOKEN)",
                }),
            ComputeProvider::Proxmox => self
                .proxmox
                .as_ref()
                .map(Backend::Proxmox)
                .ok_or(RunnerError::NotConfigured {
                    provider: "proxmox",
                    hint: "proxmox runners are leased through the control plane: configure [proxmox] in its \
                               lian.toml (the token secret in LIAN_PROXMOX_TOKEN_SECRET)",
                }),
        }
    }
}
