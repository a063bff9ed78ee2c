//! `lian catalog` on the real lamina catalog and on broken ones. The DAG the plan is checked
//! against is read straight from the workflow.ncl files, not through lian's own loader.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{copy_dir, lian, text};
use lian_test_support::workspace_root;

/// layer -> the layers it is built from, read from `build_base = { layer = "x" }` and donors.
fn parents_from_files(catalog: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut dag = BTreeMap::new();
    for entry in std::fs::read_dir(catalog).unwrap().flatten() {
        let Ok(workflow) = std::fs::read_to_string(entry.path().join("workflow.ncl")) else {
            continue;
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parents = BTreeSet::new();
        for line in workflow.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("build_base")
                && let Some(layer) = rest.split("layer = \"").nth(1)
            {
                parents.insert(layer.split('"').next().unwrap().to_string());
            }
            if let Some(rest) = line.strip_prefix("donors") {
                for d in rest.split('"').skip(1).step_by(2) {
                    parents.insert(d.to_string());
                }
            }
        }
        dag.insert(name, parents);
    }
    dag
}

#[test]
fn plan_for_rust_lists_its_ten_descendants_in_a_valid_order() {
    let out = lian(&["catalog", "plan", "--changed", "rust", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    let expected: BTreeSet<&str> = [
        "wasm",
        "leptos",
        "rustelo",
        "ontoref",
        "stratumiops",
        "stratumiops-ia",
        "typedialog",
        "librosys",
        "fastembed",
        "secretumvault",
    ]
    .into();
    assert_eq!(plan.iter().map(String::as_str).collect::<BTreeSet<_>>(), expected);
    assert_eq!(plan.len(), 10, "each once: {plan:?}");
    assert!(
        !plan.iter().any(|l| l == "nickel" || l == "nushell"),
        "separate roots are not descendants"
    );

    let dag = parents_from_files(&workspace_root().join("catalog"));
    assert_eq!(dag.len(), 13);
    for (i, layer) in plan.iter().enumerate() {
        for parent in &dag[layer] {
            if let Some(j) = plan.iter().position(|l| l == parent) {
                assert!(j < i, "{layer} is planned before its parent {parent}: {plan:?}");
            } else {
                assert_eq!(
                    parent, "rust",
                    "{layer}'s parent {parent} is neither planned nor the changed layer"
                );
            }
        }
    }

    let human = lian(&["catalog", "plan", "--changed", "rust"]);
    assert!(text(&human).contains("10 layers rebuild when rust changes"));
}

#[test]
fn the_catalogs_validate_and_graph() {
    for dir in ["catalog", "examples/catalog"] {
        let out = lian(&["catalog", "--catalog", dir, "validate"]);
        assert!(out.status.success(), "{dir}: {}", text(&out));
    }
    let dot = lian(&["catalog", "graph", "--format", "dot"]);
    assert!(text(&dot).contains("\"wasm\" -> \"leptos\";"), "{}", text(&dot));
    let mermaid = lian(&["catalog", "graph", "--format", "mermaid"]);
    assert!(
        text(&mermaid).contains("stratumiops --> stratumiops_ia"),
        "{}",
        text(&mermaid)
    );
    let unknown = lian(&["catalog", "plan", "--changed", "nope"]);
    assert!(!unknown.status.success());
    assert!(text(&unknown).contains("no layer named nope"), "{}", text(&unknown));
}

#[test]
fn a_cycle_and_a_missing_base_are_refused_with_the_layers_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&workspace_root().join("examples/catalog"), dir.path());
    let base = dir.path().join("base/workflow.ncl");
    let text_before = std::fs::read_to_string(&base).unwrap();
    std::fs::write(
        &base,
        text_before.replace(
            "build_base = { image = \"scratch\" }",
            "build_base = { layer = \"app\" }",
        ),
    )
    .unwrap();
    let tools = dir.path().join("tools/workflow.ncl");
    let tools_text = std::fs::read_to_string(&tools).unwrap();
    std::fs::write(
        &tools,
        tools_text.replace(
            "runtime_base = { layer = \"base\" }",
            "runtime_base = { layer = \"ghost\" }",
        ),
    )
    .unwrap();
    let out = lian(&["catalog", "--catalog", dir.path().to_str().unwrap(), "validate"]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("cycle") && said.contains("app") && said.contains("base"),
        "{said}"
    );
    assert!(said.contains("ghost"), "{said}");
}

/// `lian catalog suggest --project DIR --output json` against the lamina catalog.
fn suggest(project: &Path) -> serde_json::Value {
    let out = lian(&[
        "--output",
        "json",
        "catalog",
        "--catalog",
        workspace_root().join("catalog").to_str().unwrap(),
        "suggest",
        "--project",
        project.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["suggestion"].clone()
}

#[test]
fn suggest_names_the_layer_to_build_from_with_its_reasons() {
    let fixtures = workspace_root().join("tests/fixtures/suggest");
    // ripgrep: its lock has no -sys crate a layer provides, and its .cargo/config.toml only
    // sets flags per target (not a build target).
    let rg = suggest(&fixtures.join("ripgrep"));
    assert_eq!(rg["layer"], "rust", "{rg}");
    assert!(rg["matched"].as_array().unwrap().is_empty(), "{rg}");
    // leptos-rs/start-axum: leptos (built on wasm) wins over wasm, both said.
    let axum = suggest(&fixtures.join("start-axum"));
    assert_eq!(axum["layer"], "leptos", "{axum}");
    assert!(axum["reasons"].to_string().contains("cargo-leptos"), "{axum}");
    assert!(
        axum["matched"].as_array().unwrap().iter().any(|m| m["layer"] == "wasm"),
        "{axum}"
    );
    // A project the catalog has a layer made for: its cooked dependencies win.
    let own = tempfile::tempdir().unwrap();
    std::fs::write(
        own.path().join("Cargo.toml"),
        "[package]\nname = \"typedialog\"\nversion = \"0.1.0\"\n[dependencies]\nwasm-bindgen = \"0.2\"\n",
    )
    .unwrap();
    let td = suggest(own.path());
    assert_eq!(td["layer"], "typedialog", "{td}");
    // Not a project: a clear error.
    let none = lian(&["catalog", "suggest", "--project", "/nonexistent"]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    assert!(text(&none).contains("has no Cargo.toml"), "{}", text(&none));
}

#[test]
fn the_evaluation_cache_never_serves_a_changed_workflow() {
    let cache = tempfile::tempdir().unwrap();
    let env = [("XDG_CACHE_HOME", cache.path().to_str().unwrap())];
    let catalog = tempfile::tempdir().unwrap();
    copy_dir(&workspace_root().join("examples/catalog"), catalog.path());
    let dir = catalog.path().to_str().unwrap();
    let plan = || {
        common::lian_with(
            &[
                "--output",
                "json",
                "catalog",
                "--catalog",
                dir,
                "plan",
                "--changed",
                "base",
            ],
            &env,
        )
    };
    let first = plan();
    assert!(first.status.success(), "{}", text(&first));
    let cached: Vec<_> = std::fs::read_dir(cache.path().join("lian"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(cached.len(), 1, "one cache file for the catalog");
    assert_eq!(plan().stdout, first.stdout, "the cached catalog plans the same");
    // A workflow changed after it was cached is evaluated again: here it now names another
    // layer than its directory, which only evaluation can tell.
    let workflow = catalog.path().join("app/workflow.ncl");
    let text_before = std::fs::read_to_string(&workflow).unwrap();
    std::fs::write(&workflow, text_before.replace("\"app\"", "\"app2\"")).unwrap();
    let changed = plan();
    assert!(!changed.status.success());
    assert!(text(&changed).contains("names layer app2"), "{}", text(&changed));
}
