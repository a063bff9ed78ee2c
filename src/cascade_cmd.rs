//! `lian cascade show <id>`: one cascade as the tree its events describe. Each layer hangs
//! under the layer whose build's end caused it (the event's `cause`), so the tree is the
//! cascade's causality, read from its history alone: no catalog is needed.

use std::collections::BTreeMap;
use std::process::ExitCode;

use lian_catalog::cascade::{CascadeEnvelope, CascadeEvent};
use lian_core::names::CascadeId;
use lian_core::{BuildEvent, BuildId, LayerName, subjects};
use serde::Serialize;
use time::OffsetDateTime;

use crate::cli::{CascadeCommand, Global};
use crate::config::Settings;
use crate::exit::{Coded, Exit};

pub async fn run(global: Global, command: CascadeCommand) -> anyhow::Result<ExitCode> {
    match command {
        CascadeCommand::Show { cascade_id } => show(global, &cascade_id).await,
        CascadeCommand::Approve { cascade_id, by } => approve(global, &cascade_id, by).await,
    }
}

/// Appends `approved` to a cascade held at the gate; the cascade service hears it and goes on.
async fn approve(global: Global, id: &str, by: String) -> anyhow::Result<ExitCode> {
    let id = CascadeId::new(id)?;
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-cascade-approve", &settings).await?;
    let filter = subjects::cascade_history(&id);
    let records = bus.read_all(&filter).await?;
    let history: Vec<CascadeEnvelope> = records.iter().map(|r| r.decode()).collect::<Result<_, _>>()?;
    let state = lian_catalog::cascade::fold(history.iter().map(|e| &e.event))?;
    let (Some(last), Some(record)) = (history.last(), records.last()) else {
        return Err(Coded::error(Exit::Usage, format!("no cascade {id}")));
    };
    if !state.awaiting_approval {
        let what = if state.finished {
            "it has ended"
        } else {
            "it is not held at the gate"
        };
        return Err(Coded::error(
            Exit::Usage,
            format!("cascade {id} is not waiting for approval: {what}"),
        ));
    }
    let envelope = CascadeEnvelope {
        cascade_id: id.clone(),
        workspace: last.workspace.clone(),
        seq: last.seq + 1,
        at: OffsetDateTime::now_utc(),
        cause: None,
        event: CascadeEvent::Approved { by: by.clone() },
    };
    // Against the history as read: if anything was appended meanwhile, nothing is written.
    let after = lian_bus::After {
        filter,
        sequence: record.sequence,
    };
    let subject = subjects::cascade_event(&last.workspace, &id, "approved");
    bus.append_after(&subject, &format!("{id}.{}", envelope.seq), &envelope, &after)
        .await?;
    if global.json(false) {
        println!("{}", serde_json::json!({"cascade_id": id, "approved_by": by}));
    } else {
        println!("cascade {id} approved by {by}: the cascade service goes on with it");
    }
    Ok(Exit::Ok.code())
}

/// One layer of the tree.
#[derive(Debug, Serialize)]
struct Node {
    layer: LayerName,
    /// requested, completed, unchanged, cut_off, failed, blocked.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    build_id: Option<BuildId>,
    /// The layer and build whose end led to this layer's step.
    #[serde(skip_serializing_if = "Option::is_none")]
    caused_by: Option<(LayerName, BuildId)>,
    /// Why it was cut off (parents that came out unchanged) or blocked (the failed parent).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    because: Vec<LayerName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The build this cascade asked for, when a newer one (`build_id`) superseded it.
    #[serde(skip_serializing_if = "Option::is_none")]
    superseded: Option<BuildId>,
    /// From the cascade asking for the build to the cascade hearing it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    wall_secs: Option<f64>,
    /// The build step itself (`image_built`'s duration).
    #[serde(skip_serializing_if = "Option::is_none")]
    build_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<String>,
    #[serde(skip)]
    requested_at: Option<OffsetDateTime>,
}

#[derive(Debug, Serialize)]
struct Shown {
    cascade_id: CascadeId,
    workspace: String,
    root: LayerName,
    root_build: BuildId,
    /// running, completed, failed.
    state: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    started_at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    wall_secs: Option<f64>,
    layers: Vec<Node>,
}

async fn show(global: Global, id: &str) -> anyhow::Result<ExitCode> {
    let id = CascadeId::new(id)?;
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-cascade-show", &settings).await?;
    let history: Vec<CascadeEnvelope> = bus
        .read_all(&subjects::cascade_history(&id))
        .await?
        .iter()
        .map(|r| r.decode())
        .collect::<Result<_, _>>()?;
    let Some(shown) = assemble(&id, &history) else {
        return Err(Coded::error(
            Exit::Usage,
            format!("no cascade {id}: `lian watch 'lian.*.cascade.>'` prints the ids of cascades as they start"),
        ));
    };
    let mut shown = shown;
    for node in &mut shown.layers {
        if let Some(build) = &node.build_id {
            let events = bus.build_history(build).await?;
            for e in events {
                match e.event {
                    BuildEvent::ImageBuilt { duration_ms, .. } => node.build_secs = Some(duration_ms as f64 / 1000.0),
                    BuildEvent::Completed { cache: Some(cache), .. } => {
                        node.cache = Some(cache.summary().trim_start_matches("; cache: ").to_string());
                    }
                    _ => {}
                }
            }
        }
    }
    let code = if matches!(shown.state, "failed" | "refused") {
        Exit::Failed.code()
    } else {
        Exit::Ok.code()
    };
    if global.json(false) {
        println!("{}", serde_json::to_string(&shown)?);
    } else {
        print!("{}", render(&shown));
    }
    Ok(code)
}

/// The cascade's state from its history; `None` when it has no `started`.
fn assemble(id: &CascadeId, history: &[CascadeEnvelope]) -> Option<Shown> {
    let first = history.first()?;
    let CascadeEvent::Started {
        root, root_build, plan, ..
    } = &first.event
    else {
        return None;
    };
    let mut nodes: BTreeMap<&LayerName, Node> = plan
        .iter()
        .map(|l| {
            let node = Node {
                layer: l.clone(),
                state: "waiting",
                build_id: None,
                caused_by: None,
                because: vec![],
                reason: None,
                superseded: None,
                wall_secs: None,
                build_secs: None,
                cache: None,
                requested_at: None,
            };
            (l, node)
        })
        .collect();
    let mut shown = Shown {
        cascade_id: id.clone(),
        workspace: first.workspace.to_string(),
        root: root.clone(),
        root_build: root_build.clone(),
        state: "running",
        started_at: first.at,
        wall_secs: None,
        layers: vec![],
    };
    let secs = |from: OffsetDateTime, to: OffsetDateTime| (to - from).as_seconds_f64();
    for e in &history[1..] {
        let cause = e.cause.as_ref().map(|c| (c.layer.clone(), c.build_id.clone()));
        let layer = match &e.event {
            CascadeEvent::Completed { .. } | CascadeEvent::Failed { .. } => {
                shown.state = if matches!(e.event, CascadeEvent::Completed { .. }) {
                    "completed"
                } else {
                    "failed"
                };
                shown.wall_secs = Some(secs(first.at, e.at));
                continue;
            }
            CascadeEvent::Started { .. } | CascadeEvent::Approved { .. } => {
                if shown.state == "awaiting_approval" {
                    shown.state = "running";
                }
                continue;
            }
            CascadeEvent::AwaitingApproval { .. } => {
                shown.state = "awaiting_approval";
                continue;
            }
            CascadeEvent::Refused { .. } => {
                shown.state = "refused";
                shown.wall_secs = Some(secs(first.at, e.at));
                continue;
            }
            CascadeEvent::LayerRequested { layer, .. }
            | CascadeEvent::LayerCompleted { layer, .. }
            | CascadeEvent::LayerFailed { layer, .. }
            | CascadeEvent::LayerSuperseded { layer, .. }
            | CascadeEvent::LayerBlocked { layer, .. }
            | CascadeEvent::LayerCutOff { layer, .. } => layer,
        };
        let Some(node) = nodes.get_mut(layer) else { continue };
        match &e.event {
            CascadeEvent::LayerRequested { build_id, .. } => {
                node.state = "requested";
                node.build_id = Some(build_id.clone());
                node.caused_by = cause;
                node.requested_at = Some(e.at);
            }
            CascadeEvent::LayerSuperseded { by, .. } => {
                node.state = "superseded";
                if node.superseded.is_none() {
                    node.superseded = node.build_id.replace(by.clone());
                } else {
                    node.build_id = Some(by.clone());
                }
            }
            CascadeEvent::LayerCompleted { unchanged, .. } => {
                node.state = if *unchanged { "unchanged" } else { "completed" };
                node.wall_secs = node.requested_at.map(|at| secs(at, e.at));
            }
            CascadeEvent::LayerFailed { reason, .. } => {
                node.state = "failed";
                node.reason = Some(reason.clone());
                node.wall_secs = node.requested_at.map(|at| secs(at, e.at));
            }
            CascadeEvent::LayerBlocked { because, .. } => {
                node.state = "blocked";
                node.because = vec![because.clone()];
                node.caused_by = cause;
            }
            CascadeEvent::LayerCutOff { because, .. } => {
                node.state = "cut_off";
                node.because = because.clone();
                node.caused_by = cause;
            }
            _ => {}
        }
    }
    shown.layers = plan.iter().filter_map(|l| nodes.remove(l)).collect();
    Some(shown)
}

/// The tree: the root, then each layer under the layer that caused it, in plan order.
fn render(shown: &Shown) -> String {
    let mut out = format!(
        "cascade {} in {}: {}{}\n",
        shown.cascade_id,
        shown.workspace,
        shown.state,
        shown
            .wall_secs
            .map(|s| format!(" after {}", human(s)))
            .unwrap_or_default()
    );
    out.push_str(&format!("{}  root build {}\n", shown.root, shown.root_build));
    let parent_of = |n: &Node| -> LayerName {
        n.caused_by
            .as_ref()
            .map(|(l, _)| l.clone())
            .or_else(|| n.because.first().cloned())
            .unwrap_or_else(|| shown.root.clone())
    };
    fn walk(shown: &Shown, parent: &LayerName, prefix: &str, out: &mut String, parent_of: &dyn Fn(&Node) -> LayerName) {
        let children: Vec<&Node> = shown.layers.iter().filter(|n| &parent_of(n) == parent).collect();
        for (i, node) in children.iter().enumerate() {
            let last = i + 1 == children.len();
            out.push_str(&format!(
                "{prefix}{} {}\n",
                if last { "└─" } else { "├─" },
                describe(node)
            ));
            let deeper = format!("{prefix}{}", if last { "   " } else { "│  " });
            walk(shown, &node.layer, &deeper, out, parent_of);
        }
    }
    walk(shown, &shown.root, "", &mut out, &parent_of);
    out
}

fn describe(n: &Node) -> String {
    let mut parts = vec![format!("{}  {}", n.layer, n.state.replace('_', " "))];
    if let Some(b) = &n.build_id {
        parts.push(format!("build {b}"));
    }
    if let Some(s) = n.wall_secs {
        parts.push(human(s));
    }
    if let Some(s) = n.build_secs {
        parts.push(format!("build step {}", human(s)));
    }
    if let Some(c) = &n.cache {
        parts.push(c.clone());
    }
    match n.state {
        "cut_off" => parts.push(format!(
            "[{}] came out unchanged",
            n.because.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ")
        )),
        "blocked" => parts.push(format!(
            "{} failed",
            n.because.first().map(|l| l.as_str()).unwrap_or("-")
        )),
        _ => {}
    }
    if let Some(r) = &n.reason {
        parts.push(r.clone());
    }
    if let Some(own) = &n.superseded {
        parts.push(format!("coalesced: {own} superseded by it"));
    }
    if let Some((l, b)) = &n.caused_by {
        parts.push(format!("after {l} ({b})"));
    }
    parts.join(" · ")
}

fn human(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use lian_catalog::cascade::Cause;
    use lian_core::Workspace;

    use super::*;

    fn name(s: &str) -> LayerName {
        LayerName::new(s).unwrap()
    }

    fn build(s: &str) -> BuildId {
        BuildId::new(s).unwrap()
    }

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn layers_hang_under_the_build_that_caused_them() {
        let id = CascadeId::new("c-1").unwrap();
        let cause = |l: &str, b: &str| {
            Some(Cause {
                layer: name(l),
                build_id: build(b),
            })
        };
        let env = |seq, secs, cause: Option<Cause>, event| CascadeEnvelope {
            cascade_id: id.clone(),
            workspace: Workspace::new("ws").unwrap(),
            seq,
            at: at(secs),
            cause,
            event,
        };
        let history = vec![
            env(
                1,
                0,
                cause("base", "b0"),
                CascadeEvent::Started {
                    root: name("base"),
                    root_build: build("b0"),
                    plan: vec![name("tools"), name("app"), name("docs")],
                    root_unchanged: false,
                },
            ),
            env(
                2,
                0,
                cause("base", "b0"),
                CascadeEvent::LayerRequested {
                    layer: name("tools"),
                    build_id: build("c-1-tools"),
                },
            ),
            env(
                3,
                0,
                cause("base", "b0"),
                CascadeEvent::LayerRequested {
                    layer: name("docs"),
                    build_id: build("c-1-docs"),
                },
            ),
            env(
                4,
                30,
                cause("tools", "c-1-tools"),
                CascadeEvent::LayerCompleted {
                    layer: name("tools"),
                    build_id: build("c-1-tools"),
                    unchanged: true,
                },
            ),
            env(
                5,
                30,
                cause("tools", "c-1-tools"),
                CascadeEvent::LayerCutOff {
                    layer: name("app"),
                    because: vec![name("tools")],
                },
            ),
            env(
                6,
                95,
                cause("docs", "c-1-docs"),
                CascadeEvent::LayerCompleted {
                    layer: name("docs"),
                    build_id: build("c-1-docs"),
                    unchanged: false,
                },
            ),
            env(
                7,
                95,
                cause("docs", "c-1-docs"),
                CascadeEvent::Completed {
                    built: vec![name("tools"), name("docs")],
                    cut_off: vec![name("app")],
                },
            ),
        ];
        let shown = assemble(&id, &history).unwrap();
        assert_eq!(shown.state, "completed");
        assert_eq!(shown.wall_secs, Some(95.0));
        let states: Vec<_> = shown.layers.iter().map(|n| (n.layer.as_str(), n.state)).collect();
        assert_eq!(
            states,
            [("tools", "unchanged"), ("app", "cut_off"), ("docs", "completed")]
        );
        let text = render(&shown);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("completed after 1m35s"), "{text}");
        assert!(
            lines[2].starts_with("├─ tools  unchanged · build c-1-tools · 30.0s"),
            "{text}"
        );
        assert!(
            lines[3].starts_with("│  └─ app  cut off · [tools] came out unchanged"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("└─ docs  completed · build c-1-docs · 1m35s"),
            "{text}"
        );
    }

    #[test]
    fn a_history_without_a_start_is_no_cascade() {
        assert!(assemble(&CascadeId::new("c-1").unwrap(), &[]).is_none());
    }
}
