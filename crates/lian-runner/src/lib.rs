//! Compute providers (spawn / find-by-key / destroy a runner) and builders (run BuildKit on
//! a runner). Spawning is idempotent by lease key: a worker that takes over a build asks for
//! the runner recorded in the history and gets the same one back.

mod docker_build;
mod docker_local;
pub mod ssh;
pub mod sync;

pub use docker_build::{BuildFailure, BuildInvocation, BuildOutput, DockerBuilder};
pub use docker_local::DockerLocal;

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
    #[error("runner {lease_key} has no lease record: it was destroyed or never spawned")]
    Unknown { lease_key: LeaseKey },
}

/// The providers this worker can lease from.
#[derive(Debug, Clone)]
pub struct Providers {
    pub docker_local: Option<DockerLocal>,
}

impl Providers {
    pub fn docker_local(&self, provider: ComputeProvider) -> Result<&DockerLocal, RunnerError> {
        let hint = "this walking skeleton leases from docker_local only; set compute_provider = 'docker_local";
        match provider {
            ComputeProvider::DockerLocal => self.docker_local.as_ref().ok_or(RunnerError::NotConfigured {
                provider: "docker_local",
                hint: "start the worker with a runner directory (`lian worker --state-dir DIR`)",
            }),
            other => Err(RunnerError::NotConfigured {
                provider: other.as_str(),
                hint,
            }),
        }
    }
}
