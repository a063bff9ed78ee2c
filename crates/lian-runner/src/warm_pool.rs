//! The warm pool of docker_local engines: `warm_pool` engines per tier are kept started
//! (each under its own cgroup with the tier's limits) so a lease takes one instead of
//! waiting for a dockerd to boot. An engine serves one lease only and is destroyed with
//! it; the pool is topped up behind it.
//!
//! Several processes of one host may share the pool (a control plane, workers): taking an
//! engine is removing its `ready` mark, which exactly one taker can do; topping up and
//! sweeping are done by whichever process holds the pool's lock.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use lian_core::LeaseKey;
use lian_core::sizing::RunnerType;

use crate::docker_local::{DockerLocal, Isolation};
use crate::engine::LeaseEngine;

const READY: &str = "ready";
/// A taken engine whose lease was never recorded (its taker died in between) is stopped
/// after this long.
const CLAIM_GRACE: Duration = Duration::from_secs(60);

/// An engine the pool started and marked ready.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WarmEngine {
    pub runner_type: RunnerType,
    pub slot: String,
}

/// An exclusive `flock` on a file, released when dropped.
struct PoolLock {
    _file: std::fs::File,
}

impl PoolLock {
    fn try_take(path: &std::path::Path) -> io::Result<Option<Self>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a descriptor we own; it is released when the file closes.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        Ok(taken.then_some(Self { _file: file }))
    }
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", nanos & 0xffff_ffff_ffff, std::process::id())
}

impl DockerLocal {
    fn warm_root(&self) -> PathBuf {
        self.root.join(".warm")
    }

    pub fn pool_size(&self) -> u32 {
        match self.isolation {
            Isolation::Engine { warm_pool, .. } => warm_pool,
            Isolation::Shared => 0,
        }
    }

    pub(crate) fn warm_engine(&self, slot: &str) -> LeaseEngine {
        LeaseEngine::at(&self.warm_root().join(slot), slot)
    }

    fn is_ready(&self, slot: &str) -> bool {
        self.warm_root().join(slot).join(READY).exists()
    }

    /// The pool's slots, of one tier or of all.
    fn slots(&self, tier: Option<RunnerType>) -> Vec<String> {
        let prefix = match tier {
            Some(t) => format!("w-{}-", t.as_str()),
            None => "w-".to_string(),
        };
        let mut slots: Vec<String> = std::fs::read_dir(self.warm_root())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        slots.sort();
        slots
    }

    /// Started engines waiting in the pool, per tier.
    pub fn warm_engines(&self) -> Vec<(RunnerType, usize)> {
        RunnerType::ALL
            .into_iter()
            .map(|t| (t, self.slots(Some(t)).iter().filter(|s| self.is_ready(s)).count()))
            .collect()
    }

    /// Takes a started engine of the tier, if the pool has one.
    pub(crate) fn claim_warm(&self, tier: RunnerType) -> Option<String> {
        if self.pool_size() == 0 {
            return None;
        }
        self.slots(Some(tier)).into_iter().find(|slot| {
            std::fs::remove_file(self.warm_root().join(slot).join(READY)).is_ok() && self.warm_engine(slot).running()
        })
    }

    pub(crate) fn remove_warm(&self, slot: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.warm_root().join(slot)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn discard(&self, slot: &str) -> Result<(), String> {
        self.warm_engine(slot).stop().await?;
        self.remove_warm(slot).map_err(|e| format!("{slot}: {e}"))
    }

    /// The slots leases hold.
    fn held(&self) -> BTreeSet<String> {
        self.leases()
            .iter()
            .filter_map(|k| LeaseKey::new(k.as_str()).ok())
            .filter_map(|k| self.record(&k)?.engine)
            .collect()
    }

    /// One pass: stops engines nobody holds (dead ones, and taken ones whose lease was
    /// never recorded), then starts engines until every tier has `warm_pool` ready.
    /// Returns the engines it started.
    pub async fn maintain_pool(&self) -> Result<Vec<WarmEngine>, crate::RunnerError> {
        self.maintain()
            .await
            .map_err(|message| crate::RunnerError::Pool { message })
    }

    async fn maintain(&self) -> Result<Vec<WarmEngine>, String> {
        let mut started = Vec::new();
        let size = self.pool_size() as usize;
        if size == 0 {
            return Ok(started);
        }
        let root = self.warm_root();
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let Some(_lock) = PoolLock::try_take(&root.join(".lock")).map_err(|e| e.to_string())? else {
            return Ok(started);
        };
        let held = self.held();
        for slot in self.slots(None) {
            let age = std::fs::metadata(root.join(&slot))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            let dead = self.is_ready(&slot) && !self.warm_engine(&slot).running();
            let orphan = !self.is_ready(&slot) && !held.contains(&slot) && age > CLAIM_GRACE;
            if dead || orphan {
                tracing::warn!(%slot, dead, orphan, "removing a warm engine nobody holds");
                self.discard(&slot).await?;
            }
        }
        for tier in RunnerType::ALL {
            let ready = self.slots(Some(tier)).iter().filter(|s| self.is_ready(s)).count();
            for _ in ready..size {
                let slot = format!("w-{}-{}", tier.as_str(), unique());
                std::fs::create_dir_all(root.join(&slot)).map_err(|e| format!("{slot}: {e}"))?;
                let (memory, cpus) = self.limits(tier);
                if let Err(e) = self.warm_engine(&slot).start(&self.docker_cli, memory, cpus).await {
                    let _ = self.discard(&slot).await;
                    return Err(e);
                }
                std::fs::write(root.join(&slot).join(READY), b"").map_err(|e| format!("{slot}: {e}"))?;
                tracing::debug!(%slot, "warm engine ready");
                started.push(WarmEngine {
                    runner_type: tier,
                    slot,
                });
            }
        }
        Ok(started)
    }

    /// Keeps the pool topped up, forever (run it as a task; abort it, then `drain_pool`);
    /// each engine it starts is sent to `ready`.
    pub async fn keep_pool_warm(&self, ready: tokio::sync::mpsc::UnboundedSender<WarmEngine>) {
        if self.pool_size() == 0 {
            return;
        }
        loop {
            match self.maintain_pool().await {
                Ok(started) => started.into_iter().for_each(|e| {
                    let _ = ready.send(e);
                }),
                Err(err) => tracing::warn!(%err, "warm pool not topped up"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Stops every engine no lease holds (at shutdown): a pool left behind would be
    /// dockerds running after the fleet is gone.
    pub async fn drain_pool(&self) {
        if self.pool_size() == 0 {
            return;
        }
        let held = self.held();
        for slot in self.slots(None) {
            let ready = std::fs::remove_file(self.warm_root().join(&slot).join(READY)).is_ok();
            if (ready || !held.contains(&slot))
                && let Err(err) = self.discard(&slot).await
            {
                tracing::warn!(%slot, %err, "warm engine not stopped");
            }
        }
        let _ = std::fs::remove_file(self.warm_root().join(".lock"));
        let _ = std::fs::remove_dir(self.warm_root());
    }
}
