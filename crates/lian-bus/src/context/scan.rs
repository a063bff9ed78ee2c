//! Walking a context directory as `docker build` would send it: `.dockerignore` applied as
//! BuildKit applies it, directories (empty ones too) with their modes, symlinks that stay
//! inside, regular files hashed as a stream. Everything else is refused by name, and so is
//! a context over its limits, before a byte of it is read.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path};

use lian_core::dockerignore::DockerIgnore;
use sha2::{Digest, Sha256};

use super::{EntryKind, ManifestEntry, UploadProgress, hex};
use crate::BusError;

/// Abuse limits on a context, far above real projects. A user raises them with
/// `lian submit --max-context-files/--max-context-bytes` (or `LIAN_MAX_CONTEXT_FILES`,
/// `LIAN_MAX_CONTEXT_BYTES`); a worker with `max_context_files`/`max_context_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLimits {
    pub max_files: u64,
    pub max_bytes: u64,
}

impl Default for ContextLimits {
    fn default() -> Self {
        Self {
            max_files: 100_000,
            max_bytes: 4 << 30,
        }
    }
}

/// Which limit a context went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LimitKind {
    Files,
    Bytes,
}

impl ContextLimits {
    fn over(&self, kind: LimitKind, have: u64) -> BusError {
        let (what, limit, flag) = match kind {
            LimitKind::Files => (
                "entries",
                self.max_files,
                "--max-context-files (LIAN_MAX_CONTEXT_FILES)",
            ),
            LimitKind::Bytes => ("bytes", self.max_bytes, "--max-context-bytes (LIAN_MAX_CONTEXT_BYTES)"),
        };
        BusError::ContextLimit {
            why: format!(
                "the context has at least {have} {what}, over the limit of {limit}: leave files out with \
                 .dockerignore, or raise the limit with {flag} on the client and max_context_{} on the workers",
                if kind == LimitKind::Files { "files" } else { "bytes" }
            ),
        }
    }

    /// A manifest published by any client is held to the same limits before it is read.
    pub(crate) fn check_manifest(&self, entries: &[ManifestEntry]) -> Result<(), BusError> {
        if entries.len() as u64 > self.max_files {
            return Err(self.over(LimitKind::Files, entries.len() as u64));
        }
        let bytes = entries
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .fold(0u64, u64::saturating_add);
        if bytes > self.max_bytes {
            return Err(self.over(LimitKind::Bytes, bytes));
        }
        Ok(())
    }
}

pub(super) fn scan(
    root: &Path,
    keep: &[&str],
    limits: &ContextLimits,
    progress: &mut (dyn FnMut(UploadProgress) + Send),
) -> Result<Vec<ManifestEntry>, BusError> {
    let refuse = |path: &Path, why: String| BusError::Context {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(root).map_err(|e| refuse(root, format!("cannot read it: {e}")))?;
    if !meta.is_dir() {
        return Err(refuse(
            root,
            "not a directory: --context takes the directory the Dockerfile builds from".into(),
        ));
    }
    let ignore = match std::fs::read_to_string(root.join(".dockerignore")) {
        Ok(text) => DockerIgnore::parse(&text).map_err(|e| refuse(&root.join(".dockerignore"), e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(refuse(&root.join(".dockerignore"), format!("cannot read it: {e}"))),
    };
    let keep: BTreeSet<&str> = keep.iter().map(|k| k.trim_start_matches("./")).collect();
    let prune = !ignore.has_exceptions();
    let relative = |path: &Path| -> Result<String, BusError> {
        let rel = path.strip_prefix(root).expect("walkdir stays below its root");
        rel.to_str().map(str::to_string).ok_or_else(|| {
            refuse(
                path,
                "the name is not UTF-8: rename it or list it in .dockerignore".into(),
            )
        })
    };
    let walker = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            // Without `!` exceptions nothing under an excluded directory can come back.
            !(prune
                && e.file_type().is_dir()
                && e.path()
                    .strip_prefix(root)
                    .ok()
                    .and_then(Path::to_str)
                    .is_some_and(|rel| ignore.excludes(rel)))
        });
    let (mut entries, mut bytes) = (Vec::new(), 0u64);
    for item in walker {
        let item = item.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            refuse(&path, format!("cannot read it: {e}"))
        })?;
        let path = item.path();
        let rel = relative(path)?;
        if ignore.excludes(&rel) && !keep.contains(rel.as_str()) {
            continue;
        }
        if entries.len() as u64 >= limits.max_files {
            return Err(limits.over(LimitKind::Files, entries.len() as u64 + 1));
        }
        let kind = item.file_type();
        let meta = item
            .metadata()
            .map_err(|e| refuse(path, format!("cannot read it: {e}")))?;
        let mode = meta.permissions().mode() & 0o7777;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        let entry = if kind.is_dir() {
            EntryKind::Dir { mode, mtime_ns }
        } else if kind.is_symlink() {
            let target = std::fs::read_link(path).map_err(BusError::io(path))?;
            let resolved = Path::new(&rel).parent().unwrap_or(Path::new("")).join(&target);
            if target.is_absolute() || !stays_inside(&resolved) {
                return Err(refuse(
                    path,
                    format!(
                        "symlink to {} leaves the context: copy the file in or point inside",
                        target.display()
                    ),
                ));
            }
            let target = target
                .to_str()
                .ok_or_else(|| refuse(path, "the symlink's target is not UTF-8".into()))?;
            EntryKind::Symlink {
                target: target.to_string(),
            }
        } else if kind.is_file() {
            // The size a file claims is checked before it is read: a sparse file of a
            // terabyte is refused, not read.
            bytes = bytes.saturating_add(meta.len());
            if bytes > limits.max_bytes {
                return Err(limits.over(LimitKind::Bytes, bytes));
            }
            let (sha256, size) = hash_file(path)?;
            EntryKind::File {
                sha256,
                size,
                mode,
                pack: None,
                mtime_ns,
            }
        } else {
            let what = if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_socket() {
                "a socket"
            } else if kind.is_block_device() || kind.is_char_device() {
                "a device file"
            } else {
                "not a regular file"
            };
            return Err(refuse(
                path,
                format!(
                    "is {what}: a build context holds files, directories and symlinks; remove it or list it in \
                     .dockerignore"
                ),
            ));
        };
        entries.push(ManifestEntry { path: rel, kind: entry });
        progress(UploadProgress::Scanning {
            files: entries.len() as u64,
            bytes,
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Whether a relative path, with `..` resolved lexically, stays below its root.
pub(super) fn stays_inside(path: &Path) -> bool {
    let mut depth: i32 = 0;
    for c in path.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// The sha256 and size of a file, read as a stream.
pub(super) fn hash_file(path: &Path) -> Result<(String, u64), BusError> {
    let mut file = std::fs::File::open(path).map_err(BusError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(BusError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_dir(root: &Path) -> Result<Vec<ManifestEntry>, BusError> {
        scan(root, &["Dockerfile"], &ContextLimits::default(), &mut |_| {})
    }

    #[test]
    fn symlinks_that_leave_the_context_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("../Dockerfile", dir.path().join("sub/ok")).unwrap();
        assert_eq!(scan_dir(dir.path()).unwrap().len(), 3, "Dockerfile, sub, sub/ok");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("abs")).unwrap();
        let err = scan_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("leaves the context"), "{err}");
        std::fs::remove_file(dir.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../outside", dir.path().join("sub/up")).unwrap();
        assert!(scan_dir(dir.path()).is_err());
    }

    #[test]
    fn special_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = scan_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("pipe") && err.contains("FIFO"), "{err}");
    }

    #[test]
    fn limits_refuse_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::write(dir.path().join(format!("f{i}")), "x").unwrap();
        }
        let few = ContextLimits {
            max_files: 3,
            max_bytes: 1 << 20,
        };
        let err = scan(dir.path(), &[], &few, &mut |_| {}).unwrap_err().to_string();
        assert!(
            err.contains("limit of 3") && err.contains("--max-context-files"),
            "{err}"
        );
        // A sparse file that claims more than the limit is refused without being read.
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 40).unwrap();
        let err = scan(dir.path(), &[], &ContextLimits::default(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-context-bytes"), "{err}");
    }

    #[test]
    fn dockerignore_applies_but_kept_files_travel() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "target\nDockerfile\n*.md\n!KEEP.md\n").unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::create_dir_all(dir.path().join("target/debug")).unwrap();
        std::fs::write(dir.path().join("target/debug/big"), "x").unwrap();
        std::fs::write(dir.path().join("README.md"), "x").unwrap();
        std::fs::write(dir.path().join("KEEP.md"), "x").unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let paths: Vec<String> = scan_dir(dir.path()).unwrap().into_iter().map(|e| e.path).collect();
        assert_eq!(paths, [".dockerignore", "Dockerfile", "KEEP.md", "empty"]);
    }
}
