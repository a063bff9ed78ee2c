//! `lian watch` and `lian status`, and the one-line rendering of events they share.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt;
use lian_bus::Bus;
use lian_catalog::cascade::CascadeEnvelope;
use lian_core::lifecycle::{self, Terminal};
use lian_core::{BuildEvent, BuildId, BuildRequest, Envelope, subjects};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::cli::{CancelArgs, DeadLettersArgs, Global, LeasesArgs, StatusArgs, WatchArgs};
use crate::config::Settings;
use crate::exit::{Coded, Exit};

fn clock(at: OffsetDateTime) -> String {
    at.format(format_description!("[hour]:[minute]:[second]"))
        .unwrap_or_default()
}

pub fn build_line(e: &Envelope) -> String {
    format!(
        "{} {} build {} #{} {}  [{}]",
        clock(e.at),
        e.workspace,
        e.build_id,
        e.seq,
        e.event.summary(),
        e.worker
    )
}

pub fn cascade_line(e: &CascadeEnvelope) -> String {
    format!(
        "{} {} cascade {} {}",
        clock(e.at),
        e.workspace,
        e.cascade_id,
        e.event.summary()
    )
}

/// One readable line for any message on `lian.>`.
pub fn line(subject: &str, payload: &[u8]) -> String {
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        ["lian", ws, "build", "request"] => match serde_json::from_slice::<BuildRequest>(payload) {
            Ok(r) => format!(
                "{} {ws} request {} {}{}",
                clock(OffsetDateTime::now_utc()),
                r.build_id.map(|b| b.to_string()).unwrap_or_else(|| "(no id)".into()),
                r.directives.artifact.image,
                r.layer.map(|l| format!(" layer {l}")).unwrap_or_default()
            ),
            Err(_) => format!(
                "{} {ws} request (unreadable: the worker will refuse it)",
                clock(OffsetDateTime::now_utc())
            ),
        },
        ["lian", _, "build", _, _] => match serde_json::from_slice::<Envelope>(payload) {
            Ok(e) => build_line(&e),
            Err(_) => format!("{subject} {}", String::from_utf8_lossy(payload)),
        },
        ["lian", ws, "progress", build] => match serde_json::from_slice::<lian_runner::progress::StepProgress>(payload)
        {
            Ok(p) => {
                let state = match &p.state {
                    lian_runner::progress::StepState::Started => "started".to_string(),
                    lian_runner::progress::StepState::Done => "done".to_string(),
                    lian_runner::progress::StepState::Cached => "cached".to_string(),
                    lian_runner::progress::StepState::Failed(e) => format!("failed: {e}"),
                };
                let name = p.name.map(|n| format!(" {n}")).unwrap_or_default();
                format!(
                    "{} {ws} step {build} {}{name} {state}",
                    clock(OffsetDateTime::now_utc()),
                    p.id
                )
            }
            Err(_) => format!("{subject} {}", String::from_utf8_lossy(payload)),
        },
        ["lian", _, "cascade", _, _] => match serde_json::from_slice::<CascadeEnvelope>(payload) {
            Ok(e) => cascade_line(&e),
            Err(_) => format!("{subject} {}", String::from_utf8_lossy(payload)),
        },
        _ => format!("{subject} {}", String::from_utf8_lossy(payload)),
    }
}

/// A message on `lian.>` as `lian watch` prints it: one readable line, or one JSON line
/// `{"subject", "payload"}` (the payload as JSON when it is, else as a string).
pub fn rendered(subject: &str, payload: &[u8], json: bool) -> String {
    if !json {
        return line(subject, payload);
    }
    let payload: serde_json::Value =
        serde_json::from_slice(payload).unwrap_or_else(|_| String::from_utf8_lossy(payload).into());
    serde_json::json!({"subject": subject, "payload": payload}).to_string()
}

pub async fn watch(global: Global, args: WatchArgs) -> anyhow::Result<ExitCode> {
    let bus = lian_bus::Bus::connect(&global.nats_url, "lian-watch", global.connect_timeout.into()).await?;
    let mut sub = bus.subscribe(&args.filter).await?;
    eprintln!("watching {} on {} (Ctrl-C to stop)", args.filter, global.nats_url);
    loop {
        tokio::select! {
            _ = crate::roles::shutdown_signal() => return Ok(Exit::Ok.code()),
            msg = sub.next() => {
                let Some(msg) = msg else { return Ok(Exit::Ok.code()) };
                println!("{}", rendered(msg.subject.as_str(), &msg.payload, global.json(args.json)));
            }
        }
    }
}

pub async fn status(global: Global, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let build_id = BuildId::new(args.build_id.as_str())?;
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-status", &settings).await?;
    if args.follow {
        return follow(&bus, &build_id, global.json(args.json)).await;
    }
    let history = bus.build_history(&build_id).await?;
    if history.is_empty() {
        return Err(no_build(&build_id));
    }
    let state = lifecycle::fold(&history);
    let (word, code) = match &state {
        Ok(s) => match &s.terminal {
            Some(Terminal::Completed { .. }) => ("completed".to_string(), Exit::Ok.code()),
            Some(Terminal::Failed { reason, .. }) => (format!("failed: {reason}"), Exit::Failed.code()),
            Some(Terminal::Superseded { by }) => (format!("superseded by {by}: not built"), Exit::Failed.code()),
            None => (
                format!(
                    "in progress after {}",
                    history.last().map(|e| e.event.kind()).unwrap_or("-")
                ),
                Exit::Ok.code(),
            ),
        },
        Err(e) => (format!("unreadable history: {e}"), Exit::Failed.code()),
    };
    if global.json(args.json) {
        println!(
            "{}",
            serde_json::json!({"build_id": build_id, "state": word, "history": history})
        );
    } else {
        for e in &history {
            println!("{}", build_line(e));
        }
        println!("state: {word}");
    }
    Ok(code)
}

/// Prints the build's events until it ends; 0 when it completed, 1 when it failed.
pub async fn follow(bus: &Bus, build_id: &BuildId, json: bool) -> anyhow::Result<ExitCode> {
    let mut events = Box::pin(bus.follow(&subjects::build_history(build_id)).await?);
    // On a terminal: a spinner under the event lines, saying which of the eight steps runs.
    let bar = (!json && crate::term::decorated(&std::io::stderr())).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_message(format!("build {build_id}: waiting for a worker"));
        bar
    });
    while let Some(record) = events.next().await {
        let record = record?;
        let envelope: Envelope = record.decode()?;
        if json {
            println!("{}", String::from_utf8_lossy(&record.payload));
        } else if let Some(bar) = &bar {
            bar.println(build_line(&envelope));
            if let Some(step) = envelope.event.step_number() {
                bar.set_message(format!("build {build_id}: step {step}/8, {}", envelope.event.kind()));
            }
        } else {
            eprintln!("{}", build_line(&envelope));
        }
        if envelope.event.is_terminal()
            && let Some(bar) = &bar
        {
            bar.finish_and_clear();
        }
        match &envelope.event {
            BuildEvent::Completed { image, .. } => {
                if !json {
                    println!("completed {image}");
                }
                return Ok(Exit::Ok.code());
            }
            BuildEvent::Failed { reason, .. } => {
                if !json {
                    println!("failed: {reason}");
                }
                return Ok(Exit::Failed.code());
            }
            BuildEvent::Superseded { by, .. } => {
                if !json {
                    println!("superseded by {by}: not built");
                }
                return Ok(Exit::Failed.code());
            }
            _ => {}
        }
    }
    bail!("the event stream ended before build {build_id} did")
}

fn no_build(build_id: &BuildId) -> anyhow::Error {
    Coded::error(
        Exit::Usage,
        format!("no build {build_id}: not submitted, or not yet taken by a worker"),
    )
}

pub async fn cancel(global: Global, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let build_id = BuildId::new(args.build_id.as_str())?;
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-cancel", &settings).await?;
    let history = bus.build_history(&build_id).await?;
    let Some(first) = history.first() else {
        return Err(no_build(&build_id));
    };
    if let Some(last) = history.last().filter(|e| e.event.is_terminal()) {
        eprintln!("build {build_id} already ended: {}", last.event.summary());
        return Ok(Exit::Failed.code());
    }
    let subject = subjects::cancel(&first.workspace, &build_id);
    let record = serde_json::json!({"build_id": build_id, "reason": args.reason});
    bus.append(&subject, &format!("cancel-{build_id}"), &record).await?;
    if global.json(false) {
        println!(
            "{}",
            serde_json::json!({"build_id": build_id, "cancel_requested": true, "reason": args.reason})
        );
        return Ok(Exit::Ok.code());
    }
    println!("cancel requested for {build_id}: it stops at its next step, destroys its runner and fails as cancelled");
    Ok(Exit::Ok.code())
}

pub async fn dead_letters(global: Global, args: DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-dead-letters", &settings).await?;
    let records = bus.dead_letters().await?;
    if global.json(args.json) {
        println!("{}", serde_json::Value::Array(records));
        return Ok(Exit::Ok.code());
    }
    if records.is_empty() {
        println!("no dead letters");
        return Ok(Exit::Ok.code());
    }
    let rows = records.iter().map(|r| {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        [
            s("at"),
            s("workspace"),
            s("build_id"),
            r["deliveries"].to_string(),
            s("reason"),
        ]
    });
    println!(
        "{}",
        crate::table::table(&["at", "workspace", "build", "deliveries", "reason"], rows)
    );
    Ok(Exit::Ok.code())
}

/// `lian nats status`: what the cluster holds of the topology (created as configured on
/// connect, so this also raises streams that have fewer copies than `nats_replicas`).
pub async fn nats(global: Global, args: crate::cli::NatsArgs) -> anyhow::Result<ExitCode> {
    let json = match args.command {
        crate::cli::NatsCommand::Status { json } => json,
        crate::cli::NatsCommand::Rebalance { json } => return nats_rebalance(global, json).await,
    };
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-nats-status", &settings).await?;
    let streams = bus.topology_status().await?;
    if global.json(json) {
        println!("{}", serde_json::to_string(&streams)?);
        return Ok(Exit::Ok.code());
    }
    println!("cluster of {} server(s)", bus.cluster_size());
    let rows = streams.iter().map(|s| {
        let followers: Vec<String> = s
            .followers
            .iter()
            .map(|f| match (f.offline, f.current) {
                (true, _) => format!("{} offline", f.server),
                (false, true) => format!("{} current", f.server),
                (false, false) => format!("{} {} behind", f.server, f.lag),
            })
            .collect();
        [
            s.stream.clone(),
            format!("R{}", s.replicas),
            if s.leader.is_empty() {
                "-".into()
            } else {
                s.leader.clone()
            },
            s.messages.to_string(),
            followers.join(", "),
        ]
    });
    println!(
        "{}",
        crate::table::table(&["stream", "copies", "leader", "messages", "followers"], rows)
    );
    Ok(Exit::Ok.code())
}

/// `lian nats rebalance`: spreads the leaders (`Bus::spread_leaders`), prints each move and
/// the leaders per node after; exit 1 if a move failed.
async fn nats_rebalance(global: Global, json: bool) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-nats-rebalance", &settings).await?;
    let moves = bus.spread_leaders().await?;
    let leaders = lian_bus::leaders_per_node(&bus.topology_status().await?);
    let failed = moves
        .iter()
        .any(|m| matches!(m.outcome, lian_bus::MoveOutcome::Failed(_)));
    let code = if failed { Exit::Failed } else { Exit::Ok };
    if global.json(json) {
        println!("{}", serde_json::json!({ "moves": moves, "leaders_per_node": leaders }));
        return Ok(code.code());
    }
    if bus.cluster_size() < 2 {
        println!("a lone server: nothing to spread");
    } else if moves.is_empty() {
        println!("no node leads more than its share: nothing to move");
    }
    for m in &moves {
        let what = match &m.outcome {
            lian_bus::MoveOutcome::Moved(now) => format!("moved, now led by {now}"),
            lian_bus::MoveOutcome::Skipped(why) => format!("skipped: {why}"),
            lian_bus::MoveOutcome::Failed(why) => format!("failed: {why}"),
            lian_bus::MoveOutcome::Planned => "planned".into(),
        };
        println!("{}: {} -> {}: {what}", m.stream, m.from, m.to);
    }
    let per_node: Vec<String> = leaders.iter().map(|(node, n)| format!("{node} {n}")).collect();
    println!("leaders per node: {}", per_node.join(", "));
    Ok(code.code())
}

pub async fn leases(global: Global, args: LeasesArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(global.config.as_deref())?;
    let Some(control) = settings.control()? else {
        bail!(
            "no control plane configured: set control_url and control_token (lian.toml or LIAN_CONTROL_URL / LIAN_CONTROL_TOKEN)"
        );
    };
    let leases = control.leases().await?;
    if global.json(args.json) {
        println!("{}", serde_json::to_string(&leases)?);
        return Ok(Exit::Ok.code());
    }
    if leases.is_empty() {
        println!("no leases");
        return Ok(Exit::Ok.code());
    }
    let rows = leases.iter().map(|v| {
        let l = &v.lease;
        [
            l.lease_id.to_string(),
            l.provider.as_str().into(),
            l.runner_type.as_str().into(),
            format!("{:?}", l.state).to_lowercase(),
            l.host.clone(),
            l.owner.clone(),
            l.build_id.to_string(),
            format!("{}s", v.age_secs),
        ]
    });
    let header = ["lease", "provider", "tier", "state", "host", "owner", "build", "age"];
    println!("{}", crate::table::table(&header, rows));
    Ok(Exit::Ok.code())
}
