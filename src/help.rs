//! `lian`'s command line as clap sees it, with examples at the end of every command's
//! `--help`. They live here, by command path, rather than on the derive: one table to read
//! and keep true, and a test that no command is without one.

use clap::{Command, CommandFactory};

use crate::cli::Cli;

/// Examples by command path (`catalog plan`), as a user types them.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "up",
        "lian up                               # a fleet on this host: NATS, registry, S3, control, 2 workers, cascade
  lian up --demo --once --nats-port 0   # build the example catalog's root and its cascade, then stop
  lian up --workers 4 --state-dir /var/lib/lian
  lian up --nats-cluster 3              # three nats-servers as one cluster: every stream R3",
    ),
    (
        "worker",
        "lian worker --name w1 --state-dir /var/lib/lian
  LIAN_CONTROL_URL=http://10.0.0.2:7420 LIAN_CONTROL_TOKEN=... lian worker --name w2",
    ),
    (
        "cascade",
        "lian cascade --catalog catalog\n  lian cascade --catalog catalog --approve-over-layers 5 --approve-over-minutes 60\n  lian cascade show c-01j9z7k2m8q4r6t0v2x4y6z8a0",
    ),
    (
        "cascade approve",
        "lian cascade approve c-01j9z7k2m8q4r6t0v2x4y6z8a0\n  lian cascade approve c-01j9z7k2m8q4r6t0v2x4y6z8a0 --by alice",
    ),
    (
        "cascade show",
        "lian cascade show c-01j9z7k2m8q4r6t0v2x4y6z8a0\n  lian cascade show c-01j9z7k2m8q4r6t0v2x4y6z8a0 --output json",
    ),
    (
        "control",
        "LIAN_CONTROL_TOKEN=... lian control --listen 0.0.0.0:7420
  lian control --listen 127.0.0.1:7420 --registry-listen 127.0.0.1:5001 --catalog catalog",
    ),
    ("leases", "lian leases\n  lian leases --output json"),
    (
        "submit",
        "lian submit directives.ncl --context . --wait --timeout 600
  lian submit d.json --context app/ --layer base          # its completion starts a cascade
  lian submit d.ncl --context . --request-id \"$CI_JOB_ID\"  # a retried submit is one build",
    ),
    ("watch", "lian watch\n  lian watch 'lian.ws.build.>' --output json"),
    (
        "status",
        "lian status 01j9z7k2m8q4r6t0v2x4y6z8a0\n  lian status 01j9z7k2m8q4r6t0v2x4y6z8a0 --follow --output json",
    ),
    (
        "catalog",
        "lian catalog validate\n  lian catalog plan --changed rust\n  lian catalog --catalog examples/catalog graph --format mermaid",
    ),
    (
        "catalog validate",
        "lian catalog validate\n  lian catalog --catalog examples/catalog validate",
    ),
    (
        "catalog plan",
        "lian catalog plan --changed rust\n  lian catalog plan --changed rust --estimate --parallelism 4\n  lian catalog plan --changed base --output json",
    ),
    (
        "catalog suggest",
        "lian catalog suggest --project ~/src/my-leptos-app\n  lian catalog suggest --project . --output json",
    ),
    (
        "catalog lock",
        "lian catalog lock\n  lian catalog lock --write && git diff catalog/catalog.lock\n  lian catalog lock --check",
    ),
    (
        "catalog graph",
        "lian catalog graph > catalog.dot\n  lian catalog graph --format mermaid",
    ),
    (
        "catalog bootstrap",
        "lian catalog bootstrap\n  lian catalog bootstrap --registry http://127.0.0.1:5000 --no-cargo-chef",
    ),
    (
        "cancel",
        "lian cancel 01j9z7k2m8q4r6t0v2x4y6z8a0 --reason \"superseded by a newer commit\"",
    ),
    ("dead-letters", "lian dead-letters\n  lian dead-letters --output json"),
    (
        "sizing",
        "lian sizing explain directives.ncl --context .\n  lian sizing approve ws",
    ),
    ("sizing approve", "lian sizing approve ws"),
    ("sizing revoke", "lian sizing revoke ws"),
    ("sizing explain", "lian sizing explain directives.ncl --context ."),
    ("cache", "lian cache gc --older-than 7d --dry-run"),
    (
        "cache gc",
        "lian cache gc --older-than 7d --dry-run\n  lian cache gc --older-than 0s --registry http://127.0.0.1:5000",
    ),
    (
        "nats",
        "lian nats status\n  lian --nats-url nats://a:4222,nats://b:4222 nats status --output json\n  lian nats rebalance",
    ),
    (
        "nats status",
        "lian nats status\n  lian --nats-url nats://a:4222,nats://b:4222 nats status --output json",
    ),
    (
        "nats rebalance",
        "lian nats rebalance\n  lian --nats-url nats://a:4222,nats://b:4222 nats rebalance --output json",
    ),
    (
        "config",
        "lian config show\n  LIAN_CONFIG=/etc/lian/lian.toml lian config show --output json",
    ),
    (
        "config show",
        "lian config show\n  LIAN_CONFIG=/etc/lian/lian.toml lian config show --output json",
    ),
    (
        "completions",
        "lian completions bash > /etc/bash_completion.d/lian
  lian completions zsh > \"${fpath[1]}/_lian\"
  lian completions fish > ~/.config/fish/completions/lian.fish",
    ),
];

/// The command line, every command's help ending with its examples.
pub fn command() -> Command {
    with_examples(Cli::command(), "")
}

fn with_examples(command: Command, path: &str) -> Command {
    let command = match EXAMPLES.iter().find(|(p, _)| *p == path) {
        Some((_, examples)) => command.after_help(format!("Examples:\n  {examples}")),
        None => command,
    };
    command.mut_subcommands(|sub| {
        let child = match path {
            "" => sub.get_name().to_string(),
            _ => format!("{path} {}", sub.get_name()),
        };
        with_examples(sub, &child)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_examples() {
        fn walk(command: &Command, path: &str, missing: &mut Vec<String>) {
            for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
                let child = format!("{path} {}", sub.get_name()).trim().to_string();
                let help = sub.get_after_help().map(|h| h.to_string()).unwrap_or_default();
                if !help.contains("Examples:\n  lian") && !help.contains("Examples:\n  LIAN_") {
                    missing.push(child.clone());
                }
                walk(sub, &child, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "", &mut missing);
        assert!(missing.is_empty(), "commands without examples in help.rs: {missing:?}");
        let known: Vec<&str> = EXAMPLES.iter().map(|(p, _)| *p).collect();
        for (path, _) in EXAMPLES {
            let mut command = command();
            for name in path.split(' ') {
                command = command
                    .find_subcommand(name)
                    .unwrap_or_else(|| panic!("{path}: no such command ({known:?})"))
                    .clone();
            }
        }
    }
}
