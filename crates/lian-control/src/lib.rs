//! The control plane (`lian control`): the only holder of provider credentials. Workers
//! lease runners (`POST /api/v1/vm-pool`), read one again (`GET /api/v1/vm-pool/{id}`: a
//! cloud runner's host key to pin), give them back (`DELETE /api/v1/vm-pool/{id}`) and
//! record usage (`POST /api/v1/metrics`) through it; operators list leases, read the P95
//! tier-2 sizing uses, check health and scrape Prometheus `/metrics`. hcloud and proxmox
//! runners are leased here only: a cloud lease gets an SSH host key pair of its own.
//!
//! Stateless: every lease lives in the JetStream key-value bucket `lian-leases` and every
//! provider spawns idempotently by lease key, so any number of replicas can serve behind
//! one address. Every route but `/healthz` needs the bearer token.

mod api;
mod auth;
mod prom;
mod reaper;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lian_bus::Bus;
use lian_core::subjects;
use lian_runner::{Providers, WarmEngine};

#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Appears in reaped records and logs.
    pub name: String,
    /// The bearer token every API call must carry.
    pub token: String,
    pub providers: Providers,
    /// How often the reaper looks for leases nobody will give back.
    pub reap_every: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control plane needs a bearer token: set control_token in lian.toml or LIAN_CONTROL_TOKEN")]
    NoToken,
    #[error("control plane server: {0}")]
    Serve(std::io::Error),
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn run(
    bus: Bus,
    options: ControlOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    if options.token.trim().is_empty() {
        return Err(ControlError::NoToken);
    }
    let app = Arc::new(api::App {
        bus,
        options,
        counters: prom::Counters::default(),
    });
    let reaper = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                if let Err(err) = app.reap_once().await {
                    tracing::warn!(%err, "reaper pass failed");
                }
                tokio::time::sleep(app.options.reap_every).await;
            }
        })
    };
    let local = app.options.providers.docker_local.clone();
    let pool = local.clone().map(|p| {
        let (ready, _) = app
            .bus
            .publisher(|e: &WarmEngine| subjects::warm_engine_ready(e.runner_type));
        tokio::spawn(async move { p.keep_pool_warm(ready).await })
    });
    tracing::info!(addr = ?listener.local_addr().ok(), "control plane serving");
    let served = axum::serve(listener, api::router(app))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ControlError::Serve);
    reaper.abort();
    if let (Some(pool), Some(local)) = (pool, local) {
        pool.abort();
        let _ = pool.await;
        local.drain_pool().await;
    }
    served
}
