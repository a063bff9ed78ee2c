//! The driver: the only code that performs a build's effects. It folds the history, asks
//! `lifecycle::decide` what next, appends the events (deduplicated by `<build>.<seq>`, so of
//! two workers racing on one build only one writes), runs the effect while heartbeating the
//! request, and feeds the outcome back, until the build ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lian_bus::{Bus, Job};
use lian_core::event::Step;
use lian_core::lifecycle::{self, State};
use lian_core::{BuildEvent, BuildId, Envelope, Workspace, subjects};
use lian_runner::Providers;
use time::OffsetDateTime;

use crate::WorkerOptions;
use crate::intake::{self, Intake};

pub struct Worker {
    pub bus: Bus,
    pub providers: Providers,
    pub options: WorkerOptions,
    pub stopping: Arc<AtomicBool>,
}

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

impl Worker {
    pub async fn handle(self: &Arc<Self>, job: Job) {
        let (build_id, workspace, first) = match intake::read(&job, &self.options.schemas).await {
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
        let result = self.drive(&job, &build_id, &workspace, first).await;
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
                job.term().await
            }
        };
        if let Err(err) = settle {
            tracing::warn!(%build_id, %err, "cannot settle the request; it will be redelivered");
        }
    }

    async fn drive(
        &self,
        job: &Job,
        build_id: &BuildId,
        ws: &Workspace,
        first: BuildEvent,
    ) -> Result<(), Stop> {
        let history = self
            .bus
            .read_all(&subjects::build_history(build_id))
            .await
            .map_err(|e| Stop::Transient(e.to_string()))?;
        let mut envelopes = Vec::with_capacity(history.len());
        for record in &history {
            envelopes.push(
                record
                    .decode::<Envelope>()
                    .map_err(|e| Stop::Impossible(e.to_string()))?,
            );
        }
        let mut state = lifecycle::fold(&envelopes).map_err(|e| Stop::Impossible(e.to_string()))?;
        if state.len == 0 {
            self.append(&mut state, build_id, ws, first).await?;
        } else if job.delivered() == 1 && !state.is_terminal() {
            // A fresh delivery of a build with a history is a duplicate submit of a build in
            // flight: its owner holds the original delivery.
            return Ok(());
        }
        let mut outcome = None;
        loop {
            let decision = lifecycle::decide(&state, outcome.take(), OffsetDateTime::now_utc())
                .map_err(|e| Stop::Impossible(e.to_string()))?;
            for event in decision.events {
                self.append(&mut state, build_id, ws, event).await?;
            }
            let Some(effect) = decision.effect else {
                if state.is_terminal() {
                    return Ok(());
                }
                continue;
            };
            if self.stopping.load(Ordering::SeqCst) {
                return Err(Stop::ShuttingDown);
            }
            let every = self.options.ack_wait / 3;
            let run = self.run_effect(&state, effect);
            outcome = Some(heartbeat(job, every, run).await.map_err(Stop::Transient)?);
        }
    }

    async fn append(
        &self,
        state: &mut State,
        build_id: &BuildId,
        ws: &Workspace,
        event: BuildEvent,
    ) -> Result<(), Stop> {
        let envelope = Envelope {
            build_id: build_id.clone(),
            workspace: ws.clone(),
            seq: state.len + 1,
            at: OffsetDateTime::now_utc(),
            worker: self.options.name.clone(),
            event,
        };
        state
            .apply(&envelope)
            .map_err(|e| Stop::Impossible(e.to_string()))?;
        let subject = subjects::build_event(ws, build_id, envelope.event.kind());
        let msg_id = format!("{build_id}.{}", envelope.seq);
        let appended = self
            .bus
            .append(&subject, &msg_id, &envelope)
            .await
            .map_err(|e| Stop::Transient(e.to_string()))?;
        if appended.duplicate {
            return Err(Stop::LostRace);
        }
        tracing::info!(%build_id, seq = envelope.seq, event = envelope.event.kind(), "{}", envelope.event.summary());
        Ok(())
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
