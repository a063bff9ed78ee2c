//! How long a docker_local lease takes: with a fresh engine booted for it (cold) against one
//! taken from the warm pool, in the same run. Needs root and a Docker engine (dockerd on
//! PATH). `cargo bench -p lian-runner --bench lease` prints a Markdown table (recorded in
//! BENCHMARKS.md).

use std::time::{Duration, Instant};

use lian_core::LeaseKey;
use lian_core::sizing::RunnerType;
use lian_runner::{DockerLocal, Isolation};

const LEASES: usize = 5;

fn provider(root: &std::path::Path, warm_pool: u32) -> DockerLocal {
    let cli = if std::path::Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    };
    let isolation = Isolation::Engine {
        memory_scale: 1.0 / 32.0,
        warm_pool,
    };
    DockerLocal::with_isolation(root, isolation, cli)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let root = tempfile::tempdir().unwrap();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        let cold_pool = provider(&root.path().join("cold"), 0);
        let warm_pool = provider(&root.path().join("warm"), 1);
        for i in 0..LEASES {
            let key = LeaseKey::new(format!("bench{i}-r1")).unwrap();
            let started = Instant::now();
            cold_pool.spawn(&key, RunnerType::Cax11, None).await.unwrap();
            cold.push(started.elapsed());
            cold_pool.destroy(&key).await.unwrap();

            // Topped up between leases, as the pool's keeper does in the background.
            warm_pool.maintain_pool().await.unwrap();
            let key = LeaseKey::new(format!("bench{i}-r2")).unwrap();
            let started = Instant::now();
            let runner = warm_pool.spawn(&key, RunnerType::Cax11, None).await.unwrap();
            warm.push(started.elapsed());
            assert!(
                runner.lease_id.contains("@w-cax11-"),
                "{}: not from the pool",
                runner.lease_id
            );
            warm_pool.destroy(&key).await.unwrap();
        }
        warm_pool.drain_pool().await;
    });
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("| lease (cax11, {LEASES} each) | median | min | max |");
    println!("| --- | --- | --- | --- |");
    for (name, v) in [
        ("cold: engine booted for the lease", cold),
        ("warm: engine from the pool", warm),
    ] {
        let (min, max) = (*v.iter().min().unwrap(), *v.iter().max().unwrap());
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {:.0} ms |",
            ms(median(v)),
            ms(min),
            ms(max)
        );
    }
}
