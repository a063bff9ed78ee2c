use std::collections::{BTreeMap, BTreeSet};

use lian_core::LayerName;
use petgraph::graphmap::DiGraphMap;

use crate::{Layer, LayerClass};

/// Why a catalog is not valid; each names the layer and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("layer {layer} is declared twice")]
    Duplicate { layer: LayerName },
    #[error("layer {layer}: its {field} names layer {missing}, which is not in the catalog")]
    MissingBase {
        layer: LayerName,
        field: &'static str,
        missing: LayerName,
    },
    #[error("layers {cycle} depend on each other in a cycle: a catalog must be a DAG")]
    Cycle { cycle: String },
    #[error("layer {layer} (ADR-002): a native_dep layer must declare a non-empty native_deps")]
    NativeDepsMissing { layer: LayerName },
    #[error("layer {layer} (ADR-002): declares native_deps but its class is not native_dep")]
    NativeDepsOutsideClass { layer: LayerName },
    #[error("layer {layer} (ADR-001): {why}")]
    BaseSeparation { layer: LayerName, why: &'static str },
    #[error("no layer named {layer} in the catalog (known: {known})")]
    UnknownLayer { layer: String, known: String },
}

/// A validated catalog: a DAG of layers, edges from parent to child.
#[derive(Debug, Clone)]
pub struct Catalog {
    layers: BTreeMap<LayerName, Layer>,
    /// Parent -> child; node weights index `names`.
    graph: DiGraphMap<usize, ()>,
    names: Vec<LayerName>,
}

impl Catalog {
    /// Validates the layers and builds the DAG; every problem is reported, not just the first.
    pub fn new(layers: Vec<Layer>) -> Result<Self, Vec<CatalogError>> {
        let mut errors = Vec::new();
        let mut by_name = BTreeMap::new();
        for layer in layers {
            if by_name.contains_key(&layer.name) {
                errors.push(CatalogError::Duplicate {
                    layer: layer.name.clone(),
                });
            } else {
                by_name.insert(layer.name.clone(), layer);
            }
        }
        let names: Vec<LayerName> = by_name.keys().cloned().collect();
        let index: BTreeMap<&LayerName, usize> = names.iter().enumerate().map(|(i, n)| (n, i)).collect();
        let mut graph = DiGraphMap::new();
        for i in 0..names.len() {
            graph.add_node(i);
        }
        for layer in by_name.values() {
            check_rules(layer, &mut errors);
            let refs = layer
                .build_base
                .layer()
                .map(|l| ("build_base", l))
                .into_iter()
                .chain(layer.runtime_base.layer().map(|l| ("runtime_base", l)))
                .chain(layer.donors.iter().map(|l| ("donors", l)));
            for (field, parent) in refs {
                match index.get(parent) {
                    None => errors.push(CatalogError::MissingBase {
                        layer: layer.name.clone(),
                        field,
                        missing: parent.clone(),
                    }),
                    // runtime_base is where the artifacts run, not what they are built from
                    Some(&p) if field != "runtime_base" => {
                        graph.add_edge(p, index[&layer.name], ());
                    }
                    Some(_) => {}
                }
            }
        }
        if let Err(cycle) = petgraph::algo::toposort(&graph, None) {
            let start = cycle.node_id();
            let members: Vec<String> = petgraph::algo::tarjan_scc(&graph)
                .into_iter()
                .find(|scc| scc.contains(&start))
                .unwrap_or_else(|| vec![start])
                .into_iter()
                .map(|i| names[i].to_string())
                .collect();
            errors.push(CatalogError::Cycle {
                cycle: members.join(", "),
            });
        }
        if errors.is_empty() {
            Ok(Self {
                layers: by_name,
                graph,
                names,
            })
        } else {
            Err(errors)
        }
    }

    pub fn layers(&self) -> impl Iterator<Item = &Layer> {
        self.layers.values()
    }

    pub fn get(&self, name: &str) -> Result<&Layer, CatalogError> {
        self.layers.get(name).ok_or_else(|| CatalogError::UnknownLayer {
            layer: name.to_string(),
            known: self.names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    fn index(&self, name: &LayerName) -> usize {
        self.names.binary_search(name).expect("a layer of this catalog")
    }

    /// Every layer built, directly or not, on `changed`, in an order where each layer comes
    /// after all of its parents; ties are broken by name so the plan is stable.
    pub fn plan(&self, changed: &str) -> Result<Vec<LayerName>, CatalogError> {
        let root = self.get(changed)?.name.clone();
        let mut affected = BTreeSet::new();
        let mut stack = vec![self.index(&root)];
        while let Some(n) = stack.pop() {
            for child in self.graph.neighbors_directed(n, petgraph::Direction::Outgoing) {
                if affected.insert(child) {
                    stack.push(child);
                }
            }
        }
        // Kahn's algorithm restricted to the affected layers.
        let mut waiting: BTreeMap<usize, usize> = affected
            .iter()
            .map(|&n| {
                let parents = self
                    .graph
                    .neighbors_directed(n, petgraph::Direction::Incoming)
                    .filter(|p| affected.contains(p))
                    .count();
                (n, parents)
            })
            .collect();
        let mut ready: BTreeSet<&LayerName> = waiting
            .iter()
            .filter(|(_, w)| **w == 0)
            .map(|(n, _)| &self.names[*n])
            .collect();
        let mut order = Vec::with_capacity(affected.len());
        while let Some(name) = ready.pop_first() {
            let n = self.index(name);
            order.push(name.clone());
            for child in self.graph.neighbors_directed(n, petgraph::Direction::Outgoing) {
                if let Some(w) = waiting.get_mut(&child) {
                    *w -= 1;
                    if *w == 0 {
                        ready.insert(&self.names[child]);
                    }
                }
            }
        }
        Ok(order)
    }

    /// Each layer's depth: 0 for a layer built on no other layer, else one more than its
    /// deepest parent (the longest path from a root). The columns of a layered drawing.
    pub fn depths(&self) -> BTreeMap<&LayerName, usize> {
        let order = petgraph::algo::toposort(&self.graph, None).expect("a validated catalog is acyclic");
        let mut depth = vec![0usize; self.names.len()];
        for n in order {
            for child in self.graph.neighbors_directed(n, petgraph::Direction::Outgoing) {
                depth[child] = depth[child].max(depth[n] + 1);
            }
        }
        self.names.iter().zip(depth).collect()
    }

    /// `name`, every layer it is built on (directly or not) and every layer built on it:
    /// the part of the DAG that matters to one layer.
    pub fn lineage(&self, name: &str) -> Result<BTreeSet<&LayerName>, CatalogError> {
        let root = self.index(&self.get(name)?.name);
        let mut seen = BTreeSet::from([root]);
        for direction in [petgraph::Direction::Outgoing, petgraph::Direction::Incoming] {
            let mut stack = vec![root];
            while let Some(n) = stack.pop() {
                for next in self.graph.neighbors_directed(n, direction) {
                    if seen.insert(next) {
                        stack.push(next);
                    }
                }
            }
        }
        Ok(seen.into_iter().map(|i| &self.names[i]).collect())
    }

    /// Parent -> child edges, sorted.
    pub fn edges(&self) -> Vec<(&LayerName, &LayerName)> {
        let mut edges: Vec<_> = self
            .graph
            .all_edges()
            .map(|(a, b, _)| (&self.names[a], &self.names[b]))
            .collect();
        edges.sort();
        edges
    }
}

fn check_rules(layer: &Layer, errors: &mut Vec<CatalogError>) {
    let name = || layer.name.clone();
    match (layer.class, layer.native_deps.is_empty()) {
        (LayerClass::NativeDep, true) => errors.push(CatalogError::NativeDepsMissing { layer: name() }),
        (LayerClass::Toolchain | LayerClass::SourceDep, false) => {
            errors.push(CatalogError::NativeDepsOutsideClass { layer: name() })
        }
        _ => {}
    }
    let own = Some(&layer.name);
    if layer.build_base.layer() == own || layer.runtime_base.layer() == own {
        errors.push(CatalogError::BaseSeparation {
            layer: name(),
            why: "a layer cannot be its own base",
        });
    }
}

#[cfg(test)]
mod tests;
