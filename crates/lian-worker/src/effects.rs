//! The effects of the lifecycle, each turned into an `Outcome`. A failure that belongs to
//! the build (bad Dockerfile, OOM, missing context) is an outcome; one that belongs to the
//! infrastructure (NATS unreachable, a runner that cannot be destroyed) is an `Err`, and
//! the build is handed back to the queue to be resumed.

use lian_bus::Downloaded;
use lian_core::control::{LeaseRequest, MetricsRecord};
use lian_core::directives::Artifact;
use lian_core::event::Step;
use lian_core::lifecycle::{Built, Effect, Lease, Outcome, State};
use lian_core::sizing::{self, BuildSpec, RunnerType, SizingInputs};
use lian_core::{BuildRequest, CacheReport, Transfer, cache};
use lian_nickel::Contract;
use std::path::Path;

use lian_core::{LeaseKey, subjects};
use lian_runner::progress::StepProgress;
use lian_runner::{
    BuildFailure, BuildInvocation, Built as RunnerBuilt, ControlError, ErrorKind, Held, RunnerError, RunnerHandle,
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

/// A runner error met at `step`: one worth another delivery hands the build back to the
/// queue (the last delivery ends it, naming the step); any other fails the build with it.
fn settle(step: Step, e: RunnerError) -> Result<Outcome, String> {
    match e.kind() {
        ErrorKind::Transient => Err(e.to_string()),
        ErrorKind::Permanent | ErrorKind::Refused => Ok(failed(step, e.to_string())),
    }
}

/// The outcome of a build: its image, measured usage and what it reused, or why it failed.
/// A build without a registry plan still reports its steps and sccache counters.
fn build_outcome(built: Result<RunnerBuilt, BuildFailure>) -> Outcome {
    match built {
        Ok(RunnerBuilt {
            output: out,
            cpu_p95,
            mem_p95_gb,
            cache,
        }) => Outcome::ImageBuilt {
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
        let ask = LeaseRequest {
            lease_key,
            provider,
            runner_type,
            workspace: request.directives.workspace.clone(),
            build_id: state.build_id.clone().ok_or("a build without identity")?,
            owner: self.options.name.clone(),
            // Intake checked the cache rules; a request that breaks them has no store.
            engine_store: cache::write_namespace(&request.directives).ok().flatten(),
        };
        match self.runners.get(provider).lease(&ask).await {
            Ok(runner) => Ok(Outcome::RunnerLeased {
                lease_id: runner.lease_id,
                host: runner.host,
            }),
            Err(e) => settle(Step::SpawnRunner, e),
        }
    }

    async fn sync_context(&self, request: &BuildRequest, lease: &Lease) -> Result<Outcome, String> {
        let runner = match self.reach(request, lease).await {
            Ok(runner) => runner,
            Err(e) => return settle(Step::SyncContext, e),
        };
        let started = std::time::Instant::now();
        let staged = match self.stage_context(request, runner.context_dir()).await? {
            Ok(staged) => staged,
            Err(outcome) => return Ok(outcome),
        };
        let forwarded = match runner.forward_context().await {
            Ok(bytes) => bytes,
            Err(e) => return settle(Step::SyncContext, e),
        };
        Ok(synced(request, staged, forwarded, started))
    }

    async fn run_build(&self, state: &State, request: &BuildRequest, lease: &Lease) -> Result<Outcome, String> {
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
        let (Some(ws), Some(id)) = (&state.workspace, &state.build_id) else {
            return Err("a build without identity".into());
        };
        let runner = match self.reach(request, lease).await {
            Ok(runner) => runner,
            Err(e) => return settle(Step::Build, e),
        };
        let mut invocation = invocation(artifact, runner.context_dir(), secrets);
        let (plan, grant) = match (&self.options.registry, runner.builds_warm()) {
            (Some(registry), true) => {
                let mut plan = match warm::plan(registry, request) {
                    Ok(plan) => plan,
                    Err(e) => return Ok(failed(Step::Build, e.to_string())),
                };
                let grant = match self.registry_grant(request).await {
                    Ok(grant) => grant,
                    Err(f) => return Ok(build_outcome(Err(f))),
                };
                if let Some(grant) = &grant {
                    // The Dockerfile may name the registry itself; the build reaches it
                    // through the gate.
                    plan.aliases.push(plan.registry.host.clone());
                    plan.registry = grant.access();
                }
                (Some(plan), grant)
            }
            _ => (None, None),
        };
        let sccache_file = runner.private_file("sccache.env");
        if let (Some(s3), Some(plan), Some(file)) = (&self.options.sccache, &plan, &sccache_file) {
            let namespace = plan
                .write
                .as_deref()
                .or(plan.reads.first().map(String::as_str))
                .unwrap_or("shared");
            if let Err(reason) = warm::write_sccache_secret(s3, namespace, file) {
                return Ok(failed(Step::Build, reason));
            }
            invocation.secrets.push((warm::SCCACHE_SECRET, file));
        }
        let (tx, forward) = self.forward_progress(subjects::progress(ws, id));
        let built = runner
            .build(&invocation, plan, &mut |step| {
                let _ = tx.send(step);
            })
            .await;
        drop(tx);
        let _ = forward.await;
        if let (Some(grant), Some(control)) = (grant, &self.options.control)
            && let Err(err) = control.revoke_registry_grant(&grant.username).await
        {
            // It expires by itself; a revocation that did not arrive is only logged.
            tracing::warn!(%err, "registry grant not revoked");
        }
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
            layer: state.request.as_ref().and_then(|r| r.layer.clone()),
            at: time::OffsetDateTime::now_utc().unix_timestamp(),
            oom_from: state
                .size
                .as_ref()
                .map(|s| s.runner_type)
                .filter(|sized| Some(*sized) != state.runner_type),
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
        let provider = self.runners.get(request.directives.compute_provider);
        // Through the control plane the lease is given back by key alone (it holds the
        // record); by itself the worker needs the lease the history holds.
        let lease = match (
            &self.options.control,
            state.lease.as_ref().filter(|l| l.key == lease_key),
        ) {
            (_, Some(lease)) => Held {
                key: &lease.key,
                runner_type: lease.runner_type,
                host: lease.host.as_deref(),
            },
            (Some(_), None) => Held {
                key: &lease_key,
                // The control plane reads the tier from its own record.
                runner_type: state.runner_type.unwrap_or(RunnerType::Cax11),
                host: None,
            },
            (None, None) => return Err("destroying a runner the build does not hold".into()),
        };
        provider.release(lease).await.map_err(|e| e.to_string())?;
        Ok(Outcome::RunnerDestroyed)
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
    ///
    /// A context found incomplete is read again, twice at most, before the build fails: the
    /// store is read by direct get, which on a cluster any replica answers, a follower too
    /// once it is 90% caught up (nats-server's `monitorStream`), so a worker reading a context
    /// just uploaded may ask a follower that has not all of its chunks yet. That follower
    /// catches up within milliseconds and the next read may go to another replica.
    async fn stage_context(&self, request: &BuildRequest, dest: &Path) -> Result<Result<Downloaded, Outcome>, String> {
        const TRIES: u32 = 3;
        for attempt in 1..=TRIES {
            let _ = tokio::fs::remove_dir_all(dest).await;
            tokio::fs::create_dir_all(dest).await.map_err(|e| e.to_string())?;
            match self
                .bus
                .download_context(&request.context, dest, &self.options.context_limits)
                .await
            {
                Ok(staged) => return Ok(Ok(staged)),
                Err(lian_bus::BusError::Nats { op, message }) => return Err(format!("{op}: {message}")),
                Err(e @ lian_bus::BusError::MissingObject { .. }) if attempt < TRIES => {
                    tracing::warn!(%e, attempt, "context incomplete as read (a replica behind?): reading it again");
                    tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => return Ok(Err(failed(Step::SyncContext, e.to_string()))),
            }
        }
        unreachable!("the last try returns")
    }

    /// The runner of the lease the build holds, reached from this worker.
    async fn reach(&self, request: &BuildRequest, lease: &Lease) -> Result<Box<dyn RunnerHandle>, RunnerError> {
        let held = Held {
            key: &lease.key,
            runner_type: lease.runner_type,
            host: lease.host.as_deref(),
        };
        self.runners.get(request.directives.compute_provider).reach(held).await
    }

    async fn resolve_size(&self, request: &BuildRequest) -> Result<Outcome, String> {
        let directives = &request.directives;
        // Two independent reads, at once: each is a round trip to the server.
        let (spec, history) = tokio::join!(
            // Past the evaluator's input limit a spec is refused before it is read.
            self.bus.context_file(
                &request.context,
                BUILD_SPEC_FILE,
                self.options.evaluator.limits().input_bytes,
            ),
            self.bus.sizing_history(directives.workspace.as_str()),
        );
        let spec = match spec {
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
        let history = history.map_err(|e| e.to_string())?;
        let inputs = SizingInputs {
            override_type: directives.runner_override.as_ref().and_then(|o| o.runner_type),
            override_budget: directives.runner_override.as_ref().and_then(|o| o.time_budget_min),
            spec: spec.as_ref(),
            history: history.p95,
            history_approved: history.approved,
            learned: history.learned,
            language: directives.artifact.language,
        };
        Ok(match sizing::resolve(&inputs) {
            Ok(decision) => Outcome::Sized(decision),
            Err(e) => failed(Step::Size, e.to_string()),
        })
    }
}
