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
