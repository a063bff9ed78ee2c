//! The command line's conventions, as a user meets them: examples at the end of every
//! command's `--help`, shell completions, clap's own usage errors as the JSON error line
//! under `--output json`, and no ANSI on a pipe or with `NO_COLOR` set.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{lian, lian_with, text};

/// The commands `lian --help` lists.
fn commands() -> Vec<String> {
    let help = text(&lian(&["--help"]));
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

#[test]
fn every_commands_help_ends_with_examples() {
    let commands = commands();
    assert!(
        commands.len() >= 15 && commands.iter().any(|c| c == "completions"),
        "{commands:?}"
    );
    for command in &commands {
        let out = lian(&[command, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{command}: {}", text(&out));
        let help = String::from_utf8_lossy(&out.stdout);
        let examples = help
            .split("Examples:\n")
            .nth(1)
            .unwrap_or_else(|| panic!("{command}: {help}"));
        assert!(
            examples.contains("lian ") && examples.contains(command.as_str()),
            "{command}: {examples}"
        );
    }
    let nested = lian(&["catalog", "plan", "--help"]);
    assert!(
        text(&nested).contains("Examples:\n  lian catalog plan --changed"),
        "{}",
        text(&nested)
    );
}

#[test]
fn completions_load_in_their_shell_and_name_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("lian.bash");
    let out = lian(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::fs::write(&script, &out.stdout).unwrap();
    let loaded = Command::new("bash")
        .args(["-c", &format!("source {} && complete -p lian", script.display())])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&loaded.stdout).contains("-F _lian lian"),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let bash = String::from_utf8_lossy(&out.stdout);
    for command in commands() {
        assert!(bash.contains(&command), "{command} not completed");
    }
    let zsh = lian(&["completions", "zsh"]);
    assert!(String::from_utf8_lossy(&zsh.stdout).starts_with("#compdef lian"));
    let fish = lian(&["completions", "fish"]);
    assert!(String::from_utf8_lossy(&fish.stdout).contains("complete -c lian"));
    assert_eq!(lian(&["completions", "tcsh"]).status.code(), Some(2));
}

/// The last stderr line, as the JSON error every failing command ends with.
fn json_error(out: &std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"))
}

#[test]
fn clap_usage_errors_are_the_json_error_line_with_exit_2() {
    for (args, env, names) in [
        (
            &["--output", "json", "submit", "--no-such-flag"][..],
            &[][..],
            "--no-such-flag",
        ),
        (&["--output=json", "frobnicate"][..], &[][..], "frobnicate"),
        (&["status"][..], &[("LIAN_OUTPUT", "json")][..], "<BUILD_ID>"),
    ] {
        let out = lian_with(args, env);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let error = json_error(&out);
        assert_eq!(error["error"]["exit_code"], 2, "{error}");
        assert_eq!(error["error"]["kind"], "usage", "{error}");
        assert!(error["error"]["message"].as_str().unwrap().contains(names), "{error}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // Help is no error, JSON or not; text usage errors stay clap's own.
    assert_eq!(lian(&["--output", "json", "--help"]).status.code(), Some(0));
    let plain = lian(&["submit", "--no-such-flag"]);
    assert_eq!(plain.status.code(), Some(2));
    assert!(
        text(&plain).starts_with("error: unexpected argument"),
        "{}",
        text(&plain)
    );
}

/// `line` run under a terminal (`script` gives it one) or on a pipe, stderr with stdout.
fn shell(line: &str, terminal: bool) -> Command {
    if terminal {
        let mut c = Command::new("script");
        c.args(["-qfec", line, "/dev/null"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &format!("exec {line} 2>&1")]);
        c
    }
}

/// A worker's log lines up to the one saying it serves, run under a terminal (`script`
/// gives it one) with `env`, or on a pipe.
fn worker_log_until_serving(nats_url: &str, terminal: bool, env: &[(&str, &str)]) -> String {
    let state = tempfile::tempdir().unwrap();
    let worker = format!(
        "{} --nats-url {nats_url} worker --name conventions --state-dir {}",
        common::lian_bin().display(),
        state.path().display()
    );
    let mut command = shell(&worker, terminal);
    let mut child = command
        .env("LIAN_CONFIG", "/dev/null")
        .env("LIAN_RUNNER_ISOLATION", "shared")
        .env("LIAN_LOG", "info,async_nats=warn")
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("script and sh run");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("serving build requests") {
                    break;
                }
            }
            Err(_) => panic!("the worker did not say it serves within 60 s: {seen}"),
        }
    }
    // Ending `script` hangs its terminal up, which ends the worker with it.
    let _ = child.kill();
    let _ = child.wait();
    seen
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let nats = lian_test_support::NatsServer::start();
    let on_terminal = worker_log_until_serving(&nats.url, true, &[]);
    assert!(
        on_terminal.contains('\u{1b}'),
        "a terminal gets colour: {on_terminal:?}"
    );
    let no_color = worker_log_until_serving(&nats.url, true, &[("NO_COLOR", "1")]);
    assert!(!no_color.contains('\u{1b}'), "NO_COLOR: {no_color:?}");
    let piped = worker_log_until_serving(&nats.url, false, &[]);
    assert!(!piped.contains('\u{1b}'), "a pipe: {piped:?}");
}

/// `lian submit --wait` of a small build, under a terminal (`script`) or on a pipe: what it
/// wrote on stderr and stdout together, and whether it succeeded.
fn submit_wait(fleet: &common::Fleet, terminal: bool) -> (String, bool) {
    let context = common::context_with("RUN echo waited\n");
    let directives = common::directives_json(context.path(), fleet.workspace, "lian-test/waited:latest");
    let submit = format!(
        "{} --nats-url {} submit {} --context {} --wait --timeout 180",
        common::lian_bin().display(),
        fleet.server.url,
        directives.display(),
        context.path().display()
    );
    let mut command = shell(&submit, terminal);
    let out = command
        .env("LIAN_CONFIG", "/dev/null")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .output()
        .expect("script and sh run");
    (String::from_utf8_lossy(&out.stdout).into_owned(), out.status.success())
}

#[test]
fn wait_shows_the_current_step_on_a_terminal_only() {
    let fleet = common::Fleet::new("waiting");
    let _worker = fleet.worker("w", &[("LIAN_RUNNER_ISOLATION", "shared")]);
    let (on_terminal, ok) = submit_wait(&fleet, true);
    assert!(ok, "{on_terminal}");
    assert!(
        on_terminal.contains("/8, "),
        "a spinner naming the step: {on_terminal:?}"
    );
    let (piped, ok) = submit_wait(&fleet, false);
    assert!(ok, "{piped}");
    assert!(
        !piped.contains("/8, ") && !piped.contains('\u{1b}'),
        "plain lines on a pipe: {piped:?}"
    );
    assert!(piped.contains("completed lian-test/waited:latest"), "{piped}");
}
