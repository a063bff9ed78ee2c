//! The Docker engine's embedded BuildKit (`DOCKER_BUILDKIT=1 docker build`). Every argument
//! is passed as its own argv entry, never through a shell, and every value was validated by
//! lian-core's newtypes before it got here.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::progress::{StepProgress, parse_plain};

#[derive(Debug, Clone)]
pub struct DockerBuilder {
    /// The docker CLI; Debian's builds with BuildKit without buildx.
    pub cli: PathBuf,
    /// `DOCKER_HOST` for the engine, if not the default socket.
    pub host: Option<String>,
    /// `--network` for RUN steps: `host` or `none` (dockerd here runs without a bridge).
    pub network: String,
}

/// One build.
#[derive(Debug, Clone)]
pub struct BuildInvocation<'a> {
    pub context: &'a Path,
    pub dockerfile: &'a str,
    pub image: &'a str,
    pub target: Option<&'a str>,
    pub build_args: Vec<(&'a str, &'a str)>,
    /// `(id, file)`: each file is handed to BuildKit as a secret mount, never copied.
    pub secrets: Vec<(&'a str, &'a Path)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    pub image_id: String,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct BuildFailure {
    pub reason: String,
    /// Exit 137 or "Killed" in the step output: a fallback OOM signal.
    pub oom: bool,
}

impl DockerBuilder {
    pub fn args(&self, spec: &BuildInvocation<'_>, iidfile: &Path) -> Vec<String> {
        let mut args = vec![
            "build".to_string(),
            "--progress=plain".into(),
            format!("--network={}", self.network),
            "--file".into(),
            spec.context.join(spec.dockerfile).display().to_string(),
            "--tag".into(),
            spec.image.to_string(),
            "--iidfile".into(),
            iidfile.display().to_string(),
        ];
        if let Some(target) = spec.target {
            args.push("--target".into());
            args.push(target.to_string());
        }
        for (k, v) in &spec.build_args {
            args.push("--build-arg".into());
            args.push(format!("{k}={v}"));
        }
        for (id, file) in &spec.secrets {
            args.push("--secret".into());
            args.push(format!("id={id},src={}", file.display()));
        }
        args.push(spec.context.display().to_string());
        args
    }

    /// Builds; each BuildKit step that starts, ends, is cached or fails is reported to
    /// `on_step` as it happens.
    pub async fn build(
        &self,
        spec: &BuildInvocation<'_>,
        on_step: &mut (dyn FnMut(StepProgress) + Send),
    ) -> Result<BuildOutput, BuildFailure> {
        let started = Instant::now();
        let scratch = spec.context.parent().unwrap_or(spec.context).to_path_buf();
        let iidfile = scratch.join("image.iid");
        let _ = tokio::fs::remove_file(&iidfile).await;
        let mut cmd = tokio::process::Command::new(&self.cli);
        cmd.args(self.args(spec, &iidfile))
            .env("DOCKER_BUILDKIT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(host) = &self.host {
            cmd.env("DOCKER_HOST", host);
        }
        let mut child = cmd.spawn().map_err(|e| BuildFailure {
            reason: format!("cannot run {}: {e} (is docker.io installed?)", self.cli.display()),
            oom: false,
        })?;
        let mut stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let mut out = Vec::new();
        let mut err = String::new();
        let progress = async {
            // BuildKit writes its progress to stderr, one line per event.
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(step) = parse_plain(&line) {
                    on_step(step);
                }
                err.push_str(&line);
                err.push('\n');
            }
        };
        let (_, (), status) = tokio::join!(stdout.read_to_end(&mut out), progress, child.wait());
        let status = status.map_err(|e| BuildFailure {
            reason: format!("docker build did not finish: {e}"),
            oom: false,
        })?;
        let log = err + &String::from_utf8_lossy(&out);
        if !status.success() {
            return Err(failure(&log, status.code()));
        }
        let image_id = tokio::fs::read_to_string(&iidfile).await.map_err(|e| BuildFailure {
            reason: format!("docker build succeeded but wrote no image id: {e}"),
            oom: false,
        })?;
        Ok(BuildOutput {
            image_id: image_id.trim().to_string(),
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// The reason of a failed build: BuildKit's error lines, or the log's tail.
pub(crate) fn failure(log: &str, code: Option<i32>) -> BuildFailure {
    let oom = log.contains("exit code: 137") || log.lines().any(|l| l.trim_end().ends_with("Killed"));
    let errors: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("ERROR") || l.starts_with("error:") || l.contains("failed to solve"))
        .collect();
    let lines: Vec<&str> = if errors.is_empty() {
        log.lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        errors
    };
    let mut reason = lines.join(" | ");
    if reason.len() > 600 {
        let cut = (0..=600).rev().find(|i| reason.is_char_boundary(*i)).unwrap_or(0);
        reason.truncate(cut);
        reason.push_str("...");
    }
    if reason.is_empty() {
        reason = format!("docker build exited with {code:?}");
    }
    BuildFailure { reason, oom }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_separate_argv_entries() {
        let b = DockerBuilder {
            cli: "docker".into(),
            host: None,
            network: "none".into(),
        };
        let spec = BuildInvocation {
            context: Path::new("/r/context"),
            dockerfile: "Dockerfile",
            image: "lian-example/base:latest",
            target: Some("final"),
            build_args: vec![("A", "x y; rm -rf /")],
            secrets: vec![("sccache_creds", Path::new("/etc/lian/sccache"))],
        };
        let args = b.args(&spec, Path::new("/r/iid"));
        assert!(
            args.contains(&"A=x y; rm -rf /".to_string()),
            "one argv entry, no shell"
        );
        assert_eq!(args.last().unwrap(), "/r/context");
        assert!(args.contains(&"--network=none".to_string()));
        assert!(args.contains(&"id=sccache_creds,src=/etc/lian/sccache".to_string()));
    }

    #[test]
    fn failures_keep_buildkits_error_and_spot_the_oom_signal() {
        let log = "#5 [2/2] RUN hog\n#5 0.3 Killed\n#5 ERROR: process \"/bin/sh -c hog\" did not complete successfully: exit code: 137\n------\nERROR: failed to solve: exit code: 137\n";
        let f = failure(log, Some(1));
        assert!(f.oom);
        assert!(f.reason.contains("exit code: 137"), "{}", f.reason);
        let f = failure(
            "#3 ERROR: failed to read dockerfile: open Dockerfile: no such file\n",
            Some(1),
        );
        assert!(!f.oom);
        assert!(f.reason.contains("no such file"));
    }
}
