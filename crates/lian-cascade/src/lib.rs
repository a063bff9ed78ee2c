//! The cascade service: when a catalog layer's build completes, rebuild every layer built
//! on it, each only after all of its parents in this cascade completed. It folds the
//! cascade's history on every terminal build event, so any replica can carry on.

mod catalog;

pub use catalog::{LoadError, load_catalog};

use std::future::Future;
use std::path::PathBuf;

use lian_bus::{Bus, BusError, Job};
use lian_catalog::Catalog;
use lian_catalog::cascade::LayerStatus;
use lian_catalog::cascade::{self, CascadeEnvelope, CascadeEvent, CascadeState, Cause};
use lian_core::names::CascadeId;
use lian_core::{BuildDirectives, BuildEvent, BuildId, CascadeRef, Envelope, LayerName, Workspace, subjects};
use lian_nickel::{Contract, Schemas};
use time::OffsetDateTime;

#[derive(Debug, Clone)]
pub struct CascadeOptions {
    /// The catalog directory: one sub-directory per layer, each with `workflow.ncl`,
    /// `build_directives.ncl` and the layer's build context.
    pub catalog_dir: PathBuf,
    pub schemas: Schemas,
    pub gate: Gate,
}

/// The cascade gate: a cascade planning more layers, or expected to take longer, than this
/// waits for `lian cascade approve <id>` (or, with `refuse`, is refused).
#[derive(Debug, Clone, Default)]
pub struct Gate {
    pub max_layers: Option<usize>,
    /// Expected wall time (P50, from recorded builds) in minutes.
    pub max_minutes: Option<f64>,
    pub refuse: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CascadeServiceError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Catalog(#[from] LoadError),
    #[error("the stream of terminal build events ended (NATS closed the subscription)")]
    StreamEnded,
}

/// One cascade being advanced because of one build's end: every event appended carries
/// that build as its cause.
struct Turn<'a> {
    id: &'a CascadeId,
    ws: &'a Workspace,
    /// `None` when a person moved it (an approval).
    cause: Option<&'a Cause>,
}

struct Service {
    bus: Bus,
    catalog: Catalog,
    options: CascadeOptions,
}

/// What `plan` will cost, from the fleet's recorded builds of each layer (`lian-metrics`),
/// on `parallelism` workers (default: those the fleet has now, idle or building): what
/// `lian catalog plan --estimate` prints and the gate's minute limit reads.
pub async fn estimate_plan(
    bus: &Bus,
    catalog: &Catalog,
    plan: &[LayerName],
    parallelism: Option<usize>,
) -> Result<lian_catalog::estimate::Estimate, BusError> {
    let mut history: std::collections::BTreeMap<LayerName, Vec<lian_catalog::estimate::Sample>> = Default::default();
    for record in bus.layer_metrics().await? {
        let Some(layer) = record.layer else { continue };
        history.entry(layer).or_default().push(lian_catalog::estimate::Sample {
            runner_type: record.runner_type.map(|t| t.as_str().to_string()).unwrap_or_default(),
            seconds: record.duration_ms as f64 / 1000.0,
            at: record.at,
        });
    }
    let parallelism = match parallelism {
        Some(n) => n,
        None => {
            let depth = bus.queue_depth().await?;
            (depth.idle_pulls + depth.in_flight).max(1) as usize
        }
    };
    Ok(lian_catalog::estimate::estimate(catalog, plan, &history, parallelism))
}

/// Serves terminal build events until `shutdown` resolves.
pub async fn run(
    bus: Bus,
    options: CascadeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CascadeServiceError> {
    let dir = options.catalog_dir.clone();
    let schemas = options.schemas.clone();
    let catalog = tokio::task::spawn_blocking(move || load_catalog(&dir, &schemas))
        .await
        .expect("catalog loading does not panic")?;
    let service = Service {
        bus: bus.clone(),
        catalog,
        options,
    };
    let mut jobs = bus.terminal_build_events().await?;
    tracing::info!(catalog = %service.options.catalog_dir.display(), "cascade serving");
    tokio::pin!(shutdown);
    loop {
        let job = tokio::select! {
            () = &mut shutdown => break,
            job = jobs.next() => job,
        };
        // A stream that ends is not retried here: the service stops with an error, and its
        // supervisor starts it again on a fresh subscription.
        let job = match job {
            Some(Ok(job)) => job,
            Some(Err(err)) => {
                tracing::warn!(%err, "cannot take a terminal build event");
                continue;
            }
            None => return Err(CascadeServiceError::StreamEnded),
        };
        // One span per event handled, so a build's lines across worker, control plane and
        // cascade can be pulled out by its id (`--log-format json`).
        let tokens: Vec<&str> = job.subject().split('.').collect();
        let span = tracing::info_span!(
            "cascade",
            workspace = tokens.get(1).copied().unwrap_or_default(),
            build_id = tracing::field::Empty,
            cascade_id = tracing::field::Empty,
            layer = tracing::field::Empty,
        );
        if tokens.get(2) == Some(&"build") {
            span.record("build_id", tokens.get(3).copied().unwrap_or_default());
        }
        match tracing::Instrument::instrument(service.handle(&job), span).await {
            Ok(()) => {
                let _ = job.ack().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cascade step interrupted; retrying");
                let _ = job.nak(std::time::Duration::from_secs(1)).await;
            }
        }
    }
    Ok(())
}

impl Service {
    async fn handle(&self, job: &Job) -> Result<(), BusError> {
        if job.subject().ends_with(".approved") {
            return self.approved(job).await;
        }
        let Ok(envelope) = job.record().decode::<Envelope>() else {
            tracing::warn!(subject = job.subject(), "not a build event; ignored");
            return Ok(());
        };
        let (layer, cascade_ref, ok, reason) = match &envelope.event {
            BuildEvent::Completed { layer, cascade, .. } => (layer, cascade, true, String::new()),
            BuildEvent::Failed {
                layer, cascade, reason, ..
            } => (layer, cascade, false, reason.clone()),
            _ => return Ok(()),
        };
        let Some(layer) = layer else { return Ok(()) };
        let unchanged = self.record_image(&envelope, layer).await?;
        let (id, root_started) = match cascade_ref {
            Some(c) => (c.id.clone(), None),
            // A catalog layer built on its own starts a cascade; a failed one does not.
            None if ok && self.catalog.get(layer.as_str()).is_ok() => {
                let id = CascadeId::rooted_at(&envelope.build_id);
                let plan = self.catalog.plan(layer.as_str()).expect("layer is in the catalog");
                (
                    id,
                    Some(CascadeEvent::Started {
                        root: layer.clone(),
                        root_build: envelope.build_id.clone(),
                        plan,
                        root_unchanged: unchanged,
                    }),
                )
            }
            None => return Ok(()),
        };
        let cause = Cause {
            layer: layer.clone(),
            build_id: envelope.build_id.clone(),
        };
        let span = tracing::Span::current();
        span.record("cascade_id", id.as_str());
        span.record("layer", layer.as_str());
        let turn = Turn {
            id: &id,
            ws: &envelope.workspace,
            cause: Some(&cause),
        };
        let (mut state, mut seq) = self.fold(&id).await?;
        let redelivered = job.delivered() > 1;
        if let Some(started) = root_started {
            if state.root.is_none() {
                self.append(&mut state, &mut seq, &turn, started).await?;
                if let Some(held) = self.gate(&state).await? {
                    self.append(&mut state, &mut seq, &turn, held).await?;
                }
            }
        } else if let Some(LayerStatus::Requested(build)) = state.layers.get(layer) {
            let build = build.clone();
            let event = if ok {
                CascadeEvent::LayerCompleted {
                    layer: layer.clone(),
                    build_id: build,
                    unchanged,
                }
            } else {
                CascadeEvent::LayerFailed {
                    layer: layer.clone(),
                    build_id: build,
                    reason: reason.clone(),
                }
            };
            self.append(&mut state, &mut seq, &turn, event).await?;
        }
        if redelivered {
            self.republish(&mut state, &mut seq, &turn).await?;
        }
        self.advance(&mut state, &mut seq, &turn).await?;
        if cascade_ref.is_some() {
            self.tell_followers(&envelope, layer, ok, &reason, unchanged, &cause, redelivered)
                .await?;
        }
        Ok(())
    }

    /// Whether a cascade just started is over the gate's limits: the event that holds it
    /// (`awaiting_approval`, or `refused`), or `None` to go on.
    async fn gate(&self, state: &CascadeState) -> Result<Option<CascadeEvent>, BusError> {
        let gate = &self.options.gate;
        if state.root_unchanged || state.plan.is_empty() || (gate.max_layers.is_none() && gate.max_minutes.is_none()) {
            return Ok(None);
        }
        let layers = state.plan.len();
        let minutes = match gate.max_minutes {
            Some(_) => Some(self.expected_minutes(&state.plan).await?),
            None => None,
        };
        let over = match (gate.max_layers, gate.max_minutes, minutes) {
            (Some(max), _, _) if layers > max => format!("{layers} layers, over the limit of {max}"),
            (_, Some(max), Some(m)) if m > max => format!("about {m:.0} min, over the limit of {max} min"),
            _ => return Ok(None),
        };
        Ok(Some(if gate.refuse {
            CascadeEvent::Refused { over }
        } else {
            CascadeEvent::AwaitingApproval { layers, minutes, over }
        }))
    }

    /// The plan's expected wall time (P50) from the fleet's recorded builds, on the
    /// workers it has now.
    async fn expected_minutes(&self, plan: &[LayerName]) -> Result<f64, BusError> {
        let estimate = estimate_plan(&self.bus, &self.catalog, plan, None).await?;
        Ok(estimate.wall_p50_secs / 60.0)
    }

    /// `lian cascade approve` appended `approved` to a waiting cascade: go on with it.
    async fn approved(&self, job: &Job) -> Result<(), BusError> {
        let Ok(envelope) = job.record().decode::<CascadeEnvelope>() else {
            tracing::warn!(subject = job.subject(), "not a cascade event; ignored");
            return Ok(());
        };
        let id = envelope.cascade_id;
        tracing::Span::current().record("cascade_id", id.as_str());
        let turn = Turn {
            id: &id,
            ws: &envelope.workspace,
            cause: None,
        };
        let (mut state, mut seq) = self.fold(&id).await?;
        if job.delivered() > 1 {
            self.republish(&mut state, &mut seq, &turn).await?;
        }
        self.advance(&mut state, &mut seq, &turn).await
    }

    /// The previous attempt may have recorded a request it did not get to publish; requests
    /// are deduplicated by build id, so publishing again is safe.
    async fn republish(&self, state: &mut CascadeState, seq: &mut u32, turn: &Turn<'_>) -> Result<(), BusError> {
        let pending: Vec<LayerName> = state
            .plan
            .iter()
            .filter(|l| state.build_of(l).is_some())
            .cloned()
            .collect();
        for l in pending {
            self.request_layer(state, seq, turn, &l).await?;
        }
        Ok(())
    }

    /// Coalescing, the other half: cascades whose build of `layer` this build superseded take
    /// its end as the end of theirs, and go on.
    #[allow(clippy::too_many_arguments)]
    async fn tell_followers(
        &self,
        envelope: &Envelope,
        layer: &LayerName,
        ok: bool,
        reason: &str,
        unchanged: bool,
        cause: &Cause,
        redelivered: bool,
    ) -> Result<(), BusError> {
        for follower in self.bus.followers(envelope.build_id.as_str()).await? {
            let Ok(id) = CascadeId::new(follower.as_str()) else {
                continue;
            };
            let turn = Turn {
                id: &id,
                ws: &envelope.workspace,
                cause: Some(cause),
            };
            let (mut state, mut seq) = self.fold(&id).await?;
            if matches!(state.layers.get(layer), Some(LayerStatus::Superseded(by)) if *by == envelope.build_id) {
                let build_id = envelope.build_id.clone();
                let event = if ok {
                    CascadeEvent::LayerCompleted {
                        layer: layer.clone(),
                        build_id,
                        unchanged,
                    }
                } else {
                    CascadeEvent::LayerFailed {
                        layer: layer.clone(),
                        build_id,
                        reason: reason.to_string(),
                    }
                };
                self.append(&mut state, &mut seq, &turn, event).await?;
            }
            if redelivered {
                self.republish(&mut state, &mut seq, &turn).await?;
            }
            self.advance(&mut state, &mut seq, &turn).await?;
        }
        Ok(())
    }

    /// Coalescing: before asking for `build` of `layer`, supersede the layer's build asked for
    /// last in this workspace if no worker took it yet; the cascades that waited on it (its
    /// own, and any it had superseded) now wait on `build`.
    async fn coalesce(&self, turn: &Turn<'_>, layer: &LayerName, build: &BuildId) -> Result<(), BusError> {
        let ws = turn.ws.as_str();
        if let Some(queued) = self.bus.queued_layer(ws, layer.as_str()).await?
            && queued.build_id != build.as_str()
            && let (Ok(old), Ok(old_cascade)) = (
                BuildId::new(queued.build_id.as_str()),
                CascadeId::new(queued.cascade_id.as_str()),
            )
            && self.supersede(turn.ws, &old, &old_cascade, layer, build).await?
        {
            let mut moved = self.bus.followers(old.as_str()).await?;
            moved.push(old_cascade.to_string());
            for follower in self.bus.add_followers(build.as_str(), &moved).await? {
                let Ok(id) = CascadeId::new(follower.as_str()) else {
                    continue;
                };
                let (mut state, mut seq) = self.fold(&id).await?;
                let waiting = match state.layers.get(layer) {
                    Some(LayerStatus::Requested(b)) => b == &old,
                    Some(LayerStatus::Superseded(b)) => b != build,
                    _ => false,
                };
                if waiting {
                    let follower_turn = Turn { id: &id, ..*turn };
                    let event = CascadeEvent::LayerSuperseded {
                        layer: layer.clone(),
                        by: build.clone(),
                    };
                    self.append(&mut state, &mut seq, &follower_turn, event).await?;
                }
            }
        }
        let queued = lian_bus::QueuedLayer {
            build_id: build.to_string(),
            cascade_id: turn.id.to_string(),
        };
        self.bus.set_queued_layer(ws, layer.as_str(), &queued).await
    }

    /// Ends `old` as superseded by `by` if no worker took it: the event is appended against
    /// an empty history, so of the cascade and a worker taking the request, one wins. `true`
    /// when `old` is (now, or already was) superseded by `by`.
    async fn supersede(
        &self,
        ws: &Workspace,
        old: &BuildId,
        old_cascade: &CascadeId,
        layer: &LayerName,
        by: &BuildId,
    ) -> Result<bool, BusError> {
        let (old_state, _) = self.fold(old_cascade).await?;
        let Some(root) = old_state.root else {
            return Ok(false);
        };
        let envelope = Envelope {
            build_id: old.clone(),
            workspace: ws.clone(),
            seq: 1,
            at: OffsetDateTime::now_utc(),
            worker: "cascade".into(),
            event: BuildEvent::Superseded {
                by: by.clone(),
                layer: Some(layer.clone()),
                cascade: Some(CascadeRef {
                    id: old_cascade.clone(),
                    root,
                }),
            },
        };
        let empty = lian_bus::After {
            filter: subjects::build_history(old),
            sequence: 0,
        };
        let subject = subjects::build_event(ws, old, "superseded");
        match self
            .bus
            .append_after(&subject, &format!("{old}.1"), &envelope, &empty)
            .await
        {
            Ok(_) => {
                tracing::info!(build_id = %old, %by, "superseded a queued build");
                Ok(true)
            }
            Err(BusError::Conflict { .. }) => {
                // Taken by a worker, or superseded by us earlier (past the dedup window).
                let first = self.bus.build_history(old).await?.into_iter().next();
                Ok(matches!(first.map(|e| e.event), Some(BuildEvent::Superseded { by: b, .. }) if &b == by))
            }
            Err(e) => Err(e),
        }
    }

    /// Records a completed build of a catalog layer as the layer's latest image; whether
    /// it came out as the layer's previous image (early cutoff). `false` for anything else.
    async fn record_image(&self, envelope: &Envelope, layer: &LayerName) -> Result<bool, BusError> {
        let BuildEvent::Completed {
            image,
            image_id,
            cache,
            cascade,
            ..
        } = &envelope.event
        else {
            return Ok(false);
        };
        if self.catalog.get(layer.as_str()).is_err() {
            return Ok(false);
        }
        let record = self
            .bus
            .record_layer_image(lian_bus::LayerImage {
                layer: layer.to_string(),
                build_id: envelope.build_id.to_string(),
                image: image.to_string(),
                image_id: image_id.clone(),
                previous_image_id: None,
                pinned: cache.as_ref().and_then(|c| c.pinned.clone()),
                cascade_id: cascade.as_ref().map(|c| c.id.to_string()),
                at: envelope.at.unix_timestamp(),
            })
            .await?;
        Ok(record.unchanged())
    }

    /// Appends what `decide` proposes and publishes the requested builds, until quiet.
    async fn advance(&self, state: &mut CascadeState, seq: &mut u32, turn: &Turn<'_>) -> Result<(), BusError> {
        loop {
            let events = cascade::decide(state, &self.catalog, turn.id);
            if events.is_empty() {
                return Ok(());
            }
            for event in events {
                let requested = match &event {
                    CascadeEvent::LayerRequested { layer, .. } => Some(layer.clone()),
                    _ => None,
                };
                if matches!(event, CascadeEvent::Completed { .. }) {
                    // Before the end is recorded: a handler run again after a crash between
                    // the two writes the same lock again, and then the end.
                    self.lock(state, turn.id).await?;
                }
                self.append(state, seq, turn, event).await?;
                if let Some(layer) = requested {
                    self.request_layer(state, seq, turn, &layer).await?;
                }
            }
        }
    }

    /// The catalog lock takes every layer this cascade completed (the root too), as the
    /// layers' latest images say, in one write.
    async fn lock(&self, state: &CascadeState, id: &CascadeId) -> Result<(), BusError> {
        let completed = state.root.iter().chain(
            state
                .layers
                .iter()
                .filter(|(_, s)| matches!(s, LayerStatus::Completed { .. }))
                .map(|(l, _)| l),
        );
        let mut images = Vec::new();
        for layer in completed {
            if let Some(image) = self.bus.layer_image(layer.as_str()).await? {
                images.push(image);
            }
        }
        let lock = self
            .bus
            .lock_layers(id.as_str(), OffsetDateTime::now_utc().unix_timestamp(), images)
            .await?;
        tracing::info!(cascade = %id, layers = lock.layers.len(), "catalog lock written");
        Ok(())
    }

    /// The parents of `layer` by digest, as their latest builds pushed them (this cascade's,
    /// or the lock's for parents it did not rebuild): the image the Dockerfile names ->
    /// `<ns>/<repo>@sha256:…`.
    async fn pins(&self, layer: &LayerName) -> Result<std::collections::BTreeMap<String, String>, BusError> {
        let mut pins = std::collections::BTreeMap::new();
        let Ok(spec) = self.catalog.get(layer.as_str()) else {
            return Ok(pins);
        };
        for parent in spec.parents() {
            if let Some(image) = self.bus.layer_image(parent.as_str()).await?
                && let Some(pinned) = image.pinned
            {
                pins.insert(image.image, pinned);
            }
        }
        Ok(pins)
    }

    /// Publishes the build of one layer; a layer whose directives cannot be read fails in
    /// the cascade with the reason, and blocks its branch.
    async fn request_layer(
        &self,
        state: &mut CascadeState,
        seq: &mut u32,
        turn: &Turn<'_>,
        layer: &LayerName,
    ) -> Result<(), BusError> {
        let build_id = state.build_of(layer).cloned().expect("requested before published");
        self.coalesce(turn, layer, &build_id).await?;
        let dir = self.options.catalog_dir.join(layer.as_str());
        let schemas = self.options.schemas.clone();
        let directives_path = dir.join("build_directives.ncl");
        let directives = tokio::task::spawn_blocking(move || {
            schemas.eval_file::<BuildDirectives>(&directives_path, Contract::BuildDirectives)
        })
        .await
        .expect("nickel evaluation does not panic");
        let directives = match directives {
            Ok(d) => d,
            Err(e) => {
                let event = CascadeEvent::LayerFailed {
                    layer: layer.clone(),
                    build_id,
                    reason: format!("cannot read {layer}/build_directives.ncl: {}", e.summary()),
                };
                return self.append(state, seq, turn, event).await;
            }
        };
        let root = state.root.clone().expect("a started cascade");
        let cascade = Some(CascadeRef {
            id: turn.id.clone(),
            root,
        });
        match self
            .bus
            .submit_dir(
                &dir,
                directives,
                lian_bus::Lineage {
                    layer: Some(layer.clone()),
                    cascade,
                    parents: self.pins(layer).await?,
                },
                &build_id,
                lian_bus::Upload {
                    limits: &Default::default(),
                    progress: &mut |_| {},
                },
            )
            .await
        {
            Ok(_) => Ok(()),
            // NATS trouble is retried by redelivery; anything else is this layer's failure.
            Err(e @ BusError::Nats { .. }) => Err(e),
            Err(e) => {
                let event = CascadeEvent::LayerFailed {
                    layer: layer.clone(),
                    build_id,
                    reason: e.to_string(),
                };
                self.append(state, seq, turn, event).await
            }
        }
    }

    async fn fold(&self, id: &CascadeId) -> Result<(CascadeState, u32), BusError> {
        let records = self.bus.read_all(&subjects::cascade_history(id)).await?;
        let mut events = Vec::with_capacity(records.len());
        for r in &records {
            events.push(r.decode::<CascadeEnvelope>()?.event);
        }
        let state = cascade::fold(&events).map_err(|e| BusError::Nats {
            op: "fold cascade",
            message: e.to_string(),
        })?;
        let seq = state.len;
        Ok((state, seq))
    }

    async fn append(
        &self,
        state: &mut CascadeState,
        seq: &mut u32,
        turn: &Turn<'_>,
        event: CascadeEvent,
    ) -> Result<(), BusError> {
        state.apply(&event).map_err(|e| BusError::Nats {
            op: "cascade",
            message: e.to_string(),
        })?;
        *seq += 1;
        let id = turn.id;
        let subject = subjects::cascade_event(turn.ws, id, event.kind());
        let envelope = CascadeEnvelope {
            cascade_id: id.clone(),
            workspace: turn.ws.clone(),
            seq: *seq,
            at: OffsetDateTime::now_utc(),
            cause: turn.cause.cloned(),
            event,
        };
        self.bus.append(&subject, &format!("{id}.{}", *seq), &envelope).await?;
        tracing::info!(cascade = %id, "{}", envelope.event.summary());
        Ok(())
    }
}
