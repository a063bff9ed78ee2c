//! The catalog DAG drawn server-side as inline SVG: layers in columns by depth (the longest
//! path from a root, `Catalog::depths`), ordered within a column by the mean row of their
//! parents (one barycentre sweep: few crossings for catalogs shaped like lamina's), edges
//! from parent to child as curves. No script lays anything out.

use std::collections::{BTreeMap, BTreeSet};

use lian_catalog::Catalog;
use maud::{Markup, html};

use super::live::{LayerState, LayerView};

pub const NODE_W: u32 = 230;
pub const NODE_H: u32 = 66;
const COL_GAP: u32 = 70;
const ROW_GAP: u32 = 18;
const MARGIN: u32 = 10;

/// One placed node.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub name: String,
    pub depth: usize,
    pub row: usize,
}

impl Placed {
    fn x(&self) -> u32 {
        MARGIN + self.depth as u32 * (NODE_W + COL_GAP)
    }
    fn y(&self) -> u32 {
        MARGIN + self.row as u32 * (NODE_H + ROW_GAP)
    }
}

/// A layered layout of `shown` (all layers of `catalog` when `None`).
pub struct Layout {
    pub nodes: Vec<Placed>,
    /// Parent -> child, as indexes into `nodes`.
    pub edges: Vec<(usize, usize)>,
}

impl Layout {
    pub fn new(catalog: &Catalog, depths: &BTreeMap<String, usize>, shown: Option<&BTreeSet<String>>) -> Self {
        let visible = |n: &str| shown.is_none_or(|s| s.contains(n));
        // Columns re-numbered so a filtered view starts at its shallowest layer.
        let mut columns: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for layer in catalog.layers() {
            let name = layer.name.as_str();
            if visible(name) {
                columns.entry(depths[name]).or_default().push(name.to_string());
            }
        }
        let parents: BTreeMap<&str, Vec<&str>> = catalog
            .layers()
            .filter(|l| visible(l.name.as_str()))
            .map(|l| {
                (
                    l.name.as_str(),
                    l.parents().map(|p| p.as_str()).filter(|p| visible(p)).collect(),
                )
            })
            .collect();
        let mut row_of: BTreeMap<String, usize> = BTreeMap::new();
        let mut nodes = Vec::new();
        for (column, (_, mut names)) in columns.into_iter().enumerate() {
            // Barycentre of the parents' rows; ties (and roots) by name.
            let key = |n: &String| -> f64 {
                let rows: Vec<usize> = parents[n.as_str()]
                    .iter()
                    .filter_map(|p| row_of.get(*p).copied())
                    .collect();
                if rows.is_empty() {
                    f64::MAX
                } else {
                    rows.iter().sum::<usize>() as f64 / rows.len() as f64
                }
            };
            names.sort_by(|a, b| key(a).total_cmp(&key(b)).then_with(|| a.cmp(b)));
            for (row, name) in names.into_iter().enumerate() {
                row_of.insert(name.clone(), row);
                nodes.push(Placed {
                    name,
                    depth: column,
                    row,
                });
            }
        }
        let index: BTreeMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
        let mut edges: Vec<(usize, usize)> = parents
            .iter()
            .flat_map(|(child, ps)| ps.iter().map(|p| (index[p], index[child])))
            .collect();
        edges.sort_unstable();
        edges.dedup();
        Self { nodes, edges }
    }

    fn size(&self) -> (u32, u32) {
        let w = self.nodes.iter().map(|n| n.x() + NODE_W).max().unwrap_or(0) + MARGIN;
        let h = self.nodes.iter().map(|n| n.y() + NODE_H).max().unwrap_or(0) + MARGIN;
        (w, h)
    }
}

/// `sha256:0123456789abcdef…` as `0123456789ab`.
pub fn short_digest(image_id: &str) -> &str {
    let hex = image_id.split_once(':').map_or(image_id, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

/// `1.2 s`, `3 min 4 s`.
pub fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms < 1_000 => format!("{ms} ms"),
        ms if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        ms => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn state_label(view: &LayerView) -> String {
    match (view.state, &view.step) {
        (LayerState::Running, Some(step)) => format!("running: {step}"),
        (LayerState::CutOff, _) => "cut off".to_string(),
        (LayerState::Blocked, _) => "blocked: a parent failed".to_string(),
        (state, _) => state.as_str().to_string(),
    }
}

/// The SVG, each node a link to its lineage (`/catalog?layer=NAME`), carrying
/// `data-layer` and `data-state` for whoever reads the page (and its tests).
pub fn svg(layout: &Layout, views: &BTreeMap<String, LayerView>, focus: Option<&str>) -> Markup {
    let (w, h) = layout.size();
    html! {
        svg.dag xmlns="http://www.w3.org/2000/svg" width=(w) height=(h) viewBox={"0 0 " (w) " " (h)} role="img" aria-label="catalog DAG" {
            g.edges {
                @for (p, c) in &layout.edges {
                    @let (p, c) = (&layout.nodes[*p], &layout.nodes[*c]);
                    @let (x1, y1, x2, y2) = (p.x() + NODE_W, p.y() + NODE_H / 2, c.x(), c.y() + NODE_H / 2);
                    @let mid = (x1 + x2) / 2;
                    path.edge d={"M" (x1) "," (y1) " C" (mid) "," (y1) " " (mid) "," (y2) " " (x2) "," (y2)}
                        data-from=(p.name) data-to=(c.name) {}
                }
            }
            @for n in &layout.nodes {
                @let view = &views[&n.name];
                @let built = view.built.as_ref();
                a href={"/catalog?layer=" (n.name)} {
                    g class={"node s-" (view.state.as_str()) @if focus == Some(n.name.as_str()) { " focus" }}
                        data-layer=(n.name) data-state=(view.state.as_str())
                        transform={"translate(" (n.x()) "," (n.y()) ")"} {
                        title { (n.name) ": " (state_label(view)) }
                        rect width=(NODE_W) height=(NODE_H) rx="6" {}
                        text.name x="10" y="20" { (n.name) }
                        text.state x="10" y="38" { (state_label(view)) }
                        text.figures x="10" y="56" {
                            @match built {
                                Some(b) => {
                                    (short_digest(&b.image_id)) " · " (human_ms(b.duration_ms))
                                    @if let Some((hit, of)) = b.cache { " · " (hit) "/" (of) " cached" }
                                }
                                None => "not built yet",
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lian_catalog::{Base, Layer, LayerClass};
    use lian_core::LayerName;

    use super::*;

    fn layer(n: &str, base: Option<&str>, donors: &[&str]) -> Layer {
        let name = |s: &str| LayerName::new(s).unwrap();
        Layer {
            name: name(n),
            class: LayerClass::Toolchain,
            description: String::new(),
            build_base: match base {
                Some(b) => Base::Layer { layer: name(b) },
                None => Base::Image {
                    image: "scratch".into(),
                },
            },
            runtime_base: Base::Image {
                image: "scratch".into(),
            },
            donors: donors.iter().map(|d| name(d)).collect(),
            tools_provided: vec![],
            artifact_paths: vec![],
            native_deps: vec![],
            suggest_when: Default::default(),
        }
    }

    fn example() -> (Catalog, BTreeMap<String, usize>) {
        let c = Catalog::new(vec![
            layer("base", None, &[]),
            layer("tools", Some("base"), &[]),
            layer("deps", Some("base"), &[]),
            layer("app", Some("tools"), &["deps"]),
        ])
        .unwrap();
        let depths = c.depths().into_iter().map(|(n, d)| (n.to_string(), d)).collect();
        (c, depths)
    }

    #[test]
    fn layers_sit_in_columns_by_depth_with_every_edge() {
        let (c, depths) = example();
        let l = Layout::new(&c, &depths, None);
        let at: BTreeMap<&str, (usize, usize)> = l.nodes.iter().map(|n| (n.name.as_str(), (n.depth, n.row))).collect();
        assert_eq!(at["base"], (0, 0));
        assert_eq!(at["deps"].0, 1);
        assert_eq!(at["tools"].0, 1);
        assert_eq!(at["app"], (2, 0));
        let names: BTreeSet<(&str, &str)> = l
            .edges
            .iter()
            .map(|(p, c)| (l.nodes[*p].name.as_str(), l.nodes[*c].name.as_str()))
            .collect();
        let expected: BTreeSet<(&str, &str)> = c.edges().into_iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn a_filtered_view_starts_at_its_shallowest_layer() {
        let (c, depths) = example();
        let shown: BTreeSet<String> = ["tools", "app"].map(String::from).into();
        let l = Layout::new(&c, &depths, Some(&shown));
        let at: Vec<(&str, usize)> = l.nodes.iter().map(|n| (n.name.as_str(), n.depth)).collect();
        assert_eq!(at, [("tools", 0), ("app", 1)]);
        assert_eq!(l.edges, [(0, 1)]);
    }

    #[test]
    fn digests_and_durations_read_short() {
        assert_eq!(short_digest("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_digest("abc"), "abc");
        assert_eq!(human_ms(950), "950 ms");
        assert_eq!(human_ms(1_250), "1.2 s");
        assert_eq!(human_ms(185_000), "3 min 5 s");
    }
}
