//! The constraints of the ADRs in adrs/, checked on every CI run.

mod common;

use std::path::{Path, PathBuf};

use common::{copy_dir, lian, text};
use lian_test_support::workspace_root;

fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

fn catalog_layers() -> Vec<(String, String)> {
    let root = workspace_root().join("catalog");
    let mut layers: Vec<(String, String)> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let w = std::fs::read_to_string(e.path().join("workflow.ncl")).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), w))
        })
        .collect();
    layers.sort();
    layers
}

#[test]
fn adr_lamina_001_every_layer_declares_both_bases() {
    let layers = catalog_layers();
    assert_eq!(layers.len(), 13);
    for (name, workflow) in &layers {
        let declares = |field: &str| workflow.lines().any(|l| l.trim_start().starts_with(field));
        assert!(
            declares("build_base") && declares("runtime_base"),
            "{name} must declare build_base and runtime_base"
        );
    }
    assert!(lian(&["catalog", "validate"]).status.success());
}

#[test]
fn adr_lamina_002_native_dep_layers_declare_native_deps() {
    for name in ["fastembed", "secretumvault"] {
        let (_, workflow) = catalog_layers().into_iter().find(|(n, _)| n == name).unwrap();
        assert!(workflow.contains("'native_dep"), "{name} is a native-dep layer");
        let deps = workflow.split("native_deps").nth(1).unwrap();
        assert!(
            deps.split(']').next().unwrap().contains('"'),
            "{name} declares a non-empty native_deps"
        );
    }
    // and the validator refuses a native-dep layer without them
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&workspace_root().join("examples/catalog"), dir.path());
    let deps = dir.path().join("deps/workflow.ncl");
    let w = std::fs::read_to_string(&deps)
        .unwrap()
        .replace("'source_dep", "'native_dep");
    std::fs::write(&deps, w).unwrap();
    let out = lian(&["catalog", "--catalog", dir.path().to_str().unwrap(), "validate"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("ADR-002"), "{}", text(&out));
}

#[test]
fn adr_lamina_003_no_layer_names_in_runner_code() {
    // "rust" is also a language (sizing tier 3), so it names no layer in code.
    let names: Vec<String> = catalog_layers()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n != "rust")
        .collect();
    let sources = rust_sources(&workspace_root().join("crates"))
        .into_iter()
        .chain(rust_sources(&workspace_root().join("src")));
    for file in sources {
        let source = std::fs::read_to_string(&file).unwrap();
        for name in &names {
            assert!(
                !source.contains(&format!("\"{name}\"")),
                "{} names catalog layer {name}: layer behaviour belongs in the catalog",
                file.display()
            );
        }
    }
}

#[test]
fn adr_lian_001_core_names_no_caller() {
    for file in rust_sources(&workspace_root().join("crates/lian-core/src")) {
        let source = std::fs::read_to_string(&file).unwrap().to_lowercase();
        for caller in ["vapora", "provisioning", "github", "gitlab", "woodpecker"] {
            assert!(!source.contains(caller), "{} names caller {caller}", file.display());
        }
    }
}

#[test]
fn adr_lian_039_oom_retry_bounded_at_one() {
    assert_eq!(lian_core::sizing::MAX_OOM_RETRIES, 1, "changing this needs a new ADR");
    // The state machine's side (a second OOM fails with the runner_type hint) is walked by
    // lian-core's lifecycle tests: terminal_and_failure_rows, the_oom_story_is_bounded_by_adr_039.
}
