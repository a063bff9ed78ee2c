//! Reaching a cloud runner (hcloud, proxmox) that the control plane leased: over SSH as
//! `lian` with the worker's client key, at the lease's address and port, accepting only the
//! host key generated for the lease (any other is refused before anything is sent). The
//! context is synced with the ssh pool's incremental sync; the build runs on the runner's
//! buildkitd through `buildctl`, whose `rawjson` progress is streamed back step by step.
//!
//! The image is pushed (`push=true`): the runner and its image store are gone once the lease
//! is given back. Out of memory cannot be read from a cgroup here (the runner is a whole VM):
//! a step killed by the kernel's OOM killer is only recognised by exit status 137 (SIGKILL)
//! or "Killed" in the output.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lian_core::LeaseKey;
use lian_core::control::Lease;

use crate::buildctl::{Buildctl, Outputs, image_digest};
use crate::docker_build::failure;
use crate::progress::{StepProgress, StepState, parse_rawjson};
use crate::ssh::{SshError, SshSession, SshTarget};
use crate::ssh_pool::HostBuilder;
use crate::sync::{SyncStats, sync_dir};
use crate::{BuildFailure, BuildInvocation, BuildOutput, RunnerError, SshHost};

/// Defaults shared by the cloud providers' configs: SSH on 22, a server may take 5 minutes
/// to run and answer, its state is polled every 2 s.
pub(crate) fn default_ssh_port() -> u16 {
    22
}
pub(crate) fn default_ready_secs() -> u64 {
    300
}
pub(crate) fn default_poll_ms() -> u64 {
    2000
}

/// A token not given: the providers refuse it at start, naming where to set it.
pub(crate) fn no_secret() -> secrecy::SecretString {
    secrecy::SecretString::from("")
}

/// How a secret of a configuration serializes: as a mark that one is set, never its value,
/// so a config printed (`lian config show`) or logged shows none.
pub fn serialize_redacted<S: serde::Serializer>(
    secret: &impl secrecy::ExposeSecret<str>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(if secret.expose_secret().is_empty() {
        ""
    } else {
        REDACTED
    })
}

/// What a secret is shown as.
pub const REDACTED: &str = "<redacted>";

/// The user cloud-init creates on a cloud runner, with the workers' client key.
pub const RUNNER_USER: &str = "lian";
/// Where leases live on a cloud runner.
pub const WORK_DIR: &str = "/home/lian/runs";
/// buildkitd's socket on a cloud runner.
pub const BUILDKIT_ADDR: &str = "unix:///run/buildkit/buildkitd.sock";

/// A ready cloud lease, as a worker reaches it.
#[derive(Debug, Clone)]
pub struct CloudRunner {
    key: LeaseKey,
    host: SshHost,
    staging: PathBuf,
    buildctl: Buildctl,
}

impl CloudRunner {
    /// The runner of `lease`, reached with the private key `client_key`; the context is
    /// put together under `staging_root/<lease key>` before it is synced.
    pub fn from_lease(lease: &Lease, client_key: &Path, staging_root: &Path) -> Result<Self, RunnerError> {
        let key = lease.lease_id.clone();
        let (Some(host_key), Some(port)) = (lease.host_key.as_deref(), lease.ssh_port) else {
            return Err(RunnerError::Failed {
                lease_key: key,
                message: format!(
                    "the {} lease has no pinned host key or SSH port: it is not a cloud runner ready to be reached",
                    lease.provider.as_str()
                ),
            });
        };
        if lease.host.is_empty() {
            return Err(RunnerError::Failed {
                lease_key: key,
                message: "the lease has no address yet".into(),
            });
        }
        let address = if lease.host.contains(':') {
            format!("[{}]:{port}", lease.host)
        } else {
            format!("{}:{port}", lease.host)
        };
        let host = SshHost {
            name: format!("{}:{}", lease.provider.as_str(), lease.host),
            target: SshTarget {
                address,
                user: RUNNER_USER.into(),
                key: client_key.to_path_buf(),
                host_key: host_key.to_string(),
            },
            tier: lease.runner_type,
            work_dir: WORK_DIR.into(),
            docker_cli: String::new(),
            builder: HostBuilder::Buildctl,
            buildkit_addr: BUILDKIT_ADDR.into(),
        };
        Ok(Self::on_host(&key, &host, staging_root))
    }

    /// The lease `key` on a host reached over SSH whose builder is buildkitd (a cloud
    /// runner, or an ssh pool host with `builder = "buildctl"`).
    pub fn on_host(key: &LeaseKey, host: &SshHost, staging_root: &Path) -> Self {
        Self {
            key: key.clone(),
            host: host.clone(),
            staging: staging_root.join(key.as_str()),
            buildctl: Buildctl {
                cli: "buildctl".into(),
                addr: host.buildkit_addr.clone(),
            },
        }
    }

    /// The same runner reached as another user with another work directory (a test sshd
    /// that is not a cloud runner).
    pub fn as_user(mut self, user: &str, work_dir: &str) -> Self {
        self.host.target.user = user.into();
        self.host.work_dir = work_dir.into();
        self
    }

    /// The same runner with another `buildctl`.
    pub fn with_buildctl(mut self, buildctl: Buildctl) -> Self {
        self.buildctl = buildctl;
        self
    }

    /// How the runner is reached, as an ssh pool host.
    pub fn ssh_host(&self) -> &SshHost {
        &self.host
    }

    /// The local directory the worker materialises the context in, before `sync`.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// The lease's directory on the runner.
    pub fn dir(&self) -> String {
        format!("{}/{}", self.host.work_dir.trim_end_matches('/'), self.key)
    }

    async fn session(&self) -> Result<SshSession, RunnerError> {
        SshSession::connect(&self.host.target).await.map_err(|e| match e {
            SshError::HostKey { .. } => RunnerError::HostKey {
                lease_key: self.key.clone(),
                message: e.to_string(),
            },
            e => RunnerError::Remote {
                lease_key: self.key.clone(),
                message: e.to_string(),
            },
        })
    }

    /// Syncs the staged context to `<dir>/context` on the runner.
    pub async fn sync(&self) -> Result<SyncStats, RunnerError> {
        let session = self.session().await?;
        let stats = sync_dir(&session, &self.staging, &format!("{}/context", self.dir()))
            .await
            .map_err(|e| RunnerError::Remote {
                lease_key: self.key.clone(),
                message: e.to_string(),
            });
        session.close().await;
        stats
    }

    /// The `buildctl` argv for `spec` (whose context is the staged one) on the runner.
    pub fn build_argv(&self, spec: &BuildInvocation<'_>) -> Vec<String> {
        let dir = self.dir();
        let context = PathBuf::from(&dir).join("context");
        let remote = BuildInvocation {
            context: &context,
            ..spec.clone()
        };
        let outputs = Outputs {
            push: true,
            ..Default::default()
        };
        let mut argv = vec![self.buildctl.cli.clone()];
        argv.extend(
            self.buildctl
                .args(&remote, &outputs, Path::new(&format!("{dir}/metadata.json"))),
        );
        argv
    }

    /// Builds the synced context with the runner's buildkitd; each step that starts, ends,
    /// is cached or fails is reported to `on_step` as buildctl reports it. The image id is
    /// the pushed image's digest.
    pub async fn build(
        &self,
        spec: &BuildInvocation<'_>,
        on_step: &mut (dyn FnMut(StepProgress) + Send),
    ) -> Result<BuildOutput, BuildFailure> {
        let fail = |reason: String| BuildFailure { reason, oom: false };
        if !spec.secrets.is_empty() {
            return Err(fail(
                "secrets are not supported with buildctl builders yet: build on docker_local or an ssh_pool host whose builder is docker".into(),
            ));
        }
        let started = Instant::now();
        let session = self.session().await.map_err(|e| fail(e.to_string()))?;
        let argv = self.build_argv(spec);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        // What is not progress, and the errors of failed steps: the failure's reason.
        let mut log = String::new();
        let mut seen = HashSet::new();
        let out = session
            .exec_streaming(&argv, &mut |line: &str| match parse_rawjson(line) {
                Ok(steps) => {
                    for step in steps {
                        if !seen.insert(format!("{}{:?}", step.id, step.state)) {
                            continue;
                        }
                        if let StepState::Failed(error) = &step.state {
                            let name = step.name.as_deref().unwrap_or(&step.id);
                            log.push_str(&format!("ERROR: {name}: {error}\n"));
                        }
                        on_step(step);
                    }
                }
                Err(_) => {
                    log.push_str(line);
                    log.push('\n');
                }
            })
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                session.close().await;
                return Err(fail(e.to_string()));
            }
        };
        if out.status != 0 {
            session.close().await;
            log.push_str(&String::from_utf8_lossy(&out.stdout));
            let mut f = failure(&log, Some(out.status as i32));
            // buildctl itself killed (137 = 128 + SIGKILL): the runner ran out of memory.
            f.oom |= out.status == 137;
            return Err(f);
        }
        let metadata = session
            .exec(&["cat", &format!("{}/metadata.json", self.dir())], &[])
            .await
            .map_err(|e| fail(e.to_string()));
        session.close().await;
        let digest = image_digest(&String::from_utf8_lossy(&metadata?.stdout))
            .ok_or_else(|| fail("buildctl succeeded but its metadata file names no image digest".into()))?;
        Ok(BuildOutput {
            image_id: digest,
            duration_ms: started.elapsed().as_millis() as u64,
            steps: None,
        })
    }
}
