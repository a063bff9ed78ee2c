//! What the web view shows, kept up to date from `lian.>`: one row per build (its state and
//! figures), the latest build of every catalog layer, BuildKit's progress lines, and the
//! workers seen. Fed by one ordered consumer over the stored build and cascade events
//! (history first, then live) and a core subscription to progress; every change is also
//! sent to the browsers watching (server-sent events).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::RwLock;
use std::time::Duration;

use futures::StreamExt;
use lian_bus::Bus;
use lian_catalog::cascade::{CascadeEnvelope, CascadeEvent};
use lian_core::{BuildEvent, Envelope, subjects};
use lian_runner::progress::{StepProgress, StepState};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// Progress lines kept per build, and builds whose progress is kept.
const PROGRESS_LINES: usize = 40;
const PROGRESS_BUILDS: usize = 200;
/// Builds kept in memory; past it the oldest ended ones are forgotten (their histories stay
/// in JetStream and their pages still read them).
const MAX_BUILDS: usize = 20_000;

/// Where a build is, as a word a page can show and colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    /// Requested by a cascade, not yet taken by a worker.
    Queued,
    Running,
    Completed,
    Failed,
    /// Never built: a newer build of its layer was asked for before a worker took it.
    Superseded,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Superseded => "superseded",
        }
    }

    pub const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Superseded,
    ];
}

/// A layer's node colour: the state of its latest build, or why it has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    /// Never built while this control plane has been watching (and not in the history).
    Idle,
    Queued,
    Running,
    Done,
    Failed,
    /// Not rebuilt: every layer it is built on came out unchanged (early cutoff).
    CutOff,
    /// Not built: a layer it is built on failed in the same cascade.
    Blocked,
}

impl LayerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::CutOff => "cut_off",
            Self::Blocked => "blocked",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildRow {
    pub id: String,
    pub workspace: String,
    pub layer: Option<String>,
    pub cascade: Option<String>,
    pub state: BuildState,
    /// The kind of the last event (`image_built`, ...), or `requested`.
    pub step: String,
    #[serde(with = "time::serde::rfc3339")]
    pub first_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_at: OffsetDateTime,
    pub runner_type: Option<String>,
    pub image_id: Option<String>,
    /// The image pushed, by digest: what the catalog lock records for its layer.
    pub pinned: Option<String>,
    /// Dockerfile steps served from cache, of steps.
    pub cache: Option<(u32, u32)>,
    pub reason: Option<String>,
    /// A newer build of the same layer that overtook this one while it had not ended: the
    /// layer's node follows the newer one (this one still runs to its own end).
    pub superseded_by: Option<String>,
    pub worker: String,
    /// Order of first sighting: newest builds list first.
    pub seen: u64,
}

impl BuildRow {
    /// A build first seen at `at`, running, with nothing known of it yet.
    fn new(id: &str, workspace: &str, at: OffsetDateTime, seen: u64) -> Self {
        Self {
            id: id.to_string(),
            workspace: workspace.to_string(),
            layer: None,
            cascade: None,
            state: BuildState::Running,
            step: String::new(),
            first_at: at,
            last_at: at,
            runner_type: None,
            image_id: None,
            pinned: None,
            cache: None,
            reason: None,
            superseded_by: None,
            worker: String::new(),
            seen,
        }
    }

    pub fn ended(&self) -> bool {
        matches!(
            self.state,
            BuildState::Completed | BuildState::Failed | BuildState::Superseded
        )
    }

    /// From the first event to the last one (to now, while it runs).
    pub fn duration(&self, now: OffsetDateTime) -> Duration {
        let end = if self.ended() { self.last_at } else { now };
        (end - self.first_at).try_into().unwrap_or_default()
    }
}

/// The last completed build of a layer: what its node says about the image.
#[derive(Debug, Clone, Serialize)]
pub struct Built {
    pub build_id: String,
    pub image_id: String,
    /// The pushed image by digest (what a cascade pins its children to, and the lock records).
    pub pinned: Option<String>,
    pub duration_ms: u64,
    pub cache: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Default)]
struct LayerMark {
    /// The layer's latest build, or `None` when the latest news is that it was not built
    /// (`unbuilt` says why: cut off or blocked).
    build: Option<String>,
    unbuilt: Option<LayerState>,
    at: Option<OffsetDateTime>,
    built: Option<Built>,
}

/// One layer as a node shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerView {
    pub state: LayerState,
    pub build: Option<String>,
    /// The running build's last event.
    pub step: Option<String>,
    pub built: Option<Built>,
}

/// A change, as sent to browsers: enough to know what to redraw.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub build: Option<String>,
    pub layer: Option<String>,
    pub state: String,
}

#[derive(Default)]
struct Model {
    builds: HashMap<String, BuildRow>,
    layers: HashMap<String, LayerMark>,
    progress: HashMap<String, VecDeque<String>>,
    progress_order: VecDeque<String>,
    /// Worker name -> its last event.
    workers: BTreeMap<String, OffsetDateTime>,
    seen: u64,
    /// Stored events applied (history and live).
    events: u64,
    /// Cascades held by the gate, by id, until approved, refused or ended.
    gates: BTreeMap<String, Gate>,
}

/// A cascade over the gate's limit, waiting for `lian cascade approve <id>`.
#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub cascade: String,
    pub workspace: String,
    pub layers: usize,
    /// Expected wall time at P50, when the fleet has recorded builds.
    pub minutes: Option<f64>,
    /// Which limit it is over, in words.
    pub over: String,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

pub struct Live {
    model: RwLock<Model>,
    changes: broadcast::Sender<Change>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            model: RwLock::default(),
            changes: broadcast::channel(1024).0,
        }
    }
}

fn short_error(err: impl std::fmt::Display) -> String {
    err.to_string()
}

impl Live {
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Follows the stored events and the progress notices until the task is dropped;
    /// reconnects (and reads the history again: applying an event twice changes nothing)
    /// when NATS goes away.
    pub async fn feed(&self, bus: Bus) {
        loop {
            if let Err(err) = self.feed_once(&bus).await {
                tracing::warn!(%err, "web view: following lian.> failed; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn feed_once(&self, bus: &Bus) -> Result<(), String> {
        let mut events = Box::pin(
            bus.follow_many(&[subjects::ALL_BUILD_EVENTS, subjects::ALL_CASCADE_EVENTS])
                .await
                .map_err(short_error)?,
        );
        let mut progress = bus.subscribe(subjects::ALL_PROGRESS).await.map_err(short_error)?;
        loop {
            tokio::select! {
                record = events.next() => {
                    let Some(record) = record else { return Err("the event stream ended".into()) };
                    let record = record.map_err(short_error)?;
                    self.apply_stored(&record.subject, &record.payload);
                }
                msg = progress.next() => {
                    let Some(msg) = msg else { return Err("the progress subscription ended".into()) };
                    self.apply_progress(msg.subject.as_str(), &msg.payload);
                }
            }
        }
    }

    /// One stored message on `lian.<ws>.build|cascade.<id>.<kind>`.
    pub fn apply_stored(&self, subject: &str, payload: &[u8]) {
        let change = if subject.split('.').nth(2) == Some("cascade") {
            match serde_json::from_slice::<CascadeEnvelope>(payload) {
                Ok(e) => self.apply_cascade(&e),
                Err(err) => {
                    tracing::debug!(%subject, %err, "web view: unreadable cascade event");
                    None
                }
            }
        } else {
            match serde_json::from_slice::<Envelope>(payload) {
                Ok(e) => Some(self.apply_build(&e)),
                Err(err) => {
                    tracing::debug!(%subject, %err, "web view: unreadable build event");
                    None
                }
            }
        };
        if let Some(change) = change {
            // Nobody watching is not an error.
            let _ = self.changes.send(change);
        }
    }

    fn apply_cascade(&self, e: &CascadeEnvelope) -> Option<Change> {
        let mut m = self.model.write().expect("web model lock");
        m.events += 1;
        match &e.event {
            CascadeEvent::LayerRequested { layer, build_id } => {
                let id = build_id.to_string();
                let seen = m.next_seen();
                m.builds.entry(id.clone()).or_insert_with(|| BuildRow {
                    layer: Some(layer.to_string()),
                    cascade: Some(e.cascade_id.to_string()),
                    state: BuildState::Queued,
                    step: "requested".into(),
                    ..BuildRow::new(&id, e.workspace.as_str(), e.at, seen)
                });
                m.mark_layer(layer.as_str(), Ok(&id), e.at);
                let state = m.builds[&id].state.as_str().to_string();
                Some(Change {
                    build: Some(id),
                    layer: Some(layer.to_string()),
                    state,
                })
            }
            CascadeEvent::AwaitingApproval { layers, minutes, over } => {
                let cascade = e.cascade_id.to_string();
                m.gates.insert(
                    cascade.clone(),
                    Gate {
                        cascade,
                        workspace: e.workspace.to_string(),
                        layers: *layers,
                        minutes: *minutes,
                        over: over.clone(),
                        since: e.at,
                    },
                );
                Some(Change {
                    build: None,
                    layer: None,
                    state: "awaiting_approval".into(),
                })
            }
            CascadeEvent::Approved { .. }
            | CascadeEvent::Refused { .. }
            | CascadeEvent::Completed { .. }
            | CascadeEvent::Failed { .. } => m.gates.remove(e.cascade_id.as_str()).map(|_| Change {
                build: None,
                layer: None,
                state: e.event.kind().into(),
            }),
            CascadeEvent::LayerBlocked { layer, .. } | CascadeEvent::LayerCutOff { layer, .. } => {
                let why = match &e.event {
                    CascadeEvent::LayerBlocked { .. } => LayerState::Blocked,
                    _ => LayerState::CutOff,
                };
                m.mark_layer(layer.as_str(), Err(why), e.at);
                Some(Change {
                    build: None,
                    layer: Some(layer.to_string()),
                    state: why.as_str().into(),
                })
            }
            _ => None,
        }
    }

    fn apply_build(&self, e: &Envelope) -> Change {
        let mut m = self.model.write().expect("web model lock");
        m.events += 1;
        let id = e.build_id.to_string();
        if !m.builds.contains_key(&id) {
            let seen = m.next_seen();
            m.builds
                .insert(id.clone(), BuildRow::new(&id, e.workspace.as_str(), e.at, seen));
            m.forget_old_builds();
        }
        let worker_seen = m.workers.entry(e.worker.clone()).or_insert(e.at);
        *worker_seen = (*worker_seen).max(e.at);
        let row = m.builds.get_mut(&id).expect("inserted above");
        row.first_at = row.first_at.min(e.at);
        row.last_at = row.last_at.max(e.at);
        row.worker.clone_from(&e.worker);
        if !row.ended() {
            row.state = BuildState::Running;
            row.step = e.event.kind().to_string();
        }
        let mut layer = row.layer.clone();
        match &e.event {
            BuildEvent::Accepted { request } => {
                row.layer = request.layer.as_ref().map(|l| l.to_string());
                row.cascade = request.cascade.as_ref().map(|c| c.id.to_string());
                layer.clone_from(&row.layer);
            }
            BuildEvent::Sized(size) => row.runner_type = Some(size.runner_type.as_str().into()),
            BuildEvent::OomEscalated { to, .. } => row.runner_type = Some(to.as_str().into()),
            BuildEvent::ImageBuilt { cache, .. } => row.cache = cache.as_ref().map(|c| (c.cached_steps, c.steps)),
            BuildEvent::Completed {
                image_id,
                cache,
                layer: done_layer,
                ..
            } => {
                row.state = BuildState::Completed;
                row.step = "completed".into();
                row.image_id = Some(image_id.clone());
                if let Some(c) = cache {
                    row.cache = Some((c.cached_steps, c.steps));
                    row.pinned.clone_from(&c.pinned);
                }
                if layer.is_none() {
                    layer = done_layer.as_ref().map(|l| l.to_string());
                    row.layer.clone_from(&layer);
                }
            }
            BuildEvent::Superseded { by, .. } => {
                row.state = BuildState::Superseded;
                row.step = "superseded".into();
                row.superseded_by = Some(by.to_string());
            }
            BuildEvent::Failed {
                reason,
                layer: failed_layer,
                cascade,
                ..
            } => {
                row.state = BuildState::Failed;
                row.step = "failed".into();
                row.reason = Some(reason.clone());
                if layer.is_none() {
                    layer = failed_layer.as_ref().map(|l| l.to_string());
                    row.layer.clone_from(&layer);
                }
                if row.cascade.is_none() {
                    row.cascade = cascade.as_ref().map(|c| c.id.to_string());
                }
            }
            _ => {}
        }
        let state = row.state;
        let built = (state == BuildState::Completed).then(|| Built {
            build_id: id.clone(),
            image_id: row.image_id.clone().unwrap_or_default(),
            pinned: row.pinned.clone(),
            duration_ms: row.duration(row.last_at).as_millis() as u64,
            cache: row.cache,
        });
        let first_at = row.first_at;
        if let Some(layer) = &layer {
            m.mark_layer(layer, Ok(&id), first_at);
            if let Some(built) = built {
                let mark = m.layers.entry(layer.clone()).or_default();
                let newer = mark
                    .built
                    .as_ref()
                    .is_none_or(|b| b.build_id == built.build_id || mark.build.as_deref() == Some(&built.build_id));
                if newer {
                    mark.built = Some(built);
                }
            }
        }
        Change {
            build: Some(id),
            layer,
            state: state.as_str().into(),
        }
    }

    /// A progress notice on `lian.<ws>.progress.<build>`: kept as a short tail per build.
    pub fn apply_progress(&self, subject: &str, payload: &[u8]) {
        let Some(build) = subject.split('.').nth(3) else { return };
        let Ok(p) = serde_json::from_slice::<StepProgress>(payload) else {
            return;
        };
        let state = match &p.state {
            StepState::Started => "started".to_string(),
            StepState::Done => "done".to_string(),
            StepState::Cached => "cached".to_string(),
            StepState::Failed(e) => format!("failed: {e}"),
        };
        let line = match &p.name {
            Some(name) => format!("{} {name} {state}", p.id),
            None => format!("{} {state}", p.id),
        };
        let mut m = self.model.write().expect("web model lock");
        if !m.progress.contains_key(build) {
            m.progress_order.push_back(build.to_string());
            if m.progress_order.len() > PROGRESS_BUILDS
                && let Some(old) = m.progress_order.pop_front()
            {
                m.progress.remove(&old);
            }
        }
        let tail = m.progress.entry(build.to_string()).or_default();
        tail.push_back(line);
        if tail.len() > PROGRESS_LINES {
            tail.pop_front();
        }
    }

    #[cfg(test)]
    pub fn layer(&self, name: &str) -> LayerView {
        let m = self.model.read().expect("web model lock");
        m.layer_view(name)
    }

    /// Every layer's view, for a set of names.
    pub fn layers<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, LayerView> {
        let m = self.model.read().expect("web model lock");
        names.into_iter().map(|n| (n.to_string(), m.layer_view(n))).collect()
    }

    /// Builds matching the filters, newest first: one page of them and how many matched.
    pub fn builds(
        &self,
        workspace: Option<&str>,
        state: Option<BuildState>,
        skip: usize,
        take: usize,
    ) -> (Vec<BuildRow>, usize) {
        let m = self.model.read().expect("web model lock");
        let mut rows: Vec<&BuildRow> = m
            .builds
            .values()
            .filter(|r| workspace.is_none_or(|w| r.workspace == w))
            .filter(|r| state.is_none_or(|s| r.state == s))
            .collect();
        let total = rows.len();
        rows.sort_unstable_by_key(|r| std::cmp::Reverse(r.seen));
        (rows.into_iter().skip(skip).take(take).cloned().collect(), total)
    }

    /// Cascades waiting for approval, oldest first.
    pub fn gates(&self) -> Vec<Gate> {
        let m = self.model.read().expect("web model lock");
        let mut gates: Vec<Gate> = m.gates.values().cloned().collect();
        gates.sort_by_key(|g| g.since);
        gates
    }

    pub fn build(&self, id: &str) -> Option<BuildRow> {
        self.model.read().expect("web model lock").builds.get(id).cloned()
    }

    pub fn workspaces(&self) -> Vec<String> {
        let m = self.model.read().expect("web model lock");
        let mut all: Vec<String> = m.builds.values().map(|r| r.workspace.clone()).collect();
        all.sort();
        all.dedup();
        all
    }

    pub fn progress(&self, build: &str) -> Vec<String> {
        let m = self.model.read().expect("web model lock");
        m.progress
            .get(build)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Workers by their last event, most recent first.
    pub fn workers(&self) -> Vec<(String, OffsetDateTime)> {
        let m = self.model.read().expect("web model lock");
        let mut all: Vec<_> = m.workers.iter().map(|(w, at)| (w.clone(), *at)).collect();
        all.sort_by_key(|w| std::cmp::Reverse(w.1));
        all
    }

    /// Builds by state, and stored events applied so far.
    pub fn counts(&self) -> (BTreeMap<BuildState, usize>, u64) {
        let m = self.model.read().expect("web model lock");
        let mut by_state = BTreeMap::new();
        for r in m.builds.values() {
            *by_state.entry(r.state).or_insert(0) += 1;
        }
        (by_state, m.events)
    }
}

impl Model {
    fn next_seen(&mut self) -> u64 {
        self.seen += 1;
        self.seen
    }

    /// Makes `news` (a build, or why the layer was not built) the layer's latest news,
    /// unless the layer already has newer news.
    fn mark_layer(&mut self, layer: &str, news: Result<&str, LayerState>, at: OffsetDateTime) {
        let build = news.ok();
        let mark = self.layers.entry(layer.to_string()).or_default();
        let same = build.is_some() && mark.build.as_deref() == build;
        if same || mark.at.is_none_or(|t| t <= at) {
            let overtaken = if same { None } else { mark.build.take() };
            if let (Some(old), Some(new)) = (overtaken, build)
                && let Some(row) = self.builds.get_mut(&old)
                && !row.ended()
            {
                row.superseded_by = Some(new.to_string());
            }
            let mark = self.layers.get_mut(layer).expect("inserted above");
            mark.build = build.map(String::from);
            mark.unbuilt = news.err();
            mark.at = Some(mark.at.map_or(at, |t| if same { t } else { at }));
        }
    }

    fn layer_view(&self, name: &str) -> LayerView {
        let Some(mark) = self.layers.get(name) else {
            return LayerView {
                state: LayerState::Idle,
                build: None,
                step: None,
                built: None,
            };
        };
        let row = mark.build.as_ref().and_then(|b| self.builds.get(b));
        let state = match (mark.unbuilt, row.map(|r| r.state)) {
            (Some(why), _) => why,
            // A superseded build's successor is queued, whether or not it was seen yet.
            (None, Some(BuildState::Queued | BuildState::Superseded)) => LayerState::Queued,
            (None, Some(BuildState::Running)) => LayerState::Running,
            (None, Some(BuildState::Completed)) => LayerState::Done,
            (None, Some(BuildState::Failed)) => LayerState::Failed,
            (None, None) => LayerState::Idle,
        };
        LayerView {
            state,
            build: mark.build.clone(),
            step: row.filter(|r| r.state == BuildState::Running).map(|r| r.step.clone()),
            built: mark.built.clone(),
        }
    }

    fn forget_old_builds(&mut self) {
        if self.builds.len() <= MAX_BUILDS {
            return;
        }
        let mut ended: Vec<(u64, String)> = self
            .builds
            .values()
            .filter(|r| r.ended())
            .map(|r| (r.seen, r.id.clone()))
            .collect();
        ended.sort_unstable();
        for (_, id) in ended.into_iter().take(self.builds.len() - MAX_BUILDS) {
            self.builds.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_event(ws: &str, id: &str, seq: u32, at: i64, event: serde_json::Value) -> Vec<u8> {
        let mut v = serde_json::json!({
            "build_id": id, "workspace": ws, "seq": seq, "worker": "w1",
            "at": OffsetDateTime::from_unix_timestamp(at).unwrap().format(&time::format_description::well_known::Rfc3339).unwrap(),
        });
        v.as_object_mut().unwrap().extend(event.as_object().unwrap().clone());
        serde_json::to_vec(&v).unwrap()
    }

    fn cascade_event(id: &str, seq: u32, at: i64, event: serde_json::Value) -> Vec<u8> {
        let mut v = serde_json::json!({
            "cascade_id": id, "workspace": "ws", "seq": seq,
            "at": OffsetDateTime::from_unix_timestamp(at).unwrap().format(&time::format_description::well_known::Rfc3339).unwrap(),
        });
        v.as_object_mut().unwrap().extend(event.as_object().unwrap().clone());
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_layer_goes_queued_running_done_and_keeps_its_last_image() {
        let live = Live::default();
        let mut changes = live.subscribe();
        live.apply_stored(
            "lian.ws.cascade.c-1.layer_requested",
            &cascade_event(
                "c-1",
                2,
                100,
                serde_json::json!({"type": "layer_requested", "layer": "deps", "build_id": "c-1-deps"}),
            ),
        );
        assert_eq!(live.layer("deps").state, LayerState::Queued);
        assert_eq!(live.layer("tools").state, LayerState::Idle);
        live.apply_stored(
            "lian.ws.build.c-1-deps.started",
            &build_event(
                "ws",
                "c-1-deps",
                3,
                101,
                serde_json::json!({"type": "started", "runner_type": "cax11"}),
            ),
        );
        let view = live.layer("deps");
        assert_eq!(
            (view.state, view.step.as_deref()),
            (LayerState::Running, Some("started"))
        );
        live.apply_stored(
            "lian.ws.build.c-1-deps.completed",
            &build_event(
                "ws",
                "c-1-deps",
                10,
                104,
                serde_json::json!({"type": "completed", "image": "x:1", "image_id": "sha256:abc", "layer": "deps",
                "cache": {"steps": 4, "cached_steps": 3}}),
            ),
        );
        let view = live.layer("deps");
        assert_eq!(view.state, LayerState::Done);
        let built = view.built.unwrap();
        assert_eq!(
            (built.image_id.as_str(), built.duration_ms, built.cache),
            ("sha256:abc", 4000, Some((3, 4)))
        );
        let states: Vec<String> = std::iter::from_fn(|| changes.try_recv().ok())
            .map(|c| c.state)
            .collect();
        assert_eq!(states, ["queued", "running", "completed"]);
        // An older event read again (a reconnect replays the history) changes nothing.
        live.apply_stored(
            "lian.ws.build.c-1-deps.started",
            &build_event(
                "ws",
                "c-1-deps",
                3,
                101,
                serde_json::json!({"type": "started", "runner_type": "cax11"}),
            ),
        );
        assert_eq!(live.layer("deps").state, LayerState::Done);
    }

    #[test]
    fn failures_and_cut_offs_colour_their_layers_and_builds_filter_and_page() {
        let live = Live::default();
        live.apply_stored(
            "lian.ws.build.b1.failed",
            &build_event(
                "ws",
                "b1",
                1,
                10,
                serde_json::json!({"type": "failed", "reason": "no <Dockerfile>", "layer": "tools"}),
            ),
        );
        live.apply_stored(
            "lian.ws.cascade.c-1.layer_blocked",
            &cascade_event(
                "c-1",
                3,
                11,
                serde_json::json!({"type": "layer_blocked", "layer": "app", "because": "tools"}),
            ),
        );
        for i in 0..5 {
            live.apply_stored(
                "lian.other.build.x.started",
                &build_event(
                    "other",
                    &format!("x{i}"),
                    1,
                    20 + i,
                    serde_json::json!({"type": "started", "runner_type": "cax11"}),
                ),
            );
        }
        assert_eq!(live.layer("tools").state, LayerState::Failed);
        assert_eq!(live.layer("app").state, LayerState::Blocked, "blocked, not cut off");
        assert_eq!(live.build("b1").unwrap().reason.as_deref(), Some("no <Dockerfile>"));
        let (failed, total) = live.builds(None, Some(BuildState::Failed), 0, 10);
        assert_eq!((failed.len(), total), (1, 1));
        let (page, total) = live.builds(Some("other"), None, 2, 2);
        let ids: Vec<&str> = page.iter().map(|r| r.id.as_str()).collect();
        assert_eq!((ids, total), (vec!["x2", "x1"], 5));
        assert_eq!(live.workspaces(), ["other", "ws"]);
    }

    #[test]
    fn a_newer_build_of_a_layer_supersedes_an_unfinished_one() {
        let live = Live::default();
        let accepted = |id: &str, at: i64| {
            build_event(
                "ws",
                id,
                1,
                at,
                serde_json::json!({"type": "accepted", "request": {
                "build_id": id,
                "directives": {"workspace": "ws", "artifact": {"image": "x:1", "language": "other"},
                    "compute_provider": "docker_local", "registry_provider": "zot",
                    "cache_policy": {"actor": "ci", "cache_from": [], "cache_to": []}},
                "context": {"manifest": "manifest-00", "files": 0, "bytes": 0, "sent_bytes": 0},
                "layer": "tools"}}),
            )
        };
        live.apply_stored("lian.ws.build.old.accepted", &accepted("old", 10));
        live.apply_stored("lian.ws.build.new.accepted", &accepted("new", 20));
        assert_eq!(live.build("old").unwrap().superseded_by.as_deref(), Some("new"));
        assert_eq!(live.build("new").unwrap().superseded_by, None);
        assert_eq!(live.layer("tools").build.as_deref(), Some("new"));
    }

    #[test]
    fn progress_keeps_a_short_tail_per_build() {
        let live = Live::default();
        for i in 0..(PROGRESS_LINES + 5) {
            live.apply_progress(
                "lian.ws.progress.b1",
                format!(r##"{{"id":"#{i}","name":"RUN x","state":"done"}}"##).as_bytes(),
            );
        }
        let tail = live.progress("b1");
        assert_eq!(tail.len(), PROGRESS_LINES);
        assert_eq!(tail.last().unwrap(), &format!("#{} RUN x done", PROGRESS_LINES + 4));
    }
    #[test]
    fn a_held_cascade_is_listed_until_approved_and_a_pushed_layer_shows_its_pin() {
        let live = Live::default();
        let gate = |seq, event: serde_json::Value| {
            let kind = event["type"].as_str().unwrap().to_string();
            live.apply_stored(
                &format!("lian.ws.cascade.c-9.{kind}"),
                &cascade_event("c-9", seq, 50 + i64::from(seq), event),
            );
        };
        gate(
            2,
            serde_json::json!({"type": "awaiting_approval", "layers": 12, "minutes": 41.5, "over": "10 layers"}),
        );
        let held = live.gates();
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].cascade.as_str(), held[0].layers), ("c-9", 12));
        assert_eq!(held[0].minutes, Some(41.5));
        gate(3, serde_json::json!({"type": "approved", "by": "ops"}));
        assert!(live.gates().is_empty(), "approved: no longer waiting");

        let pin = "lamina/deps@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        live.apply_stored(
            "lian.ws.build.c-9-deps.completed",
            &build_event(
                "ws",
                "c-9-deps",
                10,
                60,
                serde_json::json!({"type": "completed", "image": "x:1", "image_id": "sha256:abc", "layer": "deps",
                "cache": {"steps": 4, "cached_steps": 3, "pinned": pin}}),
            ),
        );
        assert_eq!(live.layer("deps").built.unwrap().pinned.as_deref(), Some(pin));
    }
}
