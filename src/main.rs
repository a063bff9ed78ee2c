//! `lian`: one binary for every role (`up`, `worker`, `cascade`) and every client command
//! (`submit`, `watch`, `status`, `catalog`). This file only parses and dispatches.

mod bootstrap;
mod cache_cmd;
mod cascade_cmd;
mod catalog_cmd;
mod cli;
mod config;
mod config_cmd;
mod exit;
mod help;
mod local_stores;
mod output;
mod project;
mod roles;
mod sizing_cmd;
mod submit;
mod supervise;
mod table;
mod term;
mod up;

use clap::FromArgMatches;
use clap::error::ErrorKind;

use crate::cli::{CatalogArgs, CatalogCommand, Cli, Command};

fn main() -> std::process::ExitCode {
    // The bounded evaluator's child (lian_nickel::Evaluator): before clap, logging and the
    // runtime, so no threads or allocations share its address-space limit. Not a listed
    // command: nobody types it.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == lian_nickel::EVAL_SUBCOMMAND)
    {
        return lian_nickel::serve_eval();
    }
    let cli = match help::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    // async_nats logs its own connection chatter at info; ours is what an operator reads.
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LIAN_LOG").unwrap_or_else(|_| "info,async_nats=warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match cli.global.log_format {
        // The span list, not only the innermost span: a step's line carries its build's id.
        cli::LogFormat::Json => logs.json().flatten_event(true).with_span_list(true).init(),
        cli::LogFormat::Text => logs.with_ansi(term::decorated(&std::io::stderr())).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let json = cli.global.json(false);
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(cli.global, args).await,
            Command::Worker(args) => roles::worker(cli.global, args).await,
            Command::Cascade(cli::CascadeArgs {
                command: Some(command), ..
            }) => cascade_cmd::run(cli.global, command).await,
            Command::Cascade(args) => roles::cascade(cli.global, args).await,
            Command::Control(args) => roles::control(cli.global, args).await,
            Command::Leases(args) => output::leases(cli.global, args).await,
            Command::Submit(args) => submit::run(cli.global, args).await,
            Command::Watch(args) => output::watch(cli.global, args).await,
            Command::Status(args) => output::status(cli.global, args).await,
            // Bootstrap makes an image; it needs the settings, not the catalog.
            Command::Catalog(CatalogArgs {
                command: CatalogCommand::Bootstrap(args),
                ..
            }) => bootstrap::run(&cli.global, args),
            Command::Catalog(args) => catalog_cmd::run(&cli.global, args).await,
            Command::Cancel(args) => output::cancel(cli.global, args).await,
            Command::DeadLetters(args) => output::dead_letters(cli.global, args).await,
            Command::Nats(args) => output::nats(cli.global, args).await,
            Command::Sizing(args) => sizing_cmd::run(cli.global, args).await,
            Command::Cache(args) => match args.command {
                cli::CacheCommand::Gc(gc) => cache_cmd::gc(&cli.global, gc).await,
            },
            Command::Completions { shell } => completions(shell),
            Command::Config(args) => match args.command {
                cli::ConfigCommand::Show => config_cmd::show(&cli.global),
            },
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            let exit = exit::Exit::of(&err);
            if json {
                let error = serde_json::json!({"error": {"exit_code": exit as u8, "kind": exit.name(), "message": format!("{err:#}")}});
                eprintln!("{error}");
            } else {
                eprintln!("error: {err:#}");
            }
            exit.code()
        }
    }
}

/// A command line clap refused, as every other error: under `--output json` (or
/// `LIAN_OUTPUT=json`) the JSON error line, exit 2. Help and version are not errors.
fn usage_error(err: clap::Error) -> std::process::ExitCode {
    let json = {
        let args: Vec<String> = std::env::args().collect();
        let flagged =
            args.windows(2).any(|w| w[0] == "--output" && w[1] == "json") || args.iter().any(|a| a == "--output=json");
        flagged || std::env::var("LIAN_OUTPUT").is_ok_and(|v| v == "json")
    };
    if !json || matches!(err.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        err.exit()
    }
    let exit = exit::Exit::Usage;
    let message = err.render().to_string();
    let error =
        serde_json::json!({"error": {"exit_code": exit as u8, "kind": exit.name(), "message": message.trim_end()}});
    eprintln!("{error}");
    exit.code()
}

/// `lian completions SHELL`. Written whole, so a reader that stops early (`| head`) ends it
/// quietly instead of clap_complete's panic on the closed pipe.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut help::command(), "lian", &mut script);
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(exit::Exit::Ok.code()),
    }
}
