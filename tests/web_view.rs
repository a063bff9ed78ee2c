//! The web view in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver, fantoccini) against a real fleet. What is asserted is what the page
//! renders: node states as drawn, steps and durations as listed, a failure's reason as
//! shown, and the login that keeps everything else out. Screenshots land in
//! `target/web-view/` (README's pictures in docs/ are copies of them).

mod browser;
mod common;

use std::time::Duration;

use browser::Browser;
use common::{Fleet, Running, lian, staged_examples, text};
use fantoccini::Locator;
use lian_test_support::{http, workspace_root};

const TOKEN: &str = "web-view-test-token";

/// `lian control` with the web view drawing `catalog`; its base URL.
fn control(nats_url: &str, state: &std::path::Path, catalog: &std::path::Path) -> (Running, String) {
    let control = Running::start_with(
        &[
            "--nats-url",
            nats_url,
            "control",
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--catalog",
            catalog.to_str().unwrap(),
        ],
        &[("LIAN_CONTROL_TOKEN", TOKEN)],
        "serving http://",
    );
    let url = control.served_url();
    (control, url)
}

#[test]
fn without_the_token_pages_go_to_the_login_and_nothing_else_answers() {
    let nats = lian_test_support::NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let catalog = workspace_root().join("examples/catalog");
    let (_control, url) = control(&nats.url, state.path(), &catalog);

    // Machines: the event stream and the API refuse; the token header opens both.
    assert_eq!(http("GET", &format!("{url}/events"), None, None).status, 401);
    assert_eq!(http("GET", &format!("{url}/api/v1/catalog"), None, None).status, 401);
    let api = http("GET", &format!("{url}/api/v1/catalog"), Some(TOKEN), None);
    assert_eq!(api.status, 200, "{}", api.body);
    let body = api.json();
    let names: Vec<&str> = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");

    let browser = Browser::start();
    browser.goto(&format!("{url}/catalog"));
    assert!(browser.url().contains("/login?next=%2Fcatalog"), "{}", browser.url());
    assert!(
        browser.texts("svg.dag").is_empty(),
        "the DAG is not shown before logging in"
    );

    browser.log_in("not-the-token");
    let refusal = browser.wait_for("section.login p.error", Duration::from_secs(10));
    assert!(refusal.contains("not this control plane's token"), "{refusal}");
    assert!(browser.texts("svg.dag").is_empty());
    assert!(!browser.url().contains("not-the-token"), "no token in URLs");

    browser.log_in(TOKEN);
    browser.wait_for("svg.dag", Duration::from_secs(10));
    assert!(browser.url().ends_with("/catalog"), "{}", browser.url());
    assert!(!browser.url().contains(TOKEN), "no token in URLs");
    let mut nodes = browser.attrs("svg.dag g.node", "data-layer");
    nodes.sort();
    assert_eq!(nodes, ["app", "base", "deps", "tools"]);
    assert!(
        browser
            .attrs("svg.dag g.node", "data-state")
            .iter()
            .all(|s| s == "idle"),
        "nothing built yet"
    );
    // HttpOnly: the page's scripts cannot read the session.
    assert_eq!(browser.script("return document.cookie;"), serde_json::json!(""));

    browser.rt.block_on(async {
        browser
            .client
            .find(Locator::Css("form.logout button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    });
    browser.wait_for("section.login form", Duration::from_secs(10));
    browser.goto(&format!("{url}/builds"));
    assert!(browser.url().contains("/login?next=%2Fbuilds"), "{}", browser.url());
}

/// Records, in the page, every state each DAG node is drawn in, in the order drawn.
const RECORD_STATES: &str = r#"
    window.lianSeen = [];
    const last = {};
    const scan = () => document.querySelectorAll("svg.dag g.node").forEach((n) => {
        const layer = n.getAttribute("data-layer"), state = n.getAttribute("data-state");
        if (last[layer] !== state) { last[layer] = state; window.lianSeen.push([layer, state]); }
    });
    scan();
    new MutationObserver(scan).observe(document.querySelector("main"), { childList: true, subtree: true, attributes: true });
    return true;
"#;

#[test]
fn a_cascade_lights_the_dag_up_in_order_and_build_pages_show_steps_and_failures() {
    let fleet = Fleet::new("web");
    let catalog = staged_examples();
    let (_control, url) = control(&fleet.server.url, fleet.state.path(), catalog.path());
    let _workers = [fleet.worker("web-1", &[]), fleet.worker("web-2", &[])];
    let _cascade = Running::start(
        &[
            "--nats-url",
            &fleet.server.url,
            "cascade",
            "--catalog",
            catalog.path().to_str().unwrap(),
        ],
        "",
    );

    let browser = Browser::start();
    browser.goto(&format!("{url}/catalog"));
    browser.log_in(TOKEN);
    browser.wait_for("svg.dag", Duration::from_secs(10));
    browser.wait_for("#live-status", Duration::from_secs(10));
    assert_eq!(browser.script(RECORD_STATES), serde_json::json!(true));

    // The root layer, as `lian submit --layer` sends it: its completion starts the cascade.
    let root = catalog.path().join("base");
    let submitted = lian(&[
        "--nats-url",
        &fleet.server.url,
        "submit",
        root.join("build_directives.ncl").to_str().unwrap(),
        "--context",
        root.to_str().unwrap(),
        "--layer",
        "base",
    ]);
    assert!(submitted.status.success(), "{}", text(&submitted));
    let root_build = String::from_utf8_lossy(&submitted.stdout).trim().to_string();

    let bound = Duration::from_secs(240);
    browser.wait_for(r#"g.node[data-layer="base"][data-state="done"]"#, bound);
    browser.wait_for(
        r#"g.node[data-layer="deps"][data-state="running"], g.node[data-layer="tools"][data-state="running"], g.node[data-layer="app"][data-state="running"]"#,
        bound,
    );
    let shot = browser.screenshot("dag-cascade.png");
    browser.wait_for(r#"g.node[data-layer="app"][data-state="done"]"#, bound);

    let seen: Vec<(String, String)> = serde_json::from_value(browser.script("return window.lianSeen;")).unwrap();
    let first = |layer: &str, states: &[&str]| {
        seen.iter()
            .position(|(l, s)| l == layer && states.contains(&s.as_str()))
            .unwrap_or_else(|| panic!("{layer} never drawn {states:?}; drawn: {seen:?}"))
    };
    // Every layer is drawn running, then done; a child starts only after its parents are done.
    for layer in ["base", "deps", "tools", "app"] {
        assert!(
            first(layer, &["running"]) < first(layer, &["done"]),
            "{layer}: {seen:?}"
        );
    }
    for (parent, child) in [("base", "deps"), ("base", "tools"), ("deps", "app"), ("tools", "app")] {
        assert!(
            first(parent, &["done"]) < first(child, &["queued", "running"]),
            "{child} started before {parent} was done: {seen:?}"
        );
    }
    // What a done node says: the digest of the image the fleet recorded, and its cache figures.
    let history = common::history_all(&fleet.server.url, &root_build);
    assert_eq!(history.last().unwrap().0, "completed");
    let status = lian(&["--nats-url", &fleet.server.url, "status", &root_build, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let image_id = status["history"].as_array().unwrap().last().unwrap()["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    let hex = image_id.split(':').next_back().unwrap();
    let figures = browser.texts(r#"g.node[data-layer="base"] text.figures"#);
    assert!(figures[0].starts_with(&hex[..12]), "{figures:?} vs {image_id}");

    // One build: its eight steps as a timeline, each with a duration.
    browser.goto(&format!("{url}/builds/{root_build}"));
    browser.wait_for("ol.timeline", Duration::from_secs(10));
    let steps = browser.texts("ol.timeline li.step .step-name");
    assert_eq!(
        steps,
        [
            "1. size the runner",
            "2. announce",
            "3. lease a runner",
            "4. put the context on it",
            "5. build",
            "6. record metrics",
            "7. destroy the runner",
            "8. announce the result"
        ]
    );
    let durations = browser.texts("ol.timeline li.step .step-duration");
    assert_eq!(durations.len(), 8);
    for d in &durations {
        assert!(d.ends_with(" ms") || d.ends_with(" s"), "a duration: {d:?}");
    }
    let build_ms: u64 = browser.attrs(r#"li.step[data-step="5"]"#, "data-duration-ms")[0]
        .parse()
        .unwrap();
    assert!(build_ms > 0, "the build step took time");
    let kinds = browser.attrs("table.history tr[data-kind]", "data-kind");
    let stored: Vec<String> = history.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(kinds, stored, "the page lists the history as stored");
    let build_shot = browser.screenshot("build-page.png");

    // A failed build shows why, as the fleet recorded it.
    let (failed, _ctx) = fleet.submit("lian-test/web-fail:latest", "RUN false\n", &[]);
    browser.goto(&format!("{url}/builds?state=failed"));
    browser.wait_for(&format!(r#"tr[data-build="{failed}"][data-state="failed"]"#), bound);
    browser.goto(&format!("{url}/builds/{failed}"));
    let shown = browser.wait_for("section.failure .reason", Duration::from_secs(10));
    let status = lian(&["--nats-url", &fleet.server.url, "status", &failed, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let reason = status["history"].as_array().unwrap().last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!reason.is_empty());
    assert_eq!(shown.trim(), reason.trim(), "the page shows the recorded reason");
    assert!(browser.attrs(r#"li.step[data-step="5"]"#, "class")[0].contains("failed"));

    // The fleet page: the workers that did this, and an empty queue.
    browser.goto(&format!("{url}/fleet"));
    browser.wait_for("#queue-waiting", Duration::from_secs(10));
    let workers = browser.texts("table.workers td:first-child");
    assert!(workers.iter().any(|w| w.starts_with("web-")), "{workers:?}");
    eprintln!("screenshots: {} {}", shot.display(), build_shot.display());
}
