//! `lian catalog validate | plan | graph`.

use std::process::ExitCode;

use lian_catalog::GraphFormat;
use lian_nickel::Schemas;

use crate::cli::{CatalogArgs, CatalogCommand, Format, Global};
use crate::exit::Exit;

pub fn run(global: &Global, args: CatalogArgs) -> anyhow::Result<ExitCode> {
    let schemas = Schemas::embedded()?;
    let catalog = match lian_cascade::load_catalog(&args.catalog, &schemas) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(Exit::Failed.code());
        }
    };
    match args.command {
        CatalogCommand::Bootstrap(_) => unreachable!("main.rs dispatches bootstrap to crate::bootstrap"),
        CatalogCommand::Validate => {
            let layers = catalog.layers().count();
            let edges = catalog.edges().len();
            if global.json(false) {
                println!(
                    "{}",
                    serde_json::json!({"catalog": args.catalog, "valid": true, "layers": layers, "edges": edges})
                );
                return Ok(Exit::Ok.code());
            }
            println!(
                "catalog {} is valid: {layers} layers, {edges} edges, acyclic; every base exists; ADR-001 and ADR-002 hold",
                args.catalog.display()
            );
        }
        CatalogCommand::Plan { changed, json } => {
            let plan = catalog.plan(&changed)?;
            if global.json(json) {
                println!("{}", serde_json::to_string(&plan)?);
            } else {
                println!("{} layers rebuild when {changed} changes, in this order:", plan.len());
                for (i, layer) in plan.iter().enumerate() {
                    let spec = catalog.get(layer.as_str())?;
                    let parents: Vec<&str> = spec.parents().map(|p| p.as_str()).collect();
                    println!("  {:>2}. {layer}  (after {})", i + 1, parents.join(", "));
                }
            }
        }
        CatalogCommand::Graph { format } => {
            let (name, format) = match format {
                Format::Dot => ("dot", GraphFormat::Dot),
                Format::Mermaid => ("mermaid", GraphFormat::Mermaid),
            };
            if global.json(false) {
                println!(
                    "{}",
                    serde_json::json!({"format": name, "graph": catalog.render(format)})
                );
            } else {
                print!("{}", catalog.render(format));
            }
        }
    }
    Ok(Exit::Ok.code())
}
