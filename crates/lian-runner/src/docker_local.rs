//! The docker_local provider: a runner is a lease record and a private workspace directory
//! on this host, built with the host's Docker engine. (Per-lease engines with cgroup limits
//! per tier come with the real-runner work; the lease shape stays the same.)

use std::path::{Path, PathBuf};

use lian_core::LeaseKey;
use lian_core::sizing::RunnerType;
use serde::{Deserialize, Serialize};

use crate::{Runner, RunnerError};

#[derive(Debug, Clone)]
pub struct DockerLocal {
    root: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct LeaseRecord {
    lease_key: LeaseKey,
    runner_type: RunnerType,
}

impl DockerLocal {
    /// Runners live under `root/<lease-key>/`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn dir(&self, key: &LeaseKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// The directory the build context is put in.
    pub fn workspace(&self, key: &LeaseKey) -> PathBuf {
        self.dir(key).join("context")
    }

    /// Finds the runner recorded under `key`, or creates it.
    pub async fn spawn(&self, key: &LeaseKey, runner_type: RunnerType) -> Result<Runner, RunnerError> {
        let io = |op| {
            move |source| RunnerError::Io {
                op,
                lease_key: key.clone(),
                source,
            }
        };
        let dir = self.dir(key);
        let record = dir.join("lease.json");
        if let Ok(existing) = tokio::fs::read(&record).await
            && let Ok(found) = serde_json::from_slice::<LeaseRecord>(&existing)
        {
            return Ok(self.runner(key, found.runner_type));
        }
        tokio::fs::create_dir_all(self.workspace(key))
            .await
            .map_err(io("create"))?;
        let body = serde_json::to_vec(&LeaseRecord {
            lease_key: key.clone(),
            runner_type,
        })
        .expect("json");
        // Written beside and renamed: a crash never leaves half a record.
        let tmp = dir.join("lease.json.tmp");
        tokio::fs::write(&tmp, body).await.map_err(io("record"))?;
        tokio::fs::rename(&tmp, &record).await.map_err(io("record"))?;
        Ok(self.runner(key, runner_type))
    }

    fn runner(&self, key: &LeaseKey, runner_type: RunnerType) -> Runner {
        Runner {
            lease_key: key.clone(),
            lease_id: format!("docker_local:{key}"),
            host: "local".into(),
            runner_type,
        }
    }

    /// Destroys the runner and everything in it; destroying a runner that is gone succeeds.
    pub async fn destroy(&self, key: &LeaseKey) -> Result<(), RunnerError> {
        match tokio::fs::remove_dir_all(self.dir(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RunnerError::Io {
                op: "destroy",
                lease_key: key.clone(),
                source,
            }),
        }
    }

    /// How long ago the runner was created, if it exists.
    pub fn age(&self, key: &LeaseKey) -> Option<std::time::Duration> {
        let created = std::fs::metadata(self.dir(key)).ok()?.modified().ok()?;
        created.elapsed().ok()
    }

    /// The lease keys of every runner that exists now.
    pub fn leases(&self) -> Vec<String> {
        list_dirs(&self.root)
    }
}

fn list_dirs(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("lease.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_is_idempotent_by_key_and_destroy_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let p = DockerLocal::new(root.path());
        let key = LeaseKey::new("b1-r1").unwrap();
        let a = p.spawn(&key, RunnerType::Cax21).await.unwrap();
        std::fs::write(p.workspace(&key).join("f"), "x").unwrap();
        let b = p.spawn(&key, RunnerType::Cax41).await.unwrap();
        assert_eq!(a, b, "the runner recorded under the key is found, not re-created");
        assert!(p.workspace(&key).join("f").exists());
        assert_eq!(p.leases(), vec!["b1-r1".to_string()]);
        p.destroy(&key).await.unwrap();
        p.destroy(&key).await.unwrap();
        assert!(p.leases().is_empty());
    }
}
