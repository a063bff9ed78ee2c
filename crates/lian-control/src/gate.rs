//! The registry gate: an authorising reverse proxy for the OCI distribution API in front of
//! the fleet's registry, which itself stays on loopback without auth. A build logs in with
//! the grant the control plane gave it (HTTP Basic); the gate checks each request against
//! the grant's namespaces (`gate_rules`) and streams the rest through unchanged.
//!
//! Grants live in the key-value bucket `lian-registry-grants`, so any control replica's
//! gate accepts any replica's grant, and a revoked one is refused by all of them at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lian_bus::Bus;
use lian_core::control::RegistryGrantRecord;

use crate::api::now;
use crate::auth::same;
use crate::gate_rules::{self, Allowed};
use crate::grants::{sha256_hex, username_ok};

pub struct Gate {
    bus: Bus,
    /// `127.0.0.1:5000`: the registry behind the gate.
    upstream: String,
    client: Client<HttpConnector, Body>,
}

impl Gate {
    pub fn new(bus: Bus, upstream: String) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Self {
            bus,
            upstream,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

pub fn router(gate: Arc<Gate>) -> Router {
    Router::new().fallback(proxy).with_state(gate)
}

/// The registry API's own error body, which docker and BuildKit show to the user.
fn registry_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        // Without the challenge docker never sends the credentials it holds.
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"lian-registry\""),
        );
    }
    response
}

fn unauthorized(message: &str) -> Response {
    registry_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
}

/// `user:password` from an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let encoded = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = data_encoding::BASE64.decode(encoded.trim().as_bytes()).ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The grant the request's credentials name, or the answer to give instead.
async fn authenticate(gate: &Gate, headers: &HeaderMap) -> Result<RegistryGrantRecord, Response> {
    let refused = "log in with the registry grant the control plane gave this build (POST /api/v1/registry-grants)";
    let Some((user, password)) = basic_credentials(headers) else {
        return Err(unauthorized(refused));
    };
    if !username_ok(&user) {
        return Err(unauthorized(refused));
    }
    let grant = match gate.bus.registry_grant(&user).await {
        Ok(Some(grant)) => grant,
        Ok(None) => {
            return Err(unauthorized(
                "no such grant: it was revoked, has expired or never existed",
            ));
        }
        Err(e) => {
            return Err(registry_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                &e.to_string(),
            ));
        }
    };
    if !same(sha256_hex(&password).as_bytes(), grant.password_sha256.as_bytes()) {
        return Err(unauthorized(refused));
    }
    if grant.expires_at <= now() {
        return Err(unauthorized("the grant has expired: ask the control plane for another"));
    }
    Ok(grant)
}

async fn proxy(State(gate): State<Arc<Gate>>, request: Request) -> Response {
    let grant = match authenticate(&gate, request.headers()).await {
        Ok(g) => g,
        Err(answer) => return answer,
    };
    let actor = serde_json::to_value(grant.actor)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let allowed = Allowed {
        actor: &actor,
        reads: &grant.reads,
        writes: &grant.writes,
    };
    let (method, uri) = (request.method().clone(), request.uri().clone());
    if let Err(refusal) = gate_rules::authorize(&method, uri.path(), uri.query(), &allowed) {
        tracing::info!(user = %grant.username, build = %grant.build_id, %method, path = uri.path(), %refusal, "registry gate refused");
        return registry_error(StatusCode::FORBIDDEN, "DENIED", &refusal.to_string());
    }
    forward(&gate, request).await
}

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), and the gate's own
/// credentials, which the registry behind it has no use for.
fn strip_hop_headers(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

/// Passes the request on and the answer back, both bodies streamed (a layer is hundreds of
/// MB). The `Host` header is kept: distribution writes the upload `Location` it answers
/// with that host, so the client's next chunk comes back through the gate.
async fn forward(gate: &Gate, mut request: Request) -> Response {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match format!("http://{}{path}", gate.upstream).parse() {
        Ok(u) => u,
        Err(e) => return registry_error(StatusCode::BAD_REQUEST, "UNSUPPORTED", &e.to_string()),
    };
    *request.uri_mut() = uri;
    strip_hop_headers(request.headers_mut());
    match gate.client.request(request).await {
        Ok(answer) => {
            let (mut parts, body) = answer.into_parts();
            strip_hop_headers(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            tracing::warn!(upstream = %gate.upstream, err = %e, "the registry behind the gate did not answer");
            registry_error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                "the registry behind the gate did not answer",
            )
        }
    }
}
