//! Every subject, stream and consumer name, in one place (documented in `subjects.md`).
//! Requests have four tokens and events five, so the work-queue stream on requests and the
//! events stream never overlap (NATS refuses overlapping stream subjects).

use crate::names::{BuildId, CascadeId, Workspace};

pub const PREFIX: &str = "lian";
pub const REQUESTS_STREAM: &str = "LIAN_REQUESTS";
pub const EVENTS_STREAM: &str = "LIAN_EVENTS";
pub const WORKERS_CONSUMER: &str = "lian-workers";
pub const CASCADE_CONSUMER: &str = "lian-cascade";
pub const METRICS_BUCKET: &str = "lian-metrics";
pub const CONTROL_STREAM: &str = "LIAN_CONTROL";
pub const DEAD_LETTER_BUCKET: &str = "lian-dead-letters";
pub const SIZING_BUCKET: &str = "lian-sizing";
/// The control plane's leases, keyed by lease key.
pub const LEASE_BUCKET: &str = "lian-leases";
/// The registry gate's grants, keyed by username.
pub const REGISTRY_GRANT_BUCKET: &str = "lian-registry-grants";
/// Each catalog layer's latest completed image, keyed by layer (early cutoff, the lock).
pub const LAYER_BUCKET: &str = "lian-layers";

pub const ALL_CANCELS: &str = "lian.*.cancel.*";
pub const ALL_REAPED: &str = "lian.*.reaped.*";

pub const ALL_REQUESTS: &str = "lian.*.build.request";
pub const ALL_BUILD_EVENTS: &str = "lian.*.build.*.*";
pub const ALL_CASCADE_EVENTS: &str = "lian.*.cascade.*.*";
/// Every build's live BuildKit progress (core NATS, not stored).
pub const ALL_PROGRESS: &str = "lian.*.progress.*";
pub const ALL_TERMINAL_BUILD_EVENTS: [&str; 2] = ["lian.*.build.*.completed", "lian.*.build.*.failed"];

/// What the cascade service hears: every build's end, and every approval of a cascade that
/// waits for one (`lian cascade approve`).
pub const CASCADE_INPUTS: [&str; 3] = [
    ALL_TERMINAL_BUILD_EVENTS[0],
    ALL_TERMINAL_BUILD_EVENTS[1],
    "lian.*.cascade.*.approved",
];

/// Where writers append events (ADR lian-045): `_lian.append.<event subject>`, outside
/// `lian.>`. The events stream takes these in, stores each under its event subject (a
/// subject transform) and, once stored, republishes it there, so `lian.>` carries exactly
/// the stored history: an append the stream refuses (a lost expected-sequence race, a
/// duplicate) never reaches a subscriber.
pub const APPEND_PREFIX: &str = "_lian.append";
/// What the events stream takes in (its `subjects`).
pub const EVENT_APPENDS: [&str; 2] = ["_lian.append.lian.*.build.*.*", "_lian.append.lian.*.cascade.*.*"];

/// The subject a writer publishes `subject` on to append it: the append subject for an
/// event (of a build or a cascade), `subject` itself for anything else.
pub fn append_subject(subject: &str) -> std::borrow::Cow<'_, str> {
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        [PREFIX, _, "build" | "cascade", _, _] => format!("{APPEND_PREFIX}.{subject}").into(),
        _ => subject.into(),
    }
}

pub fn request(ws: &Workspace) -> String {
    format!("{PREFIX}.{ws}.build.request")
}

pub fn build_event(ws: &Workspace, build: &BuildId, kind: &str) -> String {
    format!("{PREFIX}.{ws}.build.{build}.{kind}")
}

/// Every event of one build, whatever its workspace.
pub fn build_history(build: &BuildId) -> String {
    format!("{PREFIX}.*.build.{build}.*")
}

pub fn cascade_event(ws: &Workspace, cascade: &CascadeId, kind: &str) -> String {
    format!("{PREFIX}.{ws}.cascade.{cascade}.{kind}")
}

pub fn cascade_history(cascade: &CascadeId) -> String {
    format!("{PREFIX}.*.cascade.{cascade}.*")
}

/// Where `lian cancel` asks a build to stop; the worker reads the last message here
/// before every effect.
pub fn cancel(ws: &Workspace, build: &BuildId) -> String {
    format!("{PREFIX}.{ws}.cancel.{build}")
}

/// Live BuildKit step progress of a build: core NATS only, not stored.
pub fn progress(ws: &Workspace, build: &BuildId) -> String {
    format!("{PREFIX}.{ws}.progress.{build}")
}

/// Where the reaper records a runner it destroyed.
pub fn reaped(ws: &Workspace, lease: &crate::LeaseKey) -> String {
    format!("{PREFIX}.{ws}.reaped.{lease}")
}

/// Where a host announces a warm docker_local engine ready for a lease (core NATS only).
/// `_pool` starts with '_', which no workspace may: it never meets a workspace's subjects.
pub fn warm_engine_ready(tier: crate::sizing::RunnerType) -> String {
    format!("{PREFIX}._pool.{}.ready", tier.as_str())
}

/// The workspace token of a request subject `lian.<ws>.build.request`, unvalidated.
pub fn workspace_token(subject: &str) -> Option<&str> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(PREFIX), Some(ws), Some("build"), Some("request"), None) => Some(ws),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_have_the_documented_shape() {
        let ws = Workspace::new("ws").unwrap();
        let b = BuildId::new("b1").unwrap();
        assert_eq!(request(&ws), "lian.ws.build.request");
        assert_eq!(build_event(&ws, &b, "started"), "lian.ws.build.b1.started");
        assert_eq!(workspace_token("lian.ws.build.request"), Some("ws"));
        assert_eq!(workspace_token("lian.ws.build.b1.started"), None);
        assert_eq!(
            append_subject("lian.ws.build.b1.started"),
            "_lian.append.lian.ws.build.b1.started"
        );
        assert_eq!(
            append_subject("lian.ws.cascade.c1.done"),
            "_lian.append.lian.ws.cascade.c1.done"
        );
        assert_eq!(append_subject("lian.ws.build.request"), "lian.ws.build.request");
        assert_eq!(append_subject("lian.ws.cancel.b1"), "lian.ws.cancel.b1");
    }
}
