//! Compute providers (spawn / find-by-key / destroy a runner) and builders (run BuildKit on
//! a runner). Spawning is idempotent by lease key: a worker that takes over a build asks for
//! the runner recorded in the history and gets the same one back.

pub mod buildctl;
mod cgroup;
pub mod cloud;
pub mod control;
mod docker_build;
mod docker_local;
pub mod dockerfile;
mod engine;
mod engine_store;
pub mod hcloud;
mod noop;
pub mod progress;
mod provider;
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
pub use noop::{NOOP_IMAGE_ID, Noop};
pub use provider::{Built, CloudRunners, Held, OnStep, Provider, RunnerHandle, Unconfigured, ViaControl};
pub use proxmox::{Proxmox, ProxmoxConfig};
pub use ssh_pool::{HostBuilder, SshHost, SshPool};
pub use usage::Sampler;
pub use warm_pool::WarmEngine;

use std::sync::Arc;

use lian_core::LeaseKey;
use lian_core::directives::ComputeProvider;
use lian_core::sizing::RunnerType;
use secrecy::ExposeSecret;

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

/// How a runner error is to be taken: the lifecycle decides from this whether to try the
/// step again on another delivery or to fail the build with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Something could not be reached or answered nonsense (a network or SSH hiccup, the
    /// control plane restarting): the same step may work on another delivery.
    Transient,
    /// The provider tried and failed (an engine that would not start, an API that said no).
    Permanent,
    /// Refused before anything was tried: configuration or policy (a provider this host
    /// does not have, a host key that does not match); asking again meets the same answer.
    Refused,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("compute provider {provider} is not configured on this worker: {hint}")]
    NotConfigured { provider: &'static str, hint: &'static str },
    /// Only the control plane leases this provider's runners (it alone holds their tokens).
    #[error("{provider} runners are leased through the control plane: set control_url and control_token")]
    LeasedElsewhere { provider: &'static str },
    /// Runners of this provider are reached by workers, not by the control plane.
    #[error("{provider} runners are reached by workers over SSH, not by the control plane")]
    ReachedByWorkers { provider: &'static str },
    #[error(
        "{provider} runners are reached over SSH with the worker's client key: set runner_ssh_key in lian.toml \
         (the private half of authorized_key in the control plane's [{provider}])"
    )]
    NoClientKey { provider: &'static str },
    #[error("{op} runner {lease_key}: {source}")]
    Io {
        op: &'static str,
        lease_key: LeaseKey,
        source: std::io::Error,
    },
    #[error("no ssh pool host serves tier {tier} (hosts: {hosts}): add one to ssh_hosts or ask for a smaller runner")]
    NoHost { tier: &'static str, hosts: String },
    /// The runner's host could not be reached or the connection broke.
    #[error("runner {lease_key}: {message}")]
    Remote { lease_key: LeaseKey, message: String },
    /// The runner's host (or provider) was reached and what was asked of it failed.
    #[error("runner {lease_key}: {message}")]
    Failed { lease_key: LeaseKey, message: String },
    #[error("compute provider {provider} is misconfigured: {message}")]
    Misconfigured { provider: &'static str, message: String },
    /// The runner did not show the host key pinned for its lease: nothing was sent to it.
    #[error("runner {lease_key}: {message}")]
    HostKey { lease_key: LeaseKey, message: String },
    /// A warm pool engine could not be set up (or cleared away).
    #[error("warm pool: {message}")]
    Pool { message: String },
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl RunnerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RunnerError::Remote { .. } | RunnerError::Control(ControlError::Unreachable { .. }) => ErrorKind::Transient,
            RunnerError::Io { .. } | RunnerError::Failed { .. } | RunnerError::Pool { .. } => ErrorKind::Permanent,
            RunnerError::NotConfigured { .. }
            | RunnerError::LeasedElsewhere { .. }
            | RunnerError::ReachedByWorkers { .. }
            | RunnerError::NoClientKey { .. }
            | RunnerError::NoHost { .. }
            | RunnerError::Misconfigured { .. }
            | RunnerError::HostKey { .. }
            | RunnerError::Control(ControlError::Refused { .. }) => ErrorKind::Refused,
        }
    }
}

/// A host key pair generated for a cloud lease: the runner gets the private half, the
/// public half is pinned.
pub(crate) fn lease_host_key(key: &LeaseKey) -> Result<ssh::HostKeyPair, RunnerError> {
    ssh::generate_host_key(&format!("lian-runner {key}")).map_err(|source| RunnerError::Io {
        op: "generate a host key for",
        lease_key: key.clone(),
        source,
    })
}

/// The registry of providers: the ones this worker (or control plane) can lease from. Only
/// the control plane has hcloud and proxmox: it alone holds their credentials. `noop` is
/// there only where a worker was started for a benchmark ([`Providers::enable_noop`]).
#[derive(Debug, Clone)]
pub struct Providers {
    pub docker_local: Option<DockerLocal>,
    pub ssh_pool: Option<SshPool>,
    pub hcloud: Option<Hcloud>,
    pub proxmox: Option<Proxmox>,
    pub noop: Option<Noop>,
}

/// How to configure a provider this host does not have.
fn hint(provider: ComputeProvider) -> &'static str {
    match provider {
        ComputeProvider::DockerLocal => "start the worker with a runner directory (`lian worker --state-dir DIR`)",
        ComputeProvider::SshPool => "list the pool's hosts as [[ssh_hosts]] in lian.toml",
        ComputeProvider::Hcloud => {
            "hcloud runners are leased through the control plane: configure [hcloud] in its lian.toml \
             (the token in LIAN_HCLOUD_TOKEN)"
        }
        ComputeProvider::Proxmox => {
            "proxmox runners are leased through the control plane: configure [proxmox] in its \
             lian.toml (the token secret in LIAN_PROXMOX_TOKEN_SECRET)"
        }
        ComputeProvider::Noop => {
            "noop is a benchmark-only provider (it builds nothing): a worker serves it only when started \
             with LIAN_ENABLE_NOOP_PROVIDER=1"
        }
    }
}

/// Every provider a build can name, each seen through [`Provider`]: what a worker's effects
/// call. Built from a host's [`Providers`] by [`Providers::for_worker`].
#[derive(Debug, Clone)]
pub struct Registry {
    providers: Vec<Arc<dyn Provider>>,
}

impl Registry {
    /// The provider a build names; one this host does not have refuses every ask, naming
    /// how to configure it.
    pub fn get(&self, kind: ComputeProvider) -> &dyn Provider {
        self.providers
            .iter()
            .find(|p| p.kind() == kind)
            .map(|p| p.as_ref())
            .expect("for_worker registers every ComputeProvider")
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
            noop: None,
        }
    }

    /// These providers plus `noop`, for benchmarks: builds naming it complete with a fake
    /// image, its contexts staged under `dir`. Never enabled by default, so a request cannot
    /// get a production worker to report a build it did not run.
    pub fn enable_noop(mut self, dir: &std::path::Path) -> Self {
        self.noop = Some(Noop::new(dir));
        self
    }

    /// These providers plus the cloud ones configured (the control plane's: it alone holds
    /// their credentials). A configuration that cannot work is refused here, at start.
    pub fn with_clouds(
        mut self,
        hcloud: Option<HcloudConfig>,
        proxmox: Option<ProxmoxConfig>,
    ) -> Result<Self, RunnerError> {
        if let Some(config) = hcloud {
            if config.token.expose_secret().trim().is_empty() {
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

    /// The provider `kind` on this host, or the refusal naming how to configure it.
    pub fn get(&self, kind: ComputeProvider) -> Result<&dyn Provider, RunnerError> {
        let found: Option<&dyn Provider> = match kind {
            ComputeProvider::DockerLocal => self.docker_local.as_ref().map(|p| p as &dyn Provider),
            ComputeProvider::SshPool => self
                .ssh_pool
                .as_ref()
                .filter(|p| !p.is_empty())
                .map(|p| p as &dyn Provider),
            ComputeProvider::Hcloud => self.hcloud.as_ref().map(|p| p as &dyn Provider),
            ComputeProvider::Proxmox => self.proxmox.as_ref().map(|p| p as &dyn Provider),
            ComputeProvider::Noop => self.noop.as_ref().map(|p| p as &dyn Provider),
        };
        found.ok_or(RunnerError::NotConfigured {
            provider: kind.as_str(),
            hint: hint(kind),
        })
    }

    /// What a worker leases from: this host's providers, building with `builder`; cloud
    /// runners reached with `client_key` over SSH (their contexts staged under
    /// `cloud_staging`); and, with a control plane, every lease taken and given back
    /// through it.
    pub fn for_worker(
        &self,
        builder: &DockerBuilder,
        control: Option<&ControlClient>,
        client_key: Option<&std::path::Path>,
        cloud_staging: &std::path::Path,
    ) -> Registry {
        let here = |kind: ComputeProvider| -> Arc<dyn Provider> {
            match kind {
                ComputeProvider::DockerLocal => match &self.docker_local {
                    Some(p) => Arc::new(p.clone().with_builder(builder.clone())),
                    None => Arc::new(Unconfigured { kind, hint: hint(kind) }),
                },
                ComputeProvider::SshPool => match self.ssh_pool.as_ref().filter(|p| !p.is_empty()) {
                    Some(p) => Arc::new(p.clone()),
                    None => Arc::new(Unconfigured { kind, hint: hint(kind) }),
                },
                ComputeProvider::Noop => match &self.noop {
                    Some(p) => Arc::new(p.clone()),
                    None => Arc::new(Unconfigured { kind, hint: hint(kind) }),
                },
                ComputeProvider::Hcloud | ComputeProvider::Proxmox => Arc::new(CloudRunners {
                    kind,
                    control: control.cloned(),
                    client_key: client_key.map(std::path::Path::to_path_buf),
                    staging: cloud_staging.to_path_buf(),
                }),
            }
        };
        let providers = ComputeProvider::ALL
            .iter()
            .map(|&kind| match control {
                // noop leases nothing anywhere: the control plane would only refuse it.
                Some(control) if kind != ComputeProvider::Noop => Arc::new(ViaControl {
                    control: control.clone(),
                    here: here(kind),
                }) as Arc<dyn Provider>,
                _ => here(kind),
            })
            .collect();
        Registry { providers }
    }
}
