//! A build's history as its eight steps: which event ends which step, how long each took
//! (the time from the event before), how often it failed, and the tiers it ran on.

use lian_core::{BuildEvent, Envelope};
use time::OffsetDateTime;

pub const STEP_NAMES: [&str; 8] = [
    "size the runner",
    "announce",
    "lease a runner",
    "put the context on it",
    "build",
    "record metrics",
    "destroy the runner",
    "announce the result",
];

/// One of the eight steps, as far as the history got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpan {
    /// 1 to 8.
    pub number: usize,
    pub name: &'static str,
    /// From the build's first event to this step's start.
    pub start_ms: u64,
    /// Time spent in it, over every attempt.
    pub duration_ms: u64,
    /// How often it failed (each failure is retried, escalated or ends the build).
    pub failures: u32,
    /// Its events, in order (`runner_requested`, `runner_leased`, ...).
    pub events: Vec<&'static str>,
}

fn ms(from: OffsetDateTime, to: OffsetDateTime) -> u64 {
    (to - from).whole_milliseconds().max(0) as u64
}

/// The steps the history reached, in step order. Each event's share of time is the gap
/// since the event before it.
pub fn steps(history: &[Envelope]) -> Vec<StepSpan> {
    let Some(first) = history.first() else {
        return Vec::new();
    };
    let mut spans: Vec<Option<StepSpan>> = vec![None; 8];
    let mut previous = first.at;
    for e in history {
        let gap = ms(previous, e.at);
        if let Some(n) = e.event.step_number() {
            let span = spans[n - 1].get_or_insert_with(|| StepSpan {
                number: n,
                name: STEP_NAMES[n - 1],
                start_ms: ms(first.at, previous),
                duration_ms: 0,
                failures: 0,
                events: Vec::new(),
            });
            span.duration_ms += gap;
            span.events.push(e.event.kind());
            if matches!(e.event, BuildEvent::StepFailed { .. }) {
                span.failures += 1;
            }
        }
        previous = previous.max(e.at);
    }
    spans.into_iter().flatten().collect()
}

/// The tiers the build ran on, in order: the sized one, then each OOM escalation.
pub fn tiers(history: &[Envelope]) -> Vec<String> {
    history
        .iter()
        .filter_map(|e| match &e.event {
            BuildEvent::Sized(s) => Some(s.runner_type.as_str().to_string()),
            BuildEvent::OomEscalated { to, .. } => Some(to.as_str().to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(events: &[(i64, serde_json::Value)]) -> Vec<Envelope> {
        events
            .iter()
            .enumerate()
            .map(|(i, (at_ms, event))| {
                let at = OffsetDateTime::from_unix_timestamp_nanos(*at_ms as i128 * 1_000_000).unwrap();
                let mut v = serde_json::json!({
                    "build_id": "b1", "workspace": "ws", "seq": i + 1, "worker": "w1",
                    "at": at.format(&time::format_description::well_known::Rfc3339).unwrap(),
                });
                v.as_object_mut().unwrap().extend(event.as_object().unwrap().clone());
                serde_json::from_value(v).unwrap()
            })
            .collect()
    }

    #[test]
    fn each_step_gets_the_time_since_the_event_before() {
        let h = history(&[
            (
                0,
                serde_json::json!({"type": "sized", "tier": "default", "runner_type": "cax11", "time_budget_min": 30, "reason": "r"}),
            ),
            (100, serde_json::json!({"type": "started", "runner_type": "cax11"})),
            (
                150,
                serde_json::json!({"type": "runner_requested", "lease_key": "b1-r1", "provider": "docker_local", "runner_type": "cax11"}),
            ),
            (
                450,
                serde_json::json!({"type": "runner_leased", "lease_key": "b1-r1", "lease_id": "x", "host": "local"}),
            ),
            (
                2450,
                serde_json::json!({"type": "step_failed", "step": "build", "reason": "killed", "oom": true}),
            ),
            (
                2500,
                serde_json::json!({"type": "runner_destroyed", "lease_key": "b1-r1"}),
            ),
            (
                2600,
                serde_json::json!({"type": "oom_escalated", "from": "cax11", "to": "cax21"}),
            ),
            (
                2700,
                serde_json::json!({"type": "failed", "reason": "out of memory twice", "step": "build"}),
            ),
        ]);
        let spans = steps(&h);
        let summary: Vec<(usize, u64, u64, u32)> = spans
            .iter()
            .map(|s| (s.number, s.start_ms, s.duration_ms, s.failures))
            .collect();
        assert_eq!(
            summary,
            [
                (1, 0, 0, 0),
                (2, 0, 100, 0),
                (3, 100, 350, 0),
                (5, 450, 2100, 1),
                (7, 2450, 50, 0),
                (8, 2600, 100, 0)
            ]
        );
        assert_eq!(spans[2].events, ["runner_requested", "runner_leased"]);
        assert_eq!(tiers(&h), ["cax11", "cax21"]);
    }

    #[test]
    fn an_empty_history_has_no_steps() {
        assert!(steps(&[]).is_empty());
    }
}
