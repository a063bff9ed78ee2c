//! The control plane's API, as the values that cross it: a worker asks for a runner
//! (`POST /api/v1/vm-pool`), reads a lease again (`GET /api/v1/vm-pool/{lease_id}`), gives
//! it back (`DELETE /api/v1/vm-pool/{lease_id}`), and records a build's usage
//! (`POST /api/v1/metrics`). Only the control plane holds provider
//! credentials; these types are all a worker sees of a lease.

use serde::{Deserialize, Serialize};

use crate::directives::{Actor, BuildDirectives, ComputeProvider};
use crate::sizing::RunnerType;
use crate::{BuildId, LayerName, LeaseKey, Workspace};

/// `POST /api/v1/vm-pool`: a runner for one attempt of one build. Asking twice with the
/// same lease key returns the same runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub lease_key: LeaseKey,
    pub provider: ComputeProvider,
    pub runner_type: RunnerType,
    pub workspace: Workspace,
    pub build_id: BuildId,
    /// Who holds it (a worker's name), shown by `GET /api/v1/vm-pool`.
    pub owner: String,
    /// The cache namespace whose engine store a docker_local runner starts from and, after
    /// a build that succeeded, hands back to (ADR lian-044); `None`: an empty engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_store: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Recorded before the provider is asked: a lease that never gets past this is still
    /// found, and destroyed, by its key.
    Creating,
    Ready,
}

/// A lease as the control plane records it (key-value bucket `lian-leases`, keyed by the
/// lease key, which is also the lease id of the API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub lease_id: LeaseKey,
    pub provider: ComputeProvider,
    pub runner_type: RunnerType,
    pub workspace: Workspace,
    pub build_id: BuildId,
    pub owner: String,
    pub state: LeaseState,
    /// Where the runner is reached ("local" for docker_local, the pool host's name, an address).
    #[serde(default)]
    pub host: String,
    /// The provider's own id for it (a server id, a VMID, a directory).
    #[serde(default)]
    pub provider_id: String,
    /// Seconds since the UNIX epoch.
    pub created_at: u64,
    /// A cloud runner's SSH host key (`ssh-ed25519 AAAA...`), generated for this lease: the
    /// only key a worker accepts from the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// The port a cloud runner's sshd answers on at `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
}

/// One lease in `GET /api/v1/vm-pool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseView {
    #[serde(flatten)]
    pub lease: Lease,
    pub age_secs: u64,
}

/// `POST /api/v1/metrics`: what one build used (step 6 of the lifecycle).
///
/// Unlike a request, a record is written by one version of lian and read by others (a
/// worker newer than its control plane, sizing reading records of older builds), so fields
/// are only ever added, each optional, and a field this version does not know is ignored:
/// refusing it would lose the record of a build a newer worker ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub workspace: Workspace,
    pub build_id: BuildId,
    pub runner_type: Option<RunnerType>,
    pub duration_ms: u64,
    pub cpu_p95: Option<f64>,
    pub mem_p95_gb: Option<f64>,
    /// The catalog layer built, if it is one: what `lian catalog plan --estimate` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerName>,
    /// When the build step ended (UNIX seconds; 0 in records from before it was kept).
    #[serde(default)]
    pub at: i64,
    /// The tier it was sized to, when it ran out of memory there and succeeded on
    /// `runner_type` (ADR-039): what sizing learns from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_from: Option<RunnerType>,
}

/// `GET /api/v1/p95?workspace=`: the usage tier-2 sizing reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct P95Answer {
    pub workspace: Workspace,
    /// `None` until the workspace has enough builds with usage.
    pub cpu_p95: Option<f64>,
    pub mem_p95_gb: Option<f64>,
    /// Whether an operator approved using it (`lian sizing approve`).
    pub approved: bool,
    /// The workspace's latest OOM escalation among its recent builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_learned: Option<crate::sizing::OomLearned>,
}

/// What `lian.<ws>.reaped.<lease-key>` records: a runner destroyed by the safety net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reaped {
    pub lease_key: LeaseKey,
    pub build_id: BuildId,
    pub reason: String,
    /// The worker or control replica that reaped it.
    pub by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
}

/// The longest a registry grant lives (and how long the bucket `lian-registry-grants` keeps
/// one): a build that runs longer asks again.
pub const REGISTRY_GRANT_MAX_SECS: u64 = 3 * 3600;

/// `POST /api/v1/registry-grants`: registry credentials for one build. The control plane
/// derives what they may read and write from the directives' actor (`cache::namespaces`),
/// never from a list the caller sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryGrantRequest {
    pub build_id: BuildId,
    pub directives: BuildDirectives,
    /// Shorter than [`REGISTRY_GRANT_MAX_SECS`] (a build's time budget); longer is cut to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A credential crossing the API: serialised as itself (the one place it must travel),
/// never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that hands it on (`docker login`, a config file).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The answer to a grant request: HTTP Basic credentials for the control plane's registry
/// gate, good for `reads` (pull) and `writes` (push) until `expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryGrant {
    /// The gate, as image references name it (`127.0.0.1:5001`).
    pub registry: String,
    pub username: String,
    pub password: Secret,
    pub reads: Vec<String>,
    pub writes: Vec<String>,
    /// Seconds since the UNIX epoch.
    pub expires_at: u64,
}

/// A grant as the control plane records it (key-value bucket `lian-registry-grants`, keyed
/// by username): the password only as its SHA-256, so the bucket holds nothing to log in with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryGrantRecord {
    pub username: String,
    pub build_id: BuildId,
    pub workspace: Workspace,
    /// Named in the gate's refusals.
    pub actor: Actor,
    /// Lowercase hex.
    pub password_sha256: String,
    pub reads: Vec<String>,
    pub writes: Vec<String>,
    pub expires_at: u64,
}

/// The error body of every refusal: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ApiErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiErrorDetail {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            error: ApiErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_shows_its_password_only_when_serialised() {
        let grant = RegistryGrant {
            registry: "127.0.0.1:5001".into(),
            username: "b1.0123456789abcdef".into(),
            password: Secret::new("grant-pass-4321"),
            reads: vec!["ci/ws".into()],
            writes: vec!["ci/ws".into()],
            expires_at: 1,
        };
        let shown = format!("{grant:?} {}", grant.password);
        assert!(
            !shown.contains("grant-pass-4321") && shown.contains("b1.0123456789abcdef"),
            "{shown}"
        );
        let wire = serde_json::to_value(&grant).unwrap();
        assert_eq!(wire["password"], "grant-pass-4321");
    }

    #[test]
    fn a_lease_request_refuses_unknown_fields_and_bad_names() {
        let ok = r#"{"lease_key":"b1-r1","provider":"docker_local","runner_type":"cax11","workspace":"ws","build_id":"b1","owner":"w1"}"#;
        assert!(serde_json::from_str::<LeaseRequest>(ok).is_ok());
        let unknown = ok.replace("\"owner\"", "\"token\":\"x\",\"owner\"");
        assert!(serde_json::from_str::<LeaseRequest>(&unknown).is_err());
        let bad_ws = ok.replace("\"ws\"", "\"a.b\"");
        assert!(serde_json::from_str::<LeaseRequest>(&bad_ws).is_err());
        let bad_provider = ok.replace("docker_local", "aws");
        assert!(serde_json::from_str::<LeaseRequest>(&bad_provider).is_err());
    }
}
