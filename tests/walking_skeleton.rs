//! The whole road, as a user drives it: `lian up` on a free port, `lian submit --wait` of
//! the example root layer, and every event read from `lian.>` by a NATS client that is not
//! ours (the raw protocol).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{Running, STEPS, lian, runners_left, staged_examples, text};
use lian_test_support::{RawMessage, RawNats, docker_available, docker_cli, free_port};

fn kind(m: &RawMessage) -> &str {
    m.subject.rsplit('.').next().unwrap()
}

fn build_of(m: &RawMessage) -> Option<&str> {
    let t: Vec<&str> = m.subject.split('.').collect();
    (t.len() == 5 && t[2] == "build").then(|| t[3])
}

#[test]
fn a_root_layer_build_and_its_cascade_run_through_every_step() {
    assert!(
        docker_available(),
        "this test builds images: start a Docker engine (see .ci/run)"
    );
    let catalog = staged_examples();
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let nats_url = format!("nats://127.0.0.1:{port}");
    let _fleet = Running::start(
        &[
            "up",
            "--nats-port",
            &port.to_string(),
            "--state-dir",
            state.path().to_str().unwrap(),
            "--catalog",
            catalog.path().to_str().unwrap(),
        ],
        "Ctrl-C stops everything",
    );
    let mut events = RawNats::subscribe(port, "lian.>");

    let submit_layer = |layer: &str| {
        let root = catalog.path().join(layer);
        let submitted = lian(&[
            "--nats-url",
            &nats_url,
            "submit",
            root.join("build_directives.ncl").to_str().unwrap(),
            "--context",
            root.to_str().unwrap(),
            "--layer",
            layer,
            "--wait",
            "--timeout",
            "120",
        ]);
        assert!(submitted.status.success(), "submit --wait: {}", text(&submitted));
        String::from_utf8_lossy(&submitted.stdout)
            .lines()
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    let build_id = submit_layer("base");

    let cascade = format!("c-{build_id}");
    let end = events.wait_for(Duration::from_secs(120), "the cascade's end", |m| {
        m.subject.contains(&format!(".cascade.{cascade}.")) && matches!(kind(m), "completed" | "failed")
    });
    assert_eq!(
        kind(&end),
        "completed",
        "cascade ended with {}",
        String::from_utf8_lossy(&end.payload)
    );

    // The root build: every step, in order, each once.
    let root_kinds: Vec<&str> = events
        .seen
        .iter()
        .filter(|m| build_of(m) == Some(&build_id))
        .map(kind)
        .collect();
    assert_eq!(root_kinds, STEPS, "the root build's story");

    // BuildKit's steps went out live, next to the lifecycle.
    let progress = format!("lian.examples.progress.{build_id}");
    let steps: Vec<serde_json::Value> = events
        .seen
        .iter()
        .filter(|m| m.subject == progress)
        .map(|m| m.json())
        .collect();
    assert!(
        steps
            .iter()
            .any(|s| s["name"].as_str().is_some_and(|n| n.contains("RUN")) && s["state"] == "started"),
        "step progress of the root build: {steps:?}"
    );

    // The cascade: every descendant requested exactly once and built through every step.
    let requested: Vec<String> = events
        .seen
        .iter()
        .filter(|m| m.subject.contains(".cascade.") && kind(m) == "layer_requested")
        .map(|m| m.json()["layer"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = requested.clone();
    sorted.sort();
    assert_eq!(sorted, ["app", "deps", "tools"], "each descendant once: {requested:?}");
    let mut images = BTreeMap::new();
    for layer in ["tools", "deps", "app"] {
        let id = format!("{cascade}-{layer}");
        let kinds: Vec<&str> = events
            .seen
            .iter()
            .filter(|m| build_of(m) == Some(id.as_str()))
            .map(kind)
            .collect();
        assert_eq!(kinds, STEPS, "{layer}'s story");
        let completed = events
            .seen
            .iter()
            .find(|m| build_of(m) == Some(id.as_str()) && kind(m) == "completed")
            .unwrap();
        images.insert(layer, completed.json()["image_id"].as_str().unwrap().to_string());
    }

    // The two-parent layer starts only after both of its parents completed.
    let position = |pred: &dyn Fn(&RawMessage) -> bool| events.seen.iter().position(pred).unwrap();
    let app_accepted = position(&|m| build_of(m) == Some(&format!("{cascade}-app")) && kind(m) == "accepted");
    for parent in ["tools", "deps"] {
        let done = position(&|m| build_of(m) == Some(&format!("{cascade}-{parent}")) && kind(m) == "completed");
        assert!(done < app_accepted, "app began before {parent} completed");
    }

    // The images are in the Docker engine, as built.
    for (layer, id) in images {
        let out = Command::new(docker_cli())
            .args([
                "image",
                "inspect",
                "--format",
                "{{.Id}}",
                &format!("lian-example/{layer}:latest"),
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            id,
            "lian-example/{layer}:latest"
        );
    }
    let run = Command::new(docker_cli())
        .args([
            "run",
            "--rm",
            "--network=none",
            "lian-example/app:latest",
            "cat",
            "/opt/app/hello",
            "/opt/app/deps",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(
        said.contains("hello from the tools layer") && said.contains("tokio"),
        "{said}"
    );

    // No runner is left behind.
    assert!(
        runners_left(state.path()).is_empty(),
        "runners left: {:?}",
        runners_left(state.path())
    );

    // `lian status` tells the same story.
    let status = lian(&["--nats-url", &nats_url, "status", &build_id]);
    assert!(status.status.success());
    assert!(text(&status).contains("state: completed"), "{}", text(&status));
    let rebuilt = end.json();
    assert!(rebuilt.get("cut_off").is_none(), "nothing was built before: {rebuilt}");

    // Causality: every cascade event names the build whose end caused it; app, built on
    // tools and deps, was asked for by whichever of them ended last.
    let story: Vec<serde_json::Value> = events
        .seen
        .iter()
        .filter(|m| m.subject.contains(&format!(".cascade.{cascade}.")))
        .map(|m| m.json())
        .collect();
    for e in &story {
        assert_eq!(e["cascade_id"], cascade.as_str(), "{e}");
        assert!(e["cause"]["build_id"].is_string(), "an event without a cause: {e}");
    }
    assert_eq!(story[0]["cause"]["build_id"], build_id.as_str());
    let app_asked = story
        .iter()
        .find(|e| e["type"] == "layer_requested" && e["layer"] == "app")
        .unwrap();
    let cause = app_asked["cause"]["layer"].as_str().unwrap().to_string();
    assert!(["tools", "deps"].contains(&cause.as_str()), "{app_asked}");
    assert_eq!(app_asked["cause"]["build_id"], format!("{cascade}-{cause}"));
    let shown = lian(&["--nats-url", &nats_url, "cascade", "show", &cascade]);
    assert!(shown.status.success(), "{}", text(&shown));
    let tree = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(
        tree.starts_with(&format!("cascade {cascade} in examples: completed after")),
        "{tree}"
    );
    assert!(tree.lines().nth(1).unwrap().starts_with("base  root build"), "{tree}");
    let row = |layer: &str| {
        tree.lines()
            .find(|l| l.contains(&format!(" {layer}  ")))
            .unwrap_or_else(|| panic!("{layer} in {tree}"))
            .to_string()
    };
    assert!(
        row(&cause).starts_with("├─ ") || row(&cause).starts_with("└─ "),
        "{tree}"
    );
    assert!(row("app").contains("app  completed · build"), "{tree}");
    assert!(row("app").contains("steps cached"), "cache figures: {tree}");
    assert!(
        row("app").starts_with("   └─ ") || row("app").starts_with("│  └─ "),
        "app under {cause}: {tree}"
    );
    let shown = lian(&["--nats-url", &nats_url, "--output", "json", "cascade", "show", &cascade]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["state"], "completed");
    assert_eq!(shown["layers"].as_array().unwrap().len(), 3, "{shown}");
    let unknown = lian(&["--nats-url", &nats_url, "cascade", "show", "c-nothing"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));

    // The impact preview of the next change to base, from the builds just recorded.
    let catalog_dir = catalog.path().to_str().unwrap();
    // `lian --output json catalog --catalog DIR ARGS...` on this fleet.
    let catalog_json = |args: &[&str]| {
        let mut all = vec![
            "--nats-url",
            &nats_url,
            "--output",
            "json",
            "catalog",
            "--catalog",
            catalog_dir,
        ];
        all.extend_from_slice(args);
        lian(&all)
    };
    let preview = |parallelism: &str| {
        let out = catalog_json(&["plan", "--changed", "base", "--estimate", "--parallelism", parallelism]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["estimate"].clone()
    };
    let (one, two) = (preview("1"), preview("2"));
    let layers = one["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{one}");
    for l in layers {
        assert!(l["samples"].as_u64().unwrap() >= 1, "each layer was built once: {l}");
        assert!(l["p50_secs"].as_f64().unwrap() > 0.0, "{l}");
    }
    let secs = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    assert!(
        (secs(&one, "wall_p50_secs") - secs(&one, "build_p50_secs")).abs() < 1e-6,
        "one worker builds one layer at a time: {one}"
    );
    assert!(
        secs(&two, "wall_p50_secs") < secs(&one, "wall_p50_secs"),
        "two workers build tools and deps side by side: {two}"
    );
    let text_preview = lian(&[
        "--nats-url",
        &nats_url,
        "catalog",
        "--catalog",
        catalog_dir,
        "plan",
        "--changed",
        "base",
        "--estimate",
    ]);
    let said = String::from_utf8_lossy(&text_preview.stdout).to_string();
    assert!(
        said.starts_with("3 layers rebuild when base changes; expected wall time"),
        "{said}"
    );

    // The catalog lock: the completed cascade locked its four layers by digest, in one write.
    let lock = catalog_json(&["lock"]);
    assert!(lock.status.success(), "{}", text(&lock));
    let lock: serde_json::Value = serde_json::from_slice(&lock.stdout).unwrap();
    assert_eq!(lock["cascade_id"], cascade.as_str(), "{lock}");
    let pin = |layer: &str| lock["layers"][layer]["pinned"].as_str().unwrap_or_default().to_string();
    for layer in ["base", "deps", "tools", "app"] {
        let build = if layer == "base" {
            build_id.clone()
        } else {
            format!("{cascade}-{layer}")
        };
        let done = events
            .seen
            .iter()
            .find(|m| build_of(m) == Some(build.as_str()) && kind(m) == "completed")
            .unwrap()
            .json();
        assert!(pin(layer).contains("@sha256:"), "{layer} locked by digest: {lock}");
        assert_eq!(lock["layers"][layer]["image_id"], done["image_id"], "{lock}");
    }
    // app was built on its parents as pinned, pulled by those digests.
    let app_history = lian(&["--nats-url", &nats_url, "status", &format!("{cascade}-app"), "--json"]);
    let app_history: serde_json::Value = serde_json::from_slice(&app_history.stdout).unwrap();
    let parents = &app_history["history"][0]["request"]["parents"];
    assert_eq!(parents["lian-example/tools:latest"], pin("tools"), "{parents}");
    assert_eq!(parents["lian-example/deps:latest"], pin("deps"), "{parents}");
    let completed = app_history["history"].as_array().unwrap().last().unwrap().clone();
    let pulled = completed["cache"]["parents_pulled"].to_string();
    assert!(
        pulled.contains(&pin("tools")) && pulled.contains(&pin("deps")),
        "{pulled}"
    );
    // catalog.lock, and --check against the Dockerfiles.
    let check = || lian(&["catalog", "--catalog", catalog_dir, "lock", "--check"]);
    assert_eq!(
        check().status.code(),
        Some(2),
        "no catalog.lock yet: {}",
        text(&check())
    );
    let write = lian(&[
        "--nats-url",
        &nats_url,
        "catalog",
        "--catalog",
        catalog_dir,
        "lock",
        "--write",
    ]);
    assert!(write.status.success(), "{}", text(&write));
    assert!(
        check().status.success(),
        "unpinned Dockerfiles follow the lock: {}",
        text(&check())
    );
    let dockerfile = catalog.path().join("app/Dockerfile");
    let original = std::fs::read_to_string(&dockerfile).unwrap();
    let tools_digest = pin("tools").split_once('@').unwrap().1.to_string();
    let with_digest = |digest: &str| {
        let pinned = original.replace(
            "FROM lian-example/tools:latest",
            &format!("FROM lian-example/tools:latest@{digest}"),
        );
        assert_ne!(pinned, original, "app's Dockerfile names tools");
        std::fs::write(&dockerfile, pinned).unwrap();
    };
    with_digest(&format!("sha256:{}", "0".repeat(64)));
    let stale = check();
    assert_eq!(stale.status.code(), Some(1), "{}", text(&stale));
    assert!(
        text(&stale).contains("app/Dockerfile: FROM lian-example/tools:latest@sha256:000"),
        "{}",
        text(&stale)
    );
    with_digest(&tools_digest);
    assert!(check().status.success(), "{}", text(&check()));
    std::fs::write(&dockerfile, original).unwrap();

    // Early cutoff: a layer built again with nothing changed gives the image it had, and
    // nothing below it is rebuilt. Rooted at tools, whose plan is app alone, so no two
    // leases of the namespace run at once and the engine store holds what tools was built
    // with (parallel leases of one namespace hand back one store of theirs, ADR lian-044).
    let mut cascade_of = |build: &str| {
        let done = format!("lian.examples.build.{build}.completed");
        let root = events.wait_for(Duration::from_secs(30), "the root's completion", |m| m.subject == done);
        let id = format!("c-{build}");
        let end = events.wait_for(Duration::from_secs(90), "a cascade's end", |m| {
            m.subject.contains(&format!(".cascade.{id}.")) && matches!(kind(m), "completed" | "failed")
        });
        let story: Vec<serde_json::Value> = events
            .seen
            .iter()
            .filter(|m| m.subject.contains(&format!(".cascade.{id}.")))
            .map(|m| m.json())
            .collect();
        (root.json(), end, story)
    };
    let (first, _, _) = cascade_of(&submit_layer("tools"));
    let (again, end, story) = cascade_of(&submit_layer("tools"));
    assert_eq!(
        again["image_id"], first["image_id"],
        "an unchanged rebuild, the same image (its cache: {})",
        again["cache"]
    );
    let ended = end.json();
    assert_eq!(kind(&end), "completed", "{ended}");
    assert_eq!(ended["built"], serde_json::json!([]), "{ended}");
    assert_eq!(ended["cut_off"], serde_json::json!(["app"]), "{ended}");
    assert_eq!(story[0]["type"], "started", "{story:?}");
    assert_eq!(story[0]["root_unchanged"], true, "{story:?}");
    assert!(
        story.iter().all(|e| e["type"] != "layer_requested"),
        "nothing rebuilt: {story:?}"
    );
    let app = story
        .iter()
        .find(|e| e["type"] == "layer_cut_off")
        .unwrap_or_else(|| panic!("app cut off: {story:?}"));
    assert_eq!(app["layer"], "app");
    assert_eq!(app["because"], serde_json::json!(["tools"]));
}
