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
pub use scan::ContextLimits;

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
    /// `mode` holds the permission bits (`0o7777`), as `docker build` sends them. A file
    /// below `PACK_BELOW` bytes lives in a pack; a larger one is a blob of its own.
    File {
        sha256: String,
        size: u64,
        mode: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pack: Option<PackRef>,
        /// Modification time, nanoseconds since the epoch: `docker build` keeps it, and
        /// cargo's fingerprints compare it, so a rebuilt target is not stale on a runner.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime_ns: Option<u64>,
    },
    Dir {
        mode: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime_ns: Option<u64>,
    },
    /// A symlink whose target stays inside the context.
    Symlink { target: String },
}

/// Where a small file's content is: `offset` bytes into the pack blob `blob`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRef {
    pub blob: String,
    pub offset: u64,
}

/// Distinct contents of a context: sha256 -> (the first path that has it, its size).
type Contents = BTreeMap<String, (String, u64)>;

/// Files below this size travel in packs, one stored message for many files: with
/// `sync_interval: always` every stored message costs the server an fsync (about 2 ms on
/// this project's machines), and a blob per small file made 20,000 files 40 s of fsyncs.
const PACK_BELOW: u64 = 64 * 1024;
/// A pack fills at most one chunk, so it is read in one message.
const PACK_SIZE: u64 = CHUNK;

/// What an upload did, for `lian submit` to report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    pub files: u64,
    pub bytes: u64,
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
}

/// How an upload is held: its abuse limits, and where its progress goes.
pub struct Upload<'a> {
    pub limits: &'a ContextLimits,
    pub progress: &'a mut (dyn FnMut(UploadProgress) + Send),
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
    /// before any byte is sent; contents already stored are not sent again. `lineage` (the
    /// workspace) names whose previous context small files may be found in.
    pub async fn upload_context(
        &self,
        root: &Path,
        keep: &[&str],
        lineage: &str,
        limits: &ContextLimits,
        progress: &mut (dyn FnMut(UploadProgress) + Send),
    ) -> Result<(ContextRef, UploadStats), BusError> {
        let mut entries = scan::scan(root, keep, limits, progress)?;
        let mut stats = UploadStats::default();
        // One path per content: large contents are blobs of their own, small ones go in packs.
        let (mut large, mut small): (Contents, Contents) = Default::default();
        for entry in &entries {
            if let EntryKind::File { sha256, size, .. } = &entry.kind {
                stats.files += 1;
                stats.bytes += size;
                let side = if *size >= PACK_BELOW { &mut large } else { &mut small };
                if *size > 0 {
                    side.entry(sha256.clone()).or_insert((entry.path.clone(), *size));
                }
            }
        }
        let lineage = lineage_subject(lineage);
        let mut placed = self.reusable_packs(&lineage, &small).await?;
        let large_shas: Vec<String> = large.keys().cloned().collect();
        let missing = self.missing_blobs(&large_shas).await?;
        let to_pack: Vec<(&String, &(String, u64))> =
            small.iter().filter(|(sha, _)| !placed.contains_key(*sha)).collect();
        let total =
            missing.iter().map(|s| large[s].1).sum::<u64>() + to_pack.iter().map(|(_, (_, size))| size).sum::<u64>();
        let mut writer = blobs::Writer::new(self);
        let mut sent = 0u64;
        let mut buf = vec![0u8; CHUNK as usize];
        for sha in &missing {
            let (path, size) = &large[sha];
            let full = root.join(path);
            let mut file = tokio::fs::File::open(&full).await.map_err(BusError::io(&full))?;
            let mut hasher = Sha256::new();
            let count = blobs::chunks(*size);
            for index in 0..count {
                let len = CHUNK.min(size - index * CHUNK) as usize;
                file.read_exact(&mut buf[..len]).await.map_err(BusError::io(&full))?;
                hasher.update(&buf[..len]);
                writer
                    .chunk(sha, index, count, Bytes::copy_from_slice(&buf[..len]))
                    .await?;
                sent += len as u64;
                progress(UploadProgress::Sending { sent, total });
            }
            // A file that changed since it was hashed would be stored under the wrong name.
            if hex(&hasher.finalize()) != *sha || file.read(&mut buf[..1]).await.map_err(BusError::io(&full))? != 0 {
                return Err(changed(full));
            }
            stats.uploaded_files += 1;
        }
        let mut pack: Vec<u8> = Vec::with_capacity(CHUNK as usize);
        let mut members: Vec<(String, u64)> = Vec::new();
        for (index, (sha, (path, size))) in to_pack.iter().enumerate() {
            let full = root.join(path);
            let content = tokio::fs::read(&full).await.map_err(BusError::io(&full))?;
            if content.len() as u64 != *size || hex_sha256(&content) != **sha {
                return Err(changed(full));
            }
            members.push(((*sha).clone(), pack.len() as u64));
            pack.extend_from_slice(&content);
            stats.uploaded_files += 1;
            sent += size;
            let last = index + 1 == to_pack.len();
            let next_fits = to_pack
                .get(index + 1)
                .is_some_and(|(_, (_, n))| pack.len() as u64 + n <= PACK_SIZE);
            if last || !next_fits {
                let pack_sha = hex_sha256(&pack);
                writer
                    .chunk(&pack_sha, 0, 1, Bytes::from(std::mem::take(&mut pack)))
                    .await?;
                for (member, offset) in members.drain(..) {
                    placed.insert(
                        member,
                        PackRef {
                            blob: pack_sha.clone(),
                            offset,
                        },
                    );
                }
                progress(UploadProgress::Sending { sent, total });
            }
        }
        stats.uploaded_bytes = sent;
        for entry in &mut entries {
            if let EntryKind::File { sha256, pack, .. } = &mut entry.kind {
                *pack = placed.get(sha256).cloned();
            }
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
        let name = format!("{MANIFEST_PREFIX}{manifest_sha}");
        self.remember(&lineage, &name).await?;
        Ok((
            ContextRef {
                manifest: name,
                files: stats.files,
                bytes: stats.bytes,
                sent_bytes: stats.uploaded_bytes,
            },
            stats,
        ))
    }

    /// Where the small files of `small` already are: in the packs of the lineage's previous
    /// context that the store still holds fresh.
    async fn reusable_packs(&self, lineage: &str, small: &Contents) -> Result<BTreeMap<String, PackRef>, BusError> {
        let Some(previous) = self.read_last(lineage).await? else {
            return Ok(BTreeMap::new());
        };
        let manifest = match self
            .manifest(&ContextRef {
                manifest: previous,
                files: 0,
                bytes: 0,
                sent_bytes: 0,
            })
            .await
        {
            Ok(m) => m,
            // Gone or from another version: nothing to reuse, everything is sent.
            Err(_) => return Ok(BTreeMap::new()),
        };
        let mut found: BTreeMap<String, PackRef> = BTreeMap::new();
        for entry in manifest.entries {
            if let EntryKind::File {
                sha256,
                pack: Some(pack),
                ..
            } = entry.kind
                && small.contains_key(&sha256)
            {
                found.entry(sha256).or_insert(pack);
            }
        }
        let packs: Vec<String> = found
            .values()
            .map(|p| p.blob.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let gone: std::collections::BTreeSet<String> = self.missing_blobs(&packs).await?.into_iter().collect();
        found.retain(|_, p| !gone.contains(&p.blob));
        Ok(found)
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
        let Some(EntryKind::File { sha256, size, pack, .. }) =
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
        let (blob, offset, blob_size) = match pack {
            Some(p) => (p.blob.clone(), p.offset, PACK_SIZE),
            None => (sha256.clone(), 0, *size),
        };
        let mut content = Vec::new();
        self.read_chunks(&blobs::chunk_list(&blob, blob_size).collect::<Vec<_>>(), |chunks| {
            let mut chunks = chunks;
            chunks.sort_by_key(|c| c.index);
            for c in chunks {
                content.extend_from_slice(&c.data);
            }
            Ok(())
        })
        .await?;
        let start = offset as usize;
        let content = content
            .get(start..start + *size as usize)
            .ok_or_else(|| corrupt(path))?
            .to_vec();
        if hex_sha256(&content) != *sha256 {
            return Err(corrupt(path));
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
        // Directories, symlinks and empty files first; one target file per large content
        // (copied to its twins after), and the members of every pack to write when it comes.
        let (mut layout, downloaded, entries) = tokio::task::spawn_blocking(move || {
            let (layout, downloaded) = lay_out(&dest_buf, &entries)?;
            Ok::<_, BusError>((layout, downloaded, entries))
        })
        .await
        .expect("laying out does not panic")?;
        let wanted: Vec<_> = layout
            .large
            .iter()
            .flat_map(|(sha, t)| blobs::chunk_list(sha, t.size))
            .chain(layout.packs.keys().flat_map(|sha| blobs::chunk_list(sha, PACK_SIZE)))
            .collect();
        self.read_chunks(&wanted, |chunks| {
            for c in chunks {
                layout.receive(&c)?;
            }
            Ok(())
        })
        .await?;
        let dest_buf = dest.to_path_buf();
        tokio::task::spawn_blocking(move || finish(&dest_buf, layout, &entries))
            .await
            .expect("finishing does not panic")?;
        Ok(downloaded)
    }
}

fn changed(path: PathBuf) -> BusError {
    BusError::Context {
        path,
        why: "the file changed while it was being uploaded: submit again".into(),
    }
}

/// Where a workspace's last context is remembered: its small files are looked for in that
/// context's packs by the next upload.
fn lineage_subject(lineage: &str) -> String {
    format!("lian-ctx.last.{}", lian_core::names::path_token(lineage))
}

fn corrupt(what: &str) -> BusError {
    BusError::MissingObject {
        name: format!("{what} (stored content does not match its manifest)"),
    }
}

/// The file a large content is written into, hashed as its chunks arrive in order. It is
/// opened for each chunk, so a context of any size holds no file open between chunks.
struct Target {
    path: PathBuf,
    size: u64,
    next: u64,
    hasher: Sha256,
    in_order: bool,
    received: u64,
}

/// A small file, waiting for its pack.
struct Member {
    path: PathBuf,
    offset: u64,
    size: u64,
    sha256: String,
}

/// What a download writes where.
#[derive(Default)]
struct Layout {
    large: BTreeMap<String, Target>,
    packs: BTreeMap<String, Vec<Member>>,
    packs_written: std::collections::BTreeSet<String>,
}

impl Layout {
    fn receive(&mut self, chunk: &blobs::Chunk) -> Result<(), BusError> {
        if let Some(target) = self.large.get_mut(&chunk.sha256) {
            return target.write(chunk);
        }
        let members = self.packs.get(&chunk.sha256).ok_or_else(|| corrupt(&chunk.sha256))?;
        if chunk.index != 0 || hex_sha256(&chunk.data) != chunk.sha256 {
            return Err(corrupt(&chunk.sha256));
        }
        for m in members {
            let start = m.offset as usize;
            let content = chunk
                .data
                .get(start..start + m.size as usize)
                .filter(|c| hex_sha256(c) == m.sha256)
                .ok_or_else(|| corrupt(&m.sha256))?;
            std::fs::write(&m.path, content).map_err(BusError::io(&m.path))?;
        }
        self.packs_written.insert(chunk.sha256.clone());
        Ok(())
    }
}

impl Target {
    fn write(&mut self, chunk: &blobs::Chunk) -> Result<(), BusError> {
        let expected = CHUNK.min(self.size.saturating_sub(chunk.index * CHUNK));
        if chunk.data.len() as u64 != expected {
            return Err(corrupt(&chunk.sha256));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(BusError::io(&self.path))?;
        file.write_all_at(&chunk.data, chunk.index * CHUNK)
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

/// Creates directories, symlinks and empty files, one sized target per large content, and
/// the list of what each pack holds.
fn lay_out(dest: &Path, entries: &[ManifestEntry]) -> Result<(Layout, Downloaded), BusError> {
    let mut layout = Layout::default();
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
            EntryKind::File { sha256, size, pack, .. } => {
                done.files += 1;
                done.bytes += size;
                if let Some(pack) = pack {
                    if *size >= PACK_BELOW || pack.offset + size > PACK_SIZE {
                        return Err(corrupt(&entry.path));
                    }
                    layout.packs.entry(pack.blob.clone()).or_default().push(Member {
                        path,
                        offset: pack.offset,
                        size: *size,
                        sha256: sha256.clone(),
                    });
                    continue;
                }
                let file = std::fs::File::create(&path).map_err(BusError::io(&path))?;
                if *size == 0 || layout.large.contains_key(sha256) {
                    continue;
                }
                file.set_len(*size).map_err(BusError::io(&path))?;
                layout.large.insert(
                    sha256.clone(),
                    Target {
                        path,
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
    Ok((layout, done))
}

/// Checks every content arrived whole, fills the twins, then sets modes (directories
/// last and deepest first, so a read-only directory is written into before it closes).
fn finish(dest: &Path, layout: Layout, entries: &[ManifestEntry]) -> Result<(), BusError> {
    for (sha, target) in &layout.large {
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
    if let Some(missing) = layout.packs.keys().find(|p| !layout.packs_written.contains(*p)) {
        return Err(BusError::MissingObject {
            name: format!("pack sha256-{missing}"),
        });
    }
    for entry in entries {
        let path = dest.join(&entry.path);
        if let EntryKind::File {
            sha256,
            size,
            mode,
            pack,
            mtime_ns,
        } = &entry.kind
        {
            if *size > 0
                && pack.is_none()
                && let Some(target) = layout.large.get(sha256)
                && target.path != path
            {
                std::fs::copy(&target.path, &path).map_err(BusError::io(&path))?;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(BusError::io(&path))?;
            set_mtime(&path, *mtime_ns)?;
        }
    }
    for entry in entries.iter().rev() {
        if let EntryKind::Dir { mode, mtime_ns } = &entry.kind {
            let path = dest.join(&entry.path);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(BusError::io(&path))?;
            set_mtime(&path, *mtime_ns)?;
        }
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime_ns: Option<u64>) -> Result<(), BusError> {
    let Some(ns) = mtime_ns else { return Ok(()) };
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    std::fs::File::open(path)
        .and_then(|f| f.set_modified(when))
        .map_err(BusError::io(path))
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
