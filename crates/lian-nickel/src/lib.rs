//! Evaluates Nickel (`.ncl`) and JSON documents against the contracts in `schemas/` and
//! deserializes the result into lian's types. The schemas are compiled into the binary and
//! written once to a directory of their own, so `lian` works from any directory and every
//! worker checks requests against the same contracts the client used.
//!
//! Two ways in. [`Schemas`] evaluates trusted documents (the operator's catalog) in this
//! process. [`Evaluator`] evaluates user-supplied ones (directives, `.build-spec.ncl`, JSON
//! requests) in a child process under [`EvalLimits`], with imports confined to the bundled
//! schemas and the document's own directory (`confine.rs`).

mod bounded;
mod confine;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nickel_lang_core::cache::InputFormat;
use nickel_lang_core::error::report::{ColorOpt, report_as_str};
use nickel_lang_core::eval::cache::CacheImpl;
use nickel_lang_core::program::{Program, ProgramBuilder};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use bounded::{EVAL_SUBCOMMAND, EvalLimits, Evaluator, serve_eval};

/// The schema files, relative to the schemas directory.
const EMBEDDED: &[(&str, &str)] = &[
    ("common.ncl", include_str!("../../../schemas/common.ncl")),
    (
        "build_directives.ncl",
        include_str!("../../../schemas/build_directives.ncl"),
    ),
    ("build_spec.ncl", include_str!("../../../schemas/build_spec.ncl")),
    ("cache_policy.ncl", include_str!("../../../schemas/cache_policy.ncl")),
    ("workflow.ncl", include_str!("../../../schemas/workflow.ncl")),
    (
        "defaults/build_directives.ncl",
        include_str!("../../../schemas/defaults/build_directives.ncl"),
    ),
];

/// How deep a JSON document may nest. lian's documents nest four or five levels; serde_json
/// stops at 128 and Nickel's JSON path overflows the stack in the low thousands.
pub const MAX_JSON_DEPTH: usize = 64;

/// Which contract a document must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Contract {
    BuildDirectives,
    BuildSpec,
    Workflow,
}

impl Contract {
    fn file(self) -> &'static str {
        match self {
            Self::BuildDirectives => "build_directives.ncl",
            Self::BuildSpec => "build_spec.ncl",
            Self::Workflow => "workflow.ncl",
        }
    }
}

/// Why a document was not evaluated. The variants the evaluator child can produce travel
/// back to the parent serialized; the others (`serde(skip)`) only ever arise in the parent.
#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
pub enum NickelError {
    /// Nickel's own report: file, line, the broken contract and the field that broke it.
    #[error("{0}")]
    Eval(String),
    /// Refused by name before anything at `path` was read.
    #[error("{file}:{line}: import of `{path}` refused: {why}")]
    Import {
        file: String,
        line: usize,
        path: String,
        why: String,
    },
    #[error("{what} is {bytes} bytes, over the {limit}-byte limit for an evaluated document")]
    TooLarge { what: String, bytes: u64, limit: u64 },
    #[error("{what} is nested more than {limit} levels deep")]
    TooDeep { what: String, limit: usize },
    #[serde(skip)]
    #[error("evaluating {what} {limit}")]
    Limit { what: String, limit: Exceeded },
    #[serde(skip)]
    #[error("evaluating {what}: the evaluator ended abnormally ({status})")]
    Crashed { what: String, status: String },
    #[serde(skip)]
    #[error("{what} evaluated, but does not have the expected shape: {source}")]
    Shape { what: String, source: serde_json::Error },
    #[serde(skip)]
    #[error("cannot prepare the schemas directory {path}: {source}")]
    Schemas { path: PathBuf, source: std::io::Error },
    #[serde(skip)]
    #[error("cannot run the Nickel evaluator {program}: {source}")]
    Evaluator { program: PathBuf, source: std::io::Error },
}

/// Which bound of [`EvalLimits`] an evaluation hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    WallTime(Duration),
    CpuTime(Duration),
    Memory(u64),
    /// The stack: recursion as deep as the document's nesting.
    Stack,
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WallTime(d) => write!(f, "ran past its {} s wall-clock limit", d.as_secs_f64()),
            Self::CpuTime(d) => write!(f, "used up its {} s CPU-time limit", d.as_secs_f64()),
            Self::Memory(bytes) => write!(f, "ran out of its {} MiB memory limit", bytes >> 20),
            Self::Stack => write!(f, "overflowed its stack: the document nests or recurses too deeply"),
        }
    }
}

impl NickelError {
    /// One line for an event or a log: Nickel's headline and the places it points to
    /// (file:line:col), never the source snippets or notes under them.
    pub fn summary(&self) -> String {
        match self {
            Self::Eval(report) => {
                let lines = || report.lines().map(str::trim).filter(|l| !l.is_empty());
                let mut parts: Vec<String> = lines().take_while(|l| !l.starts_with('┌')).map(String::from).collect();
                let places: Vec<&str> = lines()
                    .filter_map(|l| l.strip_prefix("┌─"))
                    .map(str::trim)
                    .filter(|place| !place.starts_with('<'))
                    .collect();
                if !places.is_empty() {
                    parts.push(format!("at {}", places.join(", ")));
                }
                parts.join(": ")
            }
            other => other.to_string(),
        }
    }
}

/// Where the contracts live on disk, for Nickel's imports to resolve.
#[derive(Debug, Clone)]
pub struct Schemas {
    dir: PathBuf,
    /// A digest of the contracts' text, for the schemas compiled in: what a cache of
    /// evaluated documents must match.
    fingerprint: Option<String>,
}

impl Schemas {
    /// The schemas compiled into this binary, written (once per content) under the
    /// system temp directory.
    pub fn embedded() -> Result<Self, NickelError> {
        let mut hash = Sha256::new();
        for (name, text) in EMBEDDED {
            hash.update(name.as_bytes());
            hash.update(text.as_bytes());
        }
        let digest = hash.finalize();
        let tag = data_encoding::HEXLOWER.encode(&digest[..8]);
        let dir = std::env::temp_dir().join(format!("lian-schemas-{tag}"));
        if !dir.join(EMBEDDED[0].0).exists() {
            let err = |source| NickelError::Schemas {
                path: dir.clone(),
                source,
            };
            // Written beside and renamed, so concurrent processes never see half a directory.
            let staging = tempdir_beside(&dir).map_err(err)?;
            for (name, text) in EMBEDDED {
                let path = staging.join(name);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(err)?;
                }
                std::fs::write(&path, text).map_err(err)?;
            }
            if std::fs::rename(&staging, &dir).is_err() {
                // Another process won the race; its copy is identical.
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        Ok(Self {
            dir,
            fingerprint: Some(tag),
        })
    }

    /// Schemas from a directory (a checkout's `schemas/`).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fingerprint: None,
        }
    }

    /// What the contracts are, as a digest of their text; `None` for schemas read from a
    /// directory, which may change under a cache.
    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Evaluates a trusted `.ncl` or `.json` file (the operator's catalog) in this process.
    /// User-supplied documents go through [`Evaluator`] instead.
    pub fn eval_file<T: DeserializeOwned>(&self, path: &Path, contract: Contract) -> Result<T, NickelError> {
        let what = path.display().to_string();
        let value = self.value_of(ProgramBuilder::new().add_path(path.as_os_str()), contract, &what)?;
        typed(value, &what)
    }

    /// Nickel source held in memory, as plain data.
    fn value_of_str(&self, source: &str, name: &str, contract: Contract) -> Result<serde_json::Value, NickelError> {
        self.value_of(ProgramBuilder::new().add_source_string(source, name), contract, name)
    }

    /// A JSON document, as plain data once the contract holds.
    fn value_of_json(&self, json: &str, name: &str, contract: Contract) -> Result<serde_json::Value, NickelError> {
        let builder =
            ProgramBuilder::new().add_source_with_format(Cursor::new(json.to_owned()), name, InputFormat::Json);
        self.value_of(builder, contract, name)
    }

    fn value_of(
        &self,
        builder: ProgramBuilder,
        contract: Contract,
        what: &str,
    ) -> Result<serde_json::Value, NickelError> {
        let builder = builder
            .add_contract_paths([self.dir.join(contract.file())])
            .add_import_paths([self.dir.clone()]);
        let mut program: Program<CacheImpl> = builder
            .build()
            .map_err(|e| NickelError::Eval(format!("cannot read {what}: {e}")))?;
        let value = match program.eval_full_for_export() {
            Ok(value) => value,
            Err(err) => {
                let report = report_as_str(&mut program.files(), err, ColorOpt::Never);
                return Err(NickelError::Eval(report.trim_end().to_string()));
            }
        };
        // Through serde_json::Value, not the Nickel deserializer: keeps enum tags and integers.
        serde_json::to_value(&value).map_err(|e| NickelError::Eval(format!("{what} does not evaluate to data: {e}")))
    }
}

/// Deserializes evaluated data into lian's type.
fn typed<T: DeserializeOwned>(value: serde_json::Value, what: &str) -> Result<T, NickelError> {
    serde_json::from_value(value).map_err(|source| NickelError::Shape {
        what: what.to_string(),
        source,
    })
}

/// Refuses JSON nested deeper than `limit` without building anything: one pass over the
/// bytes with a counter, so a document nested a million levels costs no stack (serde_json
/// stops at 128 with a terse message; Nickel's own JSON path recurses).
pub fn check_json_depth(json: &[u8], what: &str, limit: usize) -> Result<(), NickelError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(NickelError::TooDeep {
                        what: what.to_string(),
                        limit,
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn tempdir_beside(dir: &Path) -> std::io::Result<PathBuf> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    for attempt in 0..100u32 {
        let candidate = parent.join(format!(
            ".{}-{}-{attempt}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("schemas"),
            std::process::id()
        ));
        if std::fs::create_dir(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(std::io::Error::other("no free staging directory"))
}

#[cfg(test)]
mod tests;
