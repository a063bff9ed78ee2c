//! Graph export: `lian catalog graph --format dot|mermaid`.

use std::fmt::Write;

use crate::{Base, Catalog};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    Dot,
    Mermaid,
}

impl Catalog {
    /// The DAG with upstream images as their own nodes, parents pointing at children.
    pub fn render(&self, format: GraphFormat) -> String {
        let mut out = String::new();
        let mut images: Vec<(&str, &str)> = self
            .layers()
            .filter_map(|l| match &l.build_base {
                Base::Image { image } => Some((image.as_str(), l.name.as_str())),
                Base::Layer { .. } => None,
            })
            .collect();
        images.sort();
        let donors: Vec<(&str, &str)> = self
            .layers()
            .flat_map(|l| l.donors.iter().map(move |d| (d.as_str(), l.name.as_str())))
            .collect();
        let is_donor = |a: &str, b: &str| donors.contains(&(a, b));
        match format {
            GraphFormat::Dot => {
                out.push_str("digraph lamina {\n  rankdir=LR;\n");
                for l in self.layers() {
                    let _ = writeln!(out, "  \"{}\" [shape=box];", l.name);
                }
                for (image, layer) in &images {
                    let _ = writeln!(out, "  \"{image}\" [shape=ellipse, style=dashed];");
                    let _ = writeln!(out, "  \"{image}\" -> \"{layer}\";");
                }
                for (a, b) in self.edges() {
                    let style = if is_donor(a.as_str(), b.as_str()) {
                        " [style=dotted, label=\"COPY --from\"]"
                    } else {
                        ""
                    };
                    let _ = writeln!(out, "  \"{a}\" -> \"{b}\"{style};");
                }
                out.push_str("}\n");
            }
            GraphFormat::Mermaid => {
                out.push_str("graph LR\n");
                let id = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
                for (image, layer) in &images {
                    let _ = writeln!(out, "  {}([\"{image}\"]) --> {}", id(image), id(layer));
                }
                for (a, b) in self.edges() {
                    let arrow = if is_donor(a.as_str(), b.as_str()) {
                        "-.->"
                    } else {
                        "-->"
                    };
                    let _ = writeln!(out, "  {} {arrow} {}", id(a.as_str()), id(b.as_str()));
                }
            }
        }
        out
    }
}
