//! The cascade as a transducer, the same shape as a build's lifecycle: fold a cascade's
//! events, decide which layers are ready (every parent inside this cascade completed), and
//! name their builds. A failed layer blocks every layer below it, and says so.
//!
//! Early cutoff (Bazel, Buck2): a layer whose rebuild came out with the image it had before
//! (the same image id: the config digest, which covers the rootfs diff ids) is `unchanged`;
//! a layer whose every parent in the cascade (the root included) is unchanged or cut off is
//! not rebuilt but `layer_cut_off`, naming those parents. A root that came out unchanged cuts
//! off its whole plan.
//!
//! | state                                                        | events appended                   |
//! |--------------------------------------------------------------|-----------------------------------|
//! | started, over the gate's limit (the service decides)         | awaiting_approval, or refused     |
//! | awaiting approval                                            | - (until `approved`)              |
//! | a layer of the plan has a failed or blocked parent           | layer_blocked                     |
//! | a layer's parents all settled, and one of them changed       | layer_requested (then its request)|
//! | a layer's parents all settled, none changed                  | layer_cut_off                     |
//! | every layer completed, cut off, failed or blocked            | completed, or failed              |

use std::collections::{BTreeMap, BTreeSet};

use lian_core::names::CascadeId;
use lian_core::{BuildId, LayerName, Workspace};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Catalog;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeEnvelope {
    pub cascade_id: CascadeId,
    pub workspace: Workspace,
    pub seq: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What led to this event: the build whose end the cascade was handling. Absent on an
    /// event a person caused (an approval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    #[serde(flatten)]
    pub event: CascadeEvent,
}

/// The layer and build whose end caused a cascade event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    pub layer: LayerName,
    pub build_id: BuildId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CascadeEvent {
    /// A layer build completed; its descendants rebuild in `plan` order.
    Started {
        root: LayerName,
        root_build: BuildId,
        plan: Vec<LayerName>,
        /// The root's build gave the image the root had before: nothing below it changes.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        root_unchanged: bool,
    },
    /// The gate: the cascade is larger than its limit, and nothing is built until someone
    /// appends `approved` (`lian cascade approve <id>`).
    AwaitingApproval {
        layers: usize,
        /// The expected wall time, minutes (P50), when the fleet has recorded builds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        minutes: Option<f64>,
        /// Which limit it is over, in words.
        over: String,
    },
    /// A person let a waiting cascade go on (the envelope has no cause: nobody's build).
    Approved {
        by: String,
    },
    /// The gate refused a cascade larger than its limit: nothing was built.
    Refused {
        over: String,
    },
    LayerRequested {
        layer: LayerName,
        build_id: BuildId,
    },
    LayerCompleted {
        layer: LayerName,
        build_id: BuildId,
        /// Its image is the one the layer had before this build.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        unchanged: bool,
    },
    LayerFailed {
        layer: LayerName,
        build_id: BuildId,
        reason: String,
    },
    /// Coalescing: the layer's build was still queued when a newer build of the layer was
    /// asked for (by another cascade); that one is built instead, and its end is this
    /// layer's end here (`layer_completed` or `layer_failed` naming it).
    LayerSuperseded {
        layer: LayerName,
        by: BuildId,
    },
    /// Not built because a layer it is built on failed in this cascade.
    LayerBlocked {
        layer: LayerName,
        because: LayerName,
    },
    /// Not rebuilt: every layer it is built on in this cascade came out unchanged (or was
    /// cut off itself), so its own image would be the one it has.
    LayerCutOff {
        layer: LayerName,
        because: Vec<LayerName>,
    },
    Completed {
        built: Vec<LayerName>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        cut_off: Vec<LayerName>,
    },
    Failed {
        failed: Vec<LayerName>,
        blocked: Vec<LayerName>,
    },
}

impl CascadeEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::AwaitingApproval { .. } => "awaiting_approval",
            Self::Approved { .. } => "approved",
            Self::Refused { .. } => "refused",
            Self::LayerRequested { .. } => "layer_requested",
            Self::LayerCompleted { .. } => "layer_completed",
            Self::LayerFailed { .. } => "layer_failed",
            Self::LayerSuperseded { .. } => "layer_superseded",
            Self::LayerBlocked { .. } => "layer_blocked",
            Self::LayerCutOff { .. } => "layer_cut_off",
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
        }
    }

    pub fn summary(&self) -> String {
        let list = |v: &[LayerName]| v.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ");
        match self {
            Self::Started {
                root,
                plan,
                root_unchanged: true,
                ..
            } => format!(
                "started by {root}, which came out unchanged: cutting off [{}]",
                list(plan)
            ),
            Self::Started { root, plan, .. } => {
                format!("started by {root}: rebuilding [{}]", list(plan))
            }
            Self::AwaitingApproval { layers, minutes, over } => format!(
                "waiting for approval ({over}: {layers} layers{}); `lian cascade approve` lets it go on",
                minutes.map(|m| format!(", about {m:.0} min")).unwrap_or_default()
            ),
            Self::Approved { by } => format!("approved by {by}"),
            Self::Refused { over } => format!("refused: {over}; nothing built"),
            Self::LayerRequested { layer, build_id } => {
                format!("requested {layer} as build {build_id}")
            }
            Self::LayerCompleted {
                layer, unchanged: true, ..
            } => format!("{layer} completed, unchanged"),
            Self::LayerCompleted { layer, .. } => format!("{layer} completed"),
            Self::LayerFailed { layer, reason, .. } => format!("{layer} failed: {reason}"),
            Self::LayerSuperseded { layer, by } => {
                format!("{layer}'s queued build superseded by {by}: waiting for that one")
            }
            Self::LayerBlocked { layer, because } => format!("{layer} blocked: {because} failed"),
            Self::LayerCutOff { layer, because } => {
                format!("{layer} cut off: [{}] came out unchanged", list(because))
            }
            Self::Completed { built, cut_off } if cut_off.is_empty() => {
                format!("completed: rebuilt [{}]", list(built))
            }
            Self::Completed { built, cut_off } => {
                format!("completed: rebuilt [{}], cut off [{}]", list(built), list(cut_off))
            }
            Self::Failed { failed, blocked } => {
                format!("failed: [{}] failed, [{}] blocked", list(failed), list(blocked))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerStatus {
    Requested(BuildId),
    /// Its build was superseded by this newer one, whose end it waits for.
    Superseded(BuildId),
    /// Rebuilt; `changed` is false when the image came out as it was.
    Completed {
        changed: bool,
    },
    CutOff,
    Failed,
    Blocked,
}

impl LayerStatus {
    /// Its build (its own, or the one that superseded it) has not ended yet.
    fn waiting(&self) -> bool {
        matches!(self, Self::Requested(_) | Self::Superseded(_))
    }

    /// Settled without failing: its children may go on.
    fn went_well(&self) -> bool {
        matches!(self, Self::Completed { .. } | Self::CutOff)
    }

    fn changed(&self) -> bool {
        matches!(self, Self::Completed { changed: true })
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CascadeState {
    pub root: Option<LayerName>,
    /// Held at the gate: waiting for `approved`.
    pub awaiting_approval: bool,
    pub root_unchanged: bool,
    pub plan: Vec<LayerName>,
    pub layers: BTreeMap<LayerName, LayerStatus>,
    pub finished: bool,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CascadeError {
    #[error("impossible cascade history at event {seq} ({kind}): {why}")]
    Impossible {
        seq: u32,
        kind: &'static str,
        why: &'static str,
    },
}

impl CascadeState {
    pub fn apply(&mut self, event: &CascadeEvent) -> Result<(), CascadeError> {
        let seq = self.len + 1;
        let bad = |why| {
            Err(CascadeError::Impossible {
                seq,
                kind: event.kind(),
                why,
            })
        };
        if self.finished {
            return bad("the cascade already ended");
        }
        if self.root.is_none() && !matches!(event, CascadeEvent::Started { .. }) {
            return bad("a cascade starts with started");
        }
        let in_plan = |l: &LayerName| self.plan.contains(l);
        match event {
            CascadeEvent::Started {
                root,
                plan,
                root_unchanged,
                ..
            } => {
                if self.root.is_some() {
                    return bad("started twice");
                }
                self.root = Some(root.clone());
                self.root_unchanged = *root_unchanged;
                self.plan = plan.clone();
            }
            CascadeEvent::AwaitingApproval { .. } => {
                if self.awaiting_approval || !self.layers.is_empty() || self.len != 1 {
                    return bad("a cascade waits for approval right after it starts, once");
                }
                self.awaiting_approval = true;
            }
            CascadeEvent::Approved { .. } => {
                if !self.awaiting_approval {
                    return bad("only a cascade waiting for approval is approved");
                }
                self.awaiting_approval = false;
            }
            CascadeEvent::Refused { .. } => {
                if self.len != 1 {
                    return bad("a cascade is refused right after it starts");
                }
                self.finished = true;
            }
            CascadeEvent::LayerRequested { layer, build_id } => {
                if self.awaiting_approval {
                    return bad("nothing is requested while the cascade waits for approval");
                }
                if !in_plan(layer) || self.layers.contains_key(layer) {
                    return bad("a layer of the plan is requested once");
                }
                self.layers
                    .insert(layer.clone(), LayerStatus::Requested(build_id.clone()));
            }
            CascadeEvent::LayerSuperseded { layer, by } => {
                if !self.layers.get(layer).is_some_and(LayerStatus::waiting) {
                    return bad("only a requested layer's build is superseded");
                }
                self.layers.insert(layer.clone(), LayerStatus::Superseded(by.clone()));
            }
            CascadeEvent::LayerCompleted { layer, .. } | CascadeEvent::LayerFailed { layer, .. } => {
                if !self.layers.get(layer).is_some_and(LayerStatus::waiting) {
                    return bad("only a requested layer completes or fails");
                }
                let status = match event {
                    CascadeEvent::LayerCompleted { unchanged, .. } => LayerStatus::Completed { changed: !unchanged },
                    _ => LayerStatus::Failed,
                };
                self.layers.insert(layer.clone(), status);
            }
            CascadeEvent::LayerBlocked { layer, .. } | CascadeEvent::LayerCutOff { layer, .. } => {
                if !in_plan(layer) || self.layers.contains_key(layer) {
                    return bad("a layer is blocked or cut off once, before it is requested");
                }
                let status = match event {
                    CascadeEvent::LayerBlocked { .. } => LayerStatus::Blocked,
                    _ => LayerStatus::CutOff,
                };
                self.layers.insert(layer.clone(), status);
            }
            CascadeEvent::Completed { .. } | CascadeEvent::Failed { .. } => self.finished = true,
        }
        self.len = seq;
        Ok(())
    }

    /// The build id of a layer requested in this cascade, if it was.
    pub fn build_of(&self, layer: &LayerName) -> Option<&BuildId> {
        match self.layers.get(layer) {
            Some(LayerStatus::Requested(b)) => Some(b),
            _ => None,
        }
    }
}

pub fn fold<'a>(events: impl IntoIterator<Item = &'a CascadeEvent>) -> Result<CascadeState, CascadeError> {
    let mut state = CascadeState::default();
    for e in events {
        state.apply(e)?;
    }
    Ok(state)
}

/// The build id of a layer in a cascade: deterministic, so a repeated decision asks for
/// the same build and the request is deduplicated.
pub fn layer_build_id(cascade: &CascadeId, layer: &LayerName) -> BuildId {
    BuildId::new(format!("{cascade}-{layer}")).unwrap_or_else(|_| {
        // Both parts are tokens; only the 63-character limit can bite. Fall back to a
        // stable hash-free truncation that stays a token.
        let joined = format!("{cascade}-{layer}");
        BuildId::new(
            joined
                .chars()
                .take(63)
                .collect::<String>()
                .trim_end_matches('-')
                .to_string(),
        )
        .expect("a truncated token is a token")
    })
}

/// The events that follow from the state: blocked layers, newly ready layers, and the end.
pub fn decide(state: &CascadeState, catalog: &Catalog, cascade: &CascadeId) -> Vec<CascadeEvent> {
    if state.finished || state.root.is_none() || state.awaiting_approval {
        return vec![];
    }
    let mut next = state.clone();
    let mut events = Vec::new();
    let in_plan: BTreeSet<&LayerName> = state.plan.iter().collect();
    // Plan order puts parents first, so one pass sees every consequence.
    for layer in &state.plan {
        if next.layers.contains_key(layer) {
            continue;
        }
        let Ok(spec) = catalog.get(layer.as_str()) else {
            continue;
        };
        let on_root = spec.parents().any(|p| Some(p) == state.root.as_ref());
        let parents: Vec<&LayerName> = spec.parents().filter(|p| in_plan.contains(p)).collect();
        let dead = parents
            .iter()
            .find(|p| matches!(next.layers.get(**p), Some(LayerStatus::Failed | LayerStatus::Blocked)));
        let settled = parents
            .iter()
            .all(|p| next.layers.get(*p).is_some_and(LayerStatus::went_well));
        let changed = (on_root && !state.root_unchanged)
            || parents
                .iter()
                .any(|p| next.layers.get(*p).is_some_and(LayerStatus::changed));
        let event = if let Some(because) = dead {
            CascadeEvent::LayerBlocked {
                layer: layer.clone(),
                because: (*because).clone(),
            }
        } else if !settled {
            continue;
        } else if changed {
            CascadeEvent::LayerRequested {
                layer: layer.clone(),
                build_id: layer_build_id(cascade, layer),
            }
        } else {
            CascadeEvent::LayerCutOff {
                layer: layer.clone(),
                because: state
                    .root
                    .iter()
                    .filter(|_| on_root)
                    .chain(parents.iter().copied())
                    .cloned()
                    .collect(),
            }
        };
        next.apply(&event).expect("decide only proposes possible events");
        events.push(event);
    }
    let all_settled = state
        .plan
        .iter()
        .all(|l| next.layers.get(l).is_some_and(|s| !s.waiting()));
    if all_settled {
        let with = |keep: fn(&LayerStatus) -> bool| -> Vec<LayerName> {
            state
                .plan
                .iter()
                .filter(|l| next.layers.get(*l).is_some_and(keep))
                .cloned()
                .collect()
        };
        let failed = with(|s| *s == LayerStatus::Failed);
        let blocked = with(|s| *s == LayerStatus::Blocked);
        events.push(if failed.is_empty() && blocked.is_empty() {
            CascadeEvent::Completed {
                built: with(|s| matches!(s, LayerStatus::Completed { .. })),
                cut_off: with(|s| *s == LayerStatus::CutOff),
            }
        } else {
            CascadeEvent::Failed { failed, blocked }
        });
    }
    events
}
