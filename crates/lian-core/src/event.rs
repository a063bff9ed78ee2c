//! Build events: past-tense facts, appended to a build's history in order. The history of a
//! build is the list of its envelopes; its state is their fold (see `lifecycle`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::directives::ComputeProvider;
use crate::names::{BuildId, ImageRef, LayerName, LeaseKey, Workspace};
use crate::request::{BuildRequest, CascadeRef};
use crate::sizing::{RunnerType, SizeDecision};

/// One event as it travels on `lian.<ws>.build.<id>.<type>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub build_id: BuildId,
    pub workspace: Workspace,
    /// 1-based position in the build's history; also the dedup key of the append.
    pub seq: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The worker that appended the event.
    pub worker: String,
    #[serde(flatten)]
    pub event: BuildEvent,
}

/// What a build reused from the caches that outlive runners, carried by `image_built` and
/// `completed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheReport {
    /// BuildKit steps of the build(s), and how many of them were served from cache.
    pub steps: u32,
    pub cached_steps: u32,
    /// The cargo-chef cooker stage, built as an image of its own keyed by its recipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooker: Option<CookerReport>,
    /// From `sccache --show-stats` printed by the build, when it prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sccache_hits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sccache_misses: Option<u64>,
    /// Namespaces cache was imported from, and the one it was exported to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imported_from: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_to: Option<String>,
    /// Parent images pulled from the registry, by digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents_pulled: Vec<String>,
    /// References pushed on success (tags move only then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pushed: Vec<String>,
    /// The image pushed, by digest (`<namespace>/<repository>@sha256:…`, registry-relative):
    /// what the catalog lock records and a descendant's build pins as its parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Compressed bytes of the parent layers pulled from the registry (those the engine did
    /// not hold already) and of the layers pushed (those the registry did not hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_pulled: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_pushed: Option<u64>,
    /// The namespace's engine store (ADR lian-044): whether the runner's engine started from
    /// it (`hit`: the images and build cache of the namespace's last good build were already
    /// there) or empty (`miss`); absent where the runner keeps no engine store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_store: Option<StoreUse>,
}

/// How a build's engine began, with the namespace it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreUse {
    pub namespace: String,
    pub hit: bool,
}

impl CacheReport {
    /// `; cache: 7/9 steps cached, cooker hit, sccache 41 hits 3 misses, from ci/ws, to ci/ws`
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("{}/{} steps cached", self.cached_steps, self.steps)];
        if let Some(store) = &self.engine_store {
            parts.push(format!("engine store {}", if store.hit { "hit" } else { "miss" }));
        }
        if let Some(cooker) = &self.cooker {
            parts.push(format!("cooker {}", if cooker.hit { "hit" } else { "miss" }));
        }
        if let (Some(hits), Some(misses)) = (self.sccache_hits, self.sccache_misses) {
            parts.push(format!("sccache {hits} hits {misses} misses"));
        }
        let mb = |b: u64| b as f64 / 1e6;
        if let Some(pulled) = self.bytes_pulled {
            parts.push(format!("pulled {:.1} MB", mb(pulled)));
        }
        if let Some(pushed) = self.bytes_pushed {
            parts.push(format!("pushed {:.1} MB", mb(pushed)));
        }
        if !self.imported_from.is_empty() {
            parts.push(format!("from {}", self.imported_from.join(" ")));
        }
        if let Some(to) = &self.exported_to {
            parts.push(format!("to {to}"));
        }
        format!("; cache: {}", parts.join(", "))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CookerReport {
    pub reference: String,
    /// The image for this recipe was already in a namespace the build may read.
    pub hit: bool,
}

/// How a context reached its runner, carried by `context_synced`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    /// Content bytes that travelled for this build: uploaded by the submit, plus what was
    /// sent on to a remote runner.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Content bytes of the context that were already stored and did not travel again.
    #[serde(default)]
    pub bytes_deduplicated: u64,
    /// How long the worker took to put the context on the runner.
    #[serde(default)]
    pub seconds: f64,
}

/// The lifecycle step a failure happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Validate,
    Size,
    SpawnRunner,
    SyncContext,
    Build,
    RecordMetrics,
    DestroyRunner,
    TimeBudget,
    /// An operator asked for the build to stop (`lian cancel`).
    Cancelled,
    /// The request was delivered `max_deliver` times without the build finishing.
    Abandoned,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validate => "validate",
            Self::Size => "size",
            Self::SpawnRunner => "spawn_runner",
            Self::SyncContext => "sync_context",
            Self::Build => "build",
            Self::RecordMetrics => "record_metrics",
            Self::DestroyRunner => "destroy_runner",
            Self::TimeBudget => "time_budget",
            Self::Cancelled => "cancelled",
            Self::Abandoned => "abandoned",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// The request passed validation; the history now holds everything needed to resume.
    Accepted { request: Box<BuildRequest> },
    /// Step 1.
    Sized(SizeDecision),
    /// Step 2.
    Started { runner_type: RunnerType },
    /// Step 3, intent: recorded before the provider is called.
    RunnerRequested {
        lease_key: LeaseKey,
        provider: ComputeProvider,
        runner_type: RunnerType,
    },
    /// Step 3, done.
    RunnerLeased {
        lease_key: LeaseKey,
        lease_id: String,
        host: String,
    },
    /// Step 4.
    ContextSynced {
        lease_key: LeaseKey,
        files: u64,
        bytes: u64,
        #[serde(flatten)]
        transfer: Transfer,
    },
    /// Step 5.
    ImageBuilt {
        lease_key: LeaseKey,
        image: ImageRef,
        image_id: String,
        duration_ms: u64,
        /// Usage sampled from the lease's cgroup during the build (cores, GB), where the
        /// runner has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu_p95: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mem_p95_gb: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache: Option<Box<CacheReport>>,
    },
    /// A step failed; the runner (if any) is destroyed next.
    StepFailed {
        step: Step,
        reason: String,
        #[serde(default)]
        oom: bool,
    },
    /// ADR-039: the build was OOM-killed and gets one more runner, one tier up.
    OomEscalated { from: RunnerType, to: RunnerType },
    /// Step 6.
    MetricsRecorded {
        duration_ms: u64,
        #[serde(default)]
        cpu_p95: Option<f64>,
        #[serde(default)]
        mem_p95_gb: Option<f64>,
    },
    /// Step 7. With `left_to_reaper`, the destroy kept failing (retried with backoff) and
    /// the runner is the reaper's now: it destroys runners of ended builds.
    RunnerDestroyed {
        lease_key: LeaseKey,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        left_to_reaper: Option<String>,
    },
    /// A worker took the build over (a redelivery of its request) and owns it from here
    /// (ADR lian-045): appended, against the history it folded, before its first effect, so
    /// a worker that still thinks it owns the build has its next append refused and stops.
    /// Changes nothing else in the state; the envelope names the worker.
    Resumed { delivery: u64 },
    /// Step 8, success.
    Completed {
        image: ImageRef,
        image_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<LayerName>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cascade: Option<CascadeRef>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache: Option<Box<CacheReport>>,
    },
    /// The only event of a build no worker had taken yet: a newer build of the same layer
    /// was asked for meanwhile (coalescing), and is built instead. Appended by the cascade
    /// against an empty history, so a worker that takes the request first wins and this is
    /// never written.
    Superseded {
        by: BuildId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<LayerName>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cascade: Option<CascadeRef>,
    },
    /// Step 8, failure (also the only event of a request that could not be read).
    Failed {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<Step>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<LayerName>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cascade: Option<CascadeRef>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
    },
}

impl BuildEvent {
    /// The last token of the event's subject.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::Sized(_) => "sized",
            Self::Started { .. } => "started",
            Self::RunnerRequested { .. } => "runner_requested",
            Self::RunnerLeased { .. } => "runner_leased",
            Self::ContextSynced { .. } => "context_synced",
            Self::ImageBuilt { .. } => "image_built",
            Self::StepFailed { .. } => "step_failed",
            Self::OomEscalated { .. } => "oom_escalated",
            Self::MetricsRecorded { .. } => "metrics_recorded",
            Self::RunnerDestroyed { .. } => "runner_destroyed",
            Self::Resumed { .. } => "resumed",
            Self::Completed { .. } => "completed",
            Self::Superseded { .. } => "superseded",
            Self::Failed { .. } => "failed",
        }
    }

    /// Which of the eight lifecycle steps the event belongs to (1-8); `None` for intake
    /// and ownership notes (accepted, resumed, a refusal at validation).
    pub fn step_number(&self) -> Option<usize> {
        Some(match self {
            Self::Accepted { .. } | Self::Resumed { .. } => return None,
            Self::Sized(_) => 1,
            Self::Started { .. } => 2,
            Self::RunnerRequested { .. } | Self::RunnerLeased { .. } => 3,
            Self::ContextSynced { .. } => 4,
            Self::ImageBuilt { .. } | Self::OomEscalated { .. } => 5,
            Self::MetricsRecorded { .. } => 6,
            Self::RunnerDestroyed { .. } => 7,
            Self::Completed { .. } | Self::Failed { .. } | Self::Superseded { .. } => 8,
            Self::StepFailed { step, .. } => match step {
                Step::Validate => return None,
                Step::Size => 1,
                Step::SpawnRunner => 3,
                Step::SyncContext => 4,
                Step::Build => 5,
                Step::RecordMetrics => 6,
                Step::DestroyRunner => 7,
                Step::TimeBudget | Step::Cancelled | Step::Abandoned => 8,
            },
        })
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Completed { .. } | Self::Failed { .. } | Self::Superseded { .. }
        )
    }

    /// One human line, used by `lian watch` and `lian status`.
    pub fn summary(&self) -> String {
        match self {
            Self::Accepted { request } => format!(
                "accepted {} ({}{})",
                request.directives.artifact.image,
                request.directives.compute_provider.as_str(),
                request
                    .layer
                    .as_ref()
                    .map(|l| format!(", layer {l}"))
                    .unwrap_or_default()
            ),
            Self::Sized(d) => format!("sized {} ({}: {})", d.runner_type.as_str(), d.tier.as_str(), d.reason),
            Self::Started { runner_type } => {
                format!("started on a {} runner", runner_type.as_str())
            }
            Self::RunnerRequested {
                lease_key,
                provider,
                runner_type,
            } => {
                format!(
                    "runner requested {lease_key} ({} {})",
                    provider.as_str(),
                    runner_type.as_str()
                )
            }
            Self::RunnerLeased { lease_key, host, .. } => format!("runner leased {lease_key} on {host}"),
            Self::ContextSynced {
                files, bytes, transfer, ..
            } => {
                format!(
                    "context synced: {files} files, {bytes} bytes ({} sent, {} deduplicated) in {:.2} s",
                    transfer.bytes_sent, transfer.bytes_deduplicated, transfer.seconds
                )
            }
            Self::ImageBuilt {
                image,
                image_id,
                duration_ms,
                cache,
                ..
            } => {
                format!(
                    "image built {image} {} in {:.1}s{}",
                    short_id(image_id),
                    *duration_ms as f64 / 1000.0,
                    cache.as_deref().map(CacheReport::summary).unwrap_or_default()
                )
            }
            Self::StepFailed { step, reason, oom } => {
                format!(
                    "step {} failed{}: {reason}",
                    step.as_str(),
                    if *oom { " (out of memory)" } else { "" }
                )
            }
            Self::OomEscalated { from, to } => {
                format!("out of memory on {}, retrying on {}", from.as_str(), to.as_str())
            }
            Self::MetricsRecorded { duration_ms, .. } => {
                format!("metrics recorded: {:.1}s", *duration_ms as f64 / 1000.0)
            }
            Self::RunnerDestroyed {
                lease_key,
                left_to_reaper: None,
            } => format!("runner destroyed {lease_key}"),
            Self::RunnerDestroyed {
                lease_key,
                left_to_reaper: Some(why),
            } => format!("runner {lease_key} left to the reaper: {why}"),
            Self::Resumed { delivery } => format!("resumed (delivery {delivery}): this worker owns the build now"),
            Self::Completed {
                image, image_id, cache, ..
            } => format!(
                "completed {image} {}{}",
                short_id(image_id),
                cache.as_deref().map(CacheReport::summary).unwrap_or_default()
            ),
            Self::Superseded { by, .. } => format!("superseded by {by}: not built"),
            Self::Failed { reason, step, .. } => match step {
                Some(s) => format!("failed at {}: {reason}", s.as_str()),
                None => format!("failed: {reason}"),
            },
        }
    }
}

fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}
