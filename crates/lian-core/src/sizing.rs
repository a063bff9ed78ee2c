//! Step 1 of the lifecycle: how big a runner a build gets. First match wins:
//! tier 1 explicit (the caller's `runner_override`, then the context's `.build-spec.ncl`),
//! tier 2 the workspace's recorded P95 (only where an operator approved it),
//! tier 3 the language default.

use serde::{Deserialize, Serialize};

/// ADR-039: an OOM-killed build is retried once, on the next size tier. Changing this
/// needs a new ADR.
pub const MAX_OOM_RETRIES: u8 = 1;

/// Tier 2 sizes from the most recent builds of a workspace, and only once there are this
/// many: one odd build should not size the next.
pub const HISTORY_WINDOW: usize = 20;
pub const MIN_HISTORY: usize = 3;

/// The P95 over a workspace's recent builds of their per-build (cpu, memory GB) P95s,
/// newest first; `None` below `MIN_HISTORY` builds with usage.
pub fn workspace_p95(recent: &[(f64, f64)]) -> Option<P95> {
    let window: Vec<(f64, f64)> = recent.iter().take(HISTORY_WINDOW).copied().collect();
    if window.len() < MIN_HISTORY {
        return None;
    }
    Some(P95 {
        cpu: p95(window.iter().map(|w| w.0))?,
        memory_gb: p95(window.iter().map(|w| w.1))?,
    })
}

/// The nearest-rank 95th percentile; `None` without values.
pub fn p95(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() as f64) * 0.95).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The size tiers of the mission (cpu / GB): cax11 2/4, cax21 4/8, cax31 8/16, cax41 16/32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerType {
    Cax11,
    Cax21,
    Cax31,
    Cax41,
}

impl RunnerType {
    pub const ALL: [RunnerType; 4] = [Self::Cax11, Self::Cax21, Self::Cax31, Self::Cax41];

    pub fn cpu(self) -> u32 {
        match self {
            Self::Cax11 => 2,
            Self::Cax21 => 4,
            Self::Cax31 => 8,
            Self::Cax41 => 16,
        }
    }

    pub fn memory_gb(self) -> u32 {
        self.cpu() * 2
    }

    /// The tier an OOM-killed build escalates to; `None` past the largest.
    pub fn next(self) -> Option<Self> {
        let i = Self::ALL.iter().position(|t| *t == self)?;
        Self::ALL.get(i + 1).copied()
    }

    /// The smallest tier that fits the resources, or `None` if none does.
    pub fn fitting(cpu: u32, memory_gb: u32) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.cpu() >= cpu && t.memory_gb() >= memory_gb)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cax11 => "cax11",
            Self::Cax21 => "cax21",
            Self::Cax31 => "cax31",
            Self::Cax41 => "cax41",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Language {
    #[default]
    Rust,
    Go,
    Java,
    Other,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rust => "rust",
            Self::Go => "go",
            Self::Java => "java",
            Self::Other => "other",
        }
    }
}

/// The context's `.build-spec.ncl`, already checked against `schemas/build_spec.ncl`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    #[serde(default)]
    pub runner_type: Option<RunnerType>,
    #[serde(default)]
    pub cpu: Option<u32>,
    #[serde(default)]
    pub memory_gb: Option<u32>,
    #[serde(default)]
    pub time_budget_min: Option<u32>,
}

/// A workspace's recorded usage, as served for tier 2.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct P95 {
    pub cpu: f64,
    pub memory_gb: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizingTier {
    Explicit,
    History,
    /// Tier 3 raised: a recent build of the workspace ran out of memory on the default and
    /// succeeded one tier up.
    Learned,
    Default,
}

/// What sizing reads from a workspace's records: the P95 of its recent builds (tier 2),
/// whether an operator approved using it, and its latest OOM escalation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SizingHistory {
    pub p95: Option<P95>,
    pub approved: bool,
    pub learned: Option<OomLearned>,
}

/// A recent build of a workspace that was OOM-killed on `from` and succeeded on `to`
/// (ADR-039's escalation): the next build starts on `to` rather than OOM again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomLearned {
    pub from: RunnerType,
    pub to: RunnerType,
    pub build_id: String,
}

/// The latest escalation among a workspace's recent builds (newest first, as for
/// `workspace_p95`): `(escalated from, ran on, build id, when)` per build that escalated.
pub fn learned_from_oom(recent: &[(RunnerType, RunnerType, String, i64)]) -> Option<OomLearned> {
    recent
        .iter()
        .take(HISTORY_WINDOW)
        .max_by_key(|r| r.3)
        .map(|(from, to, build_id, _)| OomLearned {
            from: *from,
            to: *to,
            build_id: build_id.clone(),
        })
}

impl SizingTier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Explicit => "tier 1, explicit",
            Self::History => "tier 2, history",
            Self::Learned => "tier 3, learned from an OOM",
            Self::Default => "tier 3, default",
        }
    }
}

/// What step 1 decided, and why, as recorded in the `sized` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeDecision {
    pub tier: SizingTier,
    pub runner_type: RunnerType,
    pub time_budget_min: u32,
    pub reason: String,
}

/// Everything sizing looks at. `history` is `None` when the workspace has no record yet.
#[derive(Debug, Clone, Default)]
pub struct SizingInputs<'a> {
    pub override_type: Option<RunnerType>,
    pub override_budget: Option<u32>,
    pub spec: Option<&'a BuildSpec>,
    pub history: Option<P95>,
    pub history_approved: bool,
    /// The workspace's latest OOM escalation in its recent builds.
    pub learned: Option<OomLearned>,
    pub language: Language,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    #[error(
        "{source_name} asks for {cpu} cpu / {memory_gb} GB, more than the largest tier cax41 (16 cpu / 32 GB): lower it or split the build"
    )]
    TooLarge {
        source_name: &'static str,
        cpu: u32,
        memory_gb: u32,
    },
}

fn language_default(language: Language) -> (RunnerType, u32) {
    match language {
        Language::Rust => (RunnerType::Cax21, 60),
        Language::Java => (RunnerType::Cax21, 45),
        Language::Go | Language::Other => (RunnerType::Cax11, 30),
    }
}

/// Runs the three tiers, first match wins.
pub fn resolve(inputs: &SizingInputs<'_>) -> Result<SizeDecision, SizingError> {
    let (default_type, default_budget) = language_default(inputs.language);
    let spec_budget = inputs.spec.and_then(|s| s.time_budget_min);
    let budget = inputs.override_budget.or(spec_budget).unwrap_or(default_budget);

    if let Some(t) = inputs.override_type {
        return Ok(SizeDecision {
            tier: SizingTier::Explicit,
            runner_type: t,
            time_budget_min: budget,
            reason: format!("runner_override in the directives asks for {}", t.as_str()),
        });
    }
    if let Some(spec) = inputs.spec {
        if let Some(t) = spec.runner_type {
            return Ok(SizeDecision {
                tier: SizingTier::Explicit,
                runner_type: t,
                time_budget_min: budget,
                reason: format!(".build-spec.ncl sets runner_type {}", t.as_str()),
            });
        }
        if spec.cpu.is_some() || spec.memory_gb.is_some() {
            let cpu = spec.cpu.unwrap_or(0);
            let mem = spec.memory_gb.unwrap_or(0);
            let t = RunnerType::fitting(cpu, mem).ok_or(SizingError::TooLarge {
                source_name: ".build-spec.ncl",
                cpu,
                memory_gb: mem,
            })?;
            return Ok(SizeDecision {
                tier: SizingTier::Explicit,
                runner_type: t,
                time_budget_min: budget,
                reason: format!(
                    ".build-spec.ncl asks for {cpu} cpu / {mem} GB: smallest fitting tier is {}",
                    t.as_str()
                ),
            });
        }
    }
    if let Some(p95) = inputs.history
        && inputs.history_approved
    {
        let cpu = ((p95.cpu * 1.2).ceil() as u32).max(2);
        let mem = ((p95.memory_gb * 1.2).ceil() as u32).max(4);
        let t = RunnerType::fitting(cpu, mem).ok_or(SizingError::TooLarge {
            source_name: "the workspace's P95 history",
            cpu,
            memory_gb: mem,
        })?;
        return Ok(SizeDecision {
            tier: SizingTier::History,
            runner_type: t,
            time_budget_min: budget,
            reason: format!(
                "P95 {:.1} cpu / {:.1} GB x 1.2 = {cpu} cpu / {mem} GB: {}",
                p95.cpu,
                p95.memory_gb,
                t.as_str()
            ),
        });
    }
    let why_not_history = match (inputs.history, inputs.history_approved) {
        (None, _) => "no history yet",
        (Some(_), false) => "history not approved for this workspace",
        (Some(_), true) => unreachable!("approved history returned above"),
    };
    if let Some(learned) = &inputs.learned
        && learned.to > default_type
    {
        return Ok(SizeDecision {
            tier: SizingTier::Learned,
            runner_type: learned.to,
            time_budget_min: budget,
            reason: format!(
                "no explicit size, {why_not_history}; build {} ran out of memory on {} and succeeded on {}: {} (until the P95 says otherwise)",
                learned.build_id,
                learned.from.as_str(),
                learned.to.as_str(),
                learned.to.as_str()
            ),
        });
    }
    Ok(SizeDecision {
        tier: SizingTier::Default,
        runner_type: default_type,
        time_budget_min: budget,
        reason: format!(
            "no explicit size, {why_not_history}: {} default {}",
            inputs.language.as_str(),
            default_type.as_str()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oom_escalation_raises_the_default_until_the_p95_says_otherwise() {
        use RunnerType::*;
        let recent = vec![
            (Cax11, Cax21, "b1".to_string(), 10),
            (Cax21, Cax31, "b2".to_string(), 20),
        ];
        let learned = learned_from_oom(&recent).unwrap();
        assert_eq!((learned.to, learned.build_id.as_str()), (Cax31, "b2"), "the latest one");
        let go = SizingInputs {
            language: Language::Go,
            learned: Some(learned.clone()),
            ..Default::default()
        };
        let d = resolve(&go).unwrap();
        assert_eq!((d.tier, d.runner_type), (SizingTier::Learned, Cax31));
        assert!(
            d.reason
                .contains("build b2 ran out of memory on cax21 and succeeded on cax31"),
            "{}",
            d.reason
        );
        // An approved P95 decides instead, even a smaller tier: it has the newer evidence.
        let with_p95 = SizingInputs {
            history: Some(P95 {
                cpu: 1.0,
                memory_gb: 2.0,
            }),
            history_approved: true,
            ..go.clone()
        };
        assert_eq!(resolve(&with_p95).unwrap().tier, SizingTier::History);
        // A default as large as what succeeded needs no learning.
        let small = OomLearned {
            from: Cax11,
            to: Cax21,
            build_id: "b1".into(),
        };
        let rust = SizingInputs {
            language: Language::Rust,
            learned: Some(small),
            ..Default::default()
        };
        assert_eq!(resolve(&rust).unwrap().tier, SizingTier::Default);
        assert_eq!(learned_from_oom(&[]), None);
    }

    #[test]
    fn nearest_rank_p95() {
        assert_eq!(p95(std::iter::empty()), None);
        assert_eq!(p95([3.0].into_iter()), Some(3.0));
        assert_eq!(p95((1..=100).map(f64::from)), Some(95.0));
        assert_eq!(p95((1..=10).map(f64::from)), Some(10.0));
    }

    #[test]
    fn workspace_history_needs_enough_builds_and_takes_the_recent_ones() {
        assert_eq!(workspace_p95(&[(1.0, 1.0), (2.0, 2.0)]), None);
        let p = workspace_p95(&[(1.0, 0.5), (3.0, 6.0), (2.0, 1.0)]).unwrap();
        assert_eq!((p.cpu, p.memory_gb), (3.0, 6.0));
        let mut recent = vec![(1.0, 1.0); 20];
        recent.push((16.0, 30.0)); // older than the window
        assert_eq!(workspace_p95(&recent).unwrap().cpu, 1.0);
    }

    #[test]
    fn tiers_escalate_in_order_and_stop_at_the_largest() {
        assert_eq!(RunnerType::Cax21.next(), Some(RunnerType::Cax31));
        assert_eq!(RunnerType::Cax41.next(), None);
        assert_eq!(RunnerType::fitting(3, 4), Some(RunnerType::Cax21));
        assert_eq!(RunnerType::fitting(17, 1), None);
    }

    #[test]
    fn language_defaults() {
        for (lang, t, budget) in [
            (Language::Rust, RunnerType::Cax21, 60),
            (Language::Go, RunnerType::Cax11, 30),
            (Language::Java, RunnerType::Cax21, 45),
            (Language::Other, RunnerType::Cax11, 30),
        ] {
            let d = resolve(&SizingInputs {
                language: lang,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(
                (d.tier, d.runner_type, d.time_budget_min),
                (SizingTier::Default, t, budget)
            );
            assert!(d.reason.contains("no history yet"), "{}", d.reason);
        }
    }

    #[test]
    fn explicit_beats_history_beats_default() {
        let spec = BuildSpec {
            runner_type: Some(RunnerType::Cax31),
            time_budget_min: Some(90),
            ..Default::default()
        };
        let history = Some(P95 {
            cpu: 1.0,
            memory_gb: 1.0,
        });
        let d = resolve(&SizingInputs {
            spec: Some(&spec),
            history,
            history_approved: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (d.tier, d.runner_type, d.time_budget_min),
            (SizingTier::Explicit, RunnerType::Cax31, 90)
        );

        let d = resolve(&SizingInputs {
            override_type: Some(RunnerType::Cax41),
            spec: Some(&spec),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.runner_type, RunnerType::Cax41);
        assert_eq!(d.time_budget_min, 90, "the spec's budget still applies");
    }

    #[test]
    fn raw_resources_pick_the_smallest_fitting_tier() {
        let spec = BuildSpec {
            cpu: Some(5),
            memory_gb: Some(4),
            ..Default::default()
        };
        let d = resolve(&SizingInputs {
            spec: Some(&spec),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.runner_type, RunnerType::Cax31);
        let huge = BuildSpec {
            cpu: Some(64),
            ..Default::default()
        };
        let err = resolve(&SizingInputs {
            spec: Some(&huge),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("cax41"), "{err}");
    }

    #[test]
    fn history_is_used_only_when_approved_with_margin_and_floor() {
        let history = Some(P95 {
            cpu: 3.2,
            memory_gb: 6.1,
        });
        let unapproved = resolve(&SizingInputs {
            history,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(unapproved.tier, SizingTier::Default);
        assert!(unapproved.reason.contains("not approved"));

        let d = resolve(&SizingInputs {
            history,
            history_approved: true,
            ..Default::default()
        })
        .unwrap();
        // ceil(3.2 * 1.2) = 4 cpu, ceil(6.1 * 1.2) = 8 GB
        assert_eq!((d.tier, d.runner_type), (SizingTier::History, RunnerType::Cax21));

        let tiny = resolve(&SizingInputs {
            history: Some(P95 {
                cpu: 0.1,
                memory_gb: 0.2,
            }),
            history_approved: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(tiny.runner_type, RunnerType::Cax11, "floor 2 cpu / 4 GB");
    }
}
