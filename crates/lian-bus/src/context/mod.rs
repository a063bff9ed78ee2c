//! Build contexts, content-addressed (ADR-043): every file content is a blob stored once
//! under its sha256 (see `blobs`), and a context is a manifest blob listing each path with
//! its kind, mode and hash. A submit asks the store which blobs it lacks in a few batched
//! requests and sends only those; a worker reads a context in batched direct gets. No
//! per-file consumer, no per-file round trip, nothing on the server that grows with reads.

mod blobs;
mod scan;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use lian_core::ContextRef;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

pub use blobs::{CHUNK, RETENTION, STREAM, STREAM_SUBJECTS};
pub use scan::{ContextLimits, LimitKind};

use crate::{Bus, BusError};

/// The manifest format this build writes and reads.
const MANIFEST_VERSION: u32 = 2;
/// No manifest is read past this size, whatever it claims (100,000 entries take ~15 MB).
const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub entries: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative, `/`-separated, never escaping the context.
    pub path: String,
    #[serde(flatten)]
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryKind {
    /// `mode` holds the permission bits (`0o7777`), as `docker build` sends them.
    File {
        sha256: String,
        size: u64,
        mode: u32,
    },
    Dir {
        mode: u32,
    },
    /// A symlink whose target stays inside the context.
    Symlink {
        target: String,
    },
}

/// What an upload did, for `lian submit` to report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    pub files: u64,
    pub bytes: u64,
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
}

/// Where an upload is, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadProgress {
    /// Hashing: files and bytes seen so far.
    Scanning { files: u64, bytes: u64 },
    /// Sending what the store lacks: bytes sent of bytes to send.
    Sending { sent: u64, total: u64 },
}

/// What a download wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Downloaded {
    pub files: u64,
    pub bytes: u64,
}

const MANIFEST_PREFIX: &str = "manifest-";

pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the context stream holds, for checks that reads leave nothing behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreState {
    pub consumers: usize,
    pub messages: u64,
    pub bytes: u64,
}

impl Bus {
    pub async fn context_store_state(&self) -> Result<StoreState, BusError> {
        let mut stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| BusError::nats("read context stream", e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| BusError::nats("read context stream", e))?;
        Ok(StoreState {
            consumers: info.state.consumer_count,
            messages: info.state.messages,
            bytes: info.state.bytes,
        })
    }

    /// Stores a directory as a build context, minus what its `.dockerignore` excludes
    /// (`keep` names files sent even so: the Dockerfile, the ignore file, the build spec,
    /// which the runner's own `docker build` reads). A context over `limits` is refused
    /// before any byte is sent; contents already stored are not sent again.
    pub async fn upload_context(
        &self,
        root: &Path,
        keep: &[&str],
        limits: &ContextLimits,
        progress: &mut (dyn FnMut(UploadProgress) + Send),
    ) -> Result<(ContextRef, UploadStats), BusError> {
        let entries = scan::scan(root, keep, limits, progress)?;
        let mut first_path: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
        let mut stats = UploadStats::default();
        for entry in &entries {
            if let EntryKind::File { sha256, size, .. } = &entry.kind {
                stats.files += 1;
                stats.bytes += size;
                if *size > 0 {
                    first_path.entry(sha256).or_insert((&entry.path, *size));
                }
            }
        }
        let shas: Vec<String> = first_path.keys().map(|s| s.to_string()).collect();
        let missing = self.missing_blobs(&shas).await?;
        let total: u64 = missing.iter().map(|s| first_path[s.as_str()].1).sum();
        let mut writer = blobs::Writer::new(self);
        let mut buf = vec![0u8; CHUNK as usize];
        for sha in &missing {
            let (path, size) = first_path[sha.as_str()];
            let full = root.join(path);
            let mut file = tokio::fs::File::open(&full).await.map_err(BusError::io(&full))?;
            let mut hasher = Sha256::new();
            let count = blobs::chunks(size);
            for index in 0..count {
                let len = CHUNK.min(size - index * CHUNK) as usize;
                file.read_exact(&mut buf[..len]).await.map_err(BusError::io(&full))?;
                hasher.update(&buf[..len]);
                writer
                    .chunk(sha, index, count, Bytes::copy_from_slice(&buf[..len]))
                    .await?;
                stats.uploaded_bytes += len as u64;
                progress(UploadProgress::Sending {
                    sent: stats.uploaded_bytes,
                    total,
                });
            }
            // A file that changed since it was hashed would be stored under the wrong name.
            if hex(&hasher.finalize()) != *sha || file.read(&mut buf[..1]).await.map_err(BusError::io(&full))? != 0 {
                return Err(BusError::Context {
                    path: full,
                    why: "the file changed while it was being uploaded: submit again".into(),
                });
            }
            stats.uploaded_files += 1;
        }
        let manifest = serde_json::to_vec(&Manifest {
            version: MANIFEST_VERSION,
            entries,
        })
        .expect("json");
        let manifest_sha = hex_sha256(&manifest);
        if !self
            .missing_blobs(std::slice::from_ref(&manifest_sha))
            .await?
            .is_empty()
        {
            let count = blobs::chunks(manifest.len() as u64).max(1);
            for (index, piece) in manifest.chunks(CHUNK as usize).enumerate() {
                writer
                    .chunk(&manifest_sha, index as u64, count, Bytes::copy_from_slice(piece))
                    .await?;
            }
        }
        writer.finish().await?;
        Ok((
            ContextRef {
                manifest: format!("{MANIFEST_PREFIX}{manifest_sha}"),
                files: stats.files,
                bytes: stats.bytes,
                sent_bytes: stats.uploaded_bytes,
            },
            stats,
        ))
    }

    pub async fn manifest(&self, context: &ContextRef) -> Result<Manifest, BusError> {
        let sha = context
            .manifest
            .strip_prefix(MANIFEST_PREFIX)
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| BusError::Context {
                path: PathBuf::from(&context.manifest),
                why: format!("a context manifest is named {MANIFEST_PREFIX}<sha256 in hex>"),
            })?;
        let bytes = self.read_small_blob(sha, MAX_MANIFEST_BYTES).await?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|source| BusError::Decode {
            what: format!("context manifest {}", context.manifest),
            source,
        })?;
        if manifest.version != MANIFEST_VERSION {
            return Err(BusError::Context {
                path: PathBuf::from(&context.manifest),
                why: format!(
                    "manifest version {} is not the {MANIFEST_VERSION} this worker reads: submit again with this lian",
                    manifest.version
                ),
            });
        }
        Ok(manifest)
    }

    /// One file of a context, if the context has it and it is at most `limit` bytes.
    pub async fn context_file(
        &self,
        context: &ContextRef,
        path: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, BusError> {
        let manifest = self.manifest(context).await?;
        let Some(EntryKind::File { sha256, size, .. }) =
            manifest.entries.iter().find(|e| e.path == path).map(|e| &e.kind)
        else {
            return Ok(None);
        };
        if *size > limit {
            return Err(BusError::Context {
                path: PathBuf::from(path),
                why: format!("it is {size} bytes, over the limit of {limit} for this file"),
            });
        }
        let wanted: Vec<_> = blobs::chunk_list(sha256, *size).collect();
        let mut content = vec![0u8; *size as usize];
        self.read_chunks(&wanted, |chunks| {
            for c in chunks {
                let at = (c.index * CHUNK) as usize;
                content
                    .get_mut(at..at + c.data.len())
                    .ok_or_else(|| corrupt(path))?
                    .copy_from_slice(&c.data);
            }
            Ok(())
        })
        .await?;
        if hex_sha256(&content) != *sha256 {
            return Err(BusError::MissingObject {
                name: format!("{path} ({sha256})"),
            });
        }
        Ok(Some(content))
    }

    /// Writes a context under `dest` (which must be empty or absent). A manifest over
    /// `limits` is refused before anything is read.
    pub async fn download_context(
        &self,
        context: &ContextRef,
        dest: &Path,
        limits: &ContextLimits,
    ) -> Result<Downloaded, BusError> {
        let manifest = self.manifest(context).await?;
        limits.check_manifest(&manifest.entries)?;
        let dest_buf = dest.to_path_buf();
        let entries = manifest.entries;
        // Directories, symlinks and empty files first; the files that have content are
        // opened and sized, one target file per content, copied to its twins after.
        let (targets, downloaded, entries) = tokio::task::spawn_blocking(move || {
            let laid = lay_out(&dest_buf, &entries)?;
            Ok::<_, BusError>((laid.0, laid.1, entries))
        })
        .await
        .expect("laying out does not panic")?;
        let mut targets = targets;
        let wanted: Vec<_> = targets
            .iter()
            .flat_map(|(sha, t)| blobs::chunk_list(sha, t.size))
            .collect();
        self.read_chunks(&wanted, |chunks| {
            for c in chunks {
                let target = targets.get_mut(&c.sha256).ok_or_else(|| corrupt(&c.sha256))?;
                target.write(&c)?;
            }
            Ok(())
        })
        .await?;
        let dest_buf = dest.to_path_buf();
        tokio::task::spawn_blocking(move || finish(&dest_buf, targets, &entries))
            .await
            .expect("finishing does not panic")?;
        Ok(downloaded)
    }
}

fn corrupt(what: &str) -> BusError {
    BusError::MissingObject {
        name: format!("{what} (stored content does not match its manifest)"),
    }
}

/// The file a blob is written into, hashed as its chunks arrive in order.
struct Target {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    next: u64,
    hasher: Sha256,
    in_order: bool,
    received: u64,
}

impl Target {
    fn write(&mut self, chunk: &blobs::Chunk) -> Result<(), BusError> {
        let expected = CHUNK.min(self.size.saturating_sub(chunk.index * CHUNK));
        if chunk.data.len() as u64 != expected {
            return Err(corrupt(&chunk.sha256));
        }
        self.file
            .write_all_at(&chunk.data, chunk.index * CHUNK)
            .map_err(BusError::io(&self.path))?;
        if chunk.index == self.next {
            self.hasher.update(&chunk.data);
            self.next += 1;
        } else {
            self.in_order = false;
        }
        self.received += 1;
        Ok(())
    }
}

/// Creates directories, symlinks and empty files, and one sized target per content.
fn lay_out(dest: &Path, entries: &[ManifestEntry]) -> Result<(BTreeMap<String, Target>, Downloaded), BusError> {
    let mut targets = BTreeMap::new();
    let mut done = Downloaded::default();
    std::fs::create_dir_all(dest).map_err(BusError::io(dest))?;
    for entry in entries {
        let path = dest.join(safe_relative(&entry.path).ok_or_else(|| BusError::Context {
            path: PathBuf::from(&entry.path),
            why: "the manifest names a path outside the context".into(),
        })?);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(BusError::io(parent))?;
        }
        match &entry.kind {
            EntryKind::Dir { .. } => std::fs::create_dir_all(&path).map_err(BusError::io(&path))?,
            EntryKind::Symlink { target } => {
                let resolved = Path::new(&entry.path).parent().unwrap_or(Path::new("")).join(target);
                if Path::new(target).is_absolute() || !scan::stays_inside(&resolved) {
                    return Err(BusError::Context {
                        path: PathBuf::from(&entry.path),
                        why: "the manifest has a symlink that leaves the context".into(),
                    });
                }
                std::os::unix::fs::symlink(target, &path).map_err(BusError::io(&path))?;
            }
            EntryKind::File { sha256, size, .. } => {
                done.files += 1;
                done.bytes += size;
                if *size == 0 || targets.contains_key(sha256) {
                    std::fs::File::create(&path).map_err(BusError::io(&path))?;
                    continue;
                }
                let file = std::fs::File::create(&path).map_err(BusError::io(&path))?;
                file.set_len(*size).map_err(BusError::io(&path))?;
                targets.insert(
                    sha256.clone(),
                    Target {
                        path,
                        file,
                        size: *size,
                        next: 0,
                        hasher: Sha256::new(),
                        in_order: true,
                        received: 0,
                    },
                );
            }
        }
    }
    Ok((targets, done))
}

/// Checks every content arrived whole, fills the twins, then sets modes (directories
/// last and deepest first, so a read-only directory is written into before it closes).
fn finish(dest: &Path, targets: BTreeMap<String, Target>, entries: &[ManifestEntry]) -> Result<(), BusError> {
    for (sha, target) in &targets {
        let complete = target.received == blobs::chunks(target.size);
        let hash = if target.in_order {
            hex(&target.hasher.clone().finalize())
        } else {
            scan::hash_file(&target.path)?.0
        };
        if !complete || hash != *sha {
            return Err(BusError::MissingObject {
                name: format!("sha256-{sha} (for {})", target.path.display()),
            });
        }
    }
    for entry in entries {
        let path = dest.join(&entry.path);
        if let EntryKind::File { sha256, size, mode } = &entry.kind {
            if *size > 0
                && let Some(target) = targets.get(sha256)
                && target.path != path
            {
                std::fs::copy(&target.path, &path).map_err(BusError::io(&path))?;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(BusError::io(&path))?;
        }
    }
    for entry in entries.iter().rev() {
        if let EntryKind::Dir { mode } = &entry.kind {
            let path = dest.join(&entry.path);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(BusError::io(&path))?;
        }
    }
    Ok(())
}

/// `Some(path)` when `path` is relative and only descends.
fn safe_relative(path: &str) -> Option<&Path> {
    let p = Path::new(path);
    (!path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_cannot_escape() {
        assert!(safe_relative("a/b").is_some());
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "./a"] {
            assert!(safe_relative(bad).is_none(), "{bad}");
        }
    }
}
