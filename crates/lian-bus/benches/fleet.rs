//! The fleet benchmarks of issue 11 (P1, P2, P7, and P1/P2 on a 3-node R3 cluster), each
//! against an anchor measured in the same run on the same nats-server, so the machine's
//! noise cancels out of the ratio. Workers are real `lian worker` processes (the release
//! binary: `LIAN_BIN`, or `<target>/release/lian`) serving the benchmark-only `noop`
//! provider, so what is timed is the fleet and not an engine.
//!
//! `scripts/bench/fleet.sh` builds the binary and runs this (`cargo bench -p lian-bus --bench
//! fleet -- [--builds N] [--in-flight N] [--workers N] [--slots N] [--only single|cluster]`); it prints
//! Markdown tables, recorded in BENCHMARKS.md.
//!
//! - P1: a request published -> its `started` event seen on `lian.<ws>.build.<id>.started`,
//!   one build at a time, against a raw JetStream publish of 128 B with its ack awaited.
//! - P2: events appended per second with 500 builds in flight: (a) the driver's append path
//!   alone (`Bus::append_after` with the expected subject sequence, a noop build's real
//!   history replayed by 500 concurrent builds), (b) the whole fleet (500 requests to
//!   `--workers` worker processes, every event counted as it reaches `lian.>`); against raw
//!   pipelined publishes of 128 B with as many acks outstanding.
//! - P7: a worker's VmRSS / VmHWM idle and through 100 builds in flight, against a bare
//!   tokio + async-nats process connected to the same server.
//!
//! Waits are on events, each bounded; nothing sleeps to synchronise.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use lian_bus::{After, Bus, Topology};
use lian_core::directives::{Actor, Artifact, CachePolicy, ComputeProvider, RegistryProvider};
use lian_core::sizing::Language;
use lian_core::{BuildDirectives, BuildId, BuildRequest, ContextRef, ImageRef, Workspace, subjects};
use lian_test_support::{NatsCluster, NatsServer};

const WS: &str = "bench";
/// The payload of the raw anchors, as issue 11 states it.
const RAW_BYTES: usize = 128;
/// Bound on any one wait for an event: far above any latency measured here.
const PATIENCE: Duration = Duration::from_secs(60);

struct Args {
    builds: usize,
    in_flight: usize,
    workers: usize,
    builds_per_slot: usize,
    rss_in_flight: usize,
    /// Each worker's `builds_in_flight`.
    slots: usize,
    single: bool,
    cluster: bool,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let value = |name: &str, default: usize| -> usize {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
            .unwrap_or(default)
    };
    let only = argv
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| argv.get(i + 1).cloned());
    Args {
        builds: value("--builds", 200),
        in_flight: value("--in-flight", 500),
        workers: value("--workers", 4),
        builds_per_slot: value("--builds-per-slot", 4),
        rss_in_flight: value("--rss-in-flight", 100),
        slots: value("--slots", 100),
        single: only.as_deref() != Some("cluster"),
        cluster: only.as_deref() != Some("single"),
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--bare-client") {
        bare_client(&argv[i + 1]);
        return;
    }
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let lian = lian_bin();
    println!("lian binary: {} (nats-server: {})\n", lian.display(), nats_version());
    if args.single {
        let nats = NatsServer::start();
        println!("## One nats-server (file store, sync_interval: always)\n");
        runtime.block_on(measure(&lian, &nats.url, 1, &args, true));
    }
    if args.cluster {
        let cluster = NatsCluster::start(3);
        println!("## Three-node cluster on loopback, R3 (file store, sync_interval: always)\n");
        runtime.block_on(measure(&lian, &cluster.seeds(), 3, &args, false));
    }
}

fn lian_bin() -> PathBuf {
    let bin = std::env::var_os("LIAN_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| lian_test_support::workspace_root().join("target"));
        target.join("release").join("lian")
    });
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p lian --release`) or set LIAN_BIN",
        bin.display()
    );
    bin
}

fn nats_version() -> String {
    let bin = std::env::var("LIAN_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

async fn measure(lian: &std::path::Path, url: &str, replicas: usize, args: &Args, rss: bool) {
    let bus = Bus::connect(url, "bench", Duration::from_secs(30))
        .await
        .expect("connect");
    // As the fleet creates it (replicas from the cluster: R3 here), before any worker does.
    bus.ensure_topology(&Topology::default()).await.expect("topology");
    let js = raw_context(url).await;
    raw_stream(&js, replicas).await;

    // P1 and its anchor.
    let raw_ack = raw_acked(&js, args.builds.max(1000)).await;
    let ws = Workspace::new(WS).expect("a workspace");
    let context = upload_context(&bus, &ws).await;
    let fleet = Fleet::start(lian, url, 1, args.slots);
    let idle_at_start = rss.then(|| Memory::of(fleet.pids()[0]));
    let p1 = p1(&bus, &ws, &context, args.builds).await;
    println!("### P1: request published -> `started` seen (one worker, noop provider, one build at a time)\n");
    println!("| what | builds | p50 | p90 | p99 | max |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    row("raw JetStream publish, 128 B, ack awaited (anchor)", &raw_ack);
    row("**request published -> started seen**", &p1.started);
    row("  of which: publish acked", &p1.acked);
    row(
        "  of which: acked -> accepted seen (pull, intake, Nickel check, history read, append)",
        &p1.accepted,
    );
    row(
        "  of which: accepted -> sized seen (fence, cancel check, build spec, sizing KV, append)",
        &p1.sized,
    );
    row("  of which: sized -> started seen (append)", &p1.started_after_sized);
    row(
        "request published -> completed seen (the whole noop build)",
        &p1.completed,
    );
    println!();
    let ratio = |a: &Histogram<u64>, b: &Histogram<u64>, q: f64| {
        a.value_at_quantile(q) as f64 / b.value_at_quantile(q).max(1) as f64
    };
    println!(
        "P1 / raw: p50 {:.1}x, p99 **{:.1}x** (target: p99 within 5x: {})\n",
        ratio(&p1.started, &raw_ack, 0.5),
        ratio(&p1.started, &raw_ack, 0.99),
        if ratio(&p1.started, &raw_ack, 0.99) <= 5.0 {
            "met"
        } else {
            "**not met**"
        }
    );

    // P7 on the same worker: after P1's builds, then through builds in flight.
    if let Some(idle_at_start) = idle_at_start {
        let pid = fleet.pids()[0];
        let idle_after = Memory::of(pid);
        let peak = in_flight_rss(&bus, &ws, &context, pid, args.rss_in_flight).await;
        let bare = bare_rss(url);
        println!("### P7: worker memory (kB, from /proc/<pid>/status)\n");
        println!("| process | state | VmRSS | VmHWM |");
        println!("| --- | --- | ---: | ---: |");
        println!(
            "| bare tokio + async-nats client (anchor) | connected, a JetStream pull waiting | {} | {} |",
            bare.rss, bare.hwm
        );
        println!(
            "| lian worker | idle, just started | {} | {} |",
            idle_at_start.rss, idle_at_start.hwm
        );
        println!(
            "| lian worker | idle, after {} builds | {} | {} |",
            args.builds + WARMUP,
            idle_after.rss,
            idle_after.hwm
        );
        println!(
            "| lian worker | {} builds published at once ({} in flight at most) | {} (max sampled) | {} |",
            args.rss_in_flight,
            args.rss_in_flight.min(args.slots),
            peak.rss,
            peak.hwm
        );
        println!(
            "\nTargets: idle <= 20 MB ({}), {} in flight <= 80 MB ({})\n",
            verdict(idle_after.rss <= 20 * 1024),
            args.rss_in_flight,
            verdict(peak.hwm <= 80 * 1024)
        );
    }
    drop(fleet);

    // P2: the append path alone, then the fleet, against raw pipelined publishes.
    let template = history_of(&bus, &p1.last).await;
    let total = args.in_flight * args.builds_per_slot * template.len();
    // The anchor before and after: this disk's fsync budget drifts within a run.
    let raw_before = raw_pipelined(&js, total, args.in_flight).await;
    let mean_payload = template.iter().map(|(_, v)| v.to_string().len()).sum::<usize>() / template.len();
    let per_chain = args.builds_per_slot * template.len();
    let mut chained = Vec::new();
    for headers in [ChainHeaders::None, ChainHeaders::MsgId, ChainHeaders::MsgIdAndExpected] {
        chained.push(raw_chains(&js, args.in_flight, per_chain, mean_payload, headers).await);
    }
    let appends = append_path(&bus, &ws, &template, args.in_flight, args.builds_per_slot).await;
    let raw_after = raw_pipelined(&js, total, args.in_flight).await;
    let (raw_before_rate, raw_after_rate) = (raw_before.rate(), raw_after.rate());
    let raw = if raw_before_rate >= raw_after_rate {
        raw_before
    } else {
        raw_after
    };
    let fleet = Fleet::start(lian, url, args.workers, args.slots);
    let whole = fleet_rate(&bus, &ws, &context, args.in_flight).await;
    drop(fleet);
    println!(
        "### P2: events appended per second, {} builds in flight\n",
        args.in_flight
    );
    println!("| what | messages | wall | per second | vs raw |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| raw JetStream publish, 128 B, {} acks outstanding (anchor: the faster of a run before and one after, {:.0} and {:.0}/s) | {} | {:.2} s | {:.0} | 1.00 |",
        args.in_flight,
        raw_before_rate,
        raw_after_rate,
        raw.count,
        raw.wall.as_secs_f64(),
        raw.rate()
    );
    for (rate, what) in chained.iter().zip([
        "no headers",
        "with a `Nats-Msg-Id`",
        "with a `Nats-Msg-Id` and `Nats-Expected-Last-Subject-Sequence`",
    ]) {
        println!(
            "| raw chains: {} subjects, each publish waiting for the last one's ack, {} B, {what} | {} | {:.2} s | {:.0} | {:.2} |",
            args.in_flight,
            mean_payload,
            rate.count,
            rate.wall.as_secs_f64(),
            rate.rate(),
            rate.rate() / raw.rate()
        );
    }
    println!(
        "| **append path**: `Bus::append_after`, {} builds x {} each, a noop build's {} events (mean {} B) | {} | {:.2} s | {:.0} | **{:.2}** |",
        args.in_flight,
        args.builds_per_slot,
        template.len(),
        mean_payload,
        appends.count,
        appends.wall.as_secs_f64(),
        appends.rate(),
        appends.rate() / raw.rate()
    );
    println!(
        "| whole fleet: {} requests at once, {} worker processes of {} builds in flight each | {} | {:.2} s | {:.0} | {:.2} |",
        args.in_flight,
        args.workers,
        args.slots,
        whole.count,
        whole.wall.as_secs_f64(),
        whole.rate(),
        whole.rate() / raw.rate()
    );
    println!(
        "\nTarget: append path >= 50% of raw: {}\n",
        verdict(appends.rate() / raw.rate() >= 0.5)
    );
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}

fn row(what: &str, h: &Histogram<u64>) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| {what} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        h.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
}

fn histogram() -> Histogram<u64> {
    // Microseconds, up to a minute, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, 60_000_000) as u64
}

// ---- raw anchors ----

async fn raw_context(url: &str) -> jetstream::Context {
    let seeds = lian_bus::seed_urls(url);
    let client = async_nats::ConnectOptions::new()
        .connect(seeds.as_slice())
        .await
        .expect("raw connect");
    jetstream::new(client)
}

async fn raw_stream(js: &jetstream::Context, replicas: usize) {
    js.get_or_create_stream(jetstream::stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw.>".into()],
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .expect("the anchor's stream");
}

async fn raw_acked(js: &jetstream::Context, n: usize) -> Histogram<u64> {
    let payload = bytes::Bytes::from(vec![b'x'; RAW_BYTES]);
    let mut h = histogram();
    for i in 0..n + WARMUP {
        let start = Instant::now();
        js.publish(format!("bench.raw.ack.{}", i % 64), payload.clone())
            .await
            .expect("publish")
            .await
            .expect("ack");
        if i >= WARMUP {
            h.record(micros(start.elapsed())).expect("in range");
        }
    }
    h
}

struct Rate {
    count: u64,
    wall: Duration,
}

impl Rate {
    fn rate(&self) -> f64 {
        self.count as f64 / self.wall.as_secs_f64()
    }
}

async fn raw_pipelined(js: &jetstream::Context, total: usize, window: usize) -> Rate {
    let payload = bytes::Bytes::from(vec![b'y'; RAW_BYTES]);
    let start = Instant::now();
    let mut acks = FuturesUnordered::new();
    for i in 0..total {
        if acks.len() >= window {
            let acked: Result<jetstream::publish::PublishAck, _> = acks.next().await.expect("an ack");
            acked.expect("acked");
        }
        let ack = js
            .publish(format!("bench.raw.pipe.{}", i % 500), payload.clone())
            .await
            .expect("publish");
        acks.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = acks.next().await {
        ack.expect("acked");
    }
    Rate {
        count: total as u64,
        wall: start.elapsed(),
    }
}

/// What each publish of a chain carries besides its payload (P2's breakdown).
#[derive(Clone, Copy)]
enum ChainHeaders {
    None,
    MsgId,
    MsgIdAndExpected,
}

/// `chains` chains of `per_chain` publishes of `bytes` B, each publish of a chain waiting for
/// the previous one's ack (as a build's appends do), on a subject of its own; with the
/// headers an append carries, to tell their cost from the chaining's.
async fn raw_chains(
    js: &jetstream::Context,
    chains: usize,
    per_chain: usize,
    bytes: usize,
    headers: ChainHeaders,
) -> Rate {
    let variant = headers as u8;
    let payload = bytes::Bytes::from(vec![b'z'; bytes]);
    let start = Instant::now();
    let tasks: Vec<_> = (0..chains)
        .map(|chain| {
            let (js, payload) = (js.clone(), payload.clone());
            tokio::spawn(async move {
                let subject = format!("bench.raw.chain{variant}.{chain}");
                let mut last = 0;
                for i in 0..per_chain {
                    let mut h = async_nats::HeaderMap::new();
                    if !matches!(headers, ChainHeaders::None) {
                        h.insert("Nats-Msg-Id", format!("c{variant}-{chain}-{i}").as_str());
                    }
                    if matches!(headers, ChainHeaders::MsgIdAndExpected) {
                        h.insert("Nats-Expected-Last-Subject-Sequence", last.to_string().as_str());
                    }
                    let ack = js
                        .publish_with_headers(subject.clone(), h, payload.clone())
                        .await
                        .expect("publish")
                        .await
                        .expect("acked");
                    last = ack.sequence;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a chain");
    }
    Rate {
        count: (chains * per_chain) as u64,
        wall: start.elapsed(),
    }
}

// ---- lian ----

/// Builds before the measured ones (connections, caches, the page cache of the binary).
const WARMUP: usize = 10;

fn directives(ws: &Workspace) -> BuildDirectives {
    BuildDirectives {
        workspace: ws.clone(),
        artifact: Artifact {
            image: ImageRef::new("bench/noop:latest").expect("an image"),
            dockerfile: "Dockerfile".into(),
            target: None,
            build_args: Default::default(),
            language: Language::Rust,
            secrets: vec![],
        },
        compute_provider: ComputeProvider::Noop,
        registry_provider: RegistryProvider::Zot,
        cache_policy: CachePolicy {
            actor: Actor::Ci,
            actor_id: None,
            disposition: None,
            cache_from: vec![format!("ci/{ws}")],
            cache_to: vec![format!("ci/{ws}")],
        },
        runner_override: None,
        nats_events: None,
    }
}

fn request(ws: &Workspace, context: &ContextRef, id: &BuildId) -> BuildRequest {
    BuildRequest {
        build_id: Some(id.clone()),
        directives: directives(ws),
        context: context.clone(),
        layer: None,
        cascade: None,
        parents: Default::default(),
    }
}

/// A one-file context (what a noop build stages), stored once and named by every request.
async fn upload_context(bus: &Bus, ws: &Workspace) -> ContextRef {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").expect("write");
    let (context, _) = bus
        .upload_context(
            dir.path(),
            &["Dockerfile"],
            ws.as_str(),
            &lian_bus::ContextLimits::default(),
            &mut |_| {},
        )
        .await
        .expect("upload");
    context
}

/// Worker processes, killed on drop.
struct Fleet {
    children: Vec<Child>,
    _state: tempfile::TempDir,
}

impl Fleet {
    /// Starts `n` workers of `slots` builds in flight each, and returns once each said it
    /// serves requests (bounded).
    fn start(lian: &std::path::Path, url: &str, n: usize, slots: usize) -> Self {
        let state = tempfile::tempdir().expect("temp dir");
        let (tx, rx) = std::sync::mpsc::channel();
        let children = (0..n)
            .map(|i| {
                let mut child = Command::new(lian)
                    .args([
                        "--nats-url",
                        url,
                        "worker",
                        "--name",
                        &format!("bench-w{i}"),
                        "--state-dir",
                    ])
                    .arg(state.path())
                    .env("LIAN_ENABLE_NOOP_PROVIDER", "1")
                    .env("LIAN_BUILDS_IN_FLIGHT", slots.to_string())
                    .env("NO_COLOR", "1")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start a worker");
                let log = child.stderr.take().expect("piped");
                let tx = tx.clone();
                // Drained for the worker's life: a full pipe would stall its logging.
                std::thread::spawn(move || {
                    let mut told = false;
                    for line in BufReader::new(log).lines().map_while(Result::ok) {
                        if !told && line.contains("serving build requests") {
                            told = tx.send(()).is_ok();
                        }
                    }
                });
                child
            })
            .collect();
        for _ in 0..n {
            rx.recv_timeout(PATIENCE)
                .expect("a worker did not start serving in time");
        }
        Self {
            children,
            _state: state,
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct P1 {
    acked: Histogram<u64>,
    accepted: Histogram<u64>,
    sized: Histogram<u64>,
    started_after_sized: Histogram<u64>,
    started: Histogram<u64>,
    completed: Histogram<u64>,
    last: BuildId,
}

/// The build id and kind of an event subject `lian.<ws>.build.<id>.<kind>`.
fn id_and_kind(subject: &str) -> Option<(&str, &str)> {
    let mut tokens = subject.split('.');
    let (_, _, _, id, kind) = (
        tokens.next()?,
        tokens.next()?,
        tokens.next()?,
        tokens.next()?,
        tokens.next()?,
    );
    Some((id, kind))
}

async fn next_event(events: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("an event within the bound")
        .expect("the subscription lives")
}

async fn p1(bus: &Bus, ws: &Workspace, context: &ContextRef, builds: usize) -> P1 {
    let mut events = bus.subscribe(&format!("lian.{ws}.build.*.*")).await.expect("subscribe");
    let mut p = P1 {
        acked: histogram(),
        accepted: histogram(),
        sized: histogram(),
        started_after_sized: histogram(),
        started: histogram(),
        completed: histogram(),
        last: BuildId::new("none").expect("an id"),
    };
    for i in 0..builds + WARMUP {
        let id = BuildId::new(format!("p1-{i:05}")).expect("an id");
        let start = Instant::now();
        bus.submit(&request(ws, context, &id), &id).await.expect("submit");
        let acked = start.elapsed();
        let (mut accepted, mut sized, mut started) = (None, None, None);
        let completed = loop {
            let event = next_event(&mut events).await;
            let Some((of, kind)) = id_and_kind(&event.subject) else {
                continue;
            };
            if of != id.as_str() {
                continue;
            }
            let at = start.elapsed();
            match kind {
                "accepted" => accepted = Some(at),
                "sized" => sized = Some(at),
                "started" => started = Some(at),
                "completed" => break at,
                "failed" => panic!("{id} failed: {}", String::from_utf8_lossy(&event.payload)),
                _ => {}
            }
        };
        let (Some(accepted), Some(sized), Some(started)) = (accepted, sized, started) else {
            panic!("{id} completed without accepted, sized and started seen");
        };
        if i < WARMUP {
            continue;
        }
        let record = |h: &mut Histogram<u64>, d: Duration| h.record(micros(d)).expect("in range");
        record(&mut p.acked, acked);
        record(&mut p.accepted, accepted - acked);
        record(&mut p.sized, sized - accepted);
        record(&mut p.started_after_sized, started - sized);
        record(&mut p.started, started);
        record(&mut p.completed, completed);
        p.last = id;
    }
    p
}

#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    hwm: u64,
}

impl Memory {
    /// VmRSS and VmHWM (kB) of a live process.
    fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("a live process");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
        };
        Self {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
        }
    }
}

/// Publishes `n` requests at once and samples the worker's memory until all have ended:
/// the largest VmRSS sampled, and VmHWM at the end.
async fn in_flight_rss(bus: &Bus, ws: &Workspace, context: &ContextRef, pid: u32, n: usize) -> Memory {
    let mut events = bus.subscribe(&format!("lian.{ws}.build.*.*")).await.expect("subscribe");
    let ids: Vec<BuildId> = (0..n)
        .map(|i| BuildId::new(format!("p7-{i:05}")).expect("an id"))
        .collect();
    let mut submits = submit_all(bus, ws, context, &ids);
    let mut ended = 0;
    let mut peak = Memory::of(pid);
    let mut sample = tokio::time::interval(Duration::from_millis(5));
    while ended < n {
        tokio::select! {
            Some(done) = submits.next() => { done.expect("submit"); }
            event = next_event(&mut events) => {
                if let Some((_, kind)) = id_and_kind(&event.subject) {
                    match kind {
                        "completed" => ended += 1,
                        "failed" => panic!("a build failed: {}", String::from_utf8_lossy(&event.payload)),
                        _ => {}
                    }
                }
            }
            _ = sample.tick() => {
                peak.rss = peak.rss.max(Memory::of(pid).rss);
            }
        }
    }
    peak.hwm = Memory::of(pid).hwm;
    peak
}

/// The anchor of P7: this binary again, as a bare tokio + async-nats client.
fn bare_rss(url: &str) -> Memory {
    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .args(["--bare-client", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the bare client");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut ready)
        .expect("its ready line");
    assert_eq!(ready.trim(), "ready", "the bare client did not start");
    let memory = Memory::of(child.id());
    let _ = child.kill();
    let _ = child.wait();
    memory
}

/// A process that holds what any worker must: a runtime, a connection, JetStream and a
/// pull that waits for a message; prints `ready` and waits to be killed.
fn bare_client(url: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let js = raw_context(url).await;
        let stream = js.get_stream("BENCH_RAW").await.expect("the anchor's stream");
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                "bare",
                jetstream::consumer::pull::Config {
                    durable_name: Some("bare".into()),
                    filter_subject: "bench.raw.none".into(),
                    ..Default::default()
                },
            )
            .await
            .expect("a consumer");
        let mut messages = consumer.messages().await.expect("a pull");
        println!("ready");
        let _ = messages.next().await;
    });
}

/// A build's history as (kind, payload): what the append benchmark replays.
async fn history_of(bus: &Bus, id: &BuildId) -> Vec<(String, serde_json::Value)> {
    bus.read_all(&subjects::build_history(id))
        .await
        .expect("a history")
        .into_iter()
        .map(|r| {
            let (_, kind) = id_and_kind(&r.subject).expect("an event subject");
            (kind.to_string(), r.decode().expect("json"))
        })
        .collect()
}

/// The driver's append path: `slots` builds in flight, each appending a noop build's
/// history one event at a time against the sequence of its previous event.
async fn append_path(
    bus: &Bus,
    ws: &Workspace,
    template: &[(String, serde_json::Value)],
    slots: usize,
    builds_per_slot: usize,
) -> Rate {
    let count = Arc::new(AtomicU64::new(0));
    let template = Arc::new(template.to_vec());
    let start = Instant::now();
    let tasks: Vec<_> = (0..slots)
        .map(|slot| {
            let (bus, ws, template, count) = (bus.clone(), ws.clone(), template.clone(), count.clone());
            tokio::spawn(async move {
                for b in 0..builds_per_slot {
                    let id = BuildId::new(format!("p2-{slot:04}-{b:03}")).expect("an id");
                    let mut last = 0;
                    for (seq, (kind, payload)) in template.iter().enumerate() {
                        let mut payload = payload.clone();
                        payload["build_id"] = id.as_str().into();
                        let after = After {
                            filter: subjects::build_history(&id),
                            sequence: last,
                        };
                        let appended = bus
                            .append_after(
                                &subjects::build_event(&ws, &id, kind),
                                &format!("{id}.{}", seq + 1),
                                &payload,
                                &after,
                            )
                            .await
                            .expect("append");
                        assert!(!appended.duplicate, "{id}: a duplicate append");
                        last = appended.stream_sequence;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("an appending task");
    }
    Rate {
        count: count.load(Ordering::Relaxed),
        wall: start.elapsed(),
    }
}

/// The whole fleet: `n` requests published at once; every event counted as it reaches
/// `lian.>`, from the first publish to the last build's end.
async fn fleet_rate(bus: &Bus, ws: &Workspace, context: &ContextRef, n: usize) -> Rate {
    let mut events = bus.subscribe(&format!("lian.{ws}.build.*.*")).await.expect("subscribe");
    let ids: Vec<BuildId> = (0..n)
        .map(|i| BuildId::new(format!("p2f-{i:05}")).expect("an id"))
        .collect();
    let start = Instant::now();
    let mut submits = submit_all(bus, ws, context, &ids);
    let (mut ended, mut count) = (0, 0u64);
    while ended < n {
        tokio::select! {
            Some(done) = submits.next() => { done.expect("submit"); }
            event = next_event(&mut events) => {
                count += 1;
                match id_and_kind(&event.subject).map(|(_, k)| k) {
                    Some("completed") => ended += 1,
                    Some("failed") => panic!("a build failed: {}", String::from_utf8_lossy(&event.payload)),
                    _ => {}
                }
            }
        }
    }
    Rate {
        count,
        wall: start.elapsed(),
    }
}

/// Every request published at once (each publish still awaits its ack).
fn submit_all<'a>(
    bus: &'a Bus,
    ws: &'a Workspace,
    context: &'a ContextRef,
    ids: &'a [BuildId],
) -> FuturesUnordered<impl std::future::Future<Output = Result<lian_bus::Appended, lian_bus::BusError>> + 'a> {
    ids.iter()
        .map(|id| {
            let request = request(ws, context, id);
            async move { bus.submit(&request, id).await }
        })
        .collect()
}
