//! The docker_local provider: a runner is a lease record and a private workspace directory
//! on this host. With `Isolation::Engine` it is also a Docker engine of its own whose builds
//! run under a cgroup with the tier's memory and cpu limits (scaled for small hosts); with
//! `Isolation::Shared` builds use the host's engine, unlimited.

use std::path::{Path, PathBuf};

use lian_core::sizing::RunnerType;
use lian_core::{LeaseKey, StoreUse};
use serde::{Deserialize, Serialize};

use async_trait::async_trait;
use lian_core::control::LeaseRequest;
use lian_core::directives::ComputeProvider;

use crate::cgroup::LeaseCgroup;
use crate::dockerfile::parent_images;
use crate::engine::LeaseEngine;
use crate::engine_store::EngineStores;
use crate::provider::{Built, Held, OnStep, Provider, RunnerHandle};
use crate::warm::{CachePlan, Pulled};
use crate::{BuildFailure, BuildInvocation, DockerBuilder, Runner, RunnerError, Sampler};

/// BuildKit cache an engine store keeps (beyond its images) when a build hands it back.
pub const STORE_KEEP_BYTES: u64 = 16 << 30;

#[derive(Debug, Clone)]
pub struct DockerLocal {
    pub(crate) root: PathBuf,
    pub(crate) isolation: Isolation,
    pub(crate) docker_cli: PathBuf,
    /// How builds on this host's runners run (`None`: this host only leases, as the control
    /// plane does).
    pub(crate) builder: Option<DockerBuilder>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Isolation {
    /// Builds run on the host's engine, without limits.
    Shared,
    /// An engine per lease under a cgroup with the tier's limits times `memory_scale`
    /// (1.0 on a real host; 1/32 lets a small machine exercise the tiers), with
    /// `warm_pool` engines per tier kept started so a lease does not wait for one to boot.
    Engine { memory_scale: f64, warm_pool: u32 },
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LeaseRecord {
    pub lease_key: LeaseKey,
    pub runner_type: RunnerType,
    /// The warm pool slot whose engine the lease took; `None`: an engine of its own,
    /// kept in the lease's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// The cache namespace whose engine store the lease's data root goes back to after a
    /// build that succeeded, and whether the engine started from that store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreUse>,
}

impl DockerLocal {
    /// Runners live under `root/<lease-key>/`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_isolation(root, Isolation::Shared, "docker")
    }

    pub fn with_isolation(root: impl Into<PathBuf>, isolation: Isolation, docker_cli: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            isolation,
            docker_cli: docker_cli.into(),
            builder: None,
        }
    }

    /// The same provider, building on its runners with `builder` (a worker's).
    pub fn with_builder(mut self, builder: DockerBuilder) -> Self {
        self.builder = Some(builder);
        self
    }

    fn engine(&self, key: &LeaseKey) -> Option<LeaseEngine> {
        match self.isolation {
            Isolation::Shared => None,
            Isolation::Engine { .. } => Some(match self.record(key).and_then(|r| r.engine) {
                Some(slot) => self.warm_engine(&slot),
                None => LeaseEngine::at(&self.dir(key), key.as_str()),
            }),
        }
    }

    pub(crate) fn record(&self, key: &LeaseKey) -> Option<LeaseRecord> {
        let bytes = std::fs::read(self.dir(key).join("lease.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Memory and cpus of a tier's engine cgroup.
    pub(crate) fn limits(&self, runner_type: RunnerType) -> (u64, u32) {
        let scale = match self.isolation {
            Isolation::Engine { memory_scale, .. } => memory_scale,
            Isolation::Shared => 1.0,
        };
        let full = f64::from(runner_type.memory_gb()) * 1024.0 * 1024.0 * 1024.0;
        (((full * scale) as u64).max(16 * 1024 * 1024), runner_type.cpu())
    }

    /// `DOCKER_HOST` for builds on this lease, when it has an engine of its own.
    pub(crate) fn docker_host(&self, key: &LeaseKey) -> Option<String> {
        self.engine(key).map(|e| e.host())
    }

    /// The lease's cgroup, when it has one: its counters measure the build.
    pub(crate) fn cgroup(&self, key: &LeaseKey) -> Option<LeaseCgroup> {
        self.engine(key).map(|e| e.cgroup)
    }

    /// The lease's Docker client config (its registry credentials), beside its context.
    pub(crate) fn docker_config(&self, key: &LeaseKey) -> PathBuf {
        self.dir(key).join("docker-config")
    }

    /// A private file of the lease's, removed with it.
    pub(crate) fn private_file(&self, key: &LeaseKey, name: &str) -> PathBuf {
        self.dir(key).join(name)
    }

    /// The engine stores of this host (ADR lian-044).
    pub fn stores(&self) -> EngineStores {
        EngineStores::at(self.root.join(".stores"))
    }

    /// How the lease's engine began, when it belongs to a namespace's engine store.
    pub(crate) fn store_use(&self, key: &LeaseKey) -> Option<StoreUse> {
        self.record(key)?.store
    }

    /// Called once the lease's build succeeded: prunes BuildKit's cache down to
    /// [`STORE_KEEP_BYTES`] and unused images, and lets the lease's data root become its
    /// namespace's store when the lease goes.
    pub(crate) async fn keep_store(&self, key: &LeaseKey) -> Result<(), String> {
        let Some(engine) = self.engine(key) else { return Ok(()) };
        if self.store_use(key).is_none() {
            return Ok(());
        }
        for args in [
            vec![
                "builder".to_string(),
                "prune".into(),
                "--force".into(),
                format!("--keep-storage={STORE_KEEP_BYTES}"),
            ],
            vec!["image".into(), "prune".into(), "--force".into()],
        ] {
            let out = tokio::process::Command::new(&self.docker_cli)
                .args(["-H", &engine.host()])
                .args(&args)
                .output()
                .await
                .map_err(|e| format!("{}: {e}", self.docker_cli.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "docker {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        EngineStores::mark_good(&self.dir(key)).map_err(|e| format!("{}: {e}", self.dir(key).display()))
    }

    /// Puts the images a Dockerfile builds on into the lease's engine, from the host's;
    /// `present` (pulled from the registry already) are skipped.
    pub(crate) async fn load_parents(
        &self,
        key: &LeaseKey,
        dockerfile: &Path,
        build_args: &[(&str, &str)],
        present: &[String],
    ) -> Result<(), String> {
        let Some(engine) = self.engine(key) else { return Ok(()) };
        let text = tokio::fs::read_to_string(dockerfile)
            .await
            .map_err(|e| format!("{}: {e}", dockerfile.display()))?;
        let parents = parent_images(&text, build_args).map_err(|e| e.to_string())?;
        for image in parents.into_iter().filter(|i| !present.contains(i)) {
            let on_host = tokio::process::Command::new(&self.docker_cli)
                .args(["image", "inspect", &image])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if on_host {
                LeaseEngine::copy_image(&self.docker_cli, &image, None, Some(&engine.host())).await?;
            }
        }
        Ok(())
    }

    /// Copies the built image from the lease's engine to the host's, before the lease goes.
    pub(crate) async fn publish(&self, key: &LeaseKey, image: &str) -> Result<(), String> {
        let Some(engine) = self.engine(key) else { return Ok(()) };
        LeaseEngine::copy_image(&self.docker_cli, image, Some(&engine.host()), None).await
    }

    fn dir(&self, key: &LeaseKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// The directory the build context is put in.
    pub(crate) fn workspace(&self, key: &LeaseKey) -> PathBuf {
        self.dir(key).join("context")
    }

    /// Finds the runner recorded under `key`, or creates it. With `store`, its engine starts
    /// from that namespace's engine store when one is free (else empty), and may become it.
    pub async fn spawn(
        &self,
        key: &LeaseKey,
        runner_type: RunnerType,
        store: Option<&str>,
    ) -> Result<Runner, RunnerError> {
        let io = |op| {
            move |source| RunnerError::Io {
                op,
                lease_key: key.clone(),
                source,
            }
        };
        let dir = self.dir(key);
        let record = dir.join("lease.json");
        if let Ok(existing) = tokio::fs::read(&record).await
            && let Ok(found) = serde_json::from_slice::<LeaseRecord>(&existing)
        {
            self.start_engine(key, found.runner_type).await?;
            return Ok(self.runner(key, found.runner_type));
        }
        tokio::fs::create_dir_all(self.workspace(key))
            .await
            .map_err(io("create"))?;
        let store = match (store, &self.isolation) {
            (Some(namespace), Isolation::Engine { .. }) => {
                let own = LeaseEngine::at(&dir, key.as_str()).data_root();
                let hit = self
                    .stores()
                    .take(namespace, &own)
                    .map_err(io("take the engine store of"))?;
                Some(StoreUse {
                    namespace: namespace.to_string(),
                    hit,
                })
            }
            _ => None,
        };
        // An engine started from a store is the lease's own; an empty one may come warm.
        let engine = match &store {
            Some(StoreUse { hit: true, .. }) => None,
            _ => self.claim_warm(runner_type),
        };
        let body = serde_json::to_vec(&LeaseRecord {
            lease_key: key.clone(),
            runner_type,
            engine,
            store,
        })
        .expect("json");
        // Written beside and renamed: a crash never leaves half a record.
        let tmp = dir.join("lease.json.tmp");
        tokio::fs::write(&tmp, body).await.map_err(io("record"))?;
        tokio::fs::rename(&tmp, &record).await.map_err(io("record"))?;
        self.start_engine(key, runner_type).await?;
        Ok(self.runner(key, runner_type))
    }

    async fn start_engine(&self, key: &LeaseKey, runner_type: RunnerType) -> Result<(), RunnerError> {
        let Some(engine) = self.engine(key) else {
            return Ok(());
        };
        let (memory, cpus) = self.limits(runner_type);
        engine
            .start(&self.docker_cli, memory, cpus)
            .await
            .map_err(|message| RunnerError::Failed {
                lease_key: key.clone(),
                message,
            })
    }

    fn runner(&self, key: &LeaseKey, runner_type: RunnerType) -> Runner {
        let engine = self.record(key).and_then(|r| r.engine);
        Runner {
            lease_key: key.clone(),
            lease_id: match engine {
                Some(slot) => format!("docker_local:{key}@{slot}"),
                None => format!("docker_local:{key}"),
            },
            host: "local".into(),
            runner_type,
            host_key: None,
            ssh_port: None,
        }
    }

    /// Destroys the runner and everything in it, but for a data root that goes back to its
    /// namespace's engine store; destroying a runner that is gone succeeds.
    pub async fn destroy(&self, key: &LeaseKey) -> Result<(), RunnerError> {
        if let Some(engine) = self.engine(key) {
            let clean = engine.stop().await.map_err(|message| RunnerError::Failed {
                lease_key: key.clone(),
                message,
            })?;
            if let Some(store) = self.store_use(key)
                && clean
                && EngineStores::is_good(&self.dir(key))
            {
                match self.stores().give_back(&store.namespace, &engine.data_root()) {
                    Ok(kept) => {
                        tracing::info!(lease = %key, namespace = %store.namespace, kept, "engine store handed back")
                    }
                    Err(err) => {
                        tracing::warn!(lease = %key, namespace = %store.namespace, %err, "engine store not kept")
                    }
                }
            }
        }
        if let Some(slot) = self.record(key).and_then(|r| r.engine) {
            self.remove_warm(&slot).map_err(|source| RunnerError::Io {
                op: "destroy",
                lease_key: key.clone(),
                source,
            })?;
        }
        match tokio::fs::remove_dir_all(self.dir(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RunnerError::Io {
                op: "destroy",
                lease_key: key.clone(),
                source,
            }),
        }
    }

    /// How long ago the runner was created, if it exists.
    pub fn age(&self, key: &LeaseKey) -> Option<std::time::Duration> {
        let created = std::fs::metadata(self.dir(key)).ok()?.modified().ok()?;
        created.elapsed().ok()
    }

    /// The lease keys of every runner that exists now.
    pub fn leases(&self) -> Vec<String> {
        list_dirs(&self.root)
    }
}

#[async_trait]
impl Provider for DockerLocal {
    fn kind(&self) -> ComputeProvider {
        ComputeProvider::DockerLocal
    }

    async fn lease(&self, ask: &LeaseRequest) -> Result<Runner, RunnerError> {
        self.spawn(&ask.lease_key, ask.runner_type, ask.engine_store.as_deref())
            .await
    }

    async fn reach(&self, lease: Held<'_>) -> Result<Box<dyn RunnerHandle>, RunnerError> {
        Ok(Box::new(LocalRunner {
            context: self.workspace(lease.key),
            provider: self.clone(),
            key: lease.key.clone(),
        }))
    }

    async fn release(&self, lease: Held<'_>) -> Result<(), RunnerError> {
        self.destroy(lease.key).await
    }
}

/// A docker_local lease, reached on this host.
struct LocalRunner {
    provider: DockerLocal,
    key: LeaseKey,
    context: PathBuf,
}

#[async_trait]
impl RunnerHandle for LocalRunner {
    fn context_dir(&self) -> &Path {
        &self.context
    }

    fn builds_warm(&self) -> bool {
        true
    }

    fn private_file(&self, name: &str) -> Option<PathBuf> {
        Some(self.provider.private_file(&self.key, name))
    }

    /// Parents into the lease's engine (from the registry by digest, else from the host's
    /// engine), the build warm from the registry's caches where `plan` names them, usage
    /// sampled from its cgroup, the image back to the host's engine. Out of memory is what
    /// the cgroup says; the exit code 137 / "Killed" is the signal only where there is no
    /// cgroup.
    async fn build(
        &self,
        invocation: &BuildInvocation<'_>,
        plan: Option<CachePlan>,
        on_step: OnStep<'_>,
    ) -> Result<Built, BuildFailure> {
        let (provider, key) = (&self.provider, &self.key);
        let fail = |reason: String| BuildFailure { reason, oom: false };
        let base = provider
            .builder
            .clone()
            .ok_or_else(|| fail("this host leases docker_local runners but does not build on them".into()))?;
        let builder = DockerBuilder {
            host: provider.docker_host(key).or_else(|| base.host.clone()),
            config: plan.as_ref().map(|_| provider.docker_config(key)),
            ..base
        };
        let dockerfile = invocation.context.join(invocation.dockerfile);
        let mut pulled = Pulled::default();
        if let (Some(plan), Some(config)) = (&plan, &builder.config) {
            plan.registry
                .write_docker_config(config)
                .map_err(|e| fail(e.to_string()))?;
            let text = tokio::fs::read_to_string(&dockerfile)
                .await
                .map_err(|e| fail(format!("{}: {e}", dockerfile.display())))?;
            pulled = plan.pull_parents(&builder, &text, &invocation.build_args).await?;
        }
        let present: Vec<String> = pulled.parents.iter().map(|(name, _)| name.clone()).collect();
        provider
            .load_parents(key, &dockerfile, &invocation.build_args, &present)
            .await
            .map_err(fail)?;
        let cgroup = provider.cgroup(key);
        let sampler = cgroup
            .clone()
            .map(|cg| Sampler::start(cg, std::time::Duration::from_secs(1)));
        let result = match &plan {
            Some(plan) => plan
                .build(&builder, invocation, on_step)
                .await
                .map(|(out, mut report)| {
                    report.parents_pulled = pulled.parents.iter().map(|(_, r)| r.clone()).collect();
                    report.bytes_pulled = Some(pulled.bytes);
                    (out, Some(report))
                }),
            None => builder.build(invocation, on_step).await.map(|out| (out, None)),
        };
        let (cpu_p95, mem_p95_gb) = match sampler {
            Some(s) => s.finish().await,
            None => (None, None),
        };
        match result {
            Ok((output, report)) => {
                provider.publish(key, invocation.image).await.map_err(fail)?;
                if let Err(err) = provider.keep_store(key).await {
                    // The build stands; its engine's store is only not kept.
                    tracing::warn!(lease = %key, %err, "engine store not kept");
                }
                let cache = report.map(|mut r| {
                    r.engine_store = provider.store_use(key);
                    r
                });
                Ok(Built {
                    output,
                    cpu_p95,
                    mem_p95_gb,
                    cache,
                })
            }
            Err(mut f) => {
                if let Some(cg) = &cgroup {
                    f.oom = cg.hit_memory_limit();
                }
                Err(f)
            }
        }
    }
}

fn list_dirs(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("lease.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_is_idempotent_by_key_and_destroy_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let p = DockerLocal::new(root.path());
        let key = LeaseKey::new("b1-r1").unwrap();
        let a = p.spawn(&key, RunnerType::Cax21, None).await.unwrap();
        std::fs::write(p.workspace(&key).join("f"), "x").unwrap();
        let b = p.spawn(&key, RunnerType::Cax41, None).await.unwrap();
        assert_eq!(a, b, "the runner recorded under the key is found, not re-created");
        assert!(p.workspace(&key).join("f").exists());
        assert_eq!(p.leases(), vec!["b1-r1".to_string()]);
        p.destroy(&key).await.unwrap();
        p.destroy(&key).await.unwrap();
        assert!(p.leases().is_empty());
    }
}
