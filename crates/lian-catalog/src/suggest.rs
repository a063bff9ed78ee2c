//! `lian catalog suggest`: the catalog layer a Rust project should build FROM, and why,
//! from the facts its manifests state (read by the caller: this crate does no I/O). What
//! points at a layer is the layer's own `suggest_when` in the catalog, or its class (a layer
//! made for the project, a layer with the native libraries its tree links); the answer is
//! the most specific layer that matched (one built on another wins over it), and every
//! match is reported.

use std::collections::BTreeSet;

use lian_core::LayerName;
use serde::Serialize;

use crate::{Catalog, LayerClass};

/// What a project's `Cargo.toml`, `Cargo.lock`, `.cargo/config.toml` and
/// `rust-toolchain.toml` say, as far as choosing a layer goes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Project {
    /// The package's name and its workspace members' names.
    pub names: BTreeSet<String>,
    /// What its manifests depend on directly (the workspace's members' too).
    pub dependencies: BTreeSet<String>,
    /// Every package in its `Cargo.lock`: the whole tree, for every platform, so only what
    /// matters at any depth (a `-sys` crate's native library) is asked of it.
    pub locked: BTreeSet<String>,
    /// Targets it builds for (`build.target`, the toolchain file's `targets`).
    pub targets: BTreeSet<String>,
    /// The tables under `[package.metadata]` and `[workspace.metadata]`: tools configured there.
    pub metadata: BTreeSet<String>,
}

/// `-sys` crates and the Debian packages that provide what they link.
const NATIVE: [(&str, &str); 4] = [
    ("openssl-sys", "libssl-dev"),
    ("oqs-sys", "liboqs-dev"),
    ("ort-sys", "libonnxruntime-dev"),
    ("onnxruntime-sys", "libonnxruntime-dev"),
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Match {
    pub layer: LayerName,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suggestion {
    /// The layer to build FROM.
    pub layer: LayerName,
    /// Why: the matches on it.
    pub reasons: Vec<String>,
    /// Every layer that matched, the chosen one too, in catalog order.
    pub matched: Vec<Match>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SuggestError {
    #[error("the catalog has no toolchain layer providing cargo to fall back on")]
    NoToolchain,
}

pub fn suggest(catalog: &Catalog, project: &Project) -> Result<Suggestion, SuggestError> {
    let mut matched = Vec::new();
    let has = |dep: &str| project.dependencies.contains(dep);
    let needs: BTreeSet<&str> = NATIVE
        .iter()
        .filter(|(krate, _)| has(krate) || project.locked.contains(*krate))
        .map(|(_, package)| *package)
        .collect();
    for layer in catalog.layers() {
        let name = layer.name.as_str();
        let mut reasons = Vec::new();
        if matches!(layer.class, LayerClass::SourceDep | LayerClass::NativeDep) && project.names.contains(name) {
            reasons.push(format!(
                "the catalog has a layer made for the project {name}: its dependencies are cooked there"
            ));
        }
        let when = &layer.suggest_when;
        for dep in when.dependencies.iter().filter(|d| has(d)) {
            reasons.push(format!("it depends on {dep}, which {name} is made for{}", tools(layer)));
        }
        for pattern in &when.targets {
            let matches = |t: &&String| pattern.strip_suffix('*').map_or(*t == pattern, |p| t.starts_with(p));
            if let Some(target) = project.targets.iter().find(matches) {
                reasons.push(format!("it builds for {target}, which {name} installs"));
            }
        }
        for table in when.metadata.iter().filter(|t| project.metadata.contains(*t)) {
            reasons.push(format!(
                "its Cargo.toml configures [package.metadata.{table}], which {name}'s tools read"
            ));
        }
        if layer.class == LayerClass::NativeDep && !layer.native_deps.is_empty() {
            let provided: BTreeSet<&str> = layer.native_deps.iter().map(String::as_str).collect();
            if provided.iter().all(|p| needs.contains(p)) {
                let list: Vec<&str> = provided.into_iter().collect();
                reasons.push(format!(
                    "its dependency tree links {}, which {name} installs",
                    list.join(", ")
                ));
            }
        }
        matched.extend(reasons.into_iter().map(|reason| Match {
            layer: layer.name.clone(),
            reason,
        }));
    }
    let candidates: BTreeSet<&LayerName> = matched.iter().map(|m| &m.layer).collect();
    // The most specific: a candidate no other candidate is built on, preferring a layer made
    // for the project, then the one with the most reasons.
    let below = |a: &LayerName, b: &LayerName| catalog.plan(a.as_str()).is_ok_and(|plan| plan.contains(b));
    let chosen = candidates
        .iter()
        .filter(|c| !candidates.iter().any(|other| below(c, other)))
        .max_by_key(|c| {
            let reasons: Vec<&Match> = matched.iter().filter(|m| &m.layer == **c).collect();
            let made_for = reasons
                .iter()
                .any(|m| m.reason.starts_with("the catalog has a layer made"));
            (made_for, reasons.len())
        })
        .map(|c| (*c).clone());
    let layer = match chosen {
        Some(layer) => layer,
        None => {
            let root = catalog
                .layers()
                .find(|l| l.class == LayerClass::Toolchain && l.tools_provided.iter().any(|t| t == "cargo"))
                .ok_or(SuggestError::NoToolchain)?;
            return Ok(Suggestion {
                layer: root.name.clone(),
                reasons: vec![format!(
                    "nothing it depends on needs more than the Rust toolchain: {} has cargo, rustc, cargo-chef and sccache",
                    root.name
                )],
                matched,
            });
        }
    };
    Ok(Suggestion {
        reasons: matched
            .iter()
            .filter(|m| m.layer == layer)
            .map(|m| m.reason.clone())
            .collect(),
        layer,
        matched,
    })
}

/// ` (it adds a, b)` from the layer's tools, or nothing.
fn tools(layer: &crate::Layer) -> String {
    if layer.tools_provided.is_empty() {
        String::new()
    } else {
        format!(" (it adds {})", layer.tools_provided.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Base, Layer, SuggestWhen};

    fn layer(name: &str, class: LayerClass, on: Option<&str>, tools: &[&str], native: &[&str]) -> Layer {
        Layer {
            suggest_when: SuggestWhen::default(),
            name: LayerName::new(name).unwrap(),
            class,
            description: String::new(),
            build_base: match on {
                Some(parent) => Base::Layer {
                    layer: LayerName::new(parent).unwrap(),
                },
                None => Base::Image {
                    image: "rust:slim-bookworm".into(),
                },
            },
            runtime_base: Base::Image {
                image: "debian:bookworm-slim".into(),
            },
            donors: vec![],
            tools_provided: tools.iter().map(|t| t.to_string()).collect(),
            artifact_paths: vec!["/usr/local/bin".into()],
            native_deps: native.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// Layer names of this test's own, not the lamina catalog's: code names no catalog
    /// layer (lamina ADR-003), and the rules under test come from each layer's `suggest_when`.
    fn catalog() -> Catalog {
        let web = Layer {
            suggest_when: SuggestWhen {
                dependencies: vec!["bindgen".into()],
                targets: vec!["web32-*".into()],
                metadata: vec![],
            },
            ..layer("web", LayerClass::Toolchain, Some("rust"), &["bindgen-cli"], &[])
        };
        let ui = Layer {
            suggest_when: SuggestWhen {
                dependencies: vec!["ui-kit".into()],
                targets: vec![],
                metadata: vec!["ui-kit".into()],
            },
            ..layer("ui", LayerClass::Toolchain, Some("web"), &["cargo-ui"], &[])
        };
        Catalog::new(vec![
            layer("rust", LayerClass::Toolchain, None, &["cargo", "rustc"], &[]),
            web,
            ui,
            layer(
                "vault",
                LayerClass::NativeDep,
                Some("rust"),
                &[],
                &["liboqs-dev", "libssl-dev"],
            ),
        ])
        .unwrap()
    }

    fn project(deps: &[&str]) -> Project {
        Project {
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_lock_file_counts_for_native_libraries_only() {
        // A Cargo.lock lists every platform's dependencies: bindgen deep in it says
        // nothing about the project; openssl-sys anywhere in it still needs libssl.
        let deep = Project {
            locked: ["bindgen", "ui-kit", "openssl-sys", "oqs-sys"].map(String::from).into(),
            ..Default::default()
        };
        let s = suggest(&catalog(), &deep).unwrap();
        assert_eq!(s.layer.as_str(), "vault", "{s:?}");
        assert!(s.matched.iter().all(|m| m.layer.as_str() == "vault"), "{s:?}");
    }

    #[test]
    fn the_most_specific_layer_wins_and_every_match_is_said() {
        let s = suggest(&catalog(), &project(&["ui-kit", "bindgen"])).unwrap();
        assert_eq!(s.layer.as_str(), "ui", "ui is built on web: {s:?}");
        assert_eq!(s.matched.len(), 2);
        assert!(s.matched.iter().any(|m| m.layer.as_str() == "web"));
        assert!(
            s.reasons[0].contains("cargo-ui"),
            "the reason names the layer's tools: {s:?}"
        );
        let configured = Project {
            metadata: ["ui-kit".to_string()].into(),
            ..Default::default()
        };
        assert_eq!(suggest(&catalog(), &configured).unwrap().layer.as_str(), "ui");
    }

    #[test]
    fn a_plain_project_gets_the_toolchain_and_native_libraries_need_all_of_a_layers() {
        let plain = suggest(&catalog(), &project(&["regex", "serde"])).unwrap();
        assert_eq!(plain.layer.as_str(), "rust");
        assert!(plain.matched.is_empty());
        let only_ssl = suggest(&catalog(), &project(&["openssl-sys"])).unwrap();
        assert_eq!(only_ssl.layer.as_str(), "rust", "vault installs more than it needs");
        let both = suggest(&catalog(), &project(&["openssl-sys", "oqs-sys"])).unwrap();
        assert_eq!(both.layer.as_str(), "vault", "{both:?}");
        let web_target = Project {
            targets: ["web32-unknown-unknown".to_string()].into(),
            ..Default::default()
        };
        assert_eq!(suggest(&catalog(), &web_target).unwrap().layer.as_str(), "web");
        let other_target = Project {
            targets: ["web64-unknown-unknown".to_string()].into(),
            ..Default::default()
        };
        assert_eq!(suggest(&catalog(), &other_target).unwrap().layer.as_str(), "rust");
    }
}
