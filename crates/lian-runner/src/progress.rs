//! BuildKit step progress, from either client: `docker build --progress=plain` lines or
//! `buildctl --progress rawjson` lines, as one shape the worker can publish.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "error", rename_all = "snake_case")]
pub enum StepState {
    Started,
    Done,
    Cached,
    Failed(String),
}

/// One step of a build changed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProgress {
    /// BuildKit's id of the step (`#5`, or a vertex digest).
    pub id: String,
    /// What the step does, as BuildKit names it (`[2/3] RUN make`), when known.
    pub name: Option<String>,
    #[serde(flatten)]
    pub state: StepState,
}

/// A `--progress=plain` line: `#5 [2/3] RUN x`, `#5 DONE 0.2s`, `#5 CACHED`, `#5 ERROR: ...`.
pub fn parse_plain(line: &str) -> Option<StepProgress> {
    let rest = line.strip_prefix('#')?;
    let (num, tail) = rest.split_once(' ')?;
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id = format!("#{num}");
    let step = |name: Option<String>, state| {
        Some(StepProgress {
            id: id.clone(),
            name,
            state,
        })
    };
    if tail.starts_with('[') || tail.starts_with("load ") || tail.starts_with("exporting ") {
        return step(Some(tail.trim().to_string()), StepState::Started);
    }
    if tail.starts_with("DONE") {
        return step(None, StepState::Done);
    }
    if tail.trim() == "CACHED" {
        return step(None, StepState::Cached);
    }
    if let Some(error) = tail.strip_prefix("ERROR:") {
        return step(None, StepState::Failed(error.trim().to_string()));
    }
    None
}

#[derive(Deserialize)]
struct SolveStatus {
    #[serde(default)]
    vertexes: Vec<Vertex>,
}

#[derive(Deserialize)]
struct Vertex {
    digest: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    started: Option<String>,
    #[serde(default)]
    completed: Option<String>,
    #[serde(default)]
    cached: bool,
    #[serde(default)]
    error: Option<String>,
}

/// A `buildctl --progress rawjson` line (one JSON `SolveStatus`): the steps it reports.
pub fn parse_rawjson(line: &str) -> Result<Vec<StepProgress>, serde_json::Error> {
    let status: SolveStatus = serde_json::from_str(line)?;
    Ok(status
        .vertexes
        .into_iter()
        .filter_map(|v| {
            let state = match (&v.error, v.cached, &v.completed, &v.started) {
                (Some(e), ..) if !e.is_empty() => StepState::Failed(e.clone()),
                (_, true, ..) => StepState::Cached,
                (_, _, Some(_), _) => StepState::Done,
                (_, _, None, Some(_)) => StepState::Started,
                _ => return None,
            };
            Some(StepProgress {
                id: v.digest,
                name: v.name,
                state,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines() {
        let started = parse_plain("#5 [2/3] RUN make").unwrap();
        assert_eq!(
            (started.id.as_str(), started.name.as_deref(), &started.state),
            ("#5", Some("[2/3] RUN make"), &StepState::Started)
        );
        assert_eq!(parse_plain("#5 DONE 0.2s").unwrap().state, StepState::Done);
        assert_eq!(parse_plain("#4 CACHED").unwrap().state, StepState::Cached);
        assert_eq!(
            parse_plain("#6 ERROR: process \"/bin/sh -c false\" did not complete successfully: exit code: 1")
                .unwrap()
                .state,
            StepState::Failed("process \"/bin/sh -c false\" did not complete successfully: exit code: 1".into())
        );
        assert_eq!(
            parse_plain("#5 0.312 compiling foo"),
            None,
            "step output is not progress"
        );
        assert_eq!(parse_plain("------"), None);
    }

    #[test]
    fn rawjson_lines() {
        let line = r#"{"vertexes":[
            {"digest":"sha256:a","name":"[1/2] FROM docker.io/library/rust:slim","started":"2026-11-21T10:00:00Z","completed":"2026-11-21T10:00:01Z","cached":true},
            {"digest":"sha256:b","name":"[2/2] RUN cargo build","started":"2026-11-21T10:00:01Z"},
            {"digest":"sha256:c","name":"[2/2] RUN cargo test","started":"2026-11-21T10:00:01Z","completed":"2026-11-21T10:00:09Z","error":"exit code: 101"},
            {"digest":"sha256:d","name":"[internal] load .dockerignore","started":"2026-11-21T10:00:00Z","completed":"2026-11-21T10:00:00Z"},
            {"digest":"sha256:e","name":"waiting"}
        ],"statuses":[],"logs":[]}"#;
        let steps = parse_rawjson(line).unwrap();
        let states: Vec<&StepState> = steps.iter().map(|s| &s.state).collect();
        assert_eq!(
            states,
            [
                &StepState::Cached,
                &StepState::Started,
                &StepState::Failed("exit code: 101".into()),
                &StepState::Done
            ]
        );
        assert!(parse_rawjson("not json").is_err());
    }
}
