//! One interface for every compute provider: what the lifecycle asks of a runner, from
//! lease to release. The worker's effects call [`Provider`] and [`RunnerHandle`] and never
//! ask which provider is behind them; leasing through the control plane ([`ViaControl`]) is
//! one more implementation, wrapped around the providers that reach the runners from here.
//!
//! Adding a provider: implement [`Provider`] (and a [`RunnerHandle`] for reaching its
//! runners) in its own module, and name it in the registry ([`crate::Providers`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use lian_core::control::LeaseRequest;
use lian_core::directives::ComputeProvider;
use lian_core::sizing::RunnerType;
use lian_core::{CacheReport, LeaseKey};

use crate::progress::StepProgress;
use crate::warm::CachePlan;
use crate::{BuildFailure, BuildInvocation, BuildOutput, CloudRunner, ControlClient, Runner, RunnerError};

/// A lease the build holds: its key, tier, and where the lease said the runner is (an
/// ssh_pool lease whose spawn was never recorded has no host yet).
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    pub key: &'a LeaseKey,
    pub runner_type: RunnerType,
    pub host: Option<&'a str>,
}

/// A build's result on a runner: the image, its measured cpu and memory (GB) P95 where the
/// runner's cgroup could be sampled, and what it reused where it built warm.
#[derive(Debug)]
pub struct Built {
    pub output: BuildOutput,
    pub cpu_p95: Option<f64>,
    pub mem_p95_gb: Option<f64>,
    pub cache: Option<CacheReport>,
}

impl From<BuildOutput> for Built {
    fn from(output: BuildOutput) -> Self {
        Self {
            output,
            cpu_p95: None,
            mem_p95_gb: None,
            cache: None,
        }
    }
}

/// Where a build's steps are reported as BuildKit reports them.
pub type OnStep<'a> = &'a mut (dyn FnMut(StepProgress) + Send);

/// A compute provider, as the lifecycle sees it. Every method is idempotent by lease key:
/// a worker taking a build over asks again and gets the same runner.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> ComputeProvider;

    /// `SpawnRunner`: finds the runner leased under `ask.lease_key`, or creates it.
    async fn lease(&self, ask: &LeaseRequest) -> Result<Runner, RunnerError>;

    /// The runner of a held lease, reached from this host (to put the context on it and
    /// build).
    async fn reach(&self, lease: Held<'_>) -> Result<Box<dyn RunnerHandle>, RunnerError>;

    /// `DestroyRunner`: gives the runner back; a runner that is gone is given back already.
    async fn release(&self, lease: Held<'_>) -> Result<(), RunnerError>;

    /// What this host keeps of a lease that was released elsewhere (the control plane),
    /// removed.
    async fn forget(&self, _key: &LeaseKey) {}
}

/// A leased runner reached from this host: the steps between lease and release.
#[async_trait]
pub trait RunnerHandle: Send + Sync {
    /// The local directory the worker stages the build context in.
    fn context_dir(&self) -> &Path;

    /// Puts the staged context on the runner; the bytes that went beyond this host.
    async fn forward_context(&self) -> Result<u64, RunnerError> {
        Ok(0)
    }

    /// Whether builds here run warm from the registry (take a [`CachePlan`]).
    fn builds_warm(&self) -> bool {
        false
    }

    /// A file on this host only the lease's build reads (removed with the lease), for
    /// settings handed to the build as a secret; `None` where there is no such place.
    fn private_file(&self, _name: &str) -> Option<PathBuf> {
        None
    }

    /// Builds the staged context (`invocation.context` is [`Self::context_dir`]).
    async fn build(
        &self,
        invocation: &BuildInvocation<'_>,
        plan: Option<CachePlan>,
        on_step: OnStep<'_>,
    ) -> Result<Built, BuildFailure>;
}

/// Leasing through the control plane (`control_url`): it holds the provider credentials
/// and leases, releases and reaps; `here` reaches the runners it hands out.
#[derive(Debug)]
pub struct ViaControl {
    pub control: ControlClient,
    pub here: Arc<dyn Provider>,
}

#[async_trait]
impl Provider for ViaControl {
    fn kind(&self) -> ComputeProvider {
        self.here.kind()
    }

    async fn lease(&self, ask: &LeaseRequest) -> Result<Runner, RunnerError> {
        let lease = self.control.lease(ask).await?;
        Ok(Runner {
            lease_key: ask.lease_key.clone(),
            lease_id: lease.provider_id,
            host: lease.host,
            runner_type: lease.runner_type,
            host_key: lease.host_key,
            ssh_port: lease.ssh_port,
        })
    }

    async fn reach(&self, lease: Held<'_>) -> Result<Box<dyn RunnerHandle>, RunnerError> {
        self.here.reach(lease).await
    }

    async fn release(&self, lease: Held<'_>) -> Result<(), RunnerError> {
        self.control.release(lease.key).await?;
        self.here.forget(lease.key).await;
        Ok(())
    }
}

/// A provider this host does not have: every ask is refused with how to configure it.
#[derive(Debug)]
pub struct Unconfigured {
    pub kind: ComputeProvider,
    pub hint: &'static str,
}

impl Unconfigured {
    fn refusal(&self) -> RunnerError {
        RunnerError::NotConfigured {
            provider: self.kind.as_str(),
            hint: self.hint,
        }
    }
}

#[async_trait]
impl Provider for Unconfigured {
    fn kind(&self) -> ComputeProvider {
        self.kind
    }
    async fn lease(&self, _: &LeaseRequest) -> Result<Runner, RunnerError> {
        Err(self.refusal())
    }
    async fn reach(&self, _: Held<'_>) -> Result<Box<dyn RunnerHandle>, RunnerError> {
        Err(self.refusal())
    }
    async fn release(&self, _: Held<'_>) -> Result<(), RunnerError> {
        Err(self.refusal())
    }
}

/// Cloud runners (hcloud, proxmox) as a worker sees them: leased only by the control plane
/// (it alone holds their tokens), reached over SSH with the worker's `runner_ssh_key` and
/// the host key the control plane recorded for the lease.
#[derive(Debug)]
pub struct CloudRunners {
    pub kind: ComputeProvider,
    pub control: Option<ControlClient>,
    pub client_key: Option<PathBuf>,
    /// Contexts are staged under `<staging>/<lease key>` before they are synced.
    pub staging: PathBuf,
}

#[async_trait]
impl Provider for CloudRunners {
    fn kind(&self) -> ComputeProvider {
        self.kind
    }

    async fn lease(&self, _: &LeaseRequest) -> Result<Runner, RunnerError> {
        Err(RunnerError::LeasedElsewhere {
            provider: self.kind.as_str(),
        })
    }

    async fn reach(&self, lease: Held<'_>) -> Result<Box<dyn RunnerHandle>, RunnerError> {
        let provider = self.kind.as_str();
        let Some(control) = &self.control else {
            return Err(RunnerError::LeasedElsewhere { provider });
        };
        let Some(client_key) = &self.client_key else {
            return Err(RunnerError::NoClientKey { provider });
        };
        let recorded = control.lease_info(lease.key).await?;
        let runner = CloudRunner::from_lease(&recorded, client_key, &self.staging)?;
        Ok(Box::new(runner))
    }

    async fn release(&self, _: Held<'_>) -> Result<(), RunnerError> {
        Err(RunnerError::LeasedElsewhere {
            provider: self.kind.as_str(),
        })
    }

    async fn forget(&self, key: &LeaseKey) {
        let _ = tokio::fs::remove_dir_all(self.staging.join(key.as_str())).await;
    }
}

#[async_trait]
impl RunnerHandle for CloudRunner {
    fn context_dir(&self) -> &Path {
        self.staging()
    }

    async fn forward_context(&self) -> Result<u64, RunnerError> {
        let stats = self.sync().await?;
        tracing::info!(host = %self.ssh_host().target.address, sent_files = stats.sent_files, sent_bytes = stats.sent_bytes, "context synced to a cloud runner");
        Ok(stats.sent_bytes)
    }

    async fn build(
        &self,
        invocation: &BuildInvocation<'_>,
        _plan: Option<CachePlan>,
        on_step: OnStep<'_>,
    ) -> Result<Built, BuildFailure> {
        if !invocation.secrets.is_empty() {
            return Err(BuildFailure {
                reason:
                    "secrets are not supported on hcloud and proxmox runners yet: build on docker_local or ssh_pool"
                        .into(),
                oom: false,
            });
        }
        // A cloud runner's usage is not sampled (no cgroup of ours there).
        CloudRunner::build(self, invocation, on_step).await.map(Built::from)
    }
}
