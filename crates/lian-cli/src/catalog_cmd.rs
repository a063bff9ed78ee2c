//! `lian catalog validate | plan | graph`.

use std::process::ExitCode;

use lian_catalog::GraphFormat;
use lian_nickel::Schemas;

use crate::cli::{CatalogArgs, CatalogCommand, Format};
use crate::exit::Exit;

pub fn run(args: CatalogArgs) -> anyhow::Result<ExitCode> {
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
            println!(
                "catalog {} is valid: {layers} layers, {edges} edges, acyclic; every base exists; ADR-001 and ADR-002 hold",
                args.catalog.display()
            );
        }
        CatalogCommand::Plan { changed, json } => {
            let plan = catalog.plan(&changed)?;
            if json {
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
            let format = match format {
                Format::Dot => GraphFormat::Dot,
                Format::Mermaid => GraphFormat::Mermaid,
            };
            print!("{}", catalog.render(format));
        }
    }
    Ok(Exit::Ok.code())
}
