//! The effects of the lifecycle, each turned into an `Outcome`. A failure that belongs to
//! the build (bad Dockerfile, OOM, missing context) is an outcome; one that belongs to the
//! infrastructure (NATS unreachable, a runner that cannot be destroyed) is an `Err`, and
//! the build is handed back to the queue to be resumed.

use lian_bus::Downloaded;
use lian_core::control::{LeaseRequest, MetricsRecord};
use lian_core::directives::{Artifact, ComputeProvider};
use lian_core::event::Step;
use lian_core::lifecycle::{Built, Effect, Lease, Outcome, State};
use lian_core::sizing::{self, BuildSpec, RunnerType, SizingInputs};
use lian_core::{BuildRequest, CacheReport, Transfer, cache};
use lian_nickel::Contract;
use std::path::Path;
use std::time::Duration;

use lian_core::{LeaseKey, subjects};
use lian_runner::progress::StepProgress;
use lian_runner::{
    Backend, BuildFailure, BuildInvocation, BuildOutput, CloudRunner, ControlError, DockerBuilder, DockerLocal,
    RunnerError, Sampler,
};

use crate::driver::Worker;
use crate::warm;

/// The file in a build context that sizes its runner (tier 1).
const BUILD_SPEC_FILE: &str = ".build-spec.ncl";

/// The `context_synced` outcome: what the context is, what travelled for it (the submit's
/// upload plus what went on to a remote runner) and how long staging it took.
fn synced(request: &BuildRequest, staged: Downloaded, forwarded: u64, started: std::time::Instant) -> Outcome {
    Outcome::ContextSynced {
        files: staged.files,
        bytes: staged.bytes,
        transfer: Transfer {
            bytes_sent: request.context.sent_bytes + forwarded,
            bytes_deduplicated: staged.bytes.saturating_sub(request.context.sent_bytes),
            seconds: started.elapsed().as_secs_f64(),
        },
    }
}

fn failed(step: Step, reason: impl Into<String>) -> Outcome {
    Outcome::StepFailed {
        step,
        reason: reason.into(),
        oom: false,
    }
}

/// Providers whose runners only the control plane leases (it alone holds their tokens).
fn is_cloud(provider: ComputeProvider) -> bool {
    matches!(provider, ComputeProvider::Hcloud | ComputeProvider::Proxmox)
}

fn through_control(provider: ComputeProvider) -> String {
    format!(
        "{} runners are leased through the control plane: set control_url and control_token",
        provider.as_str()
    )
}

/// A build's measured cpu and memory (GB) P95, where its runner's cgroup could be sampled.
type Usage = (Option<f64>, Option<f64>);

/// The outcome of a build: its image, measured usage and what it reused, or why it failed.
/// A build without a registry plan still reports its steps and sccache counters.
fn build_outcome(built: Result<(BuildOutput, Usage, Option<CacheReport>), BuildFailure>) -> Outcome {
    match built {
        Ok((out, (cpu_p95, mem_p95_gb), cache)) => Outcome::ImageBuilt {
            cache: cache
                .or_else(|| {
                    out.steps.map(|s| CacheReport {
                        steps: s.steps,
                        cached_steps: s.cached,
                        sccache_hits: s.sccache_hits,
                        sccache_misses: s.sccache_misses,
                        ..CacheReport::default()
                    })
                })
                .map(Box::new),
            image_id: out.image_id,
            duration_ms: out.duration_ms,
            cpu_p95,
            mem_p95_gb,
        },
        Err(f) => Outcome::StepFailed {
            step: Step::Build,
            reason: f.reason,
            oom: f.oom,
        },
    }
}

fn invocation<'a>(artifact: &'a Artifact, context: &'a Path, secrets: Vec<(&'a str, &'a Path)>) -> BuildInvocation<'a> {
    BuildInvocation {
        context,
        dockerfile: &artifact.dockerfile,
        image: artifact.image.as_str(),
        target: artifact.target.as_deref(),
        build_args: artifact
            .build_args
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        secrets,
        cache_from: Vec::new(),
        inline_cache: false,
    }
}

impl Worker {
    pub(crate) async fn run_effect(&self, state: &State, effect: Effect) -> Result<Outcome, String> {
        let request = state.request.as_ref().expect("effects follow an accepted request");
        match effect {
            Effect::ResolveSize => self.resolve_size(request).await,
            Effect::SpawnRunner { lease_key, runner_type } => {
                self.spawn_runner(state, request, lease_key, runner_type).await
            }
            Effect::SyncContext { lease } => self.sync_context(request, &lease).await,
            Effect::RunBuild { lease } => self.run_build(state, request, &lease).await,
            Effect::RecordMetrics { built } => self.record_metrics(state, &built).await,
            Effect::DestroyRunner { lease_key } => self.destroy_runner(state, request, lease_key).await,
        }
    }

    async fn spawn_runner(
        &self,
        state: &State,
        request: &BuildRequest,
        lease_key: LeaseKey,
        runner_type: RunnerType,
    ) -> Result<Outcome, String> {
        let provider = request.directives.compute_provider;
        // Intake checked the cache rules; a request that breaks them has no store.
        let engine_store = cache::write_namespace(&request.directives).ok().flatten();
        if let Some(control) = &self.options.control {
            let lease = LeaseRequest {
                lease_key,
                provider,
                runner_type,
                workspace: request.directives.workspace.clone(),
                build_id: state.build_id.clone().ok_or("a build without identity")?,
                owner: self.options.name.clone(),
                engine_store,
            };
            return match control.lease(&lease).await {
                Ok(l) => Ok(Outcome::RunnerLeased {
                    lease_id: l.provider_id,
                    host: l.host,
                }),
                Err(e @ ControlError::Refused { .. }) => Ok(failed(Step::SpawnRunner, e.to_string())),
                Err(e) => Err(e.to_string()),
            };
        }
        if is_cloud(provider) {
            return Ok(failed(Step::SpawnRunner, through_control(provider)));
        }
        let spawned = match self.providers.backend(provider) {
            Ok(backend) => backend.spawn(&lease_key, runner_type, engine_store.as_deref()).await,
            Err(e) => Err(e),
        };
        Ok(match spawned {
            Ok(s) => Outcome::RunnerLeased {
                lease_id: s.lease_id,
                host: s.host,
            },
            Err(e) => failed(Step::SpawnRunner, e.to_string()),
        })
    }

    async fn sync_context(&self, request: &BuildRequest, lease: &Lease) -> Result<Outcome, String> {
        if is_cloud(request.directives.compute_provider) {
            let runner = match self.cloud_runner(request, &lease.key, Step::SyncContext).await? {
                Ok(r) => r,
                Err(outcome) => return Ok(outcome),
            };
            let started = std::time::Instant::now();
            let staged = match self.stage_context(request, runner.staging()).await? {
                Ok(staged) => staged,
                Err(outcome) => return Ok(outcome),
            };
            let stats = match runner.sync().await {
                Ok(stats) => stats,
                // Another try meets the same key: the build fails, loudly.
                Err(e @ RunnerError::HostKey { .. }) => return Ok(failed(Step::SyncContext, e.to_string())),
                Err(e) => return Err(e.to_string()),
            };
            tracing::info!(lease = %lease.key, host = %runner.ssh_host().target.address, sent_files = stats.sent_files, sent_bytes = stats.sent_bytes, "context synced to a cloud runner");
            return Ok(synced(request, staged, stats.sent_bytes, started));
        }
        let backend = self.backend(request)?;
        let dest = match backend {
            Backend::Local(p) => p.workspace(&lease.key),
            Backend::Ssh(p) => p.staging(&lease.key),
            Backend::Hcloud(_) | Backend::Proxmox(_) => {
                return Ok(failed(
                    Step::SyncContext,
                    through_control(request.directives.compute_provider),
                ));
            }
        };
        let started = std::time::Instant::now();
        let staged = match self.stage_context(request, &dest).await? {
            Ok(staged) => staged,
            Err(outcome) => return Ok(outcome),
        };
        let mut forwarded = 0;
        if let Backend::Ssh(p) = backend {
            let host = lease.host.as_deref().unwrap_or_default();
            let stats = p.sync(&lease.key, host).await.map_err(|e| e.to_string())?;
            tracing::info!(lease = %lease.key, host, sent_files = stats.sent_files, sent_bytes = stats.sent_bytes, "context synced over ssh");
            forwarded = stats.sent_bytes;
        }
        Ok(synced(request, staged, forwarded, started))
    }

    async fn run_build(&self, state: &State, request: &BuildRequest, lease: &Lease) -> Result<Outcome, String> {
        let cloud = is_cloud(request.directives.compute_provider);
        let artifact = &request.directives.artifact;
        let mut secrets = Vec::with_capacity(artifact.secrets.len());
        for id in &artifact.secrets {
            match self.options.secrets.get(id.as_str()) {
                Some(file) => secrets.push((id.as_str(), file.as_path())),
                None => {
                    let reason =
                        format!("secret {id} is not configured on this worker: add it under [secrets] in lian.toml");
                    return Ok(failed(Step::Build, reason));
                }
            }
        }
        if cloud {
            if !secrets.is_empty() {
                return Ok(failed(
                    Step::Build,
                    "secrets are not supported on hcloud and proxmox runners yet: build on docker_local or ssh_pool",
                ));
            }
            let runner = match self.cloud_runner(request, &lease.key, Step::Build).await? {
                Ok(r) => r,
                Err(outcome) => return Ok(outcome),
            };
            let (Some(ws), Some(id)) = (&state.workspace, &state.build_id) else {
                return Err("a build without identity".into());
            };
            let (tx, forward) = self.forward_progress(subjects::progress(ws, id));
            let built = runner
                .build(&invocation(artifact, runner.staging(), Vec::new()), &mut |step| {
                    let _ = tx.send(step);
                })
                .await;
            drop(tx);
            let _ = forward.await;
            // A cloud runner's usage is not sampled (no cgroup of ours there).
            return Ok(build_outcome(built.map(|out| (out, (None, None), None))));
        }
        let backend = self.backend(request)?;
        let context = match backend {
            Backend::Local(p) => p.workspace(&lease.key),
            Backend::Ssh(p) => p.staging(&lease.key),
            Backend::Hcloud(_) | Backend::Proxmox(_) => {
                return Ok(failed(
                    Step::Build,
                    through_control(request.directives.compute_provider),
                ));
            }
        };
        let invocation = invocation(artifact, &context, secrets);
        let built = match backend {
            Backend::Local(p) => {
                let (Some(ws), Some(id)) = (&state.workspace, &state.build_id) else {
                    return Err("a build without identity".into());
                };
                self.build_local(p, request, &lease.key, invocation, subjects::progress(ws, id))
                    .await
            }
            Backend::Ssh(p) => p
                .build(&lease.key, lease.host.as_deref().unwrap_or_default(), &invocation)
                .await
                .map(|out| (out, (None, None), None)),
            Backend::Hcloud(_) | Backend::Proxmox(_) => unreachable!("refused above"),
        };
        Ok(build_outcome(built))
    }

    async fn record_metrics(&self, state: &State, built: &Built) -> Result<Outcome, String> {
        let (Some(ws), Some(id)) = (&state.workspace, &state.build_id) else {
            return Err("a build without identity".into());
        };
        let record = MetricsRecord {
            workspace: ws.clone(),
            build_id: id.clone(),
            runner_type: state.runner_type,
            duration_ms: built.duration_ms,
            cpu_p95: built.cpu_p95,
            mem_p95_gb: built.mem_p95_gb,
        };
        // Metrics are advice for sizing: losing one must not fail a build.
        let recorded = match &self.options.control {
            Some(control) => control.record_metrics(&record).await.map_err(|e| e.to_string()),
            None => {
                let value = serde_json::to_value(&record).expect("json");
                let key = format!("{ws}.{id}");
                self.bus.record_metrics(&key, &value).await.map_err(|e| e.to_string())
            }
        };
        if let Err(err) = recorded {
            tracing::warn!(%err, "metrics not recorded");
        }
        Ok(Outcome::MetricsRecorded {
            cpu_p95: built.cpu_p95,
            mem_p95_gb: built.mem_p95_gb,
        })
    }

    async fn destroy_runner(
        &self,
        state: &State,
        request: &BuildRequest,
        lease_key: LeaseKey,
    ) -> Result<Outcome, String> {
        if let Some(control) = &self.options.control {
            control.release(&lease_key).await.map_err(|e| e.to_string())?;
            if is_cloud(request.directives.compute_provider) {
                let staged = self.options.runners_dir.join("cloud-staging").join(lease_key.as_str());
                let _ = tokio::fs::remove_dir_all(staged).await;
            }
            return Ok(Outcome::RunnerDestroyed);
        }
        let lease = state
            .lease
            .as_ref()
            .filter(|l| l.key == lease_key)
            .ok_or("destroying a runner the build does not hold")?;
        self.backend(request)?
            .destroy(&lease_key, lease.runner_type, lease.host.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Outcome::RunnerDestroyed)
    }

    /// A build on a docker_local runner: parents into the lease's engine (from the registry
    /// by digest, else from the host's engine), the build warm from the registry's caches
    /// where the fleet has one, usage sampled from its cgroup, the image back to the host's
    /// engine. Out of memory is what the cgroup says; the exit code 137 / "Killed" is the
    /// signal only where there is no cgroup.
    async fn build_local(
        &self,
        provider: &DockerLocal,
        request: &BuildRequest,
        key: &LeaseKey,
        invocation: BuildInvocation<'_>,
        progress_subject: String,
    ) -> Result<(BuildOutput, Usage, Option<CacheReport>), BuildFailure> {
        let fail = |reason: String| BuildFailure { reason, oom: false };
        let (plan, grant) = match &self.options.registry {
            Some(registry) => {
                let mut plan = warm::plan(registry, request).map_err(|e| fail(e.to_string()))?;
                let grant = self.registry_grant(request).await?;
                if let Some(grant) = &grant {
                    // The Dockerfile may name the registry itself; the build reaches it
                    // through the gate.
                    plan.aliases.push(plan.registry.host.clone());
                    plan.registry = grant.access();
                }
                (Some(plan), grant)
            }
            None => (None, None),
        };
        let built = self
            .build_local_with(provider, key, invocation, progress_subject, plan)
            .await;
        if let (Some(grant), Some(control)) = (grant, &self.options.control)
            && let Err(err) = control.revoke_registry_grant(&grant.username).await
        {
            // It expires by itself; a revocation that did not arrive is only logged.
            tracing::warn!(%err, "registry grant not revoked");
        }
        built
    }

    /// Credentials for this build alone from the control plane's registry gate, which
    /// allow what the actor rules allow and nothing more; `None` when the worker leases by
    /// itself or the control plane runs no gate (a registry with its own auth).
    async fn registry_grant(&self, request: &BuildRequest) -> Result<Option<warm::Grant>, BuildFailure> {
        let Some(control) = &self.options.control else {
            return Ok(None);
        };
        let Some(build_id) = request.build_id.clone() else {
            return Ok(None);
        };
        let asked = lian_core::control::RegistryGrantRequest {
            build_id,
            directives: request.directives.clone(),
            ttl_secs: None,
        };
        match control.registry_grant(&asked).await {
            Ok(grant) => Ok(Some(warm::Grant(grant))),
            Err(ControlError::Refused { code, .. }) if code == "not_configured" => Ok(None),
            Err(e) => Err(BuildFailure {
                reason: e.to_string(),
                oom: false,
            }),
        }
    }

    /// `build_local` once the registry plan is known.
    async fn build_local_with(
        &self,
        provider: &DockerLocal,
        key: &LeaseKey,
        mut invocation: BuildInvocation<'_>,
        progress_subject: String,
        plan: Option<lian_runner::warm::CachePlan>,
    ) -> Result<(BuildOutput, Usage, Option<CacheReport>), BuildFailure> {
        let fail = |reason: String| BuildFailure { reason, oom: false };
        let builder = DockerBuilder {
            host: provider.docker_host(key).or_else(|| self.options.builder.host.clone()),
            config: plan.as_ref().map(|_| provider.docker_config(key)),
            ..self.options.builder.clone()
        };
        let sccache_file = provider.private_file(key, "sccache.env");
        if let (Some(s3), Some(plan)) = (&self.options.sccache, &plan) {
            let namespace = plan
                .write
                .as_deref()
                .or(plan.reads.first().map(String::as_str))
                .unwrap_or("shared");
            warm::write_sccache_secret(s3, namespace, &sccache_file).map_err(fail)?;
            invocation.secrets.push((warm::SCCACHE_SECRET, &sccache_file));
        }
        let dockerfile = invocation.context.join(invocation.dockerfile);
        let mut pulled = lian_runner::warm::Pulled::default();
        if let (Some(plan), Some(config)) = (&plan, &builder.config) {
            plan.registry
                .write_docker_config(config)
                .map_err(|e| fail(e.to_string()))?;
            let text = tokio::fs::read_to_string(&dockerfile)
                .await
                .map_err(|e| fail(format!("{}: {e}", dockerfile.display())))?;
            pulled = plan.pull_parents(&builder, &text).await?;
        }
        let present: Vec<String> = pulled.parents.iter().map(|(name, _)| name.clone()).collect();
        provider.load_parents(key, &dockerfile, &present).await.map_err(fail)?;
        let cgroup = provider.cgroup(key);
        let sampler = cgroup.clone().map(|cg| Sampler::start(cg, Duration::from_secs(1)));
        let (tx, forward) = self.forward_progress(progress_subject);
        let mut on_step = |step| {
            let _ = tx.send(step);
        };
        let result = match &plan {
            Some(plan) => plan
                .build(&builder, &invocation, &mut on_step)
                .await
                .map(|(out, mut report)| {
                    report.parents_pulled = pulled.parents.iter().map(|(_, r)| r.clone()).collect();
                    report.bytes_pulled = Some(pulled.bytes);
                    (out, Some(report))
                }),
            None => builder.build(&invocation, &mut on_step).await.map(|out| (out, None)),
        };
        drop(tx);
        let _ = forward.await;
        let usage = match sampler {
            Some(s) => s.finish().await,
            None => (None, None),
        };
        match result {
            Ok((out, report)) => {
                provider.publish(key, invocation.image).await.map_err(fail)?;
                if let Err(err) = provider.keep_store(key).await {
                    // The build stands; its engine's store is only not kept.
                    tracing::warn!(lease = %key, %err, "engine store not kept");
                }
                let report = report.map(|mut r| {
                    r.engine_store = provider.store_use(key);
                    r
                });
                Ok((out, usage, report))
            }
            Err(mut f) => {
                if let Some(cg) = &cgroup {
                    f.oom = cg.hit_memory_limit();
                }
                Err(f)
            }
        }
    }

    /// Step progress goes out live on core NATS (not stored: the history keeps the steps of
    /// the lifecycle, not BuildKit's): send steps into the channel, drop it, await the task.
    fn forward_progress(
        &self,
        subject: String,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<StepProgress>,
        tokio::task::JoinHandle<()>,
    ) {
        self.bus.publisher(move |_| subject.clone())
    }

    /// The request's context downloaded into `dest`, emptied first: a resumed sync starts
    /// from an empty directory, so no half-written file survives. Files and bytes, or the
    /// outcome of a context that cannot be had.
    async fn stage_context(&self, request: &BuildRequest, dest: &Path) -> Result<Result<Downloaded, Outcome>, String> {
        let _ = tokio::fs::remove_dir_all(dest).await;
        tokio::fs::create_dir_all(dest).await.map_err(|e| e.to_string())?;
        match self
            .bus
            .download_context(&request.context, dest, &self.options.context_limits)
            .await
        {
            Ok(staged) => Ok(Ok(staged)),
            Err(lian_bus::BusError::Nats { op, message }) => Err(format!("{op}: {message}")),
            Err(e) => Ok(Err(failed(Step::SyncContext, e.to_string()))),
        }
    }

    /// The cloud runner leased under `key`, as the control plane recorded it (address, SSH
    /// port, the host key to pin), reached with this worker's `runner_ssh_key`; or the
    /// outcome of `step` failing because it cannot be reached from here.
    async fn cloud_runner(
        &self,
        request: &BuildRequest,
        key: &LeaseKey,
        step: Step,
    ) -> Result<Result<CloudRunner, Outcome>, String> {
        let provider = request.directives.compute_provider;
        let Some(control) = &self.options.control else {
            return Ok(Err(failed(step, through_control(provider))));
        };
        let Some(client_key) = &self.options.runner_ssh_key else {
            return Ok(Err(failed(
                step,
                format!(
                    "{} runners are reached over SSH with the worker's client key: set runner_ssh_key in lian.toml \
                     (the private half of authorized_key in the control plane's [{}])",
                    provider.as_str(),
                    provider.as_str()
                ),
            )));
        };
        let lease = match control.lease_info(key).await {
            Ok(lease) => lease,
            Err(e @ ControlError::Refused { .. }) => return Ok(Err(failed(step, e.to_string()))),
            Err(e) => return Err(e.to_string()),
        };
        let staging = self.options.runners_dir.join("cloud-staging");
        Ok(CloudRunner::from_lease(&lease, client_key, &staging).map_err(|e| failed(step, e.to_string())))
    }

    fn backend(&self, request: &BuildRequest) -> Result<Backend<'_>, String> {
        self.providers
            .backend(request.directives.compute_provider)
            .map_err(|e| e.to_string())
    }

    async fn resolve_size(&self, request: &BuildRequest) -> Result<Outcome, String> {
        let spec = match self
            .bus
            // Past the evaluator's input limit a spec is refused before it is read.
            .context_file(
                &request.context,
                BUILD_SPEC_FILE,
                self.options.evaluator.limits().input_bytes,
            )
            .await
        {
            Ok(None) => None,
            Ok(Some(bytes)) => {
                let text = match String::from_utf8(bytes) {
                    Ok(t) => t,
                    Err(_) => {
                        return Ok(failed(Step::Size, format!("{BUILD_SPEC_FILE} is not UTF-8 text")));
                    }
                };
                let evaluator = self.options.evaluator.clone();
                let evaluated = tokio::task::spawn_blocking(move || {
                    evaluator.eval_str::<BuildSpec>(&text, BUILD_SPEC_FILE, Contract::BuildSpec)
                })
                .await
                .expect("nickel evaluation does not panic");
                match evaluated {
                    Ok(spec) => Some(spec),
                    Err(e) => {
                        return Ok(failed(Step::Size, format!("{BUILD_SPEC_FILE}: {}", e.summary())));
                    }
                }
            }
            Err(lian_bus::BusError::Nats { op, message }) => {
                return Err(format!("{op}: {message}"));
            }
            Err(e) => return Ok(failed(Step::Size, e.to_string())),
        };
        let directives = &request.directives;
        let (history, history_approved) = match self.bus.sizing_history(directives.workspace.as_str()).await {
            Ok(h) => h,
            Err(e) => return Err(e.to_string()),
        };
        let inputs = SizingInputs {
            override_type: directives.runner_override.as_ref().and_then(|o| o.runner_type),
            override_budget: directives.runner_override.as_ref().and_then(|o| o.time_budget_min),
            spec: spec.as_ref(),
            history,
            history_approved,
            language: directives.artifact.language,
        };
        Ok(match sizing::resolve(&inputs) {
            Ok(decision) => Outcome::Sized(decision),
            Err(e) => failed(Step::Size, e.to_string()),
        })
    }
}
