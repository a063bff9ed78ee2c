//! The `noop` compute provider, for benchmarks only: a lease that is granted at once and a
//! build that runs nothing and answers a fixed fake image id, so a benchmark measures the
//! fleet (queue, history appends, Nickel checks, sizing, context staging) and not an
//! engine. A worker registers it only when told to (`LIAN_ENABLE_NOOP_PROVIDER=1`); anywhere
//! else a build naming it is refused like any provider the host does not have.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use lian_core::LeaseKey;
use lian_core::control::LeaseRequest;
use lian_core::directives::ComputeProvider;

use crate::provider::{Built, Held, OnStep, Provider, RunnerHandle};
use crate::warm::CachePlan;
use crate::{BuildFailure, BuildInvocation, BuildOutput, Runner, RunnerError};

/// The image id every noop build reports: all zeros, so it can never be mistaken for an
/// image that exists.
pub const NOOP_IMAGE_ID: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// The host a noop lease names.
const NOOP_HOST: &str = "noop";

#[derive(Debug, Clone)]
pub struct Noop {
    /// Contexts are staged under `<dir>/<lease key>` (the worker still downloads them: that
    /// is part of what a benchmark measures), removed on release.
    dir: PathBuf,
}

impl Noop {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

struct NoopRunner {
    context: PathBuf,
}

#[async_trait]
impl Provider for Noop {
    fn kind(&self) -> ComputeProvider {
        ComputeProvider::Noop
    }

    async fn lease(&self, ask: &LeaseRequest) -> Result<Runner, RunnerError> {
        Ok(Runner {
            lease_key: ask.lease_key.clone(),
            lease_id: format!("noop-{}", ask.lease_key),
            host: NOOP_HOST.into(),
            runner_type: ask.runner_type,
            host_key: None,
            ssh_port: None,
        })
    }

    async fn reach(&self, lease: Held<'_>) -> Result<Box<dyn RunnerHandle>, RunnerError> {
        Ok(Box::new(NoopRunner {
            context: self.dir.join(lease.key.as_str()),
        }))
    }

    async fn release(&self, lease: Held<'_>) -> Result<(), RunnerError> {
        self.forget(lease.key).await;
        Ok(())
    }

    async fn forget(&self, key: &LeaseKey) {
        let _ = tokio::fs::remove_dir_all(self.dir.join(key.as_str())).await;
    }
}

#[async_trait]
impl RunnerHandle for NoopRunner {
    fn context_dir(&self) -> &Path {
        &self.context
    }

    async fn build(
        &self,
        _invocation: &BuildInvocation<'_>,
        _plan: Option<CachePlan>,
        _on_step: OnStep<'_>,
    ) -> Result<Built, BuildFailure> {
        // No usage is sampled: nothing ran, and sizing must not learn from it.
        Ok(Built::from(BuildOutput {
            image_id: NOOP_IMAGE_ID.into(),
            duration_ms: 0,
            steps: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lian_core::sizing::RunnerType;

    fn ask(key: &LeaseKey) -> LeaseRequest {
        LeaseRequest {
            lease_key: key.clone(),
            provider: ComputeProvider::Noop,
            runner_type: RunnerType::Cax11,
            workspace: lian_core::Workspace::new("ws").unwrap(),
            build_id: lian_core::BuildId::new("b1").unwrap(),
            owner: "w".into(),
            engine_store: None,
        }
    }

    #[tokio::test]
    async fn refused_unless_the_worker_enables_it() {
        let dir = tempfile::tempdir().unwrap();
        let builder = crate::DockerBuilder {
            cli: "docker".into(),
            host: None,
            network: "none".into(),
            config: None,
        };
        let providers = crate::Providers::on_host(
            dir.path(),
            crate::Isolation::Shared,
            Path::new("docker"),
            vec![],
            "none",
        );
        let key = LeaseKey::new("b1-r1").unwrap();
        assert!(providers.get(ComputeProvider::Noop).is_err());
        let registry = providers.for_worker(&builder, None, None, dir.path());
        let err = registry.get(ComputeProvider::Noop).lease(&ask(&key)).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Refused);
        assert!(err.to_string().contains("LIAN_ENABLE_NOOP_PROVIDER=1"), "{err}");
        let enabled = providers
            .enable_noop(dir.path())
            .for_worker(&builder, None, None, dir.path());
        let runner = enabled.get(ComputeProvider::Noop).lease(&ask(&key)).await.unwrap();
        assert_eq!(runner.host, "noop");
    }

    #[tokio::test]
    async fn leases_at_once_and_builds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let noop = Noop::new(dir.path());
        let key = LeaseKey::new("b1-r1").unwrap();
        let ask = ask(&key);
        let runner = noop.lease(&ask).await.unwrap();
        assert_eq!(runner.host, "noop");
        let held = Held {
            key: &key,
            runner_type: RunnerType::Cax11,
            host: Some("noop"),
        };
        let handle = noop.reach(held).await.unwrap();
        std::fs::create_dir_all(handle.context_dir()).unwrap();
        let invocation = BuildInvocation {
            context: handle.context_dir(),
            dockerfile: "Dockerfile",
            image: "x/y:z",
            target: None,
            build_args: vec![],
            secrets: vec![],
            cache_from: vec![],
            inline_cache: false,
        };
        let built = handle.build(&invocation, None, &mut |_| {}).await.unwrap();
        assert_eq!(built.output.image_id, NOOP_IMAGE_ID);
        assert!(built.cpu_p95.is_none() && built.mem_p95_gb.is_none());
        noop.release(held).await.unwrap();
        assert!(!handle.context_dir().exists());
    }
}
