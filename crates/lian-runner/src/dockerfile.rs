//! What lian reads from a Dockerfile: the images it builds on, and its cooker stage. The
//! syntax (parser directives such as `# escape=`, line continuations, comments, heredocs,
//! flags) is `parse-dockerfile`'s; what the instructions mean for parents is ours, as the
//! Dockerfile reference defines it: `ARG`s before the first `FROM` are expanded in every
//! `FROM` (a `--build-arg` over the default), `AS` names a stage, and a stage named by
//! `FROM`, `COPY --from=` or `RUN --mount=from=` (by name or index) is no image.

use std::collections::HashMap;

use parse_dockerfile::{Dockerfile, Instruction};

/// A Dockerfile that cannot be read as one.
#[derive(Debug, thiserror::Error)]
#[error("the Dockerfile cannot be parsed: {0}")]
pub struct DockerfileError(String);

fn parse(text: &str) -> Result<Dockerfile<'_>, DockerfileError> {
    parse_dockerfile::parse(text).map_err(|e| DockerfileError(e.to_string()))
}

/// The images a Dockerfile builds on, sorted: each stage's `FROM` and every `--from` that
/// is not a stage of the same Dockerfile (and not `scratch`). `build_args` are the build's
/// `--build-arg`s.
pub fn parent_images(dockerfile: &str, build_args: &[(&str, &str)]) -> Result<Vec<String>, DockerfileError> {
    let parsed = parse(dockerfile)?;
    let args = global_args(&parsed, build_args);
    let mut stages: Vec<String> = Vec::new();
    let mut refs = Vec::new();
    let is_stage = |name: &str, stages: &[String]| {
        name.parse::<usize>().is_ok_and(|i| i < stages.len()) || stages.iter().any(|s| s.eq_ignore_ascii_case(name))
    };
    for stage in parsed.stages() {
        let image = expand(&stage.from.image.value, &args);
        if !is_stage(&image, &stages) && !image.eq_ignore_ascii_case("scratch") {
            refs.push(image);
        }
        // Named or not, a stage counts: `--from=1` is the second one.
        stages.push(
            stage
                .from
                .as_
                .as_ref()
                .map_or_else(String::new, |(_, name)| name.value.to_string()),
        );
        for instruction in stage.instructions {
            for from in from_flags(instruction) {
                if !is_stage(&from, &stages) {
                    refs.push(from);
                }
            }
        }
    }
    refs.sort();
    refs.dedup();
    Ok(refs)
}

/// What `COPY --from=` and `RUN --mount=...,from=` name.
fn from_flags(instruction: &Instruction<'_>) -> Vec<String> {
    match instruction {
        Instruction::Copy(copy) => copy
            .options
            .iter()
            .filter(|f| f.name.value == "from")
            .filter_map(|f| f.value.as_ref().map(|v| v.value.to_string()))
            .collect(),
        Instruction::Run(run) => run
            .options
            .iter()
            .filter(|f| f.name.value == "mount")
            .filter_map(|f| f.value.as_ref())
            .filter_map(|v| {
                v.value
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("from="))
                    .map(String::from)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The `ARG`s before the first `FROM`, each its `--build-arg` or else its default (which
/// may use the ones declared before it).
fn global_args(parsed: &Dockerfile<'_>, build_args: &[(&str, &str)]) -> HashMap<String, String> {
    let mut args = HashMap::new();
    for arg in parsed.global_args() {
        // `ARG A=1 B="two words"`: shell-like words, each NAME or NAME=DEFAULT.
        let words = shlex::split(&arg.arguments.value).unwrap_or_default();
        for word in words {
            let (name, default) = match word.split_once('=') {
                Some((name, default)) => (name.to_string(), Some(expand(default, &args))),
                None => (word.clone(), None),
            };
            let given = build_args.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
            if let Some(value) = given.or(default) {
                args.insert(name, value);
            }
        }
    }
    args
}

/// `$NAME`, `${NAME}`, `${NAME:-word}` (word when unset or empty) and `${NAME:+word}` (word
/// when set), as the Dockerfile reference's environment replacement; `\$` is a literal `$`.
fn expand(text: &str, vars: &HashMap<String, String>) -> String {
    let value = |name: &str| vars.get(name).map(String::as_str).unwrap_or("");
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => out.push(chars.next().unwrap_or('$')),
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let inner: String = chars.by_ref().take_while(|&c| c != '}').collect();
                if let Some((name, word)) = inner.split_once(":-") {
                    let v = value(name);
                    out.push_str(if v.is_empty() { word } else { v });
                } else if let Some((name, word)) = inner.split_once(":+") {
                    if !value(name).is_empty() {
                        out.push_str(word);
                    }
                } else {
                    out.push_str(value(&inner));
                }
            }
            '$' if chars.peek().is_some_and(|c| c.is_ascii_alphabetic() || *c == '_') => {
                let mut name = String::new();
                while let Some(&c) = chars.peek().filter(|c| c.is_ascii_alphanumeric() || **c == '_') {
                    name.push(c);
                    chars.next();
                }
                out.push_str(value(&name));
            }
            c => out.push(c),
        }
    }
    out
}

/// The stage named `name` (case-insensitively), as the Dockerfile spells it.
pub fn stage_named(dockerfile: &str, name: &str) -> Option<String> {
    let parsed = parse(dockerfile).ok()?;
    parsed.stages().find_map(|stage| {
        let (_, as_name) = stage.from.as_.as_ref()?;
        as_name
            .value
            .eq_ignore_ascii_case(name)
            .then(|| as_name.value.to_string())
    })
}

/// The Dockerfile's text up to the end of the stage named `name` (all of it if no stage
/// follows; none if it has no such stage).
pub fn through_stage<'a>(dockerfile: &'a str, name: &str) -> &'a str {
    let Ok(parsed) = parse(dockerfile) else { return "" };
    let mut stages = parsed.stages();
    if !stages.by_ref().any(|s| {
        s.from
            .as_
            .as_ref()
            .is_some_and(|(_, n)| n.value.eq_ignore_ascii_case(name))
    }) {
        return "";
    }
    match stages.next() {
        Some(next) => &dockerfile[..next.from.from.span.start],
        None => dockerfile,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parents(df: &str) -> Vec<String> {
        parent_images(df, &[]).unwrap()
    }

    #[test]
    fn parents_are_images_not_stages() {
        let df = "FROM lian-example/base:latest AS planner\nRUN x\nFROM --platform=linux/amd64 planner AS cooker\nCOPY --from=planner /a /a\nCOPY --from=lian-example/deps:latest /d /d\nCOPY --from=0 /b /b\nFROM scratch\n";
        assert_eq!(parents(df), ["lian-example/base:latest", "lian-example/deps:latest"]);
    }

    /// The reference's "Understand how ARG and FROM interact".
    #[test]
    fn args_before_from_are_expanded_with_their_defaults_or_the_build_args() {
        let df = "ARG  CODE_VERSION=latest\nFROM base:${CODE_VERSION}\nCMD  /code/run-app\n\nFROM extras:${CODE_VERSION}\nCMD  /code/run-extras\n";
        assert_eq!(parents(df), ["base:latest", "extras:latest"]);
        assert_eq!(
            parent_images(df, &[("CODE_VERSION", "1.2")]).unwrap(),
            ["base:1.2", "extras:1.2"]
        );
        let df =
            "ARG REGISTRY=127.0.0.1:5000\nARG BASE=$REGISTRY/lamina/rust\nARG TAG\nFROM ${BASE}:${TAG:-bookworm}\n";
        assert_eq!(parents(df), ["127.0.0.1:5000/lamina/rust:bookworm"]);
        let df = "ARG A=1 B=\"two\"\nFROM img:${A}-${B}${UNSET:+never}\n";
        assert_eq!(parents(df), ["img:1-two"]);
    }

    /// `FROM [--platform=<platform>] <image> [AS <name>]`, stages by name or index,
    /// case-insensitively, and `--from` on `COPY` and `RUN --mount`.
    #[test]
    fn platforms_stage_names_and_from_flags() {
        let df = "FROM --platform=$BUILDPLATFORM golang:1.22 AS Build\nRUN --mount=type=cache,target=/root/.cache,from=build go build\n\
                  RUN --mount=type=bind,from=tools:1,target=/t true\n\
                  FROM build AS test\nFROM alpine\nCOPY --from=BUILD /out /out\nCOPY --from=1 /x /x\n\
                  COPY --from=nginx:latest /etc/nginx/nginx.conf /nginx.conf\n";
        assert_eq!(parents(df), ["alpine", "golang:1.22", "nginx:latest", "tools:1"]);
    }

    /// Continuations, comments, heredocs and the `escape` parser directive.
    #[test]
    fn syntax_is_read_as_buildkit_reads_it() {
        let df = "# syntax=docker/dockerfile:1\n# FROM commented:out\nFROM \\\n    debian:bookworm \\\n    AS base\nRUN <<EOF\nFROM not-an-instruction\nEOF\nRUN echo a \\\n # a comment inside a continuation\n && echo b\n";
        assert_eq!(parents(df), ["debian:bookworm"]);
        let windows = "# escape=`\n\nFROM mcr.microsoft.com/windows/servercore `\n  AS win\nCOPY testfile.txt c:\\\nRUN dir c:\\\n";
        assert_eq!(parents(windows), ["mcr.microsoft.com/windows/servercore"]);
        assert!(parent_images("RUN no-from\n", &[]).is_err());
    }

    #[test]
    fn the_text_through_a_stage_ends_where_the_next_begins() {
        let df = "FROM base AS planner\nRUN plan\nFROM base AS Cooker\nRUN cook\nFROM base\nCOPY src src\n";
        assert_eq!(stage_named(df, "cooker").as_deref(), Some("Cooker"));
        assert_eq!(
            through_stage(df, "cooker"),
            "FROM base AS planner\nRUN plan\nFROM base AS Cooker\nRUN cook\n"
        );
        assert_eq!(stage_named("FROM a\nFROM b AS final\n", "cooker"), None);
        assert_eq!(
            through_stage("FROM a AS cooker\nRUN x\n", "cooker"),
            "FROM a AS cooker\nRUN x\n"
        );
    }
}
