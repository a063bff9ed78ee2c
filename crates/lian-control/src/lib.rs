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
//!
//! With a registry gate (`--registry-listen`), builds get registry credentials here
//! (`POST /api/v1/registry-grants`) that the gate, on its own listener in front of the
//! fleet's registry, holds to the build's cache namespaces (`gate.rs`, `gate_rules.rs`).
//!
//! It also serves the web view (`web/`): the catalog DAG, the builds and the fleet, live
//! from `lian.>`, read-only, behind a login with the same token.

mod api;
mod auth;
mod gate;
mod gate_rules;
mod grants;
mod prom;
mod reaper;
mod web;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lian_bus::Bus;
use lian_core::subjects;
use lian_runner::{Providers, WarmEngine};

#[derive(Clone)]
pub struct ControlOptions {
    /// Appears in reaped records and logs.
    pub name: String,
    /// The bearer token every API call must carry.
    pub token: String,
    pub providers: Providers,
    /// How often the reaper looks for leases nobody will give back.
    pub reap_every: Duration,
    /// The catalog the web view draws (`None`: its catalog page says there is none).
    pub catalog: Option<lian_catalog::Catalog>,
}

/// Never prints the token.
impl std::fmt::Debug for ControlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlOptions")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("providers", &self.providers)
            .field("reap_every", &self.reap_every)
            .field("catalog_layers", &self.catalog.as_ref().map(|c| c.layers().count()))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control plane needs a bearer token: set control_token in lian.toml or LIAN_CONTROL_TOKEN")]
    NoToken,
    #[error("control plane server: {0}")]
    Serve(std::io::Error),
    #[error(
        "the registry gate fronts a plain-HTTP registry on loopback without auth (http://127.0.0.1:PORT); `{url}` is not one"
    )]
    GateUpstream { url: String },
    #[error("registry gate listener: {0}")]
    GateListener(std::io::Error),
}

/// The registry gate a replica serves, when it serves one.
#[derive(Debug)]
pub struct RegistryGate {
    pub listener: tokio::net::TcpListener,
    /// The registry behind it (`[registry] url`).
    pub upstream: String,
}

/// `host:port` of a plain-HTTP registry URL: the gate speaks HTTP only, to a registry on
/// loopback that it alone is meant to reach.
fn upstream_authority(url: &str) -> Result<String, ControlError> {
    let refused = || ControlError::GateUpstream { url: url.into() };
    let authority = url.strip_prefix("http://").ok_or_else(refused)?.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(refused());
    }
    Ok(authority.to_string())
}

/// Serves the API on `listener`, and the registry gate if given, until `shutdown` resolves.
pub async fn run(
    bus: Bus,
    options: ControlOptions,
    listener: tokio::net::TcpListener,
    gate: Option<RegistryGate>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    if options.token.trim().is_empty() {
        return Err(ControlError::NoToken);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let gate = match gate {
        Some(RegistryGate { listener, upstream }) => {
            let upstream = upstream_authority(&upstream)?;
            let addr = listener.local_addr().map_err(ControlError::GateListener)?;
            let served = gate::router(Arc::new(gate::Gate::new(bus.clone(), upstream.clone())));
            tracing::info!(%addr, %upstream, "registry gate serving");
            let server = axum::serve(listener, served).with_graceful_shutdown(until_stopped(stopped.clone()));
            Some((addr.to_string(), tokio::spawn(async move { server.await })))
        }
        None => None,
    };
    let web = web::Web {
        live: Arc::new(web::Live::default()),
        catalog: options.catalog.clone().map(|c| Arc::new(web::CatalogIndex::new(c))),
    };
    let feed = {
        let (live, bus) = (web.live.clone(), bus.clone());
        tokio::spawn(async move { live.feed(bus).await })
    };
    let app = Arc::new(api::App {
        bus,
        options,
        counters: prom::Counters::default(),
        registry_gate: gate.as_ref().map(|(addr, _)| addr.clone()),
        web,
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
        .with_graceful_shutdown(until_stopped(stopped))
        .await
        .map_err(ControlError::Serve);
    let gate_served = match gate {
        Some((_, server)) => server
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(ControlError::Serve),
        None => Ok(()),
    };
    reaper.abort();
    feed.abort();
    if let (Some(pool), Some(local)) = (pool, local) {
        pool.abort();
        let _ = pool.await;
        local.drain_pool().await;
    }
    served.and(gate_served)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_gate_fronts_plain_http_registries_only() {
        assert_eq!(
            super::upstream_authority("http://127.0.0.1:5000/").unwrap(),
            "127.0.0.1:5000"
        );
        for bad in [
            "https://ghcr.io",
            "http://",
            "http://u:p@h:1",
            "http://h:1/prefix",
            "127.0.0.1:5000",
        ] {
            assert!(super::upstream_authority(bad).is_err(), "{bad}");
        }
    }
}
