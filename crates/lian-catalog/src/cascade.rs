//! The cascade as a transducer, the same shape as a build's lifecycle: fold a cascade's
//! events, decide which layers are ready (every parent inside this cascade completed), and
//! name their builds. A failed layer blocks every layer below it, and says so.
//!
//! | state                                             | events appended                   |
//! |---------------------------------------------------|-----------------------------------|
//! | a layer of the plan has a failed or blocked parent| layer_blocked                     |
//! | a layer's parents in the cascade all completed    | layer_requested (then its request)|
//! | every layer completed, failed or blocked          | completed, or failed              |

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
    #[serde(flatten)]
    pub event: CascadeEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CascadeEvent {
    /// A layer build completed; its descendants rebuild in `plan` order.
    Started {
        root: LayerName,
        root_build: BuildId,
        plan: Vec<LayerName>,
    },
    LayerRequested {
        layer: LayerName,
        build_id: BuildId,
    },
    LayerCompleted {
        layer: LayerName,
        build_id: BuildId,
    },
    LayerFailed {
        layer: LayerName,
        build_id: BuildId,
        reason: String,
    },
    /// Not built because a layer it is built on failed in this cascade.
    LayerBlocked {
        layer: LayerName,
        because: LayerName,
    },
    Completed {
        built: Vec<LayerName>,
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
            Self::LayerRequested { .. } => "layer_requested",
            Self::LayerCompleted { .. } => "layer_completed",
            Self::LayerFailed { .. } => "layer_failed",
            Self::LayerBlocked { .. } => "layer_blocked",
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
        }
    }

    pub fn summary(&self) -> String {
        let list = |v: &[LayerName]| v.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ");
        match self {
            Self::Started { root, plan, .. } => {
                format!("started by {root}: rebuilding [{}]", list(plan))
            }
            Self::LayerRequested { layer, build_id } => {
                format!("requested {layer} as build {build_id}")
            }
            Self::LayerCompleted { layer, .. } => format!("{layer} completed"),
            Self::LayerFailed { layer, reason, .. } => format!("{layer} failed: {reason}"),
            Self::LayerBlocked { layer, because } => format!("{layer} blocked: {because} failed"),
            Self::Completed { built } => format!("completed: rebuilt [{}]", list(built)),
            Self::Failed { failed, blocked } => {
                format!("failed: [{}] failed, [{}] blocked", list(failed), list(blocked))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerStatus {
    Requested(BuildId),
    Completed,
    Failed,
    Blocked,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CascadeState {
    pub root: Option<LayerName>,
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
            CascadeEvent::Started { root, plan, .. } => {
                if self.root.is_some() {
                    return bad("started twice");
                }
                self.root = Some(root.clone());
                self.plan = plan.clone();
            }
            CascadeEvent::LayerRequested { layer, build_id } => {
                if !in_plan(layer) || self.layers.contains_key(layer) {
                    return bad("a layer of the plan is requested once");
                }
                self.layers
                    .insert(layer.clone(), LayerStatus::Requested(build_id.clone()));
            }
            CascadeEvent::LayerCompleted { layer, .. } | CascadeEvent::LayerFailed { layer, .. } => {
                if !matches!(self.layers.get(layer), Some(LayerStatus::Requested(_))) {
                    return bad("only a requested layer completes or fails");
                }
                let status = if matches!(event, CascadeEvent::LayerCompleted { .. }) {
                    LayerStatus::Completed
                } else {
                    LayerStatus::Failed
                };
                self.layers.insert(layer.clone(), status);
            }
            CascadeEvent::LayerBlocked { layer, .. } => {
                if !in_plan(layer) || self.layers.contains_key(layer) {
                    return bad("a layer is blocked once, before it is requested");
                }
                self.layers.insert(layer.clone(), LayerStatus::Blocked);
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
    if state.finished || state.root.is_none() {
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
        let parents: Vec<&LayerName> = spec.parents().filter(|p| in_plan.contains(p)).collect();
        let dead = parents
            .iter()
            .find(|p| matches!(next.layers.get(**p), Some(LayerStatus::Failed | LayerStatus::Blocked)));
        let event = if let Some(because) = dead {
            CascadeEvent::LayerBlocked {
                layer: layer.clone(),
                because: (*because).clone(),
            }
        } else if parents
            .iter()
            .all(|p| matches!(next.layers.get(*p), Some(LayerStatus::Completed)))
        {
            CascadeEvent::LayerRequested {
                layer: layer.clone(),
                build_id: layer_build_id(cascade, layer),
            }
        } else {
            continue;
        };
        next.apply(&event).expect("decide only proposes possible events");
        events.push(event);
    }
    let all_settled = state.plan.iter().all(|l| {
        matches!(
            next.layers.get(l),
            Some(LayerStatus::Completed | LayerStatus::Failed | LayerStatus::Blocked)
        )
    });
    if all_settled {
        let with = |s: LayerStatus| -> Vec<LayerName> {
            state
                .plan
                .iter()
                .filter(|l| next.layers.get(*l) == Some(&s))
                .cloned()
                .collect()
        };
        let (failed, blocked) = (with(LayerStatus::Failed), with(LayerStatus::Blocked));
        events.push(if failed.is_empty() && blocked.is_empty() {
            CascadeEvent::Completed {
                built: with(LayerStatus::Completed),
            }
        } else {
            CascadeEvent::Failed { failed, blocked }
        });
    }
    events
}
