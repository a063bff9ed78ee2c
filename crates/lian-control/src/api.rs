//! The routes. Bodies are parsed here, not by extractors, so a bad one is refused with the
//! same `{"error": {"code", "message"}}` body as every other refusal, naming what was wrong.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{delete, get, post};
use lian_bus::{Bus, BusError};
use lian_core::control::{ApiError, Lease, LeaseRequest, LeaseState, LeaseView, MetricsRecord, P95Answer};
use lian_core::{LeaseKey, Workspace};
use lian_runner::Held;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::ControlOptions;
use crate::auth::require_token;
use crate::grants;
use crate::prom::{self, Counters};

pub struct App {
    pub bus: Bus,
    pub options: ControlOptions,
    pub counters: Counters,
    /// The registry gate as grants name it (`127.0.0.1:5001`), when this replica runs one.
    pub registry_gate: Option<String>,
    pub web: crate::web::Web,
}

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/api/v1/vm-pool", post(lease).get(list))
        .route("/api/v1/vm-pool/{lease_id}", get(lease_info).delete(release))
        .route("/api/v1/metrics", post(record_metrics))
        .route("/api/v1/p95", get(p95))
        .route("/api/v1/registry-grants", post(grants::grant))
        .route("/api/v1/registry-grants/{username}", delete(grants::revoke))
        .route("/api/v1/catalog", get(crate::web::catalog_json))
        .route("/metrics", get(prometheus))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), require_token));
    let web = crate::web::public_routes()
        .merge(crate::web::page_routes(app.clone()))
        .layer(axum::middleware::from_fn(crate::web::security_headers));
    Router::new()
        .route("/healthz", get(health))
        .merge(api)
        .merge(web)
        .fallback(|| async {
            refuse(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route: see /api/v1/vm-pool, /api/v1/metrics, /api/v1/p95, /api/v1/registry-grants, /api/v1/catalog, /metrics, /healthz, and the web view at /catalog",
            )
        })
        .with_state(app)
}

pub fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ApiError::new(code, message))).into_response()
}

/// NATS trouble is the control plane's, not the caller's: 503, try again.
pub fn unavailable(err: BusError) -> Response {
    refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", err.to_string())
}

/// The body as a `T`, or why it is not one.
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not a valid {what}: {e}"))
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.bus.flush().await {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    }
}

/// `POST /api/v1/vm-pool`: the lease is recorded before the provider is asked, so a
/// replica that dies mid-spawn leaves a record the reaper and the next ask both find.
async fn lease(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let request: LeaseRequest = match parse(&body, "lease request") {
        Ok(r) => r,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", message),
    };
    if request.owner.trim().is_empty() || request.owner.len() > 128 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "owner must name the worker holding the lease (1 to 128 characters)",
        );
    }
    // The build's id and workspace on every line of this lease, as on the worker's.
    let span = tracing::info_span!(
        "lease",
        build_id = %request.build_id,
        workspace = %request.workspace,
        lease = %request.lease_key
    );
    lease_for(app, request).instrument(span).await
}

async fn lease_for(app: Arc<App>, request: LeaseRequest) -> Response {
    let provider = match app.options.providers.get(request.provider) {
        Ok(b) => b,
        Err(e) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, "not_configured", e.to_string()),
    };
    let key = request.lease_key.clone();
    let existing = match app.bus.lease(&key).await {
        Ok(l) => l,
        Err(e) => return unavailable(e),
    };
    if let Some(lease) = &existing
        && lease.state == LeaseState::Ready
    {
        return Json(lease).into_response();
    }
    let mut lease = existing.unwrap_or(Lease {
        lease_id: key.clone(),
        provider: request.provider,
        runner_type: request.runner_type,
        workspace: request.workspace.clone(),
        build_id: request.build_id.clone(),
        owner: request.owner.clone(),
        state: LeaseState::Creating,
        host: String::new(),
        provider_id: String::new(),
        created_at: now(),
        host_key: None,
        ssh_port: None,
    });
    if let Err(e) = app.bus.record_lease(&lease).await {
        return unavailable(e);
    }
    // A lease recorded before keeps its tier.
    let ask = LeaseRequest {
        runner_type: lease.runner_type,
        ..request
    };
    match provider.lease(&ask).await {
        Ok(spawned) => {
            lease.state = LeaseState::Ready;
            lease.host = spawned.host;
            lease.provider_id = spawned.lease_id;
            lease.host_key = spawned.host_key;
            lease.ssh_port = spawned.ssh_port;
            if let Err(e) = app.bus.record_lease(&lease).await {
                return unavailable(e);
            }
            app.counters.leased.inc();
            tracing::info!(lease = %key, provider = lease.provider.as_str(), tier = lease.runner_type.as_str(), owner = %lease.owner, "leased");
            (StatusCode::CREATED, Json(lease)).into_response()
        }
        Err(err) => {
            app.counters.lease_failures.inc();
            // Whatever the provider got to is taken down: a failed lease leaves nothing.
            let held = Held {
                key: &key,
                runner_type: lease.runner_type,
                host: None,
            };
            if let Err(e) = provider.release(held).await {
                tracing::warn!(lease = %key, err = %e, "a failed lease could not be cleaned up; the reaper will retry");
            } else if let Err(e) = app.bus.forget_lease(&key).await {
                return unavailable(e);
            }
            tracing::warn!(lease = %key, %err, "lease failed");
            refuse(StatusCode::BAD_GATEWAY, "provider_failed", err.to_string())
        }
    }
}

/// Destroys a lease's runner and forgets the lease.
pub(crate) async fn destroy(app: &App, lease: &Lease) -> Result<(), String> {
    let provider = app.options.providers.get(lease.provider).map_err(|e| e.to_string())?;
    let held = Held {
        key: &lease.lease_id,
        runner_type: lease.runner_type,
        host: Some(&lease.host),
    };
    provider.release(held).await.map_err(|e| e.to_string())?;
    app.bus.forget_lease(&lease.lease_id).await.map_err(|e| e.to_string())
}

/// The lease recorded under `lease_id`, or the refusal to answer with.
async fn find_lease(app: &App, lease_id: &str) -> Result<Lease, Response> {
    let key = LeaseKey::new(lease_id).map_err(|e| refuse(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
    match app.bus.lease(&key).await {
        Ok(Some(l)) => Ok(l),
        Ok(None) => Err(refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no lease {key}: it was never leased here or is destroyed already"),
        )),
        Err(e) => Err(unavailable(e)),
    }
}

/// `GET /api/v1/vm-pool/{lease_id}`: one lease, with the host key to pin (a worker that
/// takes a build over reads it here).
async fn lease_info(State(app): State<Arc<App>>, Path(lease_id): Path<String>) -> Response {
    match find_lease(&app, &lease_id).await {
        Ok(lease) => Json(LeaseView {
            age_secs: now().saturating_sub(lease.created_at),
            lease,
        })
        .into_response(),
        Err(refusal) => refusal,
    }
}

async fn release(State(app): State<Arc<App>>, Path(lease_id): Path<String>) -> Response {
    let lease = match find_lease(&app, &lease_id).await {
        Ok(l) => l,
        Err(refusal) => return refusal,
    };
    let key = lease.lease_id.clone();
    let span = tracing::info_span!("release", build_id = %lease.build_id, workspace = %lease.workspace, lease = %key);
    async {
        match destroy(&app, &lease).await {
            Ok(()) => {
                app.counters.released.inc();
                tracing::info!(lease = %key, "released");
                StatusCode::NO_CONTENT.into_response()
            }
            Err(message) => refuse(StatusCode::BAD_GATEWAY, "provider_failed", message),
        }
    }
    .instrument(span)
    .await
}

async fn list(State(app): State<Arc<App>>) -> Response {
    let now = now();
    match app.bus.leases().await {
        Ok(leases) => Json(
            leases
                .into_iter()
                .map(|lease| LeaseView {
                    age_secs: now.saturating_sub(lease.created_at),
                    lease,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn record_metrics(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let record: MetricsRecord = match parse(&body, "metrics record") {
        Ok(r) => r,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", message),
    };
    let usage_ok = [record.cpu_p95, record.mem_p95_gb]
        .into_iter()
        .flatten()
        .all(|v| v.is_finite() && v >= 0.0);
    if !usage_ok {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "cpu_p95 and mem_p95_gb must be finite and not negative",
        );
    }
    let key = format!("{}.{}", record.workspace, record.build_id);
    let value = serde_json::to_value(&record).expect("json");
    match app.bus.record_metrics(&key, &value).await {
        Ok(()) => {
            app.counters.metrics_recorded.inc();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => unavailable(e),
    }
}

async fn p95(State(app): State<Arc<App>>, Query(query): Query<BTreeMap<String, String>>) -> Response {
    let Some(ws) = query.get("workspace") else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "name the workspace: /api/v1/p95?workspace=<name>",
        );
    };
    let workspace = match Workspace::new(ws.as_str()) {
        Ok(w) => w,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
    };
    match app.bus.sizing_history(workspace.as_str()).await {
        Ok(history) => Json(P95Answer {
            workspace,
            cpu_p95: history.p95.map(|p| p.cpu),
            mem_p95_gb: history.p95.map(|p| p.memory_gb),
            approved: history.approved,
            oom_learned: history.learned,
        })
        .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn prometheus(State(app): State<Arc<App>>) -> Response {
    let warm = match &app.options.providers.docker_local {
        Some(local) if local.pool_size() > 0 => local.warm_engines(),
        _ => Vec::new(),
    };
    match app.bus.leases().await {
        Ok(leases) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            prom::render(&app.counters, &leases, &warm, now()),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}
