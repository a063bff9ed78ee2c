//! Incremental context sync to a runner over SSH: a manifest of file hashes is kept on the
//! runner next to the synced tree; only files that are new or changed travel (as one tar
//! stream), and files gone from the context are removed. The tree synced is a staged
//! context, already filtered by `.dockerignore` at upload; the runner's build applies it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ssh::{SshError, SshSession};

/// Where the runner keeps the manifest of the last sync, inside the synced directory.
const MANIFEST: &str = ".lian-sync.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    /// path -> (sha256, executable)
    files: BTreeMap<String, (String, bool)>,
}

/// What one sync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub files: u64,
    pub sent_files: u64,
    /// File content bytes that travelled (not counting tar headers).
    pub sent_bytes: u64,
    pub deleted: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("reading the context {path}: {source}")]
    Local { path: PathBuf, source: std::io::Error },
    #[error("the runner refused the sync ({what}, exit {status}): {stderr}")]
    Remote {
        what: &'static str,
        status: u32,
        stderr: String,
    },
}

/// Makes `remote_dir` on the runner hold exactly the files of `local`.
pub async fn sync_dir(session: &SshSession, local: &Path, remote_dir: &str) -> Result<SyncStats, SyncError> {
    let root = local.to_path_buf();
    let wanted = tokio::task::spawn_blocking(move || scan(&root))
        .await
        .expect("scan does not panic")?;
    // Fixed scripts; the directory travels as their `$1`, never inside the script.
    let dir = remote_dir;
    let previous = session
        .exec(
            &[
                "sh",
                "-c",
                &format!("cat -- \"$1/{MANIFEST}\" 2>/dev/null || true"),
                "sh",
                dir,
            ],
            &[],
        )
        .await?;
    let previous: Manifest = serde_json::from_slice(&previous.stdout).unwrap_or_default();

    let mut stats = SyncStats {
        files: wanted.files.len() as u64,
        ..Default::default()
    };
    let gone: Vec<&String> = previous
        .files
        .keys()
        .filter(|p| !wanted.files.contains_key(*p))
        .collect();
    if !gone.is_empty() {
        // Paths go through stdin, NUL-separated: never through the command line.
        let list: Vec<u8> = gone.iter().flat_map(|p| p.bytes().chain([0u8])).collect();
        let out = session
            .exec(&["sh", "-c", "cd -- \"$1\" && xargs -0 rm -f --", "sh", dir], &list)
            .await?;
        if out.status != 0 {
            return Err(remote("delete", &out));
        }
        stats.deleted = gone.len() as u64;
    }
    let changed: Vec<&String> = wanted
        .files
        .iter()
        .filter(|(p, v)| previous.files.get(*p) != Some(v))
        .map(|(p, _)| p)
        .collect();
    let root = local.to_path_buf();
    let paths: Vec<String> = changed.iter().map(|p| p.to_string()).collect();
    let manifest = serde_json::to_vec(&wanted).expect("json");
    let (archive, sent_bytes) = tokio::task::spawn_blocking(move || pack(&root, &paths, &manifest))
        .await
        .expect("pack does not panic")?;
    let out = session
        .exec(
            &["sh", "-c", "mkdir -p -- \"$1\" && tar -x -f - -C \"$1\"", "sh", dir],
            &archive,
        )
        .await?;
    if out.status != 0 {
        return Err(remote("unpack", &out));
    }
    stats.sent_files = changed.len() as u64;
    stats.sent_bytes = sent_bytes;
    Ok(stats)
}

fn remote(what: &'static str, out: &crate::ssh::ExecOutput) -> SyncError {
    SyncError::Remote {
        what,
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().chars().take(300).collect(),
    }
}

fn local_err(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Local {
        path: path.to_path_buf(),
        source,
    }
}

/// A tar of the changed files plus the new manifest; returns it and the content bytes.
fn pack(root: &Path, paths: &[String], manifest: &[u8]) -> Result<(Vec<u8>, u64), SyncError> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    let mut bytes = 0;
    for p in paths {
        let full = root.join(p);
        let mut file = std::fs::File::open(&full).map_err(local_err(&full))?;
        let len = file.metadata().map_err(local_err(&full))?.len();
        builder.append_file(p, &mut file).map_err(local_err(&full))?;
        bytes += len;
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, MANIFEST, manifest)
        .map_err(local_err(root))?;
    Ok((builder.into_inner().map_err(local_err(root))?, bytes))
}

/// The regular files of a context (symlinks and specials are not synced), with their hashes.
fn scan(root: &Path) -> Result<Manifest, SyncError> {
    let mut manifest = Manifest::default();
    let mut dirs = vec![PathBuf::new()];
    while let Some(dir) = dirs.pop() {
        let full = root.join(&dir);
        for entry in std::fs::read_dir(&full).map_err(local_err(&full))? {
            let entry = entry.map_err(local_err(&full))?;
            let rel = dir.join(entry.file_name());
            let rel_str = rel.to_string_lossy().replace('\\', "/");
            if rel_str == MANIFEST {
                continue;
            }
            let kind = entry.file_type().map_err(local_err(&full))?;
            if kind.is_dir() {
                dirs.push(rel);
            } else if kind.is_file() {
                use std::os::unix::fs::PermissionsExt;
                let path = entry.path();
                let content = std::fs::read(&path).map_err(local_err(&path))?;
                let hash = data_encoding::HEXLOWER.encode(&Sha256::digest(&content));
                let mode = entry.metadata().map_err(local_err(&path))?.permissions().mode();
                manifest.files.insert(rel_str, (hash, mode & 0o111 != 0));
            }
        }
    }
    Ok(manifest)
}
