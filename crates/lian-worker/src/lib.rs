//! The worker: takes build requests from the shared work queue and drives each build's
//! lifecycle. Stateless: everything it knows about a build it folds from the build's
//! history, so any worker can carry on a build another worker dropped.

mod driver;
mod effects;
mod intake;
mod reaper;
mod stores;
mod warm;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lian_bus::Bus;
use lian_core::subjects;
use lian_nickel::Evaluator;
use lian_runner::{ControlClient, DockerBuilder, Isolation, Providers, SshHost, WarmEngine};

pub use intake::MAX_REQUEST_BYTES;
pub use stores::{RegistryEndpoint, S3Endpoint, Secret};

/// Everything a worker needs; the caller (the `lian` binary) builds it from config.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Appears in every event this worker appends.
    pub name: String,
    /// Runners of the docker_local provider live under `<runners_dir>/<lease-key>/`; shared
    /// by the workers of one host, so a worker that takes over finds the runner.
    pub runners_dir: PathBuf,
    pub builder: DockerBuilder,
    /// Evaluates what requests and contexts carry (directives, `.build-spec.ncl`) in a
    /// bounded child process, so a hostile document costs a refusal, not this worker.
    pub evaluator: Evaluator,
    /// The work queue's ack wait; the worker heartbeats at a third of it.
    pub ack_wait: Duration,
    /// The work queue's max deliver: on the last delivery an unfinished build is ended as
    /// failed (abandoned) instead of being tried again.
    pub max_deliver: i64,
    /// The catalog's layer names: a request for another layer is refused. `None` accepts any.
    pub catalog_layers: Option<std::collections::BTreeSet<String>>,
    /// Test hook (`LIAN_FAILPOINT=pause_before:<effect>`): pause forever before that effect.
    pub pause_before: Option<String>,
    /// Test hook (`LIAN_FAILPOINT=fail_at:<effect>`): that effect fails, every time, without
    /// running (a destroy that fails is retried with backoff, then left to the reaper).
    pub fail_at: Option<String>,
    /// How often the reaper looks for runners nobody will destroy.
    pub reap_every: Duration,
    /// The hosts of the ssh_pool provider (`[[ssh_hosts]]` in lian.toml).
    pub ssh_hosts: Vec<SshHost>,
    /// How docker_local runners are isolated from each other and the host.
    pub isolation: Isolation,
    /// Secret id -> file on this worker, mounted into builds that name the id.
    pub secrets: std::collections::BTreeMap<String, PathBuf>,
    /// With a control plane, runners are leased and given back, and metrics recorded,
    /// through it (it holds the provider credentials); this worker's providers are then
    /// only used to reach the runners, and the control plane reaps them.
    pub control: Option<ControlClient>,
    /// The private key cloud runners (hcloud, proxmox, leased through `control`) accept
    /// from workers, as user `lian`.
    pub runner_ssh_key: Option<PathBuf>,
    /// The registry images and build cache are pushed to; `None`: images stay in the engine.
    pub registry: Option<RegistryEndpoint>,
    /// The S3 bucket builds give sccache; `None`: no shared compilation cache.
    pub sccache: Option<S3Endpoint>,
    /// A context over these (any client can publish a manifest) fails its build before a
    /// byte of it is read.
    pub context_limits: lian_bus::ContextLimits,
    /// Builds this worker drives at once (at least 1). A build mostly waits on its runner,
    /// so one worker can drive several; each holds its own lease and heartbeats.
    pub builds_in_flight: usize,
    /// Serve builds that name the benchmark-only `noop` provider (a fake build, nothing
    /// run); off unless the worker is started with `LIAN_ENABLE_NOOP_PROVIDER=1`.
    pub enable_noop_provider: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Bus(#[from] lian_bus::BusError),
}

/// Serves build requests until `shutdown` resolves. A build in flight at shutdown is left
/// at its last recorded step and handed back to the queue for another worker.
pub async fn run(bus: Bus, options: WorkerOptions, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    let stopping = Arc::new(AtomicBool::new(false));
    let providers = Providers::on_host(
        &options.runners_dir,
        options.isolation.clone(),
        &options.builder.cli,
        options.ssh_hosts.clone(),
        &options.builder.network,
    );
    let providers = if options.enable_noop_provider {
        tracing::warn!("the benchmark-only noop provider is enabled: builds naming it run nothing");
        providers.enable_noop(&options.runners_dir.join("noop"))
    } else {
        providers
    };
    let runners = providers.for_worker(
        &options.builder,
        options.control.as_ref(),
        options.runner_ssh_key.as_deref(),
        &options.runners_dir.join("cloud-staging"),
    );
    let worker = Arc::new(driver::Worker {
        bus: bus.clone(),
        providers,
        runners,
        options,
        stopping: stopping.clone(),
    });
    let reaper = {
        let worker = worker.clone();
        tokio::spawn(async move {
            if worker.options.control.is_some() {
                return;
            }
            loop {
                if let Err(err) = worker.reap_once().await {
                    tracing::warn!(%err, "reaper pass failed");
                }
                tokio::time::sleep(worker.options.reap_every).await;
            }
        })
    };
    // A worker leasing through a control plane leaves the pool to it.
    let pool = match (&worker.providers.docker_local, &worker.options.control) {
        (Some(local), None) => {
            let p = local.clone();
            let (ready, _) = bus.publisher(|e: &WarmEngine| subjects::warm_engine_ready(e.runner_type));
            Some((
                tokio::spawn(async move { p.keep_pool_warm(ready).await }),
                local.clone(),
            ))
        }
        _ => None,
    };
    let mut jobs = bus.requests().await?;
    let mut expired = bus.expired_requests().await?;
    tracing::info!(worker = %worker.options.name, "serving build requests");
    tokio::pin!(shutdown);
    // Builds in flight are polled in this task (each waits on NATS or its runner; the
    // Nickel checks run on blocking threads). A request is pulled only while a slot is free:
    // what this worker cannot start now stays in the queue for another.
    let slots = worker.options.builds_in_flight.max(1);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    loop {
        let free = in_flight.len() < slots;
        let job = tokio::select! {
            () = &mut shutdown => break,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
            job = jobs.next(), if free => job,
            // A request whose last delivery died with its worker: this worker ends it.
            job = expired.next(), if free => job,
        };
        let Some(job) = job else { break };
        match job {
            Ok(job) => in_flight.push(worker.handle(job)),
            Err(err) => tracing::warn!(%err, "cannot take a request"),
        }
    }
    // Each build in flight finishes the effect it is in, then is handed back.
    stopping.store(true, Ordering::SeqCst);
    while in_flight.next().await.is_some() {}
    reaper.abort();
    if let Some((pool, local)) = pool {
        pool.abort();
        let _ = pool.await;
        local.drain_pool().await;
    }
    tracing::info!(worker = %worker.options.name, "stopped");
    Ok(())
}
