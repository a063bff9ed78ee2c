//! Compute providers (spawn / find-by-key / destroy a runner) and builders (run BuildKit on
//! a runner). Spawning is idempotent by lease key: a worker that takes over a build asks for
//! the runner recorded in the history and gets the same one back.

pub mod buildctl;
mod cgroup;
pub mod control;
mod docker_build;
mod docker_local;
mod engine;
pub mod hcloud;
pub mod progress;
pub mod proxmox;
pub mod ssh;
mod ssh_pool;
pub mod sync;
mod usage;

pub use cgroup::LeaseCgroup;
pub use control::{ControlClient, ControlError};
pub use docker_build::{BuildFailure, BuildInvocation, BuildOutput, DockerBuilder};
pub use docker_local::{DockerLocal, Isolation};
pub use ssh_pool::{SshHost, SshPool};
pub use usage::Sampler;

use lian_core::LeaseKey;
use lian_core::directives::ComputeProvider;
use lian_core::sizing::RunnerType;

/// A runner the build holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    pub lease_key: LeaseKey,
    pub lease_id: String,
    /// Where the runner is reached ("local" for docker_local).
    pub host: String,
    pub runner_type: RunnerType,
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
}

/// The providers this worker can lease from.
#[derive(Debug, Clone)]
pub struct Providers {
    pub docker_local: Option<DockerLocal>,
    pub ssh_pool: Option<SshPool>,
}

/// One provider, seen through what the lifecycle asks of every provider.
pub enum Backend<'a> {
    Local(&'a DockerLocal),
    Ssh(&'a SshPool),
}

impl Backend<'_> {
    /// Finds the runner leased under `key`, or creates it.
    pub async fn spawn(&self, key: &LeaseKey, tier: RunnerType) -> Result<Runner, RunnerError> {
        match self {
            Backend::Local(p) => p.spawn(key, tier).await,
            Backend::Ssh(p) => p.spawn(key, tier).await,
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
        }
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
            other => Err(RunnerError::NotConfigured {
                provider: other.as_str(),
                hint: "hcloud and proxmox are not available yet; use 'docker_local or 'ssh_pool",
            }),
        }
    }
}
