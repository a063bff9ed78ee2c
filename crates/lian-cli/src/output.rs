//! `lian watch` and `lian status`, and the one-line rendering of events they share.

use std::process::ExitCode;

use futures::StreamExt;
use lian_catalog::cascade::CascadeEnvelope;
use lian_core::lifecycle::{self, Terminal};
use lian_core::{BuildId, BuildRequest, Envelope, subjects};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::cli::{Global, StatusArgs, WatchArgs};
use crate::config::Settings;

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
                r.build_id
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "(no id)".into()),
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
        ["lian", _, "cascade", _, _] => match serde_json::from_slice::<CascadeEnvelope>(payload) {
            Ok(e) => cascade_line(&e),
            Err(_) => format!("{subject} {}", String::from_utf8_lossy(payload)),
        },
        _ => format!("{subject} {}", String::from_utf8_lossy(payload)),
    }
}

pub async fn watch(global: Global, args: WatchArgs) -> anyhow::Result<ExitCode> {
    let bus = lian_bus::Bus::connect(
        &global.nats_url,
        "lian-watch",
        std::time::Duration::from_secs(10),
    )
    .await?;
    let mut sub = bus.subscribe(&args.filter).await?;
    eprintln!(
        "watching {} on {} (Ctrl-C to stop)",
        args.filter, global.nats_url
    );
    loop {
        tokio::select! {
            _ = crate::roles::shutdown_signal() => return Ok(ExitCode::SUCCESS),
            msg = sub.next() => {
                let Some(msg) = msg else { return Ok(ExitCode::SUCCESS) };
                if args.json {
                    let payload: serde_json::Value = serde_json::from_slice(&msg.payload)
                        .unwrap_or_else(|_| String::from_utf8_lossy(&msg.payload).into());
                    println!("{}", serde_json::json!({"subject": msg.subject.as_str(), "payload": payload}));
                } else {
                    println!("{}", line(msg.subject.as_str(), &msg.payload));
                }
            }
        }
    }
}

pub async fn status(global: Global, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let build_id = BuildId::new(args.build_id.as_str())?;
    let settings = Settings::load(&global.config)?;
    let bus = crate::roles::connect(&global, "lian-status", &settings).await?;
    let records = bus.read_all(&subjects::build_history(&build_id)).await?;
    if records.is_empty() {
        eprintln!("no build {build_id}: not submitted, or not yet taken by a worker");
        return Ok(ExitCode::from(4));
    }
    let mut history = Vec::with_capacity(records.len());
    for r in &records {
        history.push(r.decode::<Envelope>()?);
    }
    let state = lifecycle::fold(&history);
    let (word, code) = match &state {
        Ok(s) => match &s.terminal {
            Some(Terminal::Completed { .. }) => ("completed".to_string(), ExitCode::SUCCESS),
            Some(Terminal::Failed { reason, .. }) => {
                (format!("failed: {reason}"), ExitCode::FAILURE)
            }
            None => (
                format!(
                    "in progress after {}",
                    history.last().map(|e| e.event.kind()).unwrap_or("-")
                ),
                ExitCode::SUCCESS,
            ),
        },
        Err(e) => (format!("unreadable history: {e}"), ExitCode::FAILURE),
    };
    if args.json {
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
