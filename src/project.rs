//! Reading a Rust project's manifests into the facts `lian catalog suggest` asks about
//! (`lian_catalog::suggest::Project`): its names, its dependencies, its targets.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use lian_catalog::suggest::Project;

fn read_toml(path: &Path) -> anyhow::Result<Option<toml::Table>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(
            text.parse::<toml::Table>()
                .with_context(|| format!("{} is not valid TOML", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The names of the dependency tables of a manifest (`[dependencies]`, dev, build, and
/// per-target ones), keys being the names used, `package = ` the real name when renamed.
fn dependency_names(manifest: &toml::Table, into: &mut BTreeSet<String>) {
    let tables = ["dependencies", "dev-dependencies", "build-dependencies"];
    let mut add = |deps: Option<&toml::Value>| {
        for (key, value) in deps.and_then(toml::Value::as_table).into_iter().flatten() {
            let real = value.get("package").and_then(toml::Value::as_str).unwrap_or(key);
            into.insert(real.to_string());
        }
    };
    for table in tables {
        add(manifest.get(table));
    }
    for target in manifest
        .get("target")
        .and_then(toml::Value::as_table)
        .into_iter()
        .flatten()
    {
        for table in tables {
            add(target.1.get(table));
        }
    }
    if let Some(workspace) = manifest.get("workspace").and_then(toml::Value::as_table) {
        add(workspace.get("dependencies"));
    }
}

fn strings(value: Option<&toml::Value>) -> Vec<String> {
    match value {
        Some(toml::Value::String(s)) => vec![s.clone()],
        Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        _ => vec![],
    }
}

/// The facts of the project at `dir` (its root `Cargo.toml`, required).
pub fn read_project(dir: &Path) -> anyhow::Result<Project> {
    let root = dir.join("Cargo.toml");
    let manifest = read_toml(&root)?.with_context(|| {
        format!(
            "{} has no Cargo.toml: point --project at a Rust project's root",
            dir.display()
        )
    })?;
    let mut project = Project::default();
    let mut manifests = vec![manifest];
    // Workspace members, as paths or `dir/*` globs (what Cargo accepts most often).
    let members = manifests[0]
        .get("workspace")
        .map(|w| strings(w.get("members")))
        .unwrap_or_default();
    for member in members {
        let dirs: Vec<std::path::PathBuf> = match member.strip_suffix("/*") {
            Some(parent) => std::fs::read_dir(dir.join(parent))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect(),
            None => vec![dir.join(&member)],
        };
        for d in dirs {
            if let Some(m) = read_toml(&d.join("Cargo.toml"))? {
                manifests.push(m);
            }
        }
    }
    for m in &manifests {
        let package = m.get("package");
        if let Some(name) = package.and_then(|p| p.get("name")).and_then(toml::Value::as_str) {
            project.names.insert(name.to_string());
        }
        for owner in [package, m.get("workspace")] {
            if let Some(tables) = owner.and_then(|o| o.get("metadata")).and_then(toml::Value::as_table) {
                project.metadata.extend(tables.keys().cloned());
            }
        }
        dependency_names(m, &mut project.dependencies);
    }
    if let Some(lock) = read_toml(&dir.join("Cargo.lock"))? {
        for package in lock
            .get("package")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = package.get("name").and_then(toml::Value::as_str) {
                project.locked.insert(name.to_string());
            }
        }
    }
    for config in [".cargo/config.toml", ".cargo/config"] {
        if let Some(c) = read_toml(&dir.join(config))? {
            project
                .targets
                .extend(strings(c.get("build").and_then(|b| b.get("target"))));
        }
    }
    for toolchain in ["rust-toolchain.toml", "rust-toolchain"] {
        if let Some(t) = read_toml(&dir.join(toolchain)).ok().flatten() {
            project
                .targets
                .extend(strings(t.get("toolchain").and_then(|t| t.get("targets"))));
        }
    }
    Ok(project)
}
