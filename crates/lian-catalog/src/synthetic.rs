//! Synthetic catalogs of any size, built as values, for benchmarks (the plan's speed, the
//! web view's page load): evaluating thousands of `workflow.ncl` files is not what those
//! measure.

use lian_core::LayerName;

use crate::{Base, Catalog, Layer, LayerClass};

/// `trees` trees of `per_tree` layers (layer `i` of a tree built on layer `(i-1)/2`), every
/// 25th layer of a tree also taking a donor from the tree before it. With `shared_root`,
/// every tree's root is built on the first tree's root, so a change there plans them all.
pub fn synthetic(trees: usize, per_tree: usize, shared_root: bool) -> Catalog {
    let mut layers = Vec::with_capacity(trees * per_tree);
    for t in 0..trees {
        for i in 0..per_tree {
            let build_base = match i {
                0 if shared_root && t > 0 => Base::Layer { layer: name(0, 0) },
                0 => Base::Image {
                    image: "scratch".into(),
                },
                _ => Base::Layer {
                    layer: name(t, (i - 1) / 2),
                },
            };
            layers.push(Layer {
                name: name(t, i),
                class: LayerClass::Toolchain,
                description: String::new(),
                build_base,
                runtime_base: Base::Image {
                    image: "scratch".into(),
                },
                donors: if t > 0 && i > 0 && i % 25 == 0 {
                    vec![name(t - 1, 3)]
                } else {
                    vec![]
                },
                tools_provided: vec![],
                artifact_paths: vec!["/opt".into()],
                native_deps: vec![],
                suggest_when: Default::default(),
            });
        }
    }
    Catalog::new(layers).expect("a valid synthetic catalog")
}

/// The name of layer `i` of tree `t`.
pub fn name(t: usize, i: usize) -> LayerName {
    LayerName::new(format!("t{t:03}-n{i:03}")).expect("a layer name")
}
