//! The build request a caller publishes on `lian.<ws>.build.request`.

use serde::{Deserialize, Serialize};

use crate::directives::BuildDirectives;
use crate::names::{BuildId, CascadeId, LayerName};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// Chosen by the caller (`lian submit` does) so it can follow the build before the
    /// worker answers; when absent the worker derives one from the request's stream
    /// sequence, which a redelivery keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<BuildId>,
    pub directives: BuildDirectives,
    pub context: ContextRef,
    /// Set when this build is a lamina catalog layer: its completion starts a cascade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerName>,
    /// Set when the cascade service asked for this build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<CascadeRef>,
    /// Parents pinned by digest (the catalog lock): the image the Dockerfile names (`FROM
    /// lamina/rust:latest`) -> where the registry holds the one to use
    /// (`ci/lamina/lamina/rust@sha256:…`, registry-relative). The cascade sets them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub parents: std::collections::BTreeMap<String, String>,
}

/// Whether `pin` is a registry-relative reference by digest (`path/to/repo@sha256:<64 hex>`):
/// the only form a parent pin may take, since it reaches a `docker pull`.
pub fn is_pinned_reference(pin: &str) -> bool {
    let Some((repo, digest)) = pin.split_once("@sha256:") else {
        return false;
    };
    let repo_ok = !repo.is_empty()
        && !repo.starts_with(['/', '-', '.'])
        && repo
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c));
    repo_ok && digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

/// Where the build context lives: a manifest object in the context object store, listing
/// every file by content hash, so any worker can materialise it and an unchanged file is
/// stored once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextRef {
    pub manifest: String,
    #[serde(default)]
    pub files: u64,
    #[serde(default)]
    pub bytes: u64,
    /// Content bytes the submit had to send: the rest was already stored.
    #[serde(default)]
    pub sent_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeRef {
    pub id: CascadeId,
    /// The layer whose completion started the cascade.
    pub root: LayerName,
}

#[cfg(test)]
mod tests {
    use super::is_pinned_reference;

    #[test]
    fn only_a_registry_path_by_digest_is_a_pin() {
        let digest = "a".repeat(64);
        assert!(is_pinned_reference(&format!("ci/lamina/lamina/rust@sha256:{digest}")));
        for bad in [
            "ci/lamina/lamina/rust:latest".to_string(),
            format!("ci/rust@sha256:{}", "a".repeat(63)),
            format!("ci/rust@sha256:{}", "A".repeat(64)),
            format!("-rm@sha256:{digest}"),
            format!("/etc@sha256:{digest}"),
            format!("@sha256:{digest}"),
            format!("ci/Rust@sha256:{digest}"),
            format!("ci/rust x@sha256:{digest}"),
        ] {
            assert!(!is_pinned_reference(&bad), "{bad}");
        }
    }
}
