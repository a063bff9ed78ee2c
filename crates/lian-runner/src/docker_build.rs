//! The Docker engine's embedded BuildKit (`DOCKER_BUILDKIT=1 docker build`). Every argument
//! is passed as its own argv entry, never through a shell, and every value was validated by
//! lian-core's newtypes before it got here.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::progress::{StepProgress, StepState, parse_plain};

#[derive(Debug, Clone)]
pub struct DockerBuilder {
    /// The docker CLI; Debian's builds with BuildKit without buildx.
    pub cli: PathBuf,
    /// `DOCKER_HOST` for the engine, if not the default socket.
    pub host: Option<String>,
    /// `--network` for RUN steps: `host` or `none` (dockerd here runs without a bridge).
    pub network: String,
    /// `DOCKER_CONFIG`: the lease's registry credentials, if it has any.
    pub config: Option<PathBuf>,
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
    /// Images whose inline cache BuildKit may reuse steps from.
    pub cache_from: Vec<String>,
    /// Write inline cache metadata into the image, so a later build can `--cache-from` it.
    pub inline_cache: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    pub image_id: String,
    pub duration_ms: u64,
    /// From a `--progress=plain` log; `None` where the builder's log is another shape.
    pub steps: Option<StepCounts>,
}

/// What the build log says about reuse: Dockerfile steps, those served from cache, and
/// sccache's counters if a step printed `sccache --show-stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub steps: u32,
    pub cached: u32,
    pub sccache_hits: Option<u64>,
    pub sccache_misses: Option<u64>,
}

impl StepCounts {
    /// Reads a `--progress=plain` log.
    pub fn from_log(log: &str) -> Self {
        let mut steps = std::collections::BTreeSet::new();
        let mut cached = std::collections::BTreeSet::new();
        let mut counts = Self::default();
        // Each RUN step runs its own sccache server (the step's container ends with it), so
        // the build's counters are the sum over the steps that printed them (the last table
        // a step printed counts for it).
        let mut sccache: std::collections::BTreeMap<String, (Option<u64>, Option<u64>)> = Default::default();
        for line in log.lines() {
            if let Some(step) = parse_plain(line) {
                match step.state {
                    StepState::Started
                        if step
                            .name
                            .as_deref()
                            .is_some_and(|n| n.starts_with('[') && !n.starts_with("[internal]")) =>
                    {
                        steps.insert(step.id);
                    }
                    StepState::Cached => {
                        cached.insert(step.id);
                    }
                    _ => {}
                }
                continue;
            }
            // `#12 3.4 Cache hits                 5`: the stats table sccache prints.
            let text = line.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
            let value = |label: &str| {
                text.strip_prefix(label)
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok())
            };
            let step = line.split_whitespace().next().unwrap_or_default().to_string();
            if let Some(n) = value("Cache hits") {
                sccache.entry(step.clone()).or_default().0 = Some(n);
            }
            if let Some(n) = value("Cache misses") {
                sccache.entry(step).or_default().1 = Some(n);
            }
        }
        for (hits, misses) in sccache.values() {
            counts.sccache_hits = sum(counts.sccache_hits, *hits);
            counts.sccache_misses = sum(counts.sccache_misses, *misses);
        }
        counts.steps = steps.len() as u32;
        counts.cached = cached.intersection(&steps).count() as u32;
        counts
    }
}

/// Two optional counters added; `None` only when both are.
pub fn sum(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
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
        for image in &spec.cache_from {
            args.push("--cache-from".into());
            args.push(image.clone());
        }
        if spec.inline_cache {
            args.push("--build-arg".into());
            args.push("BUILDKIT_INLINE_CACHE=1".into());
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
        let mut cmd = self.command();
        cmd.args(self.args(spec, &iidfile))
            .env("DOCKER_BUILDKIT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
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
            steps: Some(StepCounts::from_log(&log)),
        })
    }

    /// The docker CLI aimed at this builder's engine, with its credentials.
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.cli);
        if let Some(host) = &self.host {
            cmd.env("DOCKER_HOST", host);
        }
        if let Some(config) = &self.config {
            cmd.env("DOCKER_CONFIG", config);
        }
        cmd
    }

    /// `docker <args>` on this builder's engine, its standard output; the failure names
    /// what was asked.
    async fn docker(&self, args: &[&str]) -> Result<String, BuildFailure> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| BuildFailure {
                reason: format!("cannot run {}: {e}", self.cli.display()),
                oom: false,
            })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(BuildFailure {
            reason: format!("docker {} failed: {}", args.join(" "), stderr.trim()),
            oom: false,
        })
    }

    /// Pushes a tag: blobs first, the manifest last, so the tag never names half an image.
    /// Returns the layers it sent (not those the registry had), by short diff id.
    pub async fn push(&self, reference: &str) -> Result<Vec<String>, BuildFailure> {
        let out = self.docker(&["push", reference]).await?;
        Ok(layers_with(&out, "Pushed"))
    }

    pub async fn tag(&self, source: &str, target: &str) -> Result<(), BuildFailure> {
        self.docker(&["tag", source, target]).await.map(drop)
    }

    /// Pulls a reference; returns the layers it downloaded (not those the engine had), by
    /// short blob digest.
    pub async fn pull(&self, reference: &str) -> Result<Vec<String>, BuildFailure> {
        let out = self.docker(&["pull", reference]).await?;
        Ok(layers_with(&out, "Pull complete"))
    }
}

/// The layer ids of `docker push`/`docker pull` status lines `<12 hex>: <status>` (the
/// CLI prints one per layer when its output is not a terminal).
fn layers_with(output: &str, status: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.trim().split_once(": "))
        .filter(|(id, s)| s.trim() == status && id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|(id, _)| id.to_string())
        .collect()
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
    fn pushed_and_pulled_layers_are_read_from_the_cli_status_lines() {
        let push = "The push refers to repository [127.0.0.1:5000/ci/ws/app]\n\
                    5f70bf18a086: Layer already exists\n\
                    a1b2c3d4e5f6: Pushed\n\
                    0123456789ab: Mounted from ci/ws/other\n\
                    1: digest: sha256:00 size: 528\n";
        assert_eq!(layers_with(push, "Pushed"), ["a1b2c3d4e5f6"]);
        let pull = "bookworm: Pulling from lamina/rust-base\n\
                    2d3f1a0b9c8e: Already exists\n\
                    9f8e7d6c5b4a: Pull complete\n\
                    Digest: sha256:11\nStatus: Downloaded newer image for x\n";
        assert_eq!(layers_with(pull, "Pull complete"), ["9f8e7d6c5b4a"]);
    }

    #[test]
    fn arguments_are_separate_argv_entries() {
        let b = DockerBuilder {
            cli: "docker".into(),
            host: None,
            network: "none".into(),
            config: None,
        };
        let spec = BuildInvocation {
            context: Path::new("/r/context"),
            dockerfile: "Dockerfile",
            image: "lian-example/base:latest",
            target: Some("final"),
            build_args: vec![("A", "x y; rm -rf /")],
            secrets: vec![("sccache_creds", Path::new("/etc/lian/sccache"))],
            cache_from: vec!["127.0.0.1:5000/ci/ws/app:lian-cache".into()],
            inline_cache: true,
        };
        let args = b.args(&spec, Path::new("/r/iid"));
        assert!(
            args.contains(&"A=x y; rm -rf /".to_string()),
            "one argv entry, no shell"
        );
        assert_eq!(args.last().unwrap(), "/r/context");
        assert!(args.contains(&"--network=none".to_string()));
        assert!(args.contains(&"id=sccache_creds,src=/etc/lian/sccache".to_string()));
        assert!(
            args.windows(2)
                .any(|w| w == ["--cache-from", "127.0.0.1:5000/ci/ws/app:lian-cache"])
        );
        assert!(args.windows(2).any(|w| w == ["--build-arg", "BUILDKIT_INLINE_CACHE=1"]));
    }

    #[test]
    fn the_log_tells_steps_cached_steps_and_sccache_counters() {
        let log = "#1 [internal] load build definition from Dockerfile\n#1 DONE 0.0s\n\
                   #4 [1/3] FROM docker.io/library/base\n#4 CACHED\n\
                   #5 [2/3] COPY Cargo.toml .\n#5 CACHED\n\
                   #6 [3/3] RUN cargo build && sccache --show-stats\n\
                   #6 41.2 Compile requests                    12\n\
                   #6 41.2 Cache hits                          9\n\
                   #6 41.2 Cache hits (Rust)                   9\n\
                   #6 41.2 Cache misses                        3\n#6 DONE 41.5s\n";
        let counts = StepCounts::from_log(log);
        assert_eq!((counts.steps, counts.cached), (3, 2));
        assert_eq!((counts.sccache_hits, counts.sccache_misses), (Some(9), Some(3)));
        // Two RUN steps, each with its own sccache server: their counters add up.
        let two = format!(
            "{log}#7 [4/4] RUN cargo build --bin b && sccache --show-stats\n\
             #7 3.0 Cache hits                          1\n#7 3.0 Cache misses                        2\n"
        );
        let counts = StepCounts::from_log(&two);
        assert_eq!((counts.sccache_hits, counts.sccache_misses), (Some(10), Some(5)));
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
