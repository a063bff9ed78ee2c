//! Page-load benchmark of the web view (BENCHMARKS.md), in a real browser: Chromium's
//! Navigation Timing (`loadEventEnd`: the HTML, its CSS and script, parsed, laid out and
//! loaded) of the catalog page, for the 13-layer `catalog/` drawn whole and for a synthetic
//! 10,000-layer catalog filtered to one layer's lineage; the anchor, measured in the same
//! page and run, is `fetch` + `JSON.parse` of `GET /api/v1/catalog` for the same view.
//!
//! Ignored by `cargo test`; `scripts/bench/web.sh` runs it. The control planes run in this
//! process (the 10,000 layers are built as values: evaluating 10,000 `workflow.ncl` files
//! would take minutes, and loading is not what is measured).

mod browser;

use std::time::Duration;

use browser::Browser;
use lian_catalog::Catalog;
use lian_test_support::{NatsServer, workspace_root};

const TOKEN: &str = "bench-token";
const RUNS: usize = 15;

/// A control plane serving `catalog` on a free port, in this process; its URL.
fn serve(rt: &tokio::runtime::Runtime, nats_url: &str, catalog: Catalog) -> String {
    rt.block_on(async {
        let bus = lian_bus::Bus::connect(nats_url, "bench", Duration::from_secs(10))
            .await
            .unwrap();
        bus.ensure_topology(&lian_bus::Topology::default()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let options = lian_control::ControlOptions {
            name: "bench".into(),
            token: TOKEN.into(),
            providers: lian_runner::Providers {
                docker_local: None,
                ssh_pool: None,
                hcloud: None,
                proxmox: None,
                noop: None,
            },
            reap_every: Duration::from_secs(3600),
            catalog: Some(catalog),
        };
        tokio::spawn(lian_control::run(bus, options, listener, None, std::future::pending()));
        url
    })
}

fn stats(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    (ms[0], ms[ms.len() / 2], ms[ms.len() - 1])
}

/// One load of `url`: Navigation Timing's `loadEventEnd` in ms, after checking the page
/// drew `count` elements matching `css`.
fn load(browser: &Browser, url: &str, css: &str, count: usize) -> f64 {
    browser.goto(url);
    let ms =
        browser.script("const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;");
    assert_eq!(browser.attrs(css, "class").len(), count, "{url}: {css}");
    ms.as_f64().unwrap()
}

/// `RUNS` loads of `url` after one warm-up: min/median/max ms.
fn loads(browser: &Browser, url: &str, css: &str, count: usize) -> (f64, f64, f64) {
    load(browser, url, css, count);
    stats((0..RUNS).map(|_| load(browser, url, css, count)).collect())
}

/// Loads `path` `RUNS` times (after one warm-up) and fetches `api` as many times from
/// the loaded page: (page load, anchor) in ms, each min/median/max; checks the page drew
/// `nodes` layers.
fn measure(browser: &Browser, base: &str, path: &str, api: &str, nodes: usize) -> ((f64, f64, f64), (f64, f64, f64)) {
    let (mut page, mut anchor) = (Vec::new(), Vec::new());
    for run in 0..=RUNS {
        let ms = load(browser, &format!("{base}{path}"), "svg.dag g.node", nodes);
        let fetched = browser.script_with(
            "const t0 = performance.now();
             return fetch(arguments[0], {headers: {Authorization: 'Bearer bench-token'}})
               .then((r) => r.json())
               .then((j) => [performance.now() - t0, j.nodes.length]);",
            api,
        );
        assert_eq!(fetched[1].as_u64(), Some(nodes as u64), "{api}");
        if run > 0 {
            page.push(ms);
            anchor.push(fetched[0].as_f64().unwrap());
        }
    }
    (stats(page), stats(anchor))
}

/// `n` builds in workspace `bench`, each `started` then `completed` (every tenth `failed`),
/// appended to the events stream as workers append them.
fn record_builds(rt: &tokio::runtime::Runtime, nats_url: &str, n: usize) {
    rt.block_on(async {
        let bus = lian_bus::Bus::connect(nats_url, "bench-builds", Duration::from_secs(10))
            .await
            .unwrap();
        let at = "2026-01-01T00:00:00Z";
        for i in 0..n {
            let id = format!("bench-{i:04}");
            let envelope = |seq: u32, event: serde_json::Value| {
                let mut v = serde_json::json!({"build_id": id, "workspace": "bench", "seq": seq, "at": at, "worker": "bench"});
                v.as_object_mut().unwrap().extend(event.as_object().unwrap().clone());
                v
            };
            let started = envelope(1, serde_json::json!({"type": "started", "runner_type": "cax11"}));
            let end = if i % 10 == 0 {
                envelope(2, serde_json::json!({"type": "failed", "reason": "bench: failed on purpose"}))
            } else {
                envelope(2, serde_json::json!({"type": "completed", "image": "bench/x:1", "image_id": format!("sha256:{i:064}")}))
            };
            for (seq, value) in [(1, started), (2, end)] {
                let kind = value["type"].as_str().unwrap().to_string();
                bus.append(&format!("lian.bench.build.{id}.{kind}"), &format!("{id}.{seq}"), &value)
                    .await
                    .unwrap();
            }
        }
    });
}

#[test]
#[ignore = "a benchmark: scripts/bench/web.sh"]
fn page_load_of_the_catalog_view() {
    let nats = NatsServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let schemas = lian_nickel::Schemas::embedded().unwrap();
    let lamina = lian_cascade::load_catalog(&workspace_root().join("catalog"), &schemas).unwrap();
    let lamina_layers = lamina.layers().count();
    let small = serve(&rt, &nats.url, lamina);
    let big_catalog = lian_catalog::synthetic::synthetic(100, 100, false);
    let focus = "t050-n003";
    let lineage = big_catalog.lineage(focus).unwrap().len();
    let root = "t050-n000";
    let root_lineage = big_catalog.lineage(root).unwrap().len();
    let big = serve(&rt, &nats.url, big_catalog);

    let browser = Browser::start();
    browser.goto(&format!("{small}/login"));
    browser.log_in(TOKEN);
    browser.wait_for("svg.dag", Duration::from_secs(10));

    let rows = [
        (
            format!("{lamina_layers}-layer catalog/, whole DAG"),
            measure(&browser, &small, "/catalog", "/api/v1/catalog", lamina_layers),
            500.0,
        ),
        (
            format!("10,000-layer synthetic, lineage of {focus} ({lineage} layers)"),
            {
                let next = format!("/catalog?layer={focus}");
                browser.goto(&format!(
                    "{big}/login?next={}",
                    next.replace('?', "%3F").replace('=', "%3D")
                ));
                browser.log_in(TOKEN);
                browser.wait_for("svg.dag", Duration::from_secs(10));
                measure(
                    &browser,
                    &big,
                    &format!("/catalog?layer={focus}"),
                    &format!("/api/v1/catalog?layer={focus}"),
                    lineage,
                )
            },
            2000.0,
        ),
        (
            format!("10,000-layer synthetic, lineage of {root} ({root_lineage} layers)"),
            measure(
                &browser,
                &big,
                &format!("/catalog?layer={root}"),
                &format!("/api/v1/catalog?layer={root}"),
                root_lineage,
            ),
            2000.0,
        ),
    ];
    // 1,000 builds in the history: the builds list, paged by 50.
    const BUILDS: usize = 1_000;
    record_builds(&rt, &nats.url, BUILDS);
    browser.goto(&format!("{small}/builds"));
    browser.wait_for(&format!(r#"p.summary[data-total="{BUILDS}"]"#), Duration::from_secs(60));
    let builds = [
        ("builds list, 1,000 builds, page 1", "/builds", 50),
        ("builds list, 1,000 builds, page 20", "/builds?page=20", 50),
        (
            "builds list, 1,000 builds, failed only (100)",
            "/builds?state=failed",
            50,
        ),
    ]
    .map(|(what, path, rows)| {
        (
            what,
            loads(&browser, &format!("{small}{path}"), "table.builds tbody tr", rows),
        )
    });

    println!(
        "page load (Navigation Timing loadEventEnd) vs anchor (fetch + JSON.parse of /api/v1/catalog), {RUNS} runs, ms min/median/max"
    );
    for (what, ((pmin, pmed, pmax), (amin, amed, amax)), budget) in &rows {
        println!(
            "{what}: page {pmin:.1}/{pmed:.1}/{pmax:.1}, anchor {amin:.1}/{amed:.1}/{amax:.1}, page/anchor {:.2}x (median), budget {budget} ms",
            pmed / amed
        );
    }
    for (what, (min, median, max)) in &builds {
        println!("{what}: page {min:.1}/{median:.1}/{max:.1}, budget 2000 ms");
    }
    for (what, (_, median, _)) in &builds {
        assert!(*median < 2000.0, "{what}: median page load {median:.1} ms");
    }
    for (what, ((_, median, _), _), budget) in &rows {
        assert!(
            median < budget,
            "{what}: median page load {median:.1} ms over {budget} ms"
        );
    }
}
