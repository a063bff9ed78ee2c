//! A strict local fake of the Hetzner Cloud API (the parts lian uses), written from its
//! published reference: bearer auth, `POST /v1/servers` with field checks, async actions
//! polled on `GET /v1/actions/{id}`, label selectors, `DELETE`, error bodies
//! `{"error":{"code","message"}}`, 429 with `RateLimit-*` headers, 5xx. Behaviour knobs
//! make it slow, out of quota, or never ready.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

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

pub struct FakeHcloud {
    pub url: String,
    pub token: String,
    state: Arc<Mutex<State>>,
}

const TYPES: [&str; 8] = ["cx22", "cx32", "cpx11", "cpx21", "cax11", "cax21", "cax31", "cax41"];
const FIELDS: [&str; 13] = [
    "name",
    "server_type",
    "image",
    "location",
    "datacenter",
    "labels",
    "user_data",
    "start_after_create",
    "ssh_keys",
    "networks",
    "firewalls",
    "volumes",
    "public_net",
];

impl FakeHcloud {
    pub fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let token = "test-token-0123456789".to_string();
        let state = Arc::new(Mutex::new(State {
            next_id: 1000,
            ..Default::default()
        }));
        let (s, t) = (state.clone(), token.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                serve(stream, &s, &t, &behaviour);
            }
        });
        Self { url, token, state }
    }

    pub fn servers(&self) -> Vec<FakeServer> {
        self.state.lock().unwrap().servers.values().cloned().collect()
    }

    /// Every request as `METHOD /path`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn error(status: u16, code: &str, message: &str) -> (u16, Value, Vec<(String, String)>) {
    (
        status,
        json!({"error": {"code": code, "message": message, "details": {}}}),
        vec![],
    )
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

fn route(
    method: &str,
    path: &str,
    headers: &BTreeMap<String, String>,
    body: &str,
    st: &mut State,
    b: &Behaviour,
    token: &str,
) -> (u16, Value, Vec<(String, String)>) {
    if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {token}")) {
        return error(401, "unauthorized", "unable to authenticate");
    }
    if b.flaky_first && st.flaky_served < 2 {
        st.flaky_served += 1;
        if st.flaky_served == 1 {
            let (s, v, _) = error(429, "rate_limit_exceeded", "limit of 3600 requests per hour reached");
            let reset = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 1;
            return (
                s,
                v,
                vec![
                    ("RateLimit-Limit".into(), "3600".into()),
                    ("RateLimit-Remaining".into(), "0".into()),
                    ("RateLimit-Reset".into(), reset.to_string()),
                ],
            );
        }
        return error(503, "unavailable", "service temporarily unavailable");
    }
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    match (method, parts.as_slice()) {
        ("POST", ["servers"]) => {
            if headers
                .get("content-type")
                .is_none_or(|c| !c.starts_with("application/json"))
            {
                return error(415, "invalid_input", "Content-Type must be application/json");
            }
            let Ok(Value::Object(req)) = serde_json::from_str::<Value>(body) else {
                return error(400, "json_error", "invalid JSON");
            };
            if let Some(unknown) = req.keys().find(|k| !FIELDS.contains(&k.as_str())) {
                return error(422, "invalid_input", &format!("unknown field {unknown}"));
            }
            let name = req.get("name").and_then(Value::as_str).unwrap_or("");
            let name_ok = !name.is_empty()
                && name.len() <= 63
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !name_ok {
                return error(422, "invalid_input", "invalid name");
            }
            let server_type = req.get("server_type").and_then(Value::as_str).unwrap_or("");
            if !TYPES.contains(&server_type) {
                return error(422, "invalid_input", &format!("unknown server_type {server_type}"));
            }
            if req.get("image").and_then(Value::as_str).is_none() {
                return error(422, "invalid_input", "image is required");
            }
            let user_data = req.get("user_data").and_then(Value::as_str).unwrap_or("").to_string();
            if user_data.len() > 32 * 1024 {
                return error(422, "invalid_input", "user_data exceeds 32 KiB");
            }
            let labels: BTreeMap<String, String> = match req.get("labels") {
                None => BTreeMap::new(),
                Some(Value::Object(m)) if m.values().all(Value::is_string) => m
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect(),
                Some(_) => return error(422, "invalid_input", "labels must map strings to strings"),
            };
            if b.quota_exceeded {
                return error(403, "resource_limit_exceeded", "server limit exceeded for this project");
            }
            if st.servers.values().any(|s| s.name == name) {
                return error(409, "uniqueness_error", "server name is already used");
            }
            st.next_id += 1;
            let id = st.next_id;
            let server = FakeServer {
                id,
                name: name.into(),
                server_type: server_type.into(),
                status: "initializing".into(),
                labels,
                user_data,
            };
            st.next_id += 1;
            let action = st.next_id;
            st.actions.insert(action, ("create_server".into(), b.action_polls, id));
            let out = json!({"server": server_json(&server, &b.ip), "action": action_json(action, "create_server", false), "next_actions": [], "root_password": null});
            st.servers.insert(id, server);
            (201, out, vec![])
        }
        ("GET", ["servers"]) => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("label_selector="))
                .unwrap_or("");
            let selector = selector.replace("%3D", "=").replace("%3d", "=");
            let wanted = selector.split_once("==").map(|(k, v)| (k.to_string(), v.to_string()));
            let servers: Vec<Value> = st
                .servers
                .values()
                .filter(|s| wanted.as_ref().is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| server_json(s, &b.ip))
                .collect();
            let n = servers.len();
            (
                200,
                json!({"servers": servers, "meta": {"pagination": {"page": 1, "per_page": 25, "previous_page": null, "next_page": null, "last_page": 1, "total_entries": n}}}),
                vec![],
            )
        }
        ("GET", ["servers", id]) => match id.parse::<u64>().ok().and_then(|i| st.servers.get(&i)) {
            Some(s) => (200, json!({"server": server_json(s, &b.ip)}), vec![]),
            None => error(404, "not_found", "server not found"),
        },
        ("DELETE", ["servers", id]) => match id.parse::<u64>().ok().and_then(|i| st.servers.remove(&i)) {
            Some(s) => {
                st.next_id += 1;
                let action = st.next_id;
                st.actions.insert(action, ("delete_server".into(), 1, s.id));
                (
                    200,
                    json!({"action": action_json(action, "delete_server", false)}),
                    vec![],
                )
            }
            None => error(404, "not_found", "server not found"),
        },
        ("GET", ["actions", id]) => {
            let Some(id) = id.parse::<u64>().ok() else {
                return error(404, "not_found", "action not found");
            };
            let Some((command, left, server)) = st.actions.get_mut(&id) else {
                return error(404, "not_found", "action not found");
            };
            *left = left.saturating_sub(1);
            let done = *left == 0;
            let (command, server) = (command.clone(), *server);
            if done
                && command == "create_server"
                && !b.never_running
                && let Some(s) = st.servers.get_mut(&server)
            {
                s.status = "running".into();
            }
            (200, json!({"action": action_json(id, &command, done)}), vec![])
        }
        _ => error(404, "not_found", &format!("no route {method} {path}")),
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, token: &str, b: &Behaviour) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut words = line.split_whitespace();
    let (method, path) = (
        words.next().unwrap_or("").to_string(),
        words.next().unwrap_or("").to_string(),
    );
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    let _ = reader.read_exact(&mut body);
    let (status, value, extra) = {
        let mut st = state.lock().unwrap();
        st.requests
            .push(format!("{method} {}", path.split('?').next().unwrap_or("")));
        route(
            &method,
            &path,
            &headers,
            &String::from_utf8_lossy(&body),
            &mut st,
            b,
            token,
        )
    };
    let text = value.to_string();
    let mut out = stream;
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        text.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let _ = out.write_all(format!("{head}\r\n{text}").as_bytes());
}
