//! The registry gate: a real `lian control` in front of a real registry (Debian's
//! docker-registry), grants asked for over its API, and Debian's docker CLI logging in,
//! pushing and pulling through the gate as each actor. No mocks: every refusal below is the
//! gate's answer to what docker (or a plain HTTP client) actually sent.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Fleet, Running};
use lian_test_support::{Registry, docker_cli, http};

const TOKEN: &str = "test-gate-token-9d2e";
const WS: &str = "gate";

fn directives(actor: &str, actor_id: Option<&str>, disposition: Option<&str>) -> serde_json::Value {
    let mut policy = serde_json::json!({"actor": actor});
    if let Some(id) = actor_id {
        policy["actor_id"] = id.into();
    }
    if let Some(d) = disposition {
        policy["disposition"] = d.into();
    }
    serde_json::json!({
        "workspace": WS,
        "artifact": {"image": "gate/app:latest", "language": "other"},
        "compute_provider": "docker_local",
        "registry_provider": "zot",
        "cache_policy": policy,
    })
}

/// A grant's answer: (registry, username, password).
fn grant(control: &str, body: serde_json::Value) -> (String, String, String, serde_json::Value) {
    let answer = http(
        "POST",
        &format!("{control}/api/v1/registry-grants"),
        Some(TOKEN),
        Some(&body.to_string()),
    );
    assert_eq!(answer.status, 201, "{answer:?}");
    let json = answer.json();
    let field = |k: &str| json[k].as_str().unwrap().to_string();
    (field("registry"), field("username"), field("password"), json)
}

fn base64(input: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One request to the gate with HTTP Basic credentials: (status, headers, body).
fn gate_call(gate: &str, method: &str, path: &str, creds: Option<(&str, &str)>) -> (u16, String, String) {
    let mut stream = TcpStream::connect(gate).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {gate}\r\nConnection: close\r\nContent-Length: 0\r\n");
    if let Some((user, password)) = creds {
        let encoded = base64(format!("{user}:{password}").as_bytes());
        request.push_str(&format!("Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// docker with its own client configuration (the logins of one grant).
fn docker(config: &Path, args: &[&str]) -> Output {
    Command::new(docker_cli())
        .env("DOCKER_BUILDKIT", "1")
        .env("DOCKER_CONFIG", config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("docker runs")
}

fn ok(out: Output, what: &str) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed: {text}");
    text
}

fn refused(out: Output, what: &str) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} should have been refused: {text}");
    text
}

/// `docker login` to the gate as a grant, in a config directory of its own.
fn login(gate: &str, user: &str, password: &str) -> tempfile::TempDir {
    let config = tempfile::tempdir().unwrap();
    let mut child = Command::new(docker_cli())
        .env("DOCKER_CONFIG", config.path())
        .args(["login", gate, "-u", user, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    ok(child.wait_with_output().unwrap(), "docker login");
    config
}

#[test]
fn builds_reach_the_registry_through_the_gate_only_as_far_as_their_actor_may() {
    let registry = Registry::start();
    let fleet = Fleet::new(WS);
    let log = fleet.state.path().join("control.log");
    let state = fleet.state.path().to_str().unwrap().to_string();
    let control = Running::start_logged(
        &[
            "--nats-url",
            &fleet.server.url,
            "control",
            "--state-dir",
            &state,
            "--listen",
            "127.0.0.1:0",
            "--registry-listen",
            "127.0.0.1:0",
        ],
        &[
            ("LIAN_CONTROL_TOKEN", TOKEN),
            ("LIAN_REGISTRY_URL", &registry.url),
            ("LIAN_LOG", "info"),
        ],
        &log,
        "registry gate http://",
    );
    let url = control.served_url();
    let gate_line = control
        .stdout_lines
        .iter()
        .find(|l| l.contains("registry gate"))
        .unwrap();
    let gate = gate_line[gate_line.find("http://").unwrap() + 7..].trim().to_string();

    // A ci grant: reads ci/<ws> and the catalog's shared lamina/, writes ci/<ws> only.
    let (registry_name, ci_user, ci_pass, ci_json) = grant(
        &url,
        serde_json::json!({"build_id": "b-ci", "directives": directives("ci", None, None)}),
    );
    assert_eq!(registry_name, gate);
    assert_eq!(
        (ci_json["reads"].clone(), ci_json["writes"].clone()),
        (serde_json::json!(["ci/gate", "lamina"]), serde_json::json!(["ci/gate"]))
    );
    let ci = login(&gate, &ci_user, &ci_pass);

    // A tiny image, FROM scratch: nothing to pull from anywhere.
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("Dockerfile"), "FROM scratch\nCOPY hello /hello\n").unwrap();
    std::fs::write(
        context.path().join("hello"),
        format!("gate test {}\n", std::process::id()),
    )
    .unwrap();
    let ci_app = format!("{gate}/ci/gate/app:1");
    ok(
        docker(ci.path(), &["build", "-t", &ci_app, context.path().to_str().unwrap()]),
        "docker build",
    );
    ok(docker(ci.path(), &["push", &ci_app]), "ci pushes ci/gate/app");
    ok(docker(ci.path(), &["rmi", &ci_app]), "rmi");
    ok(docker(ci.path(), &["pull", &ci_app]), "ci pulls ci/gate/app");
    // The image really is in the registry behind the gate, where only the gate is meant to go.
    let tags = http("GET", &format!("{}/v2/ci/gate/app/tags/list", registry.url), None, None);
    assert!(tags.body.contains("\"1\""), "{tags:?}");

    // The upload's Location points back at the gate (the Host header was kept).
    let (status, head, _) = gate_call(
        &gate,
        "POST",
        "/v2/ci/gate/app/blobs/uploads/",
        Some((&ci_user, &ci_pass)),
    );
    assert_eq!(status, 202, "{head}");
    assert!(
        head.contains(&format!("location: http://{gate}/v2/ci/gate/app/blobs/uploads/")),
        "{head}"
    );

    // ci may neither write nor read dev/.
    let (status, _, body) = gate_call(
        &gate,
        "POST",
        "/v2/dev/jpl-gate/app/blobs/uploads/",
        Some((&ci_user, &ci_pass)),
    );
    assert_eq!(status, 403, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["errors"][0]["code"], "DENIED");
    assert_eq!(
        json["errors"][0]["message"],
        "a ci actor may not write dev/jpl-gate/app: allowed is ci/gate/*"
    );
    let (status, _, body) = gate_call(
        &gate,
        "GET",
        "/v2/dev/jpl-gate/app/manifests/1",
        Some((&ci_user, &ci_pass)),
    );
    assert_eq!(status, 403);
    assert!(
        body.contains("a ci actor may not read dev/jpl-gate/app: allowed are ci/gate/*"),
        "{body}"
    );
    let dev_app = format!("{gate}/dev/jpl-gate/app:1");
    ok(docker(ci.path(), &["tag", &ci_app, &dev_app]), "tag");
    let text = refused(docker(ci.path(), &["push", &dev_app]), "ci pushing dev/jpl-gate/app");
    assert!(
        text.contains("a ci actor may not") && text.contains("dev/jpl-gate/app"),
        "{text}"
    );
    let (status, _, body) = gate_call(&gate, "GET", "/v2/_catalog", Some((&ci_user, &ci_pass)));
    assert_eq!(status, 403, "{body}");

    // A human session that exports: writes its own dev/, reads ci/, never writes ci/.
    let (_, human_user, human_pass, _) = grant(
        &url,
        serde_json::json!({"build_id": "b-jpl", "directives": directives("human", Some("jpl"), Some("export"))}),
    );
    let human = login(&gate, &human_user, &human_pass);
    ok(
        docker(human.path(), &["push", &dev_app]),
        "a session pushes its own dev/",
    );
    ok(docker(human.path(), &["rmi", &ci_app, &dev_app]), "rmi");
    ok(docker(human.path(), &["pull", &ci_app]), "a session pulls ci/");
    let ci_other = format!("{gate}/ci/gate/other:1");
    ok(docker(human.path(), &["tag", &ci_app, &ci_other]), "tag");
    let text = refused(docker(human.path(), &["push", &ci_other]), "a session pushing ci/");
    assert!(
        text.contains("a human actor may not write ci/gate/other: allowed is dev/jpl-gate/*"),
        "{text}"
    );

    // A session that discards reads what a session reads and writes nothing.
    let (_, discard_user, discard_pass, discard_json) = grant(
        &url,
        serde_json::json!({"build_id": "b-tmp", "directives": directives("agent", Some("jpl"), Some("discard"))}),
    );
    assert_eq!(discard_json["writes"], serde_json::json!([]));
    let discard = login(&gate, &discard_user, &discard_pass);
    ok(docker(discard.path(), &["rmi", &ci_app]), "rmi");
    ok(
        docker(discard.path(), &["pull", &dev_app]),
        "a discarding session pulls its dev/",
    );
    let dev_tmp = format!("{gate}/dev/jpl-gate/tmp:1");
    ok(docker(discard.path(), &["tag", &dev_app, &dev_tmp]), "tag");
    let text = refused(
        docker(discard.path(), &["push", &dev_tmp]),
        "a discarding session pushing",
    );
    assert!(text.contains("allowed is nothing"), "{text}");

    // The caller cannot widen a grant: a list of namespaces is not part of the request,
    // and a policy its actor may not have gets no grant.
    let widened =
        serde_json::json!({"build_id": "b-x", "directives": directives("ci", None, None), "writes": ["dev/jpl-gate"]});
    let answer = http(
        "POST",
        &format!("{url}/api/v1/registry-grants"),
        Some(TOKEN),
        Some(&widened.to_string()),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    let mut asks_dev = directives("ci", None, None);
    asks_dev["cache_policy"]["cache_to"] = serde_json::json!(["dev/jpl-gate"]);
    let answer = http(
        "POST",
        &format!("{url}/api/v1/registry-grants"),
        Some(TOKEN),
        Some(&serde_json::json!({"build_id": "b-x", "directives": asks_dev}).to_string()),
    );
    assert_eq!(
        (answer.status, answer.json()["error"]["code"].as_str()),
        (403, Some("cache_rule")),
        "{answer:?}"
    );
    let answer = http("POST", &format!("{url}/api/v1/registry-grants"), None, Some("{}"));
    assert_eq!(answer.status, 401);

    // No credentials, a wrong password, an unknown user: 401 with the Basic challenge.
    for creds in [
        None,
        Some((ci_user.as_str(), "wrong")),
        Some(("b-ci.0000000000000000", ci_pass.as_str())),
    ] {
        let (status, head, body) = gate_call(&gate, "GET", "/v2/", creds);
        assert_eq!(status, 401, "{creds:?}: {body}");
        assert!(
            head.contains("www-authenticate: basic realm=\"lian-registry\""),
            "{head}"
        );
    }
    assert_eq!(gate_call(&gate, "GET", "/v2/", Some((&ci_user, &ci_pass))).0, 200);

    // Revoked: refused at once, by docker too.
    let revoked = http(
        "DELETE",
        &format!("{url}/api/v1/registry-grants/{human_user}"),
        Some(TOKEN),
        None,
    );
    assert_eq!(revoked.status, 204, "{revoked:?}");
    assert_eq!(gate_call(&gate, "GET", "/v2/", Some((&human_user, &human_pass))).0, 401);
    ok(docker(human.path(), &["rmi", &dev_app]), "rmi");
    refused(docker(human.path(), &["pull", &dev_app]), "a revoked grant pulling");

    // Expired: a grant asked for one second is refused after it.
    let (_, short_user, short_pass, short_json) = grant(
        &url,
        serde_json::json!({"build_id": "b-short", "directives": directives("ci", None, None), "ttl_secs": 1}),
    );
    assert_eq!(gate_call(&gate, "GET", "/v2/", Some((&short_user, &short_pass))).0, 200);
    // Wait for the refusal itself, asking the gate until it comes (10 s at most).
    let expires_at = short_json["expires_at"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, _, body) = gate_call(&gate, "GET", "/v2/", Some((&short_user, &short_pass)));
        if status != 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(status, 401);
    assert!(body.contains("expired"), "{body}");
    assert!(
        now >= expires_at,
        "refused only once the grant expired ({now} < {expires_at})"
    );

    for image in [&ci_app, &ci_other, &dev_tmp] {
        let _ = docker(ci.path(), &["rmi", image]);
    }
    drop(control);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("registry gate refused"), "the refusals are logged");
    for password in [&ci_pass, &human_pass, &discard_pass, &short_pass] {
        assert!(
            !logged.contains(password.as_str()),
            "a grant's password is in the control plane's log"
        );
    }
}
