//! The build lifecycle as a transducer: `fold(history) -> State`, then
//! `decide(&State, Option<Outcome>, now) -> Decision { events, effect }`. The worker's driver
//! appends the events, runs the one effect, and feeds its outcome back. Replay is quiet:
//! folding performs no effect; an impossible history is a typed error, never a guess.
//!
//! Transition table (state as folded -> what `decide(state, None, now)` returns):
//!
//! | state                                   | events appended                  | effect          |
//! |-----------------------------------------|----------------------------------|-----------------|
//! | terminal (completed / failed)           | -                                | -               |
//! | over its time budget, no failure yet    | step_failed(time_budget)         | -               |
//! | accepted, not sized                     | -                                | ResolveSize     |
//! | sized, not started                      | started, runner_requested(r1)    | SpawnRunner     |
//! | started, no runner yet (crash gap)      | runner_requested(r1)             | SpawnRunner     |
//! | runner requested, not leased            | -                                | SpawnRunner     |
//! | runner leased, context not synced       | -                                | SyncContext     |
//! | context synced, no image                | -                                | RunBuild        |
//! | image built, metrics not recorded       | -                                | RecordMetrics   |
//! | metrics recorded, runner held           | -                                | DestroyRunner   |
//! | image built, runner destroyed           | completed                        | -               |
//! | step failed, runner held                | -                                | DestroyRunner   |
//! | step failed (OOM, retry left), no runner| oom_escalated, runner_requested  | SpawnRunner     |
//! | step failed, no runner                  | failed                           | -               |
//!
//! `decide(state, Some(outcome), now)` turns the outcome of the last effect into its event
//! (runner_leased, context_synced, image_built, metrics_recorded, runner_destroyed,
//! sized, or step_failed) and asks for no effect: the next call with `None` moves on.

use time::OffsetDateTime;

use crate::event::{BuildEvent, CacheReport, Envelope, Step, Transfer};
use crate::names::{BuildId, ImageRef, LeaseKey, Workspace};
use crate::request::BuildRequest;
use crate::sizing::{MAX_OOM_RETRIES, RunnerType, SizeDecision};

/// A runner lease the build holds: requested (intent recorded), maybe leased, maybe synced.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub key: LeaseKey,
    pub runner_type: RunnerType,
    pub lease_id: Option<String>,
    pub host: Option<String>,
    pub synced: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub image: ImageRef,
    pub image_id: String,
    pub duration_ms: u64,
    pub cpu_p95: Option<f64>,
    pub mem_p95_gb: Option<f64>,
    pub cache: Option<Box<CacheReport>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub step: Step,
    pub reason: String,
    pub oom: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Terminal {
    Completed {
        image: ImageRef,
        image_id: String,
    },
    Failed {
        reason: String,
        step: Option<Step>,
    },
    /// Never built: a newer build of its layer was asked for before a worker took it.
    Superseded {
        by: BuildId,
    },
}

/// The fold of a build's history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub build_id: Option<BuildId>,
    pub workspace: Option<Workspace>,
    pub request: Option<BuildRequest>,
    pub size: Option<SizeDecision>,
    pub started_at: Option<OffsetDateTime>,
    /// The tier of the current (or next) runner: the sized tier, raised by OOM escalation.
    pub runner_type: Option<RunnerType>,
    /// Runner attempts so far; names the lease keys `<build>-r<n>`.
    pub attempts: u8,
    pub oom_retries: u8,
    pub lease: Option<Lease>,
    pub built: Option<Built>,
    pub metrics_recorded: bool,
    pub failure: Option<Failure>,
    pub terminal: Option<Terminal>,
    /// Number of events folded; the next append has `seq = len + 1`.
    pub len: u32,
}

/// One side effect for the driver to run. Effects are imperative; each names everything
/// its executor needs beyond the request held in the state.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    ResolveSize,
    /// Idempotent by `lease_key`: find the runner recorded under it, or create one.
    SpawnRunner {
        lease_key: LeaseKey,
        runner_type: RunnerType,
    },
    SyncContext {
        lease: Lease,
    },
    RunBuild {
        lease: Lease,
    },
    RecordMetrics {
        built: Built,
    },
    /// Idempotent: destroying a runner that is gone succeeds.
    DestroyRunner {
        lease_key: LeaseKey,
    },
}

impl Effect {
    /// The effect's name, as failpoints and logs spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ResolveSize => "resolve_size",
            Self::SpawnRunner { .. } => "spawn_runner",
            Self::SyncContext { .. } => "sync_context",
            Self::RunBuild { .. } => "run_build",
            Self::RecordMetrics { .. } => "record_metrics",
            Self::DestroyRunner { .. } => "destroy_runner",
        }
    }

    /// The lifecycle step the effect belongs to.
    pub fn step(&self) -> Step {
        match self {
            Self::ResolveSize => Step::Size,
            Self::SpawnRunner { .. } => Step::SpawnRunner,
            Self::SyncContext { .. } => Step::SyncContext,
            Self::RunBuild { .. } => Step::Build,
            Self::RecordMetrics { .. } => Step::RecordMetrics,
            Self::DestroyRunner { .. } => Step::DestroyRunner,
        }
    }
}

/// What an effect reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sized(SizeDecision),
    RunnerLeased {
        lease_id: String,
        host: String,
    },
    ContextSynced {
        files: u64,
        bytes: u64,
        transfer: Transfer,
    },
    ImageBuilt {
        image_id: String,
        duration_ms: u64,
        cpu_p95: Option<f64>,
        mem_p95_gb: Option<f64>,
        cache: Option<Box<CacheReport>>,
    },
    MetricsRecorded {
        cpu_p95: Option<f64>,
        mem_p95_gb: Option<f64>,
    },
    RunnerDestroyed,
    /// The destroy kept failing: the runner is handed to the reaper and the build goes on.
    RunnerLeftToReaper {
        reason: String,
    },
    StepFailed {
        step: Step,
        reason: String,
        oom: bool,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub events: Vec<BuildEvent>,
    pub effect: Option<Effect>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LifecycleError {
    #[error("impossible history: event {seq} ({kind}) cannot follow the state before it: {why}")]
    Impossible {
        seq: u32,
        kind: &'static str,
        why: &'static str,
    },
    #[error("event {seq} belongs to build {found}, not {expected}")]
    ForeignEvent {
        seq: u32,
        expected: BuildId,
        found: BuildId,
    },
    #[error("event {found} arrived where event {expected} was expected")]
    OutOfOrder { expected: u32, found: u32 },
    #[error("outcome {outcome} does not answer the state of the build")]
    UnexpectedOutcome { outcome: &'static str },
    #[error("the history is empty: nothing to resume")]
    Empty,
}

/// A runner with no build history at all is left alone this long: its build may be between
/// spawning it and recording the lease.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Why a runner should be reaped (destroyed by the safety net rather than its build), or
/// `None` to leave it: its build has ended, or it has no history and is older than
/// [`ORPHAN_GRACE`]. Returns the workspace to record the reaping in, when the history names one.
pub fn reap_reason(
    build: &BuildId,
    history: &[Envelope],
    age: Option<std::time::Duration>,
) -> Option<(Option<Workspace>, String)> {
    if history.is_empty() {
        return age
            .is_some_and(|a| a >= ORPHAN_GRACE)
            .then(|| (None, "no build history".to_string()));
    }
    let state = fold(history).ok()?;
    state
        .is_terminal()
        .then(|| (state.workspace.clone(), format!("build {build} already ended")))
}

impl State {
    pub fn is_terminal(&self) -> bool {
        self.terminal.is_some()
    }

    /// Applies one envelope, checking it may follow the state.
    pub fn apply(&mut self, envelope: &Envelope) -> Result<(), LifecycleError> {
        let seq = envelope.seq;
        if seq != self.len + 1 {
            return Err(LifecycleError::OutOfOrder {
                expected: self.len + 1,
                found: seq,
            });
        }
        match &self.build_id {
            Some(id) if *id != envelope.build_id => {
                return Err(LifecycleError::ForeignEvent {
                    seq,
                    expected: id.clone(),
                    found: envelope.build_id.clone(),
                });
            }
            _ => {}
        }
        let kind = envelope.event.kind();
        let bad = |why| Err(LifecycleError::Impossible { seq, kind, why });
        if self.terminal.is_some() {
            return bad("the build already ended");
        }
        let first_only = matches!(envelope.event, BuildEvent::Superseded { .. });
        if self.len == 0
            && !matches!(
                envelope.event,
                BuildEvent::Accepted { .. } | BuildEvent::Failed { .. } | BuildEvent::Superseded { .. }
            )
        {
            return bad("a history starts with accepted, failed or superseded");
        }
        if first_only && self.len > 0 {
            return bad("only a build no worker took is superseded");
        }
        match &envelope.event {
            BuildEvent::Accepted { request } => {
                if self.request.is_some() {
                    return bad("accepted twice");
                }
                self.request = Some((**request).clone());
            }
            BuildEvent::Sized(decision) => {
                if self.size.is_some() {
                    return bad("sized twice");
                }
                self.size = Some(decision.clone());
                self.runner_type = Some(decision.runner_type);
            }
            BuildEvent::Started { .. } => {
                if self.size.is_none() || self.started_at.is_some() {
                    return bad("started needs a size and comes once");
                }
                self.started_at = Some(envelope.at);
            }
            BuildEvent::RunnerRequested {
                lease_key, runner_type, ..
            } => {
                if self.started_at.is_none() || self.lease.is_some() || self.failure.is_some() {
                    return bad("a runner is requested after start, with no runner held and no failure pending");
                }
                self.attempts += 1;
                self.lease = Some(Lease {
                    key: lease_key.clone(),
                    runner_type: *runner_type,
                    lease_id: None,
                    host: None,
                    synced: false,
                });
            }
            BuildEvent::RunnerLeased {
                lease_key,
                lease_id,
                host,
            } => match &mut self.lease {
                Some(l) if l.key == *lease_key && l.lease_id.is_none() => {
                    l.lease_id = Some(lease_id.clone());
                    l.host = Some(host.clone());
                }
                _ => return bad("no matching runner request"),
            },
            BuildEvent::ContextSynced { lease_key, .. } => match &mut self.lease {
                Some(l) if l.key == *lease_key && l.lease_id.is_some() && !l.synced => l.synced = true,
                _ => return bad("no leased runner to sync to"),
            },
            BuildEvent::ImageBuilt {
                lease_key,
                image,
                image_id,
                duration_ms,
                cpu_p95,
                mem_p95_gb,
                cache,
            } => match &self.lease {
                Some(l) if l.key == *lease_key && l.synced && self.built.is_none() => {
                    self.built = Some(Built {
                        image: image.clone(),
                        image_id: image_id.clone(),
                        duration_ms: *duration_ms,
                        cpu_p95: *cpu_p95,
                        mem_p95_gb: *mem_p95_gb,
                        cache: cache.clone(),
                    });
                }
                _ => return bad("no synced runner, or built twice"),
            },
            BuildEvent::StepFailed { step, reason, oom } => {
                if self.failure.is_some() || self.request.is_none() {
                    return bad("a failure is already pending");
                }
                self.failure = Some(Failure {
                    step: *step,
                    reason: reason.clone(),
                    oom: *oom,
                });
            }
            BuildEvent::OomEscalated { from, to } => {
                let ok = matches!(&self.failure, Some(f) if f.oom)
                    && self.lease.is_none()
                    && self.oom_retries < MAX_OOM_RETRIES
                    && self.runner_type == Some(*from)
                    && from.next() == Some(*to);
                if !ok {
                    return bad("escalation needs an OOM failure, no runner held, a retry left and the next tier");
                }
                self.oom_retries += 1;
                self.failure = None;
                self.runner_type = Some(*to);
            }
            BuildEvent::MetricsRecorded { .. } => {
                if self.built.is_none() || self.metrics_recorded {
                    return bad("metrics need a built image and are recorded once");
                }
                self.metrics_recorded = true;
            }
            BuildEvent::RunnerDestroyed { lease_key, .. } => match &self.lease {
                Some(l) if l.key == *lease_key => {
                    if self.built.is_some() && !self.metrics_recorded && self.failure.is_none() {
                        return bad("metrics are recorded before the runner that measured them goes");
                    }
                    self.lease = None;
                }
                _ => return bad("no such runner held"),
            },
            BuildEvent::Resumed { .. } => {}
            BuildEvent::Completed { image_id, image, .. } => {
                if self.built.is_none() || self.lease.is_some() || self.failure.is_some() || !self.metrics_recorded {
                    return bad("completion needs an image, metrics, and the runner destroyed");
                }
                self.terminal = Some(Terminal::Completed {
                    image: image.clone(),
                    image_id: image_id.clone(),
                });
            }
            BuildEvent::Superseded { by, .. } => self.terminal = Some(Terminal::Superseded { by: by.clone() }),
            BuildEvent::Failed { reason, step, .. } => {
                if self.lease.is_some() {
                    return bad("a build cannot fail while it holds a runner: destroy it first");
                }
                self.terminal = Some(Terminal::Failed {
                    reason: reason.clone(),
                    step: *step,
                });
            }
        }
        if self.build_id.is_none() {
            self.build_id = Some(envelope.build_id.clone());
            self.workspace = Some(envelope.workspace.clone());
        }
        self.len = seq;
        Ok(())
    }
}

/// Rebuilds a build's state from its history.
pub fn fold<'a>(history: impl IntoIterator<Item = &'a Envelope>) -> Result<State, LifecycleError> {
    let mut state = State::default();
    for envelope in history {
        state.apply(envelope)?;
    }
    Ok(state)
}

/// Says what to append and which effect to run next. `now` is the only clock.
pub fn decide(state: &State, outcome: Option<Outcome>, now: OffsetDateTime) -> Result<Decision, LifecycleError> {
    if state.is_terminal() {
        return Ok(Decision::default());
    }
    let request = state.request.as_ref().ok_or(LifecycleError::Empty)?;
    if let Some(outcome) = outcome {
        return Ok(Decision {
            events: vec![outcome_event(state, outcome)?],
            effect: None,
        });
    }
    let build_id = state.build_id.as_ref().ok_or(LifecycleError::Empty)?;

    if let Some(failure) = &state.failure {
        if let Some(lease) = &state.lease {
            return Ok(effect(Effect::DestroyRunner {
                lease_key: lease.key.clone(),
            }));
        }
        let current = state.runner_type;
        if failure.oom
            && state.oom_retries < MAX_OOM_RETRIES
            && let Some((from, to)) = current.and_then(|f| f.next().map(|t| (f, t)))
        {
            let lease_key = LeaseKey::for_attempt(build_id, state.attempts + 1);
            return Ok(Decision {
                events: vec![
                    BuildEvent::OomEscalated { from, to },
                    BuildEvent::RunnerRequested {
                        lease_key: lease_key.clone(),
                        provider: request.directives.compute_provider,
                        runner_type: to,
                    },
                ],
                effect: Some(Effect::SpawnRunner {
                    lease_key,
                    runner_type: to,
                }),
            });
        }
        let reason = if failure.oom {
            format!(
                "{} (out of memory on {} after {} retry): set runner_type in .build-spec.ncl to a larger tier",
                failure.reason,
                current.map_or("the largest tier", |t| t.as_str()),
                state.oom_retries
            )
        } else {
            failure.reason.clone()
        };
        return Ok(events(vec![failed(request, reason, Some(failure.step))]));
    }

    if let (Some(started), Some(size)) = (state.started_at, &state.size) {
        let budget = time::Duration::minutes(i64::from(size.time_budget_min));
        if now - started > budget {
            return Ok(events(vec![BuildEvent::StepFailed {
                step: Step::TimeBudget,
                reason: format!(
                    "time budget of {} min exceeded: raise time_budget_min in .build-spec.ncl or runner_override",
                    size.time_budget_min
                ),
                oom: false,
            }]));
        }
    }

    let Some(size) = &state.size else {
        return Ok(effect(Effect::ResolveSize));
    };
    let runner_type = state.runner_type.unwrap_or(size.runner_type);
    let request_runner = |attempt: u8| {
        let lease_key = LeaseKey::for_attempt(build_id, attempt);
        (
            BuildEvent::RunnerRequested {
                lease_key: lease_key.clone(),
                provider: request.directives.compute_provider,
                runner_type,
            },
            Effect::SpawnRunner { lease_key, runner_type },
        )
    };
    if state.started_at.is_none() {
        let (requested, spawn) = request_runner(1);
        return Ok(Decision {
            events: vec![BuildEvent::Started { runner_type }, requested],
            effect: Some(spawn),
        });
    }
    let Some(lease) = &state.lease else {
        if let Some(built) = &state.built {
            return Ok(events(vec![BuildEvent::Completed {
                image: built.image.clone(),
                image_id: built.image_id.clone(),
                layer: request.layer.clone(),
                cascade: request.cascade.clone(),
                labels: request.directives.labels(),
                cache: built.cache.clone(),
            }]));
        }
        let (requested, spawn) = request_runner(state.attempts + 1);
        return Ok(Decision {
            events: vec![requested],
            effect: Some(spawn),
        });
    };
    let next = if lease.lease_id.is_none() {
        Effect::SpawnRunner {
            lease_key: lease.key.clone(),
            runner_type: lease.runner_type,
        }
    } else if !lease.synced {
        Effect::SyncContext { lease: lease.clone() }
    } else if let Some(built) = &state.built {
        if state.metrics_recorded {
            Effect::DestroyRunner {
                lease_key: lease.key.clone(),
            }
        } else {
            Effect::RecordMetrics { built: built.clone() }
        }
    } else {
        Effect::RunBuild { lease: lease.clone() }
    };
    Ok(effect(next))
}

fn effect(effect: Effect) -> Decision {
    Decision {
        events: vec![],
        effect: Some(effect),
    }
}

fn events(events: Vec<BuildEvent>) -> Decision {
    Decision { events, effect: None }
}

/// The terminal failure event of a request, carrying what the cascade and callers need.
pub fn failed(request: &BuildRequest, reason: String, step: Option<Step>) -> BuildEvent {
    BuildEvent::Failed {
        reason,
        step,
        layer: request.layer.clone(),
        cascade: request.cascade.clone(),
        labels: request.directives.labels(),
    }
}

fn outcome_event(state: &State, outcome: Outcome) -> Result<BuildEvent, LifecycleError> {
    let unexpected = |outcome| Err(LifecycleError::UnexpectedOutcome { outcome });
    let lease = state.lease.as_ref();
    Ok(match outcome {
        Outcome::Sized(decision) => BuildEvent::Sized(decision),
        Outcome::StepFailed { step, reason, oom } => BuildEvent::StepFailed { step, reason, oom },
        Outcome::RunnerLeased { lease_id, host } => match lease {
            Some(l) => BuildEvent::RunnerLeased {
                lease_key: l.key.clone(),
                lease_id,
                host,
            },
            None => return unexpected("runner_leased"),
        },
        Outcome::ContextSynced { files, bytes, transfer } => match lease {
            Some(l) => BuildEvent::ContextSynced {
                lease_key: l.key.clone(),
                files,
                bytes,
                transfer,
            },
            None => return unexpected("context_synced"),
        },
        Outcome::ImageBuilt {
            image_id,
            duration_ms,
            cpu_p95,
            mem_p95_gb,
            cache,
        } => match (lease, &state.request) {
            (Some(l), Some(r)) => BuildEvent::ImageBuilt {
                lease_key: l.key.clone(),
                image: r.directives.artifact.image.clone(),
                image_id,
                duration_ms,
                cpu_p95,
                mem_p95_gb,
                cache,
            },
            _ => return unexpected("image_built"),
        },
        Outcome::MetricsRecorded { cpu_p95, mem_p95_gb } => match &state.built {
            Some(b) => BuildEvent::MetricsRecorded {
                duration_ms: b.duration_ms,
                cpu_p95,
                mem_p95_gb,
            },
            None => return unexpected("metrics_recorded"),
        },
        Outcome::RunnerDestroyed => match lease {
            Some(l) => BuildEvent::RunnerDestroyed {
                lease_key: l.key.clone(),
                left_to_reaper: None,
            },
            None => return unexpected("runner_destroyed"),
        },
        Outcome::RunnerLeftToReaper { reason } => match lease {
            Some(l) => BuildEvent::RunnerDestroyed {
                lease_key: l.key.clone(),
                left_to_reaper: Some(reason),
            },
            None => return unexpected("runner_destroyed"),
        },
    })
}

#[cfg(test)]
mod tests;
