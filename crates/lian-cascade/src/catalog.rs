//! Loading a catalog directory: every `<layer>/workflow.ncl` evaluated against
//! `schemas/workflow.ncl`, then the DAG validated.

use std::path::{Path, PathBuf};

use lian_catalog::{Catalog, CatalogError, Layer};
use lian_nickel::{Contract, NickelError, Schemas};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read catalog directory {path}: {source} (pass --catalog DIR)")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Workflow { path: PathBuf, source: NickelError },
    #[error("{path}: the workflow names layer {name}, but its directory is {dir}")]
    NameMismatch { path: PathBuf, name: String, dir: String },
    #[error("the catalog in {dir} is not valid:\n{}", .errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid { dir: PathBuf, errors: Vec<CatalogError> },
}

pub fn load_catalog(dir: &Path, schemas: &Schemas) -> Result<Catalog, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path().join("workflow.ncl"))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let mut layers = Vec::with_capacity(paths.len());
    for path in paths {
        let layer: Layer = schemas
            .eval_file(&path, Contract::Workflow)
            .map_err(|source| LoadError::Workflow {
                path: path.clone(),
                source,
            })?;
        let dir_name = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if layer.name.as_str() != dir_name {
            return Err(LoadError::NameMismatch {
                path,
                name: layer.name.to_string(),
                dir: dir_name,
            });
        }
        layers.push(layer);
    }
    Catalog::new(layers).map_err(|errors| LoadError::Invalid {
        dir: dir.to_path_buf(),
        errors,
    })
}
