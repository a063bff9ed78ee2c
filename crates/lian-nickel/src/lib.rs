//! Evaluates Nickel (`.ncl`) and JSON documents against the contracts in `schemas/` and
//! deserializes the result into lian's types. The schemas are compiled into the binary and
//! written once to a directory of their own, so `lian` works from any directory and every
//! worker checks requests against the same contracts the client used.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use nickel_lang_core::cache::InputFormat;
use nickel_lang_core::error::report::{ColorOpt, report_as_str};
use nickel_lang_core::eval::cache::CacheImpl;
use nickel_lang_core::program::{Program, ProgramBuilder};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

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

/// Which contract a document must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, thiserror::Error)]
pub enum NickelError {
    /// Nickel's own report: file, line, the broken contract and the field that broke it.
    #[error("{0}")]
    Eval(String),
    #[error("{what} evaluated, but does not have the expected shape: {source}")]
    Shape { what: String, source: serde_json::Error },
    #[error("cannot prepare the schemas directory {path}: {source}")]
    Schemas { path: PathBuf, source: std::io::Error },
}

impl NickelError {
    /// The report without its source snippets: one line for an event or a log.
    pub fn summary(&self) -> String {
        match self {
            Self::Eval(report) => report
                .lines()
                .take_while(|l| !l.trim_start().starts_with('┌'))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": "),
            other => other.to_string(),
        }
    }
}

/// Where the contracts live on disk, for Nickel's imports to resolve.
#[derive(Debug, Clone)]
pub struct Schemas {
    dir: PathBuf,
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
        let tag: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
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
        Ok(Self { dir })
    }

    /// Schemas from a directory (a checkout's `schemas/`).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Evaluates a `.ncl` or `.json` file and applies the contract.
    pub fn eval_file<T: DeserializeOwned>(&self, path: &Path, contract: Contract) -> Result<T, NickelError> {
        let builder = ProgramBuilder::new().add_path(path.as_os_str());
        self.eval(builder, contract, &path.display().to_string())
    }

    /// Evaluates Nickel source held in memory (a file read from a build context).
    pub fn eval_str<T: DeserializeOwned>(
        &self,
        source: &str,
        name: &str,
        contract: Contract,
    ) -> Result<T, NickelError> {
        let builder = ProgramBuilder::new().add_source_string(source, name);
        self.eval(builder, contract, name)
    }

    /// Checks a JSON document (a request published by any client) against the contract.
    pub fn eval_json<T: DeserializeOwned>(&self, json: &str, name: &str, contract: Contract) -> Result<T, NickelError> {
        let builder =
            ProgramBuilder::new().add_source_with_format(Cursor::new(json.to_owned()), name, InputFormat::Json);
        self.eval(builder, contract, name)
    }

    fn eval<T: DeserializeOwned>(
        &self,
        builder: ProgramBuilder,
        contract: Contract,
        what: &str,
    ) -> Result<T, NickelError> {
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
        let json = serde_json::to_value(&value).map_err(|source| NickelError::Shape {
            what: what.to_string(),
            source,
        })?;
        serde_json::from_value(json).map_err(|source| NickelError::Shape {
            what: what.to_string(),
            source,
        })
    }
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
