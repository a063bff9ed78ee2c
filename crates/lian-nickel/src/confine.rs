//! Import confinement. Before user-supplied Nickel is evaluated, every import in it (and in
//! the user's own files it imports) is read off the parsed syntax tree and checked against
//! the directories it may read, so a path outside is refused by name and never opened.
//!
//! Nickel resolves `import "p"` by trying the importing file's directory, then each import
//! path (here only the schemas directory), taking the first that exists. Every one of those
//! candidates must lie inside an allowed directory, lexically first (so nothing outside is
//! even looked up: no probing which host files exist) and then after following symlinks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nickel_lang_core::ast::{Ast, AstAlloc, Import, InputFormat, Node};
use nickel_lang_core::cache::{normalize_abs_path, normalize_path};
use nickel_lang_core::error::report::{ColorOpt, report_as_str};
use nickel_lang_core::files::Files;
use nickel_lang_core::parser::ErrorTolerantParser;
use nickel_lang_core::parser::grammar::TermParser;
use nickel_lang_core::parser::lexer::Lexer;
use nickel_lang_core::position::TermPos;
use nickel_lang_core::traverse::{TraverseAlloc, TraverseControl};

use crate::NickelError;

/// A directory imports may lead into, as written (what Nickel compares) and as it really is.
struct Root {
    lexical: PathBuf,
    real: PathBuf,
}

impl Root {
    fn new(dir: &Path) -> Result<Self, NickelError> {
        let resolve = || -> std::io::Result<Self> {
            let lexical = normalize_path(dir)?;
            let real = std::fs::canonicalize(&lexical)?;
            Ok(Self { lexical, real })
        };
        resolve().map_err(|e| NickelError::Eval(format!("cannot resolve the directory {}: {e}", dir.display())))
    }
}

/// The imports one evaluation may follow, and how many bytes of user files it may read.
pub(crate) struct Confinement {
    schemas: Root,
    /// The directory of a document read from disk (on the client); `None` for a document
    /// that came in memory (a context's spec on a worker), which may import the schemas only.
    own_dir: Option<Root>,
    /// What the document and its imported files may weigh together.
    limit: u64,
    used: u64,
    seen: HashSet<PathBuf>,
}

impl Confinement {
    pub(crate) fn new(schemas: &Path, own_dir: Option<&Path>, limit: u64) -> Result<Self, NickelError> {
        Ok(Self {
            schemas: Root::new(schemas)?,
            own_dir: own_dir.map(Root::new).transpose()?,
            limit,
            used: 0,
            seen: HashSet::new(),
        })
    }

    /// Checks the document `source`, named `name` (its path when it was read from disk), and
    /// every user file it imports, transitively.
    pub(crate) fn check(&mut self, name: &str, source: &str) -> Result<(), NickelError> {
        self.spend(name, source.len() as u64)?;
        // An in-memory document resolves relative imports against the evaluator's working
        // directory, which the parent sets to the schemas directory.
        let dir = self.own_dir.as_ref().unwrap_or(&self.schemas).lexical.clone();
        self.check_file(name, source.into(), &dir)
    }

    fn spend(&mut self, name: &str, bytes: u64) -> Result<(), NickelError> {
        self.used += bytes;
        if self.used > self.limit {
            return Err(NickelError::TooLarge {
                what: name.to_string(),
                bytes: self.used,
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn check_file(&mut self, name: &str, source: Arc<str>, dir: &Path) -> Result<(), NickelError> {
        let mut files = Files::empty();
        let id = files.add(name, source.clone());
        let alloc = AstAlloc::new();
        let ast: Ast<'_> = TermParser::new()
            .parse_strict(&alloc, id, Lexer::new(&source))
            .map_err(|e| NickelError::Eval(report_as_str(&mut files, e, ColorOpt::Never).trim_end().to_string()))?;
        let mut imports: Vec<(Import<'_>, TermPos)> = Vec::new();
        ast.traverse_ref(
            &mut |node: &Ast<'_>, _: &()| {
                if let Node::Import(import) = &node.node {
                    imports.push((import.clone(), node.pos));
                }
                TraverseControl::<(), ()>::Continue
            },
            &(),
        );
        for (import, pos) in imports {
            let line = pos
                .as_opt_ref()
                .and_then(|span| files.location(id, span.start).ok())
                .map_or(0, |l| l.line.to_usize() + 1);
            let refuse = |path: &str, why: String| NickelError::Import {
                file: name.to_string(),
                line,
                path: path.to_string(),
                why,
            };
            let (path, format) = match import {
                Import::Path { path, format } => (Path::new(path), format),
                Import::Package { id } => {
                    return Err(refuse(id.label(), "package imports are not available".into()));
                }
            };
            let shown = path.to_string_lossy();
            let mut target = None;
            for candidate in [dir.join(path), self.schemas.lexical.join(path)] {
                // `dir` and the schemas are absolute, so is every candidate (an absolute
                // import path replaces them).
                let lexical = normalize_abs_path(&candidate);
                if !self.roots().any(|r| lexical.starts_with(&r.lexical)) {
                    return Err(refuse(&shown, self.allowed()));
                }
                // Inside an allowed directory: only now is the file system asked.
                let Ok(real) = std::fs::canonicalize(&lexical) else {
                    continue;
                };
                if !self.roots().any(|r| real.starts_with(&r.real)) {
                    return Err(refuse(&shown, format!("a symlink leads outside; {}", self.allowed())));
                }
                target.get_or_insert((lexical, real));
            }
            // Nothing found: Nickel reports the missing import itself, naming only the path.
            let Some((lexical, real)) = target else { continue };
            let own = self.own_dir.as_ref().is_some_and(|d| real.starts_with(&d.real))
                && !real.starts_with(&self.schemas.real);
            // The bundled schemas are trusted; the user's own Nickel files may import further.
            if own && matches!(format, InputFormat::Nickel) && self.seen.insert(real.clone()) {
                let shown = lexical.display().to_string();
                let bytes = std::fs::metadata(&real).map(|m| m.len()).unwrap_or(0);
                self.spend(&shown, bytes)?;
                let text = std::fs::read_to_string(&real)
                    .map_err(|e| NickelError::Eval(format!("{name}:{line}: cannot read the import {shown}: {e}")))?;
                let parent = lexical.parent().unwrap_or(Path::new("/")).to_path_buf();
                self.check_file(&shown, text.into(), &parent)?;
            }
        }
        Ok(())
    }

    fn roots(&self) -> impl Iterator<Item = &Root> {
        std::iter::once(&self.schemas).chain(&self.own_dir)
    }

    fn allowed(&self) -> String {
        match &self.own_dir {
            Some(dir) => format!(
                "imports may only name the bundled schemas or files under {}",
                dir.lexical.display()
            ),
            None => "imports may only name the bundled schemas".into(),
        }
    }
}
