//! The lamina catalog as knowledge (lamina A2): the layer DAG, its validation (acyclic,
//! every base exists, lamina ADR-001 and ADR-002), the descendants of a changed layer in
//! build order, graph export, and the cascade state machine. Pure: layers come in as
//! values, evaluated from `workflow.ncl` by the caller.

pub mod cascade;
mod dag;
pub mod estimate;
mod graph;
pub mod suggest;
pub mod synthetic;

pub use dag::{Catalog, CatalogError};
pub use graph::GraphFormat;

use lian_core::LayerName;
use serde::{Deserialize, Serialize};

/// A layer's `workflow.ncl`, checked against `schemas/workflow.ncl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub name: LayerName,
    pub class: LayerClass,
    #[serde(default)]
    pub description: String,
    pub build_base: Base,
    pub runtime_base: Base,
    #[serde(default)]
    pub donors: Vec<LayerName>,
    #[serde(default)]
    pub tools_provided: Vec<String>,
    pub artifact_paths: Vec<String>,
    #[serde(default)]
    pub native_deps: Vec<String>,
    #[serde(default)]
    pub suggest_when: SuggestWhen,
}

/// What in a Rust project says to build FROM a layer: the catalog states it, so that no
/// layer's name or tool is known to code (lamina ADR-003).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuggestWhen {
    /// Crates a project depends on directly.
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Targets it builds for; one ending in `*` matches by prefix.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Tables under `[package.metadata]` or `[workspace.metadata]`.
    #[serde(default)]
    pub metadata: Vec<String>,
}

impl Layer {
    /// The catalog layers this one is built from: its build base (if a layer) and donors.
    pub fn parents(&self) -> impl Iterator<Item = &LayerName> {
        self.build_base.layer().into_iter().chain(self.donors.iter())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerClass {
    Toolchain,
    SourceDep,
    NativeDep,
}

/// A base is another catalog layer or an upstream image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Base {
    Layer { layer: LayerName },
    Image { image: String },
}

impl Base {
    pub fn layer(&self) -> Option<&LayerName> {
        match self {
            Self::Layer { layer } => Some(layer),
            Self::Image { .. } => None,
        }
    }
}

impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Layer { layer } => write!(f, "layer {layer}"),
            Self::Image { image } => write!(f, "image {image}"),
        }
    }
}
