//! `lian config show`: the settings in force and where each came from, secrets redacted.

use std::process::ExitCode;

use clap::parser::ValueSource;

use crate::cli::Global;
use crate::config::{Settings, Shown};
use crate::exit::Exit;

pub fn show(global: &Global) -> anyhow::Result<ExitCode> {
    let loaded = Settings::load_from(global.config.as_deref(), &|name| std::env::var(name).ok())?;
    let mut shown = global_flags(global, loaded.file.as_deref());
    shown.extend(loaded.shown());
    if global.json(false) {
        let settings: serde_json::Map<String, serde_json::Value> = shown
            .into_iter()
            .map(|s| (s.key, serde_json::json!({"value": s.value, "source": s.source})))
            .collect();
        let file = loaded.file.map(|f| f.display().to_string());
        println!("{}", serde_json::json!({"file": file, "settings": settings}));
    } else {
        let rows = shown.into_iter().map(|s| {
            let value = match s.value {
                serde_json::Value::String(text) => text,
                serde_json::Value::Null => "none".into(),
                other => other.to_string(),
            };
            [s.key, value, s.source]
        });
        println!("{}", crate::table::table(&["setting", "value", "source"], rows));
    }
    Ok(Exit::Ok.code())
}

/// The global options every command takes, with where clap found each.
fn global_flags(global: &Global, file: Option<&std::path::Path>) -> Vec<Shown> {
    // Parsed again for the sources: `Cli::parse` keeps only the values.
    let matches = crate::help::command().get_matches();
    let source = |id: &str, flag: &str, env: &str| match matches.value_source(id) {
        Some(ValueSource::CommandLine) => format!("flag --{flag}"),
        Some(ValueSource::EnvVariable) => format!("env {env}"),
        _ => "default".to_string(),
    };
    let shown = |key: &str, value: serde_json::Value, env: &str| Shown {
        key: key.to_string(),
        value,
        source: source(key, &key.replace('_', "-"), env),
    };
    vec![
        shown("config", file.map(|p| p.display().to_string()).into(), "LIAN_CONFIG"),
        shown("nats_url", global.nats_url.clone().into(), "LIAN_NATS_URL"),
        shown(
            "connect_timeout",
            global.connect_timeout.to_string().into(),
            "LIAN_CONNECT_TIMEOUT",
        ),
        shown(
            "log_format",
            if global.log_format == crate::cli::LogFormat::Json {
                "json"
            } else {
                "text"
            }
            .into(),
            "LIAN_LOG_FORMAT",
        ),
        shown(
            "output",
            if global.json(false) { "json" } else { "text" }.into(),
            "LIAN_OUTPUT",
        ),
    ]
}
