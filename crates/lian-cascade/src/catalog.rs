//! Loading a catalog directory: every `<layer>/workflow.ncl` evaluated against
//! `schemas/workflow.ncl`, then the DAG validated. Evaluating costs milliseconds a layer, so
//! a large catalog keeps what each file evaluated to in a cache (under `$XDG_CACHE_HOME/lian`
//! or `~/.cache/lian`), keyed by the file's content and the contracts compiled in; a file
//! that imports another is always evaluated (the cache cannot see the other change).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    let cache_file = schemas.fingerprint().and_then(|_| cache_path(dir));
    let mut cache = cache_file
        .as_deref()
        .map(|f| Cache::read(f, schemas))
        .unwrap_or_default();
    let mut used = std::collections::BTreeSet::new();
    // Files the cache answers for, and the rest, which Nickel evaluates: one at a time
    // takes ~40 ms a file (release), so they are spread over the cores.
    let mut known: Vec<(PathBuf, Option<Layer>, Option<String>)> = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read(&path).unwrap_or_default();
        let key = data_encoding::HEXLOWER.encode(&Sha256::digest(&text));
        let cacheable = !text.windows(6).any(|w| w == b"import");
        let cached = cache.layers.get(&key).filter(|_| cacheable).cloned();
        if cacheable {
            used.insert(key.clone());
        }
        known.push((path, cached, cacheable.then_some(key)));
    }
    let misses: Vec<&PathBuf> = known.iter().filter(|k| k.1.is_none()).map(|k| &k.0).collect();
    let evaluated = evaluate_all(&misses, schemas)?;
    // Only values the cache can hold change it: files with imports are evaluated every time.
    let mut changed = false;
    let mut evaluated = evaluated.into_iter();
    let mut layers = Vec::with_capacity(known.len());
    for (path, cached, key) in known {
        let layer = match cached {
            Some(layer) => layer,
            None => {
                let layer = evaluated.next().expect("one value per miss");
                if let Some(key) = key {
                    cache.layers.insert(key, layer.clone());
                    changed = true;
                }
                layer
            }
        };
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
    if let (Some(file), true) = (cache_file, changed) {
        cache.write(&file, schemas, &used);
    }
    Catalog::new(layers).map_err(|errors| LoadError::Invalid {
        dir: dir.to_path_buf(),
        errors,
    })
}

/// Evaluates `paths` through Nickel on every core, each thread a contiguous share; the
/// values in the order of `paths`, or the first file's error in that order.
fn evaluate_all(paths: &[&PathBuf], schemas: &Schemas) -> Result<Vec<Layer>, LoadError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = paths.len().div_ceil(threads).max(1);
    let evaluate = |path: &PathBuf| {
        schemas
            .eval_file::<Layer>(path, Contract::Workflow)
            .map_err(|source| LoadError::Workflow {
                path: path.clone(),
                source,
            })
    };
    std::thread::scope(|scope| {
        let shares: Vec<_> = paths
            .chunks(share)
            .map(|chunk| scope.spawn(move || chunk.iter().map(|p| evaluate(p)).collect::<Result<Vec<_>, _>>()))
            .collect();
        let mut all = Vec::with_capacity(paths.len());
        for share in shares {
            all.extend(share.join().expect("evaluation does not panic")?);
        }
        Ok(all)
    })
}

/// What workflow files evaluated to, by the SHA-256 of their text, for one catalog
/// directory and one version of the contracts.
#[derive(Default, Serialize, Deserialize)]
struct Cache {
    schemas: String,
    layers: BTreeMap<String, Layer>,
}

/// The cache file of the catalog at `dir`; `None` without a home for caches.
fn cache_path(dir: &Path) -> Option<PathBuf> {
    let root = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let dir = std::fs::canonicalize(dir).ok()?;
    let id = data_encoding::HEXLOWER.encode(&Sha256::digest(dir.as_os_str().as_encoded_bytes())[..8]);
    Some(root.join("lian").join(format!("catalog-{id}.json")))
}

impl Cache {
    /// The cache at `file` if it was made with these contracts; empty otherwise.
    fn read(file: &Path, schemas: &Schemas) -> Self {
        std::fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Cache>(&bytes).ok())
            .filter(|c| Some(c.schemas.as_str()) == schemas.fingerprint())
            .unwrap_or_default()
    }

    /// Keeps only the entries `used` by this load (a removed layer leaves), written beside
    /// and renamed so a reader never sees half a file; a cache that cannot be written is
    /// skipped.
    fn write(mut self, file: &Path, schemas: &Schemas, used: &std::collections::BTreeSet<String>) {
        self.schemas = schemas.fingerprint().unwrap_or_default().to_string();
        self.layers.retain(|key, _| used.contains(key));
        let written = file.parent().map(std::fs::create_dir_all).transpose().and_then(|_| {
            let staging = file.with_extension(format!("json.{}", std::process::id()));
            std::fs::write(&staging, serde_json::to_vec(&self).expect("layers serialize"))?;
            std::fs::rename(&staging, file)
        });
        if let Err(err) = written {
            tracing::debug!(%err, file = %file.display(), "catalog cache not written");
        }
    }
}
