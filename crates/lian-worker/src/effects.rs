//! The effects of the lifecycle, each turned into an `Outcome`. A failure that belongs to
//! the build (bad Dockerfile, OOM, missing context) is an outcome; one that belongs to the
//! infrastructure (NATS unreachable, a runner that cannot be destroyed) is an `Err`, and
//! the build is handed back to the queue to be resumed.

use lian_core::BuildRequest;
use lian_core::control::{LeaseRequest, MetricsRecord};
use lian_core::event::Step;
use lian_core::lifecycle::{Effect, Outcome, State};
use lian_core::sizing::{self, BuildSpec, SizingInputs};
use lian_nickel::Contract;
use std::time::Duration;

use lian_core::{LeaseKey, subjects};
use lian_runner::{
    Backend, BuildFailure, BuildInvocation, BuildOutput, ControlError, DockerBuilder, DockerLocal, Sampler,
};

use crate::driver::Worker;

/// The file in a build context that sizes its runner (tier 1).
const BUILD_SPEC_FILE: &str = ".build-spec.ncl";

fn failed(step: Step, reason: impl Into<String>) -> Outcome {
    Outcome::StepFailed {
        step,
        reason: reason.into(),
        oom: false,
    }
}

impl Worker {
    pub(crate) async fn run_effect(&self, state: &State, effect: Effect) -> Result<Outcome, String> {
        let request = state.request.as_ref().expect("effects follow an accepted request");
        match effect {
            Effect::ResolveSize => self.resolve_size(request).await,
            Effect::SpawnRunner { lease_key, runner_type } => {
                let provider = request.directives.compute_provider;
                if let Some(control) = &self.options.control {
                    let lease = LeaseRequest {
                        lease_key,
                        provider,
                        runner_type,
                        workspace: request.directives.workspace.clone(),
                        build_id: state.build_id.clone().ok_or("a build without identity")?,
                        owner: self.options.name.clone(),
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
                let spawned = match self.providers.backend(provider) {
                    Ok(backend) => backend.spawn(&lease_key, runner_type).await,
                    Err(e) => Err(e),
                };
                Ok(match spawned {
                    Ok(r) => Outcome::RunnerLeased {
                        lease_id: r.lease_id,
                        host: r.host,
                    },
                    Err(e) => failed(Step::SpawnRunner, e.to_string()),
                })
            }
            Effect::SyncContext { lease } => {
                let backend = self.backend(request)?;
                let dest = match backend {
                    Backend::Local(p) => p.workspace(&lease.key),
                    Backend::Ssh(p) => p.staging(&lease.key),
                };
                // A resumed sync starts from an empty directory: no half-written file survives.
                let _ = tokio::fs::remove_dir_all(&dest).await;
                tokio::fs::create_dir_all(&dest).await.map_err(|e| e.to_string())?;
                let (files, bytes) = match self.bus.download_context(&request.context, &dest).await {
                    Ok(counts) => counts,
                    Err(lian_bus::BusError::Nats { op, message }) => return Err(format!("{op}: {message}")),
                    Err(e) => return Ok(failed(Step::SyncContext, e.to_string())),
                };
                if let Backend::Ssh(p) = backend {
                    let host = lease.host.as_deref().unwrap_or_default();
                    let stats = p.sync(&lease.key, host).await.map_err(|e| e.to_string())?;
                    tracing::info!(lease = %lease.key, host, sent_files = stats.sent_files, sent_bytes = stats.sent_bytes, "context synced over ssh");
                }
                Ok(Outcome::ContextSynced { files, bytes })
            }
            Effect::RunBuild { lease } => {
                let backend = self.backend(request)?;
                let context = match backend {
                    Backend::Local(p) => p.workspace(&lease.key),
                    Backend::Ssh(p) => p.staging(&lease.key),
                };
                let artifact = &request.directives.artifact;
                let mut secrets = Vec::with_capacity(artifact.secrets.len());
                for id in &artifact.secrets {
                    match self.options.secrets.get(id.as_str()) {
                        Some(file) => secrets.push((id.as_str(), file.as_path())),
                        None => {
                            let reason = format!(
                                "secret {id} is not configured on this worker: add it under [secrets] in lian.toml"
                            );
                            return Ok(failed(Step::Build, reason));
                        }
                    }
                }
                if !secrets.is_empty() && matches!(backend, Backend::Ssh(_)) {
                    return Ok(failed(
                        Step::Build,
                        "secrets are not supported on ssh_pool runners yet: build on docker_local",
                    ));
                }
                let invocation = BuildInvocation {
                    context: &context,
                    dockerfile: &artifact.dockerfile,
                    image: artifact.image.as_str(),
                    target: artifact.target.as_deref(),
                    build_args: artifact
                        .build_args
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                    secrets,
                };
                let built = match backend {
                    Backend::Local(p) => {
                        let (Some(ws), Some(id)) = (&state.workspace, &state.build_id) else {
                            return Err("a build without identity".into());
                        };
                        self.build_local(p, &lease.key, &invocation, subjects::progress(ws, id))
                            .await
                    }
                    Backend::Ssh(p) => p
                        .build(&lease.key, lease.host.as_deref().unwrap_or_default(), &invocation)
                        .await
                        .map(|out| (out, (None, None))),
                };
                Ok(match built {
                    Ok((out, (cpu_p95, mem_p95_gb))) => Outcome::ImageBuilt {
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
                })
            }
            Effect::RecordMetrics { built } => {
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
            Effect::DestroyRunner { lease_key } => {
                if let Some(control) = &self.options.control {
                    control.release(&lease_key).await.map_err(|e| e.to_string())?;
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
        }
    }

    /// A build on a docker_local runner: parents into the lease's engine, usage sampled from
    /// its cgroup, the image back to the host's engine. Out of memory is what the cgroup
    /// says; the exit code 137 / "Killed" is the signal only where there is no cgroup.
    async fn build_local(
        &self,
        provider: &DockerLocal,
        key: &LeaseKey,
        invocation: &BuildInvocation<'_>,
        progress_subject: String,
    ) -> Result<(BuildOutput, (Option<f64>, Option<f64>)), BuildFailure> {
        let fail = |reason: String| BuildFailure { reason, oom: false };
        let builder = DockerBuilder {
            host: provider.docker_host(key).or_else(|| self.options.builder.host.clone()),
            ..self.options.builder.clone()
        };
        provider
            .load_parents(key, &invocation.context.join(invocation.dockerfile))
            .await
            .map_err(fail)?;
        let cgroup = provider.cgroup(key);
        let sampler = cgroup.clone().map(|cg| Sampler::start(cg, Duration::from_secs(1)));
        // Step progress goes out live on core NATS (not stored: the history keeps the steps
        // of the lifecycle, not BuildKit's).
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let bus = self.bus.clone();
        let forward = tokio::spawn(async move {
            while let Some(step) = rx.recv().await {
                if let Err(err) = bus.publish_core(&progress_subject, &step).await {
                    tracing::debug!(%err, "step progress not published");
                }
            }
        });
        let result = builder
            .build(invocation, &mut |step| {
                let _ = tx.send(step);
            })
            .await;
        drop(tx);
        let _ = forward.await;
        let usage = match sampler {
            Some(s) => s.finish().await,
            None => (None, None),
        };
        match result {
            Ok(out) => {
                provider.publish(key, invocation.image).await.map_err(fail)?;
                Ok((out, usage))
            }
            Err(mut f) => {
                if let Some(cg) = &cgroup {
                    f.oom = cg.hit_memory_limit();
                }
                Err(f)
            }
        }
    }

    fn backend(&self, request: &BuildRequest) -> Result<Backend<'_>, String> {
        self.providers
            .backend(request.directives.compute_provider)
            .map_err(|e| e.to_string())
    }

    async fn resolve_size(&self, request: &BuildRequest) -> Result<Outcome, String> {
        let spec = match self.bus.context_file(&request.context, BUILD_SPEC_FILE).await {
            Ok(None) => None,
            Ok(Some(bytes)) => {
                let text = match String::from_utf8(bytes) {
                    Ok(t) => t,
                    Err(_) => {
                        return Ok(failed(Step::Size, format!("{BUILD_SPEC_FILE} is not UTF-8 text")));
                    }
                };
                let schemas = self.options.schemas.clone();
                let evaluated = tokio::task::spawn_blocking(move || {
                    schemas.eval_str::<BuildSpec>(&text, BUILD_SPEC_FILE, Contract::BuildSpec)
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
