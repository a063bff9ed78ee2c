//! P6 (issue 11): how long `Catalog::plan` takes on synthetic DAGs of 1,000 and 10,000
//! layers, against its anchor measured in the same run: a bare depth-first walk over the same
//! edges in a plain petgraph graph (what any plan must at least do: find the descendants).
//! Two shapes: a change to one tree's root (about 100-200 layers planned) and a change to
//! the root every tree is built on (every layer planned). `cargo bench -p lian-catalog
//! --bench plan` prints a Markdown table (recorded in BENCHMARKS.md).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use lian_catalog::Catalog;
use lian_catalog::synthetic::{name, synthetic};
use petgraph::graph::DiGraph;
use petgraph::visit::Dfs;

const RUNS: usize = 51;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut runs = Vec::with_capacity(RUNS);
    let mut n = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        n = black_box(f());
        runs.push(start.elapsed());
    }
    (median(runs), n)
}

/// The anchor: the same edges in a plain graph, and a walk from the changed layer.
fn anchor(catalog: &Catalog, changed: &str) -> impl FnMut() -> usize {
    let mut graph = DiGraph::<(), ()>::new();
    let mut index = BTreeMap::new();
    for layer in catalog.layers() {
        index.insert(layer.name.to_string(), graph.add_node(()));
    }
    for (parent, child) in catalog.edges() {
        graph.add_edge(index[parent.as_str()], index[child.as_str()], ());
    }
    let start = index[changed];
    move || {
        let mut dfs = Dfs::new(&graph, start);
        let mut seen = 0;
        while dfs.next(&graph).is_some() {
            seen += 1;
        }
        seen - 1
    }
}

fn main() {
    println!("| layers | changed | planned | plan (median of {RUNS}) | anchor: DFS | ratio |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for trees in [10, 100] {
        for shared_root in [false, true] {
            let catalog = synthetic(trees, 100, shared_root);
            let changed = name(0, 0).to_string();
            let (plan, planned) = time(|| catalog.plan(&changed).expect("a plan").len());
            let (walk, walked) = time(anchor(&catalog, &changed));
            assert_eq!(planned, walked, "the plan and the walk find the same layers");
            let shape = if shared_root {
                "the root of every tree"
            } else {
                "one tree's root"
            };
            println!(
                "| {} | {shape} | {planned} | {:.3} ms | {:.3} ms | {:.1}x |",
                trees * 100,
                plan.as_secs_f64() * 1e3,
                walk.as_secs_f64() * 1e3,
                plan.as_secs_f64() / walk.as_secs_f64()
            );
        }
    }
}
