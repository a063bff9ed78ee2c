//! A plain HTTP client for tests (reqwest's blocking one), so tests call the control plane
//! and the registry with a client that is not ours: no redirects followed, 120 s timeout.

use std::sync::LazyLock;
use std::time::Duration;

use reqwest::Method;
use reqwest::blocking::Client;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};

/// An answer: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The first value of a header, its name matched without regard to case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One client for every test of the process (each blocking client owns a runtime thread).
fn client(timeout: Duration) -> Client {
    // reqwest is built without a default TLS provider; plain http needs none, but building
    // a client does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client")
}

static CLIENT: LazyLock<Client> = LazyLock::new(|| client(Duration::from_secs(120)));
static QUICK: LazyLock<Client> = LazyLock::new(|| client(Duration::from_secs(2)));

/// `METHOD http://host:port/path` with an optional bearer token and JSON body.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> HttpAnswer {
    let method = Method::from_bytes(method.as_bytes()).unwrap_or_else(|e| panic!("method {method}: {e}"));
    let mut request = CLIENT.request(method.clone(), url);
    if let Some(t) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == Method::POST {
        request = request.header(CONTENT_TYPE, "application/json").body(body.to_string());
    }
    let answer = request.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = answer.status().as_u16();
    let headers = answer
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = answer
        .bytes()
        .unwrap_or_else(|e| panic!("{url}: reading the body: {e}"));
    HttpAnswer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The status of `GET http://127.0.0.1:{port}{path}`, or `None` when nothing answers within
/// 2 s: for waiting until a service is up.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    QUICK
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .ok()
        .map(|a| a.status().as_u16())
}
