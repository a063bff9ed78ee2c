//! `lian sizing approve | revoke | explain`.

use std::process::ExitCode;

use lian_core::Workspace;
use lian_core::sizing::{self, BuildSpec, SizingInputs};
use lian_nickel::Contract;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cli::{Global, SizingArgs, SizingCommand};
use crate::config::Settings;
use crate::exit::Exit;

pub async fn run(global: Global, args: SizingArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-sizing", &settings).await?;
    let json = global.json(false);
    match args.command {
        SizingCommand::Approve { workspace } => {
            let ws = Workspace::new(workspace)?;
            let by = std::env::var("USER").unwrap_or_else(|_| "an operator".into());
            let approval = serde_json::json!({
                "workspace": ws,
                "approved_by": by,
                "at": OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default(),
            });
            bus.set_sizing_approval(ws.as_str(), Some(&approval)).await?;
            if json {
                println!("{}", serde_json::json!({"approved": approval}));
                return Ok(Exit::Ok.code());
            }
            println!(
                "tier 2 approved for {ws}: its runners are sized from the P95 of its recent builds (x 1.2, floor 2 cpu / 4 GB) once it has {} builds with usage",
                sizing::MIN_HISTORY
            );
        }
        SizingCommand::Revoke { workspace } => {
            let ws = Workspace::new(workspace)?;
            bus.set_sizing_approval(ws.as_str(), None).await?;
            if json {
                println!("{}", serde_json::json!({"withdrawn": ws}));
                return Ok(Exit::Ok.code());
            }
            println!("tier 2 withdrawn for {ws}");
        }
        SizingCommand::Explain { directives, context } => {
            let d = crate::submit::evaluate(&directives).await?;
            let spec_path = context.join(".build-spec.ncl");
            let spec: Option<BuildSpec> = if spec_path.exists() {
                Some(crate::submit::eval_file(&spec_path, Contract::BuildSpec).await?)
            } else {
                None
            };
            let recorded = bus.sizing_history(d.workspace.as_str()).await?;
            let (history, approved) = (recorded.p95, recorded.approved);
            let inputs = SizingInputs {
                override_type: d.runner_override.as_ref().and_then(|o| o.runner_type),
                override_budget: d.runner_override.as_ref().and_then(|o| o.time_budget_min),
                spec: spec.as_ref(),
                history,
                history_approved: approved,
                learned: recorded.learned.clone(),
                language: d.artifact.language,
            };
            if json {
                let decision = sizing::resolve(&inputs);
                println!(
                    "{}",
                    serde_json::json!({
                        "workspace": d.workspace,
                        "runner_override": d.runner_override.as_ref().and_then(|o| o.runner_type).map(|t| t.as_str()),
                        "build_spec": spec.as_ref().map(|s| format!("{s:?}")),
                        "history_p95": history.map(|p| serde_json::json!({"cpu": p.cpu, "memory_gb": p.memory_gb})),
                        "history_approved": approved,
                        "oom_learned": recorded.learned,
                        "language": d.artifact.language.as_str(),
                        "decision": match &decision {
                            Ok(dec) => serde_json::json!({
                                "runner_type": dec.runner_type.as_str(),
                                "tier": dec.tier.as_str(),
                                "time_budget_min": dec.time_budget_min,
                                "reason": dec.reason,
                            }),
                            Err(e) => serde_json::json!({"error": e.to_string()}),
                        },
                    })
                );
                return Ok(if decision.is_ok() { Exit::Ok } else { Exit::Failed }.code());
            }
            println!(
                "tier 1  runner_override: {}",
                d.runner_override
                    .as_ref()
                    .and_then(|o| o.runner_type)
                    .map_or("-", |t| t.as_str())
            );
            println!(
                "        .build-spec.ncl: {}",
                spec.as_ref().map_or("none".to_string(), |s| format!("{s:?}"))
            );
            println!(
                "tier 2  history of {}: {}, {}",
                d.workspace,
                history.map_or(
                    format!("fewer than {} builds with usage", sizing::MIN_HISTORY),
                    |p| format!("P95 {:.2} cpu / {:.2} GB", p.cpu, p.memory_gb)
                ),
                if approved {
                    "approved"
                } else {
                    "not approved (lian sizing approve)"
                }
            );
            println!(
                "tier 3  learned from an OOM: {}",
                recorded
                    .learned
                    .as_ref()
                    .map_or("none in the recent builds".to_string(), |l| format!(
                        "build {} ran out of memory on {} and succeeded on {}",
                        l.build_id,
                        l.from.as_str(),
                        l.to.as_str()
                    ))
            );
            println!("        language default for {}", d.artifact.language.as_str());
            match sizing::resolve(&inputs) {
                Ok(decision) => println!(
                    "=> {} ({}), time budget {} min: {}",
                    decision.runner_type.as_str(),
                    decision.tier.as_str(),
                    decision.time_budget_min,
                    decision.reason
                ),
                Err(e) => {
                    println!("=> no size: {e}");
                    return Ok(Exit::Failed.code());
                }
            }
        }
    }
    Ok(Exit::Ok.code())
}
