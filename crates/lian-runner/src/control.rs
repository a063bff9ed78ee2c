//! The client side of the control plane's API: how a worker leases, gives back and
//! records through `lian control` instead of holding provider credentials itself.

use std::time::Duration;

use lian_core::LeaseKey;
use lian_core::control::{
    ApiError, Lease, LeaseRequest, LeaseView, MetricsRecord, P95Answer, RegistryGrant, RegistryGrantRequest,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control plane answered and said no: the request's fault or the provider's.
    #[error("control plane refused {what} ({status}): {code}: {message}")]
    Refused {
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    /// The control plane could not be reached or answered nonsense: try again later.
    #[error("control plane unreachable for {what}: {message}")]
    Unreachable { what: String, message: String },
}

/// A client of `lian control`. The token is sent as a bearer token and never shown.
#[derive(Clone)]
pub struct ControlClient {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ControlClient {
    pub fn new(url: &str, token: &str) -> Self {
        let http = crate::http_client()
            // A lease may wait for a cloud server to boot.
            .timeout(Duration::from_secs(900))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client");
        Self {
            url: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<Option<T>, ControlError> {
        let what = format!("{method} {path}");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable = |message: String| ControlError::Unreachable {
            what: what.clone(),
            message,
        };
        let resp = req.send().await.map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| unreachable(e.to_string()))?;
        if status.is_success() {
            if status == StatusCode::NO_CONTENT || text.is_empty() {
                return Ok(None);
            }
            return serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| unreachable(format!("unexpected answer: {e}")));
        }
        if status.is_server_error() && status != StatusCode::BAD_GATEWAY {
            return Err(unreachable(format!(
                "{status}: {}",
                text.chars().take(200).collect::<String>()
            )));
        }
        let (code, message) = match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => (e.error.code, e.error.message),
            Err(_) => (status.as_u16().to_string(), text.chars().take(200).collect()),
        };
        Err(ControlError::Refused {
            what,
            status: status.as_u16(),
            code,
            message,
        })
    }

    /// Leases a runner (or gets back the one already leased under the request's key).
    pub async fn lease(&self, request: &LeaseRequest) -> Result<Lease, ControlError> {
        self.call(Method::POST, "/api/v1/vm-pool", Some(request))
            .await?
            .ok_or_else(|| ControlError::Unreachable {
                what: "POST /api/v1/vm-pool".into(),
                message: "empty answer".into(),
            })
    }

    /// Destroys a lease's runner; a lease the control plane does not know is gone already.
    pub async fn release(&self, key: &LeaseKey) -> Result<(), ControlError> {
        match self
            .call::<serde_json::Value>(Method::DELETE, &format!("/api/v1/vm-pool/{key}"), None::<&()>)
            .await
        {
            Ok(_) => Ok(()),
            Err(ControlError::Refused { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The lease recorded under `key` (a cloud runner's address, SSH port and host key);
    /// refused with 404 if the control plane does not know it.
    pub async fn lease_info(&self, key: &LeaseKey) -> Result<Lease, ControlError> {
        let path = format!("/api/v1/vm-pool/{key}");
        self.call::<LeaseView>(Method::GET, &path, None::<&()>)
            .await?
            .map(|view| view.lease)
            .ok_or_else(|| ControlError::Unreachable {
                what: format!("GET {path}"),
                message: "empty answer".into(),
            })
    }

    pub async fn leases(&self) -> Result<Vec<LeaseView>, ControlError> {
        Ok(self
            .call(Method::GET, "/api/v1/vm-pool", None::<&()>)
            .await?
            .unwrap_or_default())
    }

    pub async fn record_metrics(&self, record: &MetricsRecord) -> Result<(), ControlError> {
        self.call::<serde_json::Value>(Method::POST, "/api/v1/metrics", Some(record))
            .await
            .map(|_| ())
    }

    /// Registry credentials for one build, good at the control plane's registry gate for
    /// what the build's actor may read and write. Refused (403 `cache_rule`) when the
    /// directives ask for a namespace their actor may not have.
    pub async fn registry_grant(&self, request: &RegistryGrantRequest) -> Result<RegistryGrant, ControlError> {
        self.call(Method::POST, "/api/v1/registry-grants", Some(request))
            .await?
            .ok_or_else(|| ControlError::Unreachable {
                what: "POST /api/v1/registry-grants".into(),
                message: "empty answer".into(),
            })
    }

    /// Revokes a grant (when its build ends); one that is gone already is revoked.
    pub async fn revoke_registry_grant(&self, username: &str) -> Result<(), ControlError> {
        self.call::<serde_json::Value>(
            Method::DELETE,
            &format!("/api/v1/registry-grants/{username}"),
            None::<&()>,
        )
        .await
        .map(|_| ())
    }

    pub async fn p95(&self, workspace: &str) -> Result<P95Answer, ControlError> {
        self.call(Method::GET, &format!("/api/v1/p95?workspace={workspace}"), None::<&()>)
            .await?
            .ok_or_else(|| ControlError::Unreachable {
                what: "GET /api/v1/p95".into(),
                message: "empty answer".into(),
            })
    }
}
