//! Registry grants: credentials for one build at the registry gate, allowed exactly what
//! the build's actor may do (`lian_core::cache::namespaces`). The caller sends the
//! directives, never a list of namespaces: what a grant allows is decided here.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use lian_core::cache;
use lian_core::control::{REGISTRY_GRANT_MAX_SECS, RegistryGrant, RegistryGrantRecord, RegistryGrantRequest, Secret};
use sha2::{Digest, Sha256};

use crate::api::{App, now, parse, refuse, unavailable};

pub fn sha256_hex(value: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(value.as_bytes()))
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(std::io::Error::other)?;
    Ok(data_encoding::HEXLOWER.encode(&buf))
}

/// Usernames are made here as `<build-id>.<16 hex>`; anything else is no grant's, and is
/// refused before it becomes a key-value lookup.
pub fn username_ok(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 200
        && !user.starts_with('.')
        && !user.ends_with('.')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The schema's rule for `actor_id` (`schemas/common.ncl`), checked again here because the
/// id becomes a path component of the namespace the grant may write: `a/b` would reach
/// into another actor's `dev/a-...`.
fn actor_id_ok(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// `POST /api/v1/registry-grants`.
pub async fn grant(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let request: RegistryGrantRequest = match parse(&body, "registry grant request") {
        Ok(r) => r,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", message),
    };
    let Some(registry) = app.registry_gate.clone() else {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_configured",
            "this control plane runs no registry gate: start it with --registry-listen and a [registry] url",
        );
    };
    let policy = &request.directives.cache_policy;
    if let Some(id) = &policy.actor_id
        && !actor_id_ok(id)
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "cache_policy.actor_id is 1 to 63 of a-z 0-9 _ -, starting with a letter or digit",
        );
    }
    // The same rule intake applies: a policy asking for what its actor may not have gets
    // no credentials at all.
    let namespaces = match cache::check(&request.directives).and_then(|()| cache::namespaces(&request.directives)) {
        Ok(n) => n,
        Err(e) => return refuse(StatusCode::FORBIDDEN, "cache_rule", e.to_string()),
    };
    let (token, password) = match (random_hex(8), random_hex(32)) {
        (Ok(t), Ok(p)) => (t, Secret::new(p)),
        (Err(e), _) | (_, Err(e)) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("no randomness: {e}"),
            );
        }
    };
    let ttl = request
        .ttl_secs
        .unwrap_or(REGISTRY_GRANT_MAX_SECS)
        .clamp(1, REGISTRY_GRANT_MAX_SECS);
    let record = RegistryGrantRecord {
        username: format!("{}.{token}", request.build_id),
        build_id: request.build_id,
        workspace: request.directives.workspace.clone(),
        actor: policy.actor,
        password_sha256: sha256_hex(password.expose()),
        reads: namespaces.reads,
        writes: namespaces.writes,
        expires_at: now() + ttl,
    };
    if let Err(e) = app.bus.record_registry_grant(&record).await {
        return unavailable(e);
    }
    app.counters.registry_grants.inc();
    tracing::info!(user = %record.username, build = %record.build_id, reads = ?record.reads, writes = ?record.writes, "registry grant");
    (
        StatusCode::CREATED,
        Json(RegistryGrant {
            registry,
            username: record.username,
            password,
            reads: record.reads,
            writes: record.writes,
            expires_at: record.expires_at,
        }),
    )
        .into_response()
}

/// `DELETE /api/v1/registry-grants/{username}`: every gate refuses it from now on. A grant
/// that is gone already (revoked, expired) is as revoked as it gets: 204 either way.
pub async fn revoke(State(app): State<Arc<App>>, Path(username): Path<String>) -> Response {
    if !username_ok(&username) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "not a grant's username: <build-id>.<hex>",
        );
    }
    match app.bus.forget_registry_grant(&username).await {
        Ok(()) => {
            tracing::info!(user = %username, "registry grant revoked");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_ids_cannot_reach_into_another_namespace() {
        for ok in ["jpl", "a-b", "x_1", "0a"] {
            assert!(actor_id_ok(ok), "{ok}");
        }
        for bad in ["", "a/b", "-a", "A", "a.b", "../ci", &"a".repeat(64)] {
            assert!(!actor_id_ok(bad), "{bad}");
        }
    }

    #[test]
    fn usernames_are_key_value_safe() {
        assert!(username_ok("b1.0123456789abcdef"));
        for bad in ["", ".a", "a.", "a b", "a/b", "a*", "a>", &"a".repeat(201)] {
            assert!(!username_ok(bad), "{bad}");
        }
    }
}
