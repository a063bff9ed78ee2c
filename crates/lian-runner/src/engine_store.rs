//! Engine stores: a cache namespace's Docker data root (its images, layers and BuildKit
//! cache), kept on this host between leases (ADR lian-044). A lease takes its namespace's
//! store for its engine by renaming it into the lease (so two leases never share one), and
//! the lease's data root becomes the namespace's store again only after a build that
//! succeeded; a failed build's root is dropped, so the next build starts from the registry's
//! last good state. A lease that found no store (the first build, or another lease of the
//! namespace holds it) starts empty and may seed it.

use std::io;
use std::path::{Path, PathBuf};

use lian_core::names::path_token;

/// Marks a lease whose build succeeded: its data root may become its namespace's store.
const GOOD: &str = "store.good";

/// The stores of one host, under `root` (one directory per namespace, named by a token).
#[derive(Debug, Clone)]
pub struct EngineStores {
    root: PathBuf,
}

impl EngineStores {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn data(&self, namespace: &str) -> PathBuf {
        self.root.join(path_token(namespace)).join("data")
    }

    /// Moves `namespace`'s store to `dest` (a data root that does not exist yet); `false`
    /// when there is none to take (never made, or held by another lease).
    pub fn take(&self, namespace: &str, dest: &Path) -> io::Result<bool> {
        match std::fs::rename(self.data(namespace), dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes `src` (a stopped engine's data root) `namespace`'s store, unless another lease
    /// gave one back first (then `src` stays where it is, for its lease to remove).
    pub fn give_back(&self, namespace: &str, src: &Path) -> io::Result<bool> {
        let dest = self.data(namespace);
        std::fs::create_dir_all(dest.parent().expect("a store has a parent"))?;
        match std::fs::rename(src, &dest) {
            Ok(()) => Ok(true),
            // A directory renamed onto a non-empty one: the slot is taken.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether `namespace` has a store waiting now.
    pub fn has(&self, namespace: &str) -> bool {
        self.data(namespace).is_dir()
    }

    /// Records that the build on the lease kept in `lease_dir` succeeded.
    pub fn mark_good(lease_dir: &Path) -> io::Result<()> {
        std::fs::write(lease_dir.join(GOOD), b"")
    }

    pub(crate) fn is_good(lease_dir: &Path) -> bool {
        lease_dir.join(GOOD).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lease_holds_a_store_and_the_first_to_give_back_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let stores = EngineStores::at(dir.path().join("stores"));
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        assert!(!stores.take("ci/ws", &a).unwrap(), "nothing to take yet");
        std::fs::create_dir_all(a.join("image")).unwrap();
        std::fs::write(a.join("image/layer"), "1").unwrap();
        assert!(stores.give_back("ci/ws", &a).unwrap());
        assert!(stores.has("ci/ws") && !stores.has("dev/me-ws"));
        assert!(stores.take("ci/ws", &b).unwrap());
        assert!(!stores.take("ci/ws", &a).unwrap(), "held by the lease of b");
        assert_eq!(std::fs::read_to_string(b.join("image/layer")).unwrap(), "1");
        std::fs::create_dir_all(a.join("image")).unwrap();
        std::fs::write(a.join("image/layer"), "2").unwrap();
        assert!(stores.give_back("ci/ws", &a).unwrap(), "a's lease gave back first");
        assert!(!stores.give_back("ci/ws", &b).unwrap(), "the slot is taken");
        assert!(b.join("image/layer").exists(), "left for its lease to remove");
    }
}
