//! Samples a lease cgroup's cpu and memory every second during a build and reports their
//! 95th percentiles: the usage that tier-2 sizing learns from.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lian_core::sizing::p95;

use crate::cgroup::LeaseCgroup;

/// cpu cores and GB at one instant.
type Sample = (f64, f64);

pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

const GB: f64 = 1024.0 * 1024.0 * 1024.0;

impl Sampler {
    pub fn start(cgroup: LeaseCgroup, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut last = (Instant::now(), cgroup.cpu_ns().unwrap_or(0));
            loop {
                let mem = cgroup.memory_bytes().unwrap_or(0) as f64 / GB;
                let now = (Instant::now(), cgroup.cpu_ns().unwrap_or(0));
                let wall = now.0.duration_since(last.0).as_nanos() as f64;
                let cores = if wall > 0.0 {
                    now.1.saturating_sub(last.1) as f64 / wall
                } else {
                    0.0
                };
                samples.push((cores, mem));
                last = now;
                if flag.load(Ordering::SeqCst) {
                    return samples;
                }
                tokio::time::sleep(every).await;
            }
        });
        Self { stop, task }
    }

    /// Stops sampling; returns (cpu cores P95, memory GB P95).
    pub async fn finish(self) -> (Option<f64>, Option<f64>) {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.task.await.unwrap_or_default();
        (p95(samples.iter().map(|s| s.0)), p95(samples.iter().map(|s| s.1)))
    }
}
