//! A strict local fake of the Hetzner Cloud API (the parts lian uses), written from its
//! published reference: bearer auth, `POST /v1/servers` with field checks, async actions
//! polled on `GET /v1/actions/{id}`, label selectors, `DELETE`, error bodies
//! `{"error":{"code","message"}}`, 429 with `RateLimit-*` headers, 5xx. Behaviour knobs
//! make it slow, out of quota, or never ready. An axum router (`serve.rs`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State as Shared};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, Method, StatusCode, Uri, header::AUTHORIZATION};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::{Value, json};

use crate::serve::Served;

#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Polls of an action before it succeeds.
    pub action_polls: u32,
    /// `POST /v1/servers` answers 403 resource_limit_exceeded.
    pub quota_exceeded: bool,
    /// Servers stay `initializing`.
    pub never_running: bool,
    /// The first request is answered 429, the second 503.
    pub flaky_first: bool,
    /// The address servers report.
    pub ip: String,
}

#[derive(Debug, Clone)]
pub struct FakeServer {
    pub id: u64,
    pub name: String,
    pub server_type: String,
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub user_data: String,
}

#[derive(Default)]
struct State {
    servers: BTreeMap<u64, FakeServer>,
    /// id -> (command, polls left, server)
    actions: BTreeMap<u64, (String, u32, u64)>,
    next_id: u64,
    requests: Vec<String>,
    flaky_served: u32,
}

/// What every handler shares.
#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    behaviour: Arc<Behaviour>,
    token: Arc<str>,
}

pub struct FakeHcloud {
    pub url: String,
    pub token: String,
    state: Arc<Mutex<State>>,
    _served: Served,
}

const TYPES: [&str; 8] = ["cx22", "cx32", "cpx11", "cpx21", "cax11", "cax21", "cax31", "cax41"];

impl FakeHcloud {
    pub fn start(behaviour: Behaviour) -> Self {
        let token = "test-token-0123456789".to_string();
        let state = Arc::new(Mutex::new(State {
            next_id: 1000,
            ..Default::default()
        }));
        let fake = Fake {
            state: state.clone(),
            behaviour: Arc::new(behaviour),
            token: token.as_str().into(),
        };
        let app = Router::new()
            .route("/v1/servers", get(list_servers).post(create_server))
            .route("/v1/servers/{id}", get(get_server).delete(delete_server))
            .route("/v1/actions/{id}", get(get_action))
            .method_not_allowed_fallback(no_route)
            .fallback(no_route)
            .layer(middleware::from_fn_with_state(fake.clone(), admit))
            .with_state(fake);
        let served = Served::start(app);
        Self {
            url: format!("http://{}/v1", served.addr),
            token,
            state,
            _served: served,
        }
    }

    pub fn servers(&self) -> Vec<FakeServer> {
        self.state.lock().unwrap().servers.values().cloned().collect()
    }

    /// Every request as `METHOD /path`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message, "details": {}}});
    (status, Json(body)).into_response()
}

fn server_json(s: &FakeServer, ip: &str) -> Value {
    json!({
        "id": s.id, "name": s.name, "status": s.status,
        "server_type": {"name": s.server_type}, "labels": s.labels,
        "public_net": {"ipv4": {"ip": ip}, "ipv6": null},
        "created": "2026-11-21T00:00:00+00:00"
    })
}

fn action_json(id: u64, command: &str, done: bool) -> Value {
    json!({"id": id, "command": command, "status": if done { "success" } else { "running" },
           "progress": if done { 100 } else { 0 }, "error": null, "started": "2026-11-21T00:00:00+00:00"})
}

/// Before any route: the request is recorded, then the bearer token checked (401), then the
/// `flaky_first` knob answers 429 (with `RateLimit-*`) and 503 to the first two.
async fn admit(Shared(fake): Shared<Fake>, request: Request, next: Next) -> Response {
    let refusal = {
        let mut st = fake.state.lock().unwrap();
        st.requests
            .push(format!("{} {}", request.method(), request.uri().path()));
        let bearer = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        if bearer != Some(&format!("Bearer {}", fake.token)) {
            Some(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unable to authenticate",
            ))
        } else if fake.behaviour.flaky_first && st.flaky_served < 2 {
            st.flaky_served += 1;
            Some(if st.flaky_served == 1 {
                rate_limited()
            } else {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "service temporarily unavailable",
                )
            })
        } else {
            None
        }
    };
    match refusal {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

fn rate_limited() -> Response {
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    let headers = [
        (HeaderName::from_static("ratelimit-limit"), "3600".to_string()),
        (HeaderName::from_static("ratelimit-remaining"), "0".to_string()),
        (HeaderName::from_static("ratelimit-reset"), reset.to_string()),
    ];
    let body = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        "limit of 3600 requests per hour reached",
    );
    (headers, body).into_response()
}

async fn no_route(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no route {method} {}", uri.path()),
    )
}

/// A JSON body as Hetzner takes it: `Content-Type: application/json` (else 415
/// invalid_input), a JSON object (else 400 json_error), then the endpoint's fields of their
/// types and no others (else 422 invalid_input).
struct HcloudJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for HcloudJson<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let json = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json"));
        if !json {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_input",
                "Content-Type must be application/json",
            ));
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let Ok(object @ Value::Object(_)) = serde_json::from_slice(&body) else {
            return Err(error(StatusCode::BAD_REQUEST, "json_error", "invalid JSON"));
        };
        serde_json::from_value(object)
            .map(Self)
            .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", &e.to_string()))
    }
}

/// `POST /v1/servers`: the fields of Hetzner's reference; an unknown one is refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateServer {
    name: Option<String>,
    server_type: Option<String>,
    image: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    user_data: Option<String>,
    // Accepted, of any shape; the fake does not use them.
    #[serde(rename = "location")]
    _location: Option<IgnoredAny>,
    #[serde(rename = "datacenter")]
    _datacenter: Option<IgnoredAny>,
    #[serde(rename = "start_after_create")]
    _start_after_create: Option<IgnoredAny>,
    #[serde(rename = "ssh_keys")]
    _ssh_keys: Option<IgnoredAny>,
    #[serde(rename = "networks")]
    _networks: Option<IgnoredAny>,
    #[serde(rename = "firewalls")]
    _firewalls: Option<IgnoredAny>,
    #[serde(rename = "volumes")]
    _volumes: Option<IgnoredAny>,
    #[serde(rename = "public_net")]
    _public_net: Option<IgnoredAny>,
}

async fn create_server(Shared(fake): Shared<Fake>, HcloudJson(req): HcloudJson<CreateServer>) -> Response {
    let invalid = |message: &str| error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", message);
    let name = req.name.unwrap_or_default();
    let name_ok =
        !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !name_ok {
        return invalid("invalid name");
    }
    let server_type = req.server_type.unwrap_or_default();
    if !TYPES.contains(&server_type.as_str()) {
        return invalid(&format!("unknown server_type {server_type}"));
    }
    if req.image.is_none() {
        return invalid("image is required");
    }
    let user_data = req.user_data.unwrap_or_default();
    if user_data.len() > 32 * 1024 {
        return invalid("user_data exceeds 32 KiB");
    }
    let b = &fake.behaviour;
    if b.quota_exceeded {
        return error(
            StatusCode::FORBIDDEN,
            "resource_limit_exceeded",
            "server limit exceeded for this project",
        );
    }
    let mut st = fake.state.lock().unwrap();
    if st.servers.values().any(|s| s.name == name) {
        return error(StatusCode::CONFLICT, "uniqueness_error", "server name is already used");
    }
    st.next_id += 1;
    let id = st.next_id;
    let server = FakeServer {
        id,
        name,
        server_type,
        status: "initializing".into(),
        labels: req.labels.unwrap_or_default(),
        user_data,
    };
    st.next_id += 1;
    let action = st.next_id;
    st.actions.insert(action, ("create_server".into(), b.action_polls, id));
    let out = json!({"server": server_json(&server, &b.ip), "action": action_json(action, "create_server", false), "next_actions": [], "root_password": null});
    st.servers.insert(id, server);
    (StatusCode::CREATED, Json(out)).into_response()
}

#[derive(Deserialize)]
struct ListServers {
    /// Only `key==value`; anything else selects every server.
    label_selector: Option<String>,
}

async fn list_servers(Shared(fake): Shared<Fake>, Query(query): Query<ListServers>) -> Response {
    let wanted = query.label_selector.as_deref().and_then(|s| s.split_once("=="));
    let st = fake.state.lock().unwrap();
    let servers: Vec<Value> = st
        .servers
        .values()
        .filter(|s| wanted.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v)))
        .map(|s| server_json(s, &fake.behaviour.ip))
        .collect();
    let n = servers.len();
    Json(json!({"servers": servers, "meta": {"pagination": {"page": 1, "per_page": 25, "previous_page": null, "next_page": null, "last_page": 1, "total_entries": n}}}))
        .into_response()
}

fn server_not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "server not found")
}

async fn get_server(Shared(fake): Shared<Fake>, Path(id): Path<String>) -> Response {
    let st = fake.state.lock().unwrap();
    match id.parse::<u64>().ok().and_then(|i| st.servers.get(&i)) {
        Some(s) => Json(json!({"server": server_json(s, &fake.behaviour.ip)})).into_response(),
        None => server_not_found(),
    }
}

async fn delete_server(Shared(fake): Shared<Fake>, Path(id): Path<String>) -> Response {
    let mut st = fake.state.lock().unwrap();
    let Some(s) = id.parse::<u64>().ok().and_then(|i| st.servers.remove(&i)) else {
        return server_not_found();
    };
    st.next_id += 1;
    let action = st.next_id;
    st.actions.insert(action, ("delete_server".into(), 1, s.id));
    Json(json!({"action": action_json(action, "delete_server", false)})).into_response()
}

async fn get_action(Shared(fake): Shared<Fake>, Path(id): Path<String>) -> Response {
    let not_found = || error(StatusCode::NOT_FOUND, "not_found", "action not found");
    let Ok(id) = id.parse::<u64>() else {
        return not_found();
    };
    let mut st = fake.state.lock().unwrap();
    let Some((command, left, server)) = st.actions.get_mut(&id) else {
        return not_found();
    };
    *left = left.saturating_sub(1);
    let done = *left == 0;
    let (command, server) = (command.clone(), *server);
    if done
        && command == "create_server"
        && !fake.behaviour.never_running
        && let Some(s) = st.servers.get_mut(&server)
    {
        s.status = "running".into();
    }
    Json(json!({"action": action_json(id, &command, done)})).into_response()
}
