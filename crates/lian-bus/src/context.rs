//! Build contexts in the JetStream object store, content-addressed: every file is stored
//! once under `sha256-<hex>` and a context is a manifest listing paths and hashes, so a
//! re-submit uploads only what changed and any worker can materialise the context.

use std::path::{Component, Path, PathBuf};

use async_nats::jetstream::object_store::{InfoErrorKind, ObjectStore};
use lian_core::{ContextRef, subjects};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{Bus, BusError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
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
    File {
        sha256: String,
        size: u64,
        executable: bool,
    },
    /// A symlink whose target stays inside the context.
    Symlink { target: String },
}

/// What an upload did, for `lian submit` to report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
}

fn object_name(sha256: &str) -> String {
    format!("sha256-{sha256}")
}

impl Bus {
    async fn contexts(&self) -> Result<ObjectStore, BusError> {
        self.js
            .get_object_store(subjects::CONTEXT_BUCKET)
            .await
            .map_err(|e| BusError::nats("open context store", e))
    }

    /// Stores a directory as a build context; files already stored are not sent again.
    pub async fn upload_context(&self, root: &Path) -> Result<(ContextRef, UploadStats), BusError> {
        let root_buf = root.to_path_buf();
        let entries = tokio::task::spawn_blocking(move || scan(&root_buf))
            .await
            .expect("scan does not panic")?;
        let store = self.contexts().await?;
        let mut stats = UploadStats::default();
        let (mut files, mut bytes) = (0u64, 0u64);
        for entry in &entries {
            let EntryKind::File { sha256, size, .. } = &entry.kind else {
                continue;
            };
            files += 1;
            bytes += size;
            let name = object_name(sha256);
            match store.info(&name).await {
                Ok(_) => continue,
                Err(e) if e.kind() == InfoErrorKind::NotFound => {}
                Err(e) => return Err(BusError::nats("look up context object", e)),
            }
            let path = root.join(&entry.path);
            let mut file = tokio::fs::File::open(&path).await.map_err(BusError::io(&path))?;
            store
                .put(name.as_str(), &mut file)
                .await
                .map_err(|e| BusError::nats("upload context file", e))?;
            stats.uploaded_files += 1;
            stats.uploaded_bytes += size;
        }
        let manifest = serde_json::to_vec(&Manifest { entries }).expect("json");
        let name = format!("manifest-{}", hex(&Sha256::digest(&manifest)));
        if store.info(&name).await.is_err() {
            store
                .put(name.as_str(), &mut manifest.as_slice())
                .await
                .map_err(|e| BusError::nats("upload manifest", e))?;
        }
        Ok((
            ContextRef {
                manifest: name,
                files,
                bytes,
            },
            stats,
        ))
    }

    pub async fn manifest(&self, context: &ContextRef) -> Result<Manifest, BusError> {
        let bytes = self.object(&context.manifest).await?;
        serde_json::from_slice(&bytes).map_err(|source| BusError::Decode {
            what: format!("context manifest {}", context.manifest),
            source,
        })
    }

    async fn object(&self, name: &str) -> Result<Vec<u8>, BusError> {
        let store = self.contexts().await?;
        let mut object = store.get(name).await.map_err(|e| {
            if e.to_string().contains("not found") {
                BusError::MissingObject { name: name.to_string() }
            } else {
                BusError::nats("read context object", e)
            }
        })?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| BusError::nats("read context object", e))?;
        Ok(bytes)
    }

    /// One file of a context, if the context has it.
    pub async fn context_file(&self, context: &ContextRef, path: &str) -> Result<Option<Vec<u8>>, BusError> {
        let manifest = self.manifest(context).await?;
        match manifest.entries.iter().find(|e| e.path == path).map(|e| &e.kind) {
            Some(EntryKind::File { sha256, .. }) => Ok(Some(self.object(&object_name(sha256)).await?)),
            _ => Ok(None),
        }
    }

    /// Writes a context under `dest` (which must be empty or absent); returns files and bytes.
    pub async fn download_context(&self, context: &ContextRef, dest: &Path) -> Result<(u64, u64), BusError> {
        let manifest = self.manifest(context).await?;
        let (mut files, mut bytes) = (0, 0);
        for entry in &manifest.entries {
            let relative = safe_relative(&entry.path).ok_or_else(|| BusError::Context {
                path: PathBuf::from(&entry.path),
                why: "the manifest names a path outside the context".into(),
            })?;
            let path = dest.join(relative);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(BusError::io(parent))?;
            }
            match &entry.kind {
                EntryKind::File {
                    sha256,
                    size,
                    executable,
                } => {
                    let content = self.object(&object_name(sha256)).await?;
                    if hex(&Sha256::digest(&content)) != *sha256 {
                        return Err(BusError::Context {
                            path: path.clone(),
                            why: "stored content does not match its hash".into(),
                        });
                    }
                    tokio::fs::write(&path, &content).await.map_err(BusError::io(&path))?;
                    if *executable {
                        use std::os::unix::fs::PermissionsExt;
                        let perms = std::fs::Permissions::from_mode(0o755);
                        tokio::fs::set_permissions(&path, perms)
                            .await
                            .map_err(BusError::io(&path))?;
                    }
                    files += 1;
                    bytes += size;
                }
                EntryKind::Symlink { target } => {
                    tokio::fs::symlink(target, &path).await.map_err(BusError::io(&path))?;
                }
            }
        }
        Ok((files, bytes))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `Some(path)` when `path` is relative and only descends.
fn safe_relative(path: &str) -> Option<&Path> {
    let p = Path::new(path);
    (!path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))).then_some(p)
}

/// Lists a context directory: regular files with their hashes, and symlinks that stay
/// inside it. A symlink that escapes the context is refused, not followed.
fn scan(root: &Path) -> Result<Vec<ManifestEntry>, BusError> {
    let meta = std::fs::metadata(root).map_err(|e| BusError::Context {
        path: root.to_path_buf(),
        why: format!("cannot read it: {e}"),
    })?;
    if !meta.is_dir() {
        return Err(BusError::Context {
            path: root.to_path_buf(),
            why: "not a directory: --context takes the directory the Dockerfile builds from".into(),
        });
    }
    let mut entries = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(dir) = dirs.pop() {
        let full = root.join(&dir);
        let mut children: Vec<_> = std::fs::read_dir(&full)
            .map_err(BusError::io(&full))?
            .collect::<Result<_, _>>()
            .map_err(BusError::io(&full))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let relative = dir.join(child.file_name());
            let display = relative.to_string_lossy().replace('\\', "/");
            let kind = child.file_type().map_err(BusError::io(child.path()))?;
            if kind.is_dir() {
                dirs.push(relative);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(child.path()).map_err(BusError::io(child.path()))?;
                let resolved = dir.join(&target);
                if target.is_absolute() || !stays_inside(&resolved) {
                    return Err(BusError::Context {
                        path: child.path(),
                        why: format!(
                            "symlink to {} leaves the context: copy the file in or point inside",
                            target.display()
                        ),
                    });
                }
                entries.push(ManifestEntry {
                    path: display,
                    kind: EntryKind::Symlink {
                        target: target.to_string_lossy().into_owned(),
                    },
                });
            } else if kind.is_file() {
                let path = child.path();
                let (sha256, size) = hash_file(&path)?;
                use std::os::unix::fs::PermissionsExt;
                let mode = child.metadata().map_err(BusError::io(&path))?.permissions().mode();
                entries.push(ManifestEntry {
                    path: display,
                    kind: EntryKind::File {
                        sha256,
                        size,
                        executable: mode & 0o111 != 0,
                    },
                });
            }
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Whether a relative path, with `..` resolved lexically, stays below its root.
fn stays_inside(path: &Path) -> bool {
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

fn hash_file(path: &Path) -> Result<(String, u64), BusError> {
    use std::io::Read;
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

    #[test]
    fn manifest_paths_cannot_escape() {
        assert!(safe_relative("a/b").is_some());
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "./a"] {
            assert!(safe_relative(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn scanning_refuses_symlinks_that_leave_the_context() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("../Dockerfile", dir.path().join("sub/ok")).unwrap();
        let entries = scan(dir.path()).unwrap();
        assert_eq!(entries.len(), 2);
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("abs")).unwrap();
        let err = scan(dir.path()).unwrap_err();
        assert!(err.to_string().contains("leaves the context"), "{err}");
        std::fs::remove_file(dir.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../outside", dir.path().join("sub/up")).unwrap();
        assert!(scan(dir.path()).is_err());
    }
}
