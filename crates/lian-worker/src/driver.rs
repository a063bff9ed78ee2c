//! The driver: the only code that performs a build's effects. It folds the history, asks
//! `lifecycle::decide` what next, appends the events, runs the effect while heartbeating the
//! request, and feeds the outcome back, until the build ends.
//!
//! Single writer: every append says which history it extends (the stream sequence of the
//! build's last event, checked by the server on `lian.*.build.<id>.*`) and carries the
//! `Nats-Msg-Id` `<build>.<seq>`. Of two workers racing on one build, the second append is
//! refused and that worker stops without running another effect.
//!
//! Ownership (ADR lian-045): a worker runs an effect only while the history's last event is
//! its own append. A worker that takes a build over (a redelivery) first appends `resumed`
//! against the history it folded; before each effect it checks the history's head is still
//! where its last append left it. A worker that lost the build (another one resumed it
//! while it was stopped or cut off) finds out at that check or at its next append, and
//! stops without recording or running anything more.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use lian_bus::{After, Bus, BusError, Job};
use lian_core::event::Step;
use lian_core::lifecycle::{self, Effect, Outcome, State};
use lian_core::{BuildEvent, BuildId, Envelope, Workspace, subjects};
use lian_runner::{Providers, Registry};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::WorkerOptions;
use crate::intake::{self, Intake};

pub struct Worker {
    pub bus: Bus,
    /// This host's providers (the reaper and the warm pool look after its docker_local runners).
    pub providers: Providers,
    /// Every provider a build can name, as the effects call it.
    pub runners: Registry,
    pub options: WorkerOptions,
    pub stopping: Arc<AtomicBool>,
}

/// Attempts at an expired request (see `lian_bus::Bus::expired_requests`) before it is left.
const EXPIRED_TRIES: usize = 5;

/// Why the driver stopped before the build ended.
enum Stop {
    /// Another worker appended first: it owns the build now.
    LostRace,
    /// NATS or the runner could not be reached: hand the request back for a retry.
    Transient(String),
    /// The history cannot be folded: a bug or tampering, never retried.
    Impossible(String),
    /// This worker is shutting down.
    ShuttingDown,
}

/// A build's folded state and where its history ends in the stream.
struct History {
    build_id: BuildId,
    workspace: Workspace,
    state: State,
    last_sequence: u64,
    /// The history's last event is this worker's append: it owns the build.
    owned: bool,
}

impl Worker {
    pub async fn handle(self: &Arc<Self>, job: Job) {
        let (build_id, workspace, first) = match intake::read(&job, &self.options).await {
            Intake::Accepted { build_id, request } => {
                let ws = request.directives.workspace.clone();
                (build_id, ws, BuildEvent::Accepted { request })
            }
            Intake::Refused {
                build_id,
                workspace,
                reason,
            } => {
                tracing::warn!(%build_id, %reason, "request refused");
                self.dead_letter(&job, &build_id, &workspace, &reason).await;
                let failed = BuildEvent::Failed {
                    reason,
                    step: Some(Step::Validate),
                    layer: None,
                    cascade: None,
                    labels: Default::default(),
                };
                (build_id, workspace, failed)
            }
        };
        // Every line about this build, here and in its effects, carries its id and workspace,
        // so one build's lines can be pulled out of every worker's log.
        let span = tracing::info_span!("build", build_id = %build_id, workspace = %workspace);
        self.carry(job, build_id, workspace, first).instrument(span).await
    }

    /// Drives the build and settles its request.
    async fn carry(&self, job: Job, build_id: BuildId, workspace: Workspace, first: BuildEvent) {
        use backon::{ConstantBuilder, Retryable};
        // An expired request has no redelivery to fall back on: a hiccup is retried here.
        let every = ConstantBuilder::new()
            .with_delay(Duration::from_secs(2))
            .with_max_times(EXPIRED_TRIES - 1);
        let result = (|| self.drive(&job, &build_id, &workspace, first.clone()))
            .retry(every)
            .when(|stop| job.is_expired() && matches!(stop, Stop::Transient(_)))
            .await;
        let settle = match result {
            Ok(()) => job.ack().await,
            Err(Stop::LostRace) => {
                tracing::info!(%build_id, "another worker owns this build; leaving it");
                Ok(())
            }
            Err(Stop::ShuttingDown) => job.nak(Duration::ZERO).await,
            Err(Stop::Transient(why)) => {
                tracing::warn!(%build_id, %why, "build interrupted; handing it back to the queue");
                job.nak(Duration::from_secs(2)).await
            }
            Err(Stop::Impossible(why)) => {
                tracing::error!(%build_id, %why, "history cannot be folded; dropping the request");
                self.dead_letter(&job, &build_id, &workspace, &why).await;
                job.term().await
            }
        };
        if let Err(err) = settle {
            tracing::warn!(%build_id, %err, "cannot settle the request; it will be redelivered");
        }
    }

    async fn drive(&self, job: &Job, build_id: &BuildId, ws: &Workspace, first: BuildEvent) -> Result<(), Stop> {
        let mut h = self.load(build_id, ws).await?;
        if job.is_expired() && h.state.is_terminal() {
            // Its last worker ended it and died before settling the request.
            return Ok(());
        }
        if h.state.len == 0 {
            match self.append(&mut h, first).await {
                // Written first by someone else: a worker that took a redelivery, or the
                // cascade superseding a build nobody had taken. An ended build is done with.
                Err(Stop::LostRace) if self.load(build_id, ws).await?.state.is_terminal() => return Ok(()),
                other => other?,
            }
        } else if job.delivered() == 1 && !job.is_expired() && !h.state.is_terminal() {
            // A fresh delivery of a build with a history is a repeated submit of a build in
            // flight: its owner holds the original delivery.
            return Ok(());
        }
        let deliveries = job.delivered();
        // An expired request is never delivered again, whatever the count says.
        let last_chance = job.is_expired() || deliveries >= self.options.max_deliver;
        let mut outcome = None;
        loop {
            let decision = lifecycle::decide(&h.state, outcome.take(), OffsetDateTime::now_utc())
                .map_err(|e| Stop::Impossible(e.to_string()))?;
            for event in decision.events {
                self.append(&mut h, event).await?;
            }
            let Some(effect) = decision.effect else {
                if h.state.is_terminal() {
                    if last_chance {
                        self.dead_letter(job, build_id, ws, "see the build's failed event")
                            .await;
                    }
                    return Ok(());
                }
                continue;
            };
            if self.stopping.load(Ordering::SeqCst) {
                return Err(Stop::ShuttingDown);
            }
            // Safe point: nothing is in flight. Stop here if asked to, or if this is the
            // request's last delivery (bounded redelivery: the build ends now, as failed).
            // The fence and the cancel check are independent reads: both at once.
            let healthy = h.state.failure.is_none();
            let cancel_subject = subjects::cancel(&h.workspace, &h.build_id);
            let (owned, cancel) = tokio::join!(self.own(&mut h, deliveries), async {
                if healthy {
                    self.cancel_requested(&cancel_subject).await
                } else {
                    Ok(None)
                }
            });
            owned?;
            if healthy {
                if let Some(reason) = cancel? {
                    outcome = Some(failed(Step::Cancelled, format!("cancelled: {reason}")));
                    continue;
                }
                if last_chance {
                    let reason = format!(
                        "abandoned: the request was delivered {deliveries} times without the build finishing (last stopped before {}); resubmit once the cause is fixed",
                        effect.name()
                    );
                    outcome = Some(failed(Step::Abandoned, reason));
                    continue;
                }
            }
            let every = self.options.ack_wait / 3;
            let step = effect.step();
            let effect_name = effect.name();
            let state = &h.state;
            // A panic in an effect is this build's failure, not the worker's: it is retried
            // like a transient error, and the last delivery ends the build with it. A paused
            // failpoint is an effect that hangs: the worker heartbeats through it.
            let effect_run = std::panic::AssertUnwindSafe(async move {
                // Marks where the step's time starts in the log; its event says how it ended.
                tracing::info!("{} started", effect.name());
                self.failpoint(&effect).await;
                self.run_effect_fenced(state, effect).await
            })
            .catch_unwind();
            let span = tracing::info_span!("step", step = step.as_str(), effect = effect_name);
            let ran = heartbeat(job, every, effect_run)
                .instrument(span)
                .await
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    Err(format!("internal error in {}: {what}", step.as_str()))
                });
            match ran {
                Ok(o) => outcome = Some(o),
                Err(why) if last_chance && h.state.failure.is_none() => {
                    outcome = Some(failed(step, format!("abandoned after {deliveries} deliveries: {why}")));
                }
                Err(why) => return Err(Stop::Transient(why)),
            }
        }
    }

    /// Runs one effect, with the test failpoint `fail_at`. A destroy is retried with
    /// exponential backoff (1, 2, 4, 8 s); one that still fails (a busy mount, an engine that
    /// will not stop, a control plane away) is left to the reaper, which destroys the runners
    /// of ended builds, so the build can still end: every path ends with one terminal event.
    async fn run_effect_fenced(&self, state: &State, effect: Effect) -> Result<Outcome, String> {
        use backon::{ExponentialBuilder, Retryable};
        let failpoint = self.options.fail_at.as_deref() == Some(effect.name());
        let once = |effect: Effect| async move {
            if failpoint {
                return Err(format!("failpoint: {} fails", effect.name()));
            }
            self.run_effect(state, effect).await
        };
        if !matches!(effect, Effect::DestroyRunner { .. }) {
            return once(effect).await;
        }
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_secs(1))
            .with_max_times(4);
        let destroyed = (|| once(effect.clone()))
            .retry(backoff)
            .notify(|err, wait| tracing::warn!(%err, ?wait, "destroy failed; retrying"))
            .await;
        Ok(destroyed.unwrap_or_else(|err| {
            tracing::warn!(%err, "destroy kept failing; the runner is left to the reaper");
            Outcome::RunnerLeftToReaper {
                reason: format!("destroy failed 5 times ({err})"),
            }
        }))
    }

    async fn load(&self, build_id: &BuildId, ws: &Workspace) -> Result<History, Stop> {
        let records = self
            .bus
            .read_all(&subjects::build_history(build_id))
            .await
            .map_err(|e| Stop::Transient(e.to_string()))?;
        let mut envelopes = Vec::with_capacity(records.len());
        for record in &records {
            envelopes.push(
                record
                    .decode::<Envelope>()
                    .map_err(|e| Stop::Impossible(e.to_string()))?,
            );
        }
        let state = lifecycle::fold(&envelopes).map_err(|e| Stop::Impossible(e.to_string()))?;
        Ok(History {
            build_id: build_id.clone(),
            workspace: state.workspace.clone().unwrap_or_else(|| ws.clone()),
            state,
            last_sequence: records.last().map_or(0, |r| r.sequence),
            owned: false,
        })
    }

    /// The fence before an effect: claims a build taken over (`resumed`, appended against
    /// the folded history), then checks nobody appended since this worker's last append.
    async fn own(&self, h: &mut History, delivery: i64) -> Result<(), Stop> {
        if !h.owned {
            let delivery = u64::try_from(delivery).unwrap_or(0);
            self.append(h, BuildEvent::Resumed { delivery }).await?;
        }
        let head = self
            .bus
            .head(&subjects::build_history(&h.build_id))
            .await
            .map_err(|e| Stop::Transient(e.to_string()))?;
        if head != h.last_sequence {
            tracing::info!(build_id = %h.build_id, head, ours = h.last_sequence, "the history moved on: another worker owns this build");
            return Err(Stop::LostRace);
        }
        Ok(())
    }

    async fn append(&self, h: &mut History, event: BuildEvent) -> Result<(), Stop> {
        let envelope = Envelope {
            build_id: h.build_id.clone(),
            workspace: h.workspace.clone(),
            seq: h.state.len + 1,
            at: OffsetDateTime::now_utc(),
            worker: self.options.name.clone(),
            event,
        };
        let mut next = h.state.clone();
        next.apply(&envelope).map_err(|e| Stop::Impossible(e.to_string()))?;
        let subject = subjects::build_event(&h.workspace, &h.build_id, envelope.event.kind());
        let msg_id = format!("{}.{}", h.build_id, envelope.seq);
        let after = After {
            filter: subjects::build_history(&h.build_id),
            sequence: h.last_sequence,
        };
        let appended = match self.bus.append_after(&subject, &msg_id, &envelope, &after).await {
            Ok(a) if a.duplicate => return Err(Stop::LostRace),
            Ok(a) => a,
            Err(BusError::Conflict { .. }) => return Err(Stop::LostRace),
            Err(e) => return Err(Stop::Transient(e.to_string())),
        };
        h.state = next;
        h.last_sequence = appended.stream_sequence;
        h.owned = true;
        tracing::info!(build_id = %h.build_id, seq = envelope.seq, event = envelope.event.kind(), "{}", envelope.event.summary());
        Ok(())
    }

    async fn cancel_requested(&self, subject: &str) -> Result<Option<String>, Stop> {
        let record = self
            .bus
            .last_control(subject)
            .await
            .map_err(|e| Stop::Transient(e.to_string()))?;
        Ok(record.map(|r| {
            r.decode::<serde_json::Value>()
                .ok()
                .and_then(|v| v["reason"].as_str().map(String::from))
                .unwrap_or_else(|| "requested".into())
        }))
    }

    /// Test hook: `LIAN_FAILPOINT=pause_before:<effect>` stops this worker, forever, at the
    /// safe point before that effect, so a test can kill it there.
    async fn failpoint(&self, effect: &Effect) {
        if self.options.pause_before.as_deref() == Some(effect.name()) {
            tracing::warn!(effect = effect.name(), "failpoint: pausing before this effect");
            std::future::pending::<()>().await;
        }
    }

    async fn dead_letter(&self, job: &Job, build_id: &BuildId, ws: &Workspace, reason: &str) {
        let record = serde_json::json!({
            "build_id": build_id,
            "workspace": ws,
            "subject": job.subject(),
            "deliveries": job.delivered(),
            "reason": reason,
            "at": OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        });
        if let Err(err) = self.bus.record_dead_letter(build_id.as_str(), &record).await {
            tracing::warn!(%build_id, %err, "dead letter not recorded");
        }
    }
}

fn failed(step: Step, reason: String) -> Outcome {
    Outcome::StepFailed {
        step,
        reason,
        oom: false,
    }
}

/// Runs `work`, telling the queue every `every` that the request is still being worked on.
async fn heartbeat<T>(job: &Job, every: Duration, work: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                if let Err(err) = job.progress().await {
                    tracing::warn!(%err, "heartbeat failed");
                }
            }
        }
    }
}
