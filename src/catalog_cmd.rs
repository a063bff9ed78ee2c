//! `lian catalog validate | plan | graph`.

use std::process::ExitCode;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;

use lian_catalog::GraphFormat;
use lian_catalog::estimate::Estimate;
use lian_nickel::Schemas;

use crate::cli::{CatalogArgs, CatalogCommand, Format, Global};
use crate::exit::Exit;

pub async fn run(global: &Global, args: CatalogArgs) -> anyhow::Result<ExitCode> {
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
        CatalogCommand::Plan {
            changed,
            json,
            estimate: true,
            parallelism,
        } => {
            let plan = catalog.plan(&changed)?;
            let estimate = estimate(global, &catalog, &plan, parallelism).await?;
            if global.json(json) {
                println!(
                    "{}",
                    serde_json::json!({"changed": changed, "plan": plan, "estimate": estimate})
                );
            } else {
                print!("{}", render_estimate(&changed, &estimate));
            }
        }
        CatalogCommand::Suggest { project } => {
            let facts = crate::project::read_project(&project)?;
            let s = lian_catalog::suggest::suggest(&catalog, &facts)?;
            if global.json(false) {
                println!("{}", serde_json::json!({"project": project, "suggestion": s}));
            } else {
                println!("FROM the {} layer", s.layer);
                for reason in &s.reasons {
                    println!("  because {reason}");
                }
                for m in s.matched.iter().filter(|m| m.layer != s.layer) {
                    println!("  also matched {}: {}", m.layer, m.reason);
                }
            }
        }
        CatalogCommand::Lock { check: true, .. } => return check_lock(global, &args.catalog, &catalog),
        CatalogCommand::Lock { write, .. } => {
            let settings = crate::config::Settings::load(global.config.as_deref())?;
            let bus = crate::roles::connect(global, "lian-catalog-lock", &settings).await?;
            let lock = bus.catalog_lock().await?;
            if write {
                let path = args.catalog.join(LOCK_FILE);
                let text = serde_json::to_string_pretty(&lock)? + "\n";
                std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!(
                    "wrote {} ({} layers, from cascade {})",
                    path.display(),
                    lock.layers.len(),
                    lock.cascade_id
                );
            }
            if global.json(false) {
                println!("{}", serde_json::to_string(&lock)?);
            } else if !write {
                println!(
                    "catalog lock from cascade {} ({} layers):",
                    lock.cascade_id,
                    lock.layers.len()
                );
                for (layer, image) in &lock.layers {
                    println!(
                        "  {layer:<24} {:<32} {}",
                        image.image,
                        image.pinned.as_deref().unwrap_or("(not pushed: no digest)")
                    );
                }
            }
        }
        CatalogCommand::Plan { changed, json, .. } => {
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

/// The plan's cost, from the fleet this command reaches.
async fn estimate(
    global: &Global,
    catalog: &lian_catalog::Catalog,
    plan: &[lian_core::LayerName],
    parallelism: Option<usize>,
) -> anyhow::Result<Estimate> {
    let settings = crate::config::Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(global, "lian-catalog-plan", &settings).await?;
    Ok(lian_cascade::estimate_plan(&bus, catalog, plan, parallelism).await?)
}

fn render_estimate(changed: &str, e: &Estimate) -> String {
    let minutes = |s: f64| format!("{:.1}", s / 60.0);
    let mut out = format!(
        "{} layers rebuild when {changed} changes; expected wall time {} min (P50), {} min (P90) on {} workers; {} min of builds\n",
        e.layers.len(),
        minutes(e.wall_p50_secs),
        minutes(e.wall_p90_secs),
        e.parallelism,
        minutes(e.build_p50_secs),
    );
    out.push_str(&format!(
        "  {:>3}  {:<24} {:<8} {:>7} {:>9} {:>9}\n",
        "#", "layer", "tier", "builds", "P50 min", "P90 min"
    ));
    for (i, l) in e.layers.iter().enumerate() {
        out.push_str(&format!(
            "  {:>3}  {:<24} {:<8} {:>7} {:>9} {:>9}{}\n",
            i + 1,
            l.layer.as_str(),
            l.tier.as_deref().unwrap_or("-"),
            l.samples,
            minutes(l.p50_secs),
            minutes(l.p90_secs),
            if l.samples == 0 {
                "  (no history: the median layer's)"
            } else {
                ""
            }
        ));
    }
    if e.without_history > 0 {
        out.push_str(&format!(
            "{} of {} layers have no recorded build: their times are a guess\n",
            e.without_history,
            e.layers.len()
        ));
    }
    out
}

/// Where `lian catalog lock --write` saves the lock, in the catalog directory.
const LOCK_FILE: &str = "catalog.lock";

/// `lian catalog lock --check`: every `FROM <image>@sha256:…` naming a locked layer's image
/// must be the digest the lock holds for it. Parents without a digest follow the lock when
/// a cascade builds them (it pins them), so they pass.
fn check_lock(global: &Global, dir: &Path, catalog: &lian_catalog::Catalog) -> anyhow::Result<ExitCode> {
    let path = dir.join(LOCK_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        crate::exit::Coded::error(
            Exit::Usage,
            format!(
                "cannot read {}: {e}; `lian catalog lock --write` makes it from the fleet's lock",
                path.display()
            ),
        )
    })?;
    let lock: lian_bus::CatalogLock =
        serde_json::from_str(&text).with_context(|| format!("{} is not a catalog lock", path.display()))?;
    let by_image: BTreeMap<&str, &lian_bus::LayerImage> = lock.layers.values().map(|l| (l.image.as_str(), l)).collect();
    let mut mismatches = Vec::new();
    let mut pinned = 0;
    for layer in catalog.layers() {
        let dockerfile = dir.join(layer.name.as_str()).join("Dockerfile");
        let Ok(text) = std::fs::read_to_string(&dockerfile) else {
            continue;
        };
        let parents = match lian_runner::dockerfile::parent_images(&text, &[]) {
            Ok(p) => p,
            Err(e) => {
                mismatches.push(serde_json::json!({
                    "dockerfile": dockerfile.display().to_string(),
                    "error": e.to_string(),
                }));
                continue;
            }
        };
        for parent in parents {
            let Some((image, digest)) = parent.split_once('@') else {
                continue;
            };
            let Some(locked) = by_image.get(image) else { continue };
            pinned += 1;
            let want = locked.pinned.as_deref().and_then(|p| p.split_once('@')).map(|(_, d)| d);
            if want != Some(digest) {
                mismatches.push(serde_json::json!({
                    "dockerfile": dockerfile.display().to_string(),
                    "parent": image,
                    "pinned": digest,
                    "locked": want,
                    "layer": locked.layer,
                }));
            }
        }
    }
    let ok = mismatches.is_empty();
    if global.json(false) {
        println!(
            "{}",
            serde_json::json!({"lock": path, "ok": ok, "pinned_parents": pinned, "mismatches": mismatches})
        );
    } else if ok {
        println!(
            "{}: every pinned parent ({pinned}) is the locked digest",
            path.display()
        );
    } else {
        for m in &mismatches {
            if let Some(error) = m["error"].as_str() {
                println!(
                    "{}: cannot read its parents: {error}",
                    m["dockerfile"].as_str().unwrap_or_default()
                );
                continue;
            }
            println!(
                "{}: FROM {}@{} but {} locks {} at {}",
                m["dockerfile"].as_str().unwrap_or_default(),
                m["parent"].as_str().unwrap_or_default(),
                m["pinned"].as_str().unwrap_or_default(),
                LOCK_FILE,
                m["layer"].as_str().unwrap_or_default(),
                m["locked"].as_str().unwrap_or("no digest (never pushed)")
            );
        }
    }
    Ok(if ok { Exit::Ok.code() } else { Exit::Failed.code() })
}
