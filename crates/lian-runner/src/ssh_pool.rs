//! The ssh pool provider: static hosts listed in config, reached with russh. A lease is a
//! directory `<work_dir>/<lease-key>` on one host, chosen deterministically from the lease
//! key among the hosts big enough for the tier, so a worker that takes over a build finds
//! the same host. The context is synced incrementally; the build runs on the host's Docker
//! engine BuildKit, with the build's secrets put beside the context for the length of the
//! build; destroy removes the directory.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Instant;

use async_trait::async_trait;
use lian_core::LeaseKey;
use lian_core::control::LeaseRequest;
use lian_core::directives::ComputeProvider;
use lian_core::sizing::RunnerType;
use serde::{Deserialize, Serialize};

use crate::docker_build::failure;
use crate::provider::{Built, Held, OnStep, Provider, RunnerHandle};
use crate::ssh::{SshSession, SshTarget};
use crate::sync::{SyncStats, sync_dir};
use crate::warm::CachePlan;
use crate::{BuildFailure, BuildInvocation, BuildOutput, CloudRunner, DockerBuilder, Runner, RunnerError};

/// One host of the pool, as configured (`[[ssh_hosts]]` in lian.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SshHostEntry")]
pub struct SshHost {
    pub name: String,
    #[serde(flatten)]
    pub target: SshTarget,
    /// The largest tier this host serves.
    pub tier: RunnerType,
    /// Where leases live on the host.
    #[serde(default = "default_work_dir")]
    pub work_dir: String,
    #[serde(default = "default_docker")]
    pub docker_cli: String,
    /// How builds run there: `docker` (its Docker engine's BuildKit, the default) or
    /// `buildctl` (its buildkitd at `buildkit_addr`; the image is pushed).
    #[serde(default)]
    pub builder: HostBuilder,
    #[serde(default = "default_buildkit_addr")]
    pub buildkit_addr: String,
}

/// `[[ssh_hosts]]` as written: flat, so a mistyped key is refused by name (serde cannot
/// refuse unknown keys through `flatten`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SshHostEntry {
    name: String,
    address: String,
    user: String,
    key: PathBuf,
    host_key: String,
    tier: RunnerType,
    #[serde(default = "default_work_dir")]
    work_dir: String,
    #[serde(default = "default_docker")]
    docker_cli: String,
    #[serde(default)]
    builder: HostBuilder,
    #[serde(default = "default_buildkit_addr")]
    buildkit_addr: String,
}

impl From<SshHostEntry> for SshHost {
    fn from(e: SshHostEntry) -> Self {
        Self {
            name: e.name,
            target: SshTarget {
                address: e.address,
                user: e.user,
                key: e.key,
                host_key: e.host_key,
            },
            tier: e.tier,
            work_dir: e.work_dir,
            docker_cli: e.docker_cli,
            builder: e.builder,
            buildkit_addr: e.buildkit_addr,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostBuilder {
    #[default]
    Docker,
    Buildctl,
}

fn default_buildkit_addr() -> String {
    crate::cloud::BUILDKIT_ADDR.into()
}

fn default_work_dir() -> String {
    "/tmp/lian-runners".into()
}

fn default_docker() -> String {
    "/usr/bin/docker".into()
}

#[derive(Debug, Clone)]
pub struct SshPool {
    hosts: Vec<SshHost>,
    /// Local directory where a context is put together before it is synced.
    staging: PathBuf,
    network: String,
}

impl SshPool {
    pub fn new(hosts: Vec<SshHost>, staging: impl Into<PathBuf>, network: &str) -> Self {
        Self {
            hosts,
            staging: staging.into(),
            network: network.to_string(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The host of a lease: stable for the key among the hosts that fit the tier.
    pub fn host_for(&self, key: &LeaseKey, tier: RunnerType) -> Result<&SshHost, RunnerError> {
        let mut fitting: Vec<&SshHost> = self.hosts.iter().filter(|h| h.tier >= tier).collect();
        fitting.sort_by(|a, b| a.name.cmp(&b.name));
        if fitting.is_empty() {
            return Err(RunnerError::NoHost {
                tier: tier.as_str(),
                hosts: self
                    .hosts
                    .iter()
                    .map(|h| format!("{} ({})", h.name, h.tier.as_str()))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.as_str().hash(&mut hasher);
        Ok(fitting[(hasher.finish() % fitting.len() as u64) as usize])
    }

    fn by_name(&self, name: &str) -> Option<&SshHost> {
        self.hosts.iter().find(|h| h.name == name)
    }

    fn dir(host: &SshHost, key: &LeaseKey) -> String {
        format!("{}/{key}", host.work_dir.trim_end_matches('/'))
    }

    async fn session(host: &SshHost, key: &LeaseKey) -> Result<SshSession, RunnerError> {
        SshSession::connect(&host.target)
            .await
            .map_err(|e| RunnerError::Remote {
                lease_key: key.clone(),
                message: e.to_string(),
            })
    }

    /// The local directory the worker materialises the context in, before `sync`.
    pub fn staging(&self, key: &LeaseKey) -> PathBuf {
        self.staging.join(key.as_str())
    }

    pub async fn spawn(&self, key: &LeaseKey, tier: RunnerType) -> Result<Runner, RunnerError> {
        let host = self.host_for(key, tier)?;
        let session = Self::session(host, key).await?;
        let dir = Self::dir(host, key);
        let out = session
            .exec(&["mkdir", "-p", &format!("{dir}/context")], &[])
            .await
            .map_err(remote(key))?;
        session.close().await;
        if out.status != 0 {
            return Err(RunnerError::Failed {
                lease_key: key.clone(),
                message: format!("mkdir failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Ok(Runner {
            lease_key: key.clone(),
            lease_id: format!("ssh_pool:{}:{key}", host.name),
            host: host.name.clone(),
            runner_type: tier,
            host_key: None,
            ssh_port: None,
        })
    }

    /// Syncs the staged context to the lease's host.
    pub async fn sync(&self, key: &LeaseKey, host_name: &str) -> Result<SyncStats, RunnerError> {
        let host = self.by_name(host_name).ok_or_else(|| unknown_host(key, host_name))?;
        let session = Self::session(host, key).await?;
        let stats = sync_dir(
            &session,
            &self.staging(key),
            &format!("{}/context", Self::dir(host, key)),
        )
        .await
        .map_err(|e| RunnerError::Remote {
            lease_key: key.clone(),
            message: e.to_string(),
        });
        session.close().await;
        stats
    }

    /// Builds on the host with its builder: the Docker engine's BuildKit, or buildkitd
    /// through `buildctl` (as on a cloud runner).
    pub async fn build(
        &self,
        key: &LeaseKey,
        host_name: &str,
        spec: &BuildInvocation<'_>,
    ) -> Result<BuildOutput, BuildFailure> {
        let fail = |reason: String| BuildFailure { reason, oom: false };
        let host = self
            .by_name(host_name)
            .ok_or_else(|| fail(unknown_host(key, host_name).to_string()))?;
        if host.builder == HostBuilder::Buildctl {
            return CloudRunner::on_host(key, host, &self.staging)
                .build(spec, &mut |_| {})
                .await;
        }
        let session = Self::session(host, key).await.map_err(|e| fail(e.to_string()))?;
        let dir = Self::dir(host, key);
        let builder = DockerBuilder {
            cli: host.docker_cli.clone().into(),
            host: None,
            network: self.network.clone(),
            config: None,
        };
        let iid = format!("{dir}/image.iid");
        let context = PathBuf::from(&dir).join("context");
        // Secrets go beside the context (never in it), readable by the lease's user only,
        // for the length of the build; destroy removes the lease directory in any case.
        let secret_dir = format!("{dir}/secrets");
        let remote_secrets = match Self::put_secrets(&session, &secret_dir, &spec.secrets).await {
            Ok(paths) => paths,
            Err(reason) => {
                let _ = session.exec(&["rm", "-rf", "--", &secret_dir], &[]).await;
                session.close().await;
                return Err(fail(reason));
            }
        };
        let remote_spec = BuildInvocation {
            context: &context,
            secrets: remote_secrets.iter().map(|(id, p)| (*id, p.as_path())).collect(),
            ..spec.clone()
        };
        let mut argv: Vec<String> = vec!["env".into(), "DOCKER_BUILDKIT=1".into(), host.docker_cli.clone()];
        argv.extend(builder.args(&remote_spec, std::path::Path::new(&iid)));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let started = Instant::now();
        let out = session.exec(&argv, &[]).await;
        if !remote_secrets.is_empty() {
            let _ = session.exec(&["rm", "-rf", "--", &secret_dir], &[]).await;
        }
        let out = out.map_err(|e| fail(e.to_string()))?;
        if out.status != 0 {
            session.close().await;
            let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            let mut f = failure(&log, Some(out.status as i32));
            f.oom |= out.status == 137;
            return Err(f);
        }
        let id = session
            .exec(&["cat", &iid], &[])
            .await
            .map_err(|e| fail(e.to_string()))?;
        session.close().await;
        Ok(BuildOutput {
            image_id: String::from_utf8_lossy(&id.stdout).trim().to_string(),
            duration_ms: started.elapsed().as_millis() as u64,
            steps: Some(crate::StepCounts::from_log(&String::from_utf8_lossy(&out.stderr))),
        })
    }

    /// Puts each secret's value in `<secret_dir>/<id>` on the host (through the SSH channel's
    /// stdin, under umask 077) and returns where. A failure names the secret, never its value.
    async fn put_secrets<'a>(
        session: &SshSession,
        secret_dir: &str,
        secrets: &[(&'a str, &std::path::Path)],
    ) -> Result<Vec<(&'a str, PathBuf)>, String> {
        let mut placed = Vec::with_capacity(secrets.len());
        if secrets.is_empty() {
            return Ok(placed);
        }
        let made = session
            .exec(&["mkdir", "-p", "-m", "700", "--", secret_dir], &[])
            .await
            .map_err(|e| e.to_string())?;
        if made.status != 0 {
            return Err(format!(
                "cannot make {secret_dir} on the host: {}",
                String::from_utf8_lossy(&made.stderr).trim()
            ));
        }
        for (id, file) in secrets {
            let value = tokio::fs::read(file)
                .await
                .map_err(|e| format!("secret {id}: cannot read {}: {e}", file.display()))?;
            let path = format!("{secret_dir}/{id}");
            let out = session
                .exec(&["sh", "-c", "umask 077 && cat > \"$1\"", "sh", &path], &value)
                .await
                .map_err(|e| format!("secret {id}: {e}"))?;
            if out.status != 0 {
                return Err(format!("secret {id}: cannot write it on the host"));
            }
            placed.push((*id, PathBuf::from(path)));
        }
        Ok(placed)
    }

    /// Removes the lease from its host; a lease that is gone is destroyed already.
    pub async fn destroy(&self, key: &LeaseKey, host_name: &str) -> Result<(), RunnerError> {
        let host = self.by_name(host_name).ok_or_else(|| unknown_host(key, host_name))?;
        let session = Self::session(host, key).await?;
        let out = session
            .exec(&["rm", "-rf", "--", &Self::dir(host, key)], &[])
            .await
            .map_err(remote(key))?;
        session.close().await;
        let _ = tokio::fs::remove_dir_all(self.staging(key)).await;
        if out.status != 0 {
            return Err(RunnerError::Failed {
                lease_key: key.clone(),
                message: format!("rm failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for SshPool {
    fn kind(&self) -> ComputeProvider {
        ComputeProvider::SshPool
    }

    async fn lease(&self, ask: &LeaseRequest) -> Result<Runner, RunnerError> {
        self.spawn(&ask.lease_key, ask.runner_type).await
    }

    async fn reach(&self, lease: Held<'_>) -> Result<Box<dyn RunnerHandle>, RunnerError> {
        Ok(Box::new(PoolRunner {
            context: self.staging(lease.key),
            pool: self.clone(),
            key: lease.key.clone(),
            host: lease.host.unwrap_or_default().to_string(),
        }))
    }

    /// An ssh_pool lease whose spawn was never recorded is on the host its key maps to.
    async fn release(&self, lease: Held<'_>) -> Result<(), RunnerError> {
        let host = match lease.host.filter(|h| !h.is_empty()) {
            Some(h) => h.to_string(),
            None => self.host_for(lease.key, lease.runner_type)?.name.clone(),
        };
        self.destroy(lease.key, &host).await
    }
}

/// An ssh_pool lease, reached from this host: the context is staged here, then synced.
struct PoolRunner {
    pool: SshPool,
    key: LeaseKey,
    host: String,
    context: PathBuf,
}

#[async_trait]
impl RunnerHandle for PoolRunner {
    fn context_dir(&self) -> &std::path::Path {
        &self.context
    }

    async fn forward_context(&self) -> Result<u64, RunnerError> {
        let stats = self.pool.sync(&self.key, &self.host).await?;
        tracing::info!(lease = %self.key, host = %self.host, sent_files = stats.sent_files, sent_bytes = stats.sent_bytes, "context synced over ssh");
        Ok(stats.sent_bytes)
    }

    async fn build(
        &self,
        invocation: &BuildInvocation<'_>,
        _plan: Option<CachePlan>,
        _on_step: OnStep<'_>,
    ) -> Result<Built, BuildFailure> {
        // Step progress is not streamed from a pool host's docker build.
        self.pool
            .build(&self.key, &self.host, invocation)
            .await
            .map(Built::from)
    }
}

fn remote(key: &LeaseKey) -> impl FnOnce(crate::ssh::SshError) -> RunnerError + '_ {
    move |e| RunnerError::Remote {
        lease_key: key.clone(),
        message: e.to_string(),
    }
}

fn unknown_host(key: &LeaseKey, name: &str) -> RunnerError {
    RunnerError::Remote {
        lease_key: key.clone(),
        message: format!("host {name} is not in this worker's ssh pool (ssh_hosts in lian.toml)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(toml_extra: &str) -> SshHost {
        let json = format!(
            r#"{{"name":"b1","address":"10.0.0.5:22","user":"lian","key":"/k","host_key":"ssh-ed25519 AAAA","tier":"cax31"{toml_extra}}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn a_mistyped_key_of_a_host_is_refused_by_name() {
        let json = r#"{"name":"b1","address":"10.0.0.5:22","user":"lian","key":"/k","host_key":"k","tier":"cax31","work_dri":"/x"}"#;
        let err = serde_json::from_str::<SshHost>(json).unwrap_err().to_string();
        assert!(err.contains("work_dri") && err.contains("work_dir"), "{err}");
    }

    #[test]
    fn a_host_builds_with_docker_unless_it_names_buildctl() {
        assert_eq!(host("").builder, HostBuilder::Docker);
        let bk = host(r#","builder":"buildctl","buildkit_addr":"tcp://127.0.0.1:1234""#);
        assert_eq!(bk.builder, HostBuilder::Buildctl);
        let key = LeaseKey::new("b1-r1").unwrap();
        let runner = CloudRunner::on_host(&key, &bk, std::path::Path::new("/tmp/staging"));
        let spec = BuildInvocation {
            context: std::path::Path::new("/tmp/staging/b1-r1"),
            dockerfile: "Dockerfile",
            image: "registry.example/ws/app:1",
            target: None,
            build_args: vec![],
            secrets: vec![],
            cache_from: vec![],
            inline_cache: false,
        };
        let argv = runner.build_argv(&spec);
        assert_eq!(argv[0], "buildctl");
        let addr = argv.iter().position(|a| a == "--addr").expect("--addr");
        assert_eq!(argv[addr + 1], "tcp://127.0.0.1:1234");
        assert!(
            argv.iter().any(|a| a == "context=/tmp/lian-runners/b1-r1/context"),
            "the lease's directory on the host: {argv:?}"
        );
        let unknown = serde_json::to_string(&host(""))
            .unwrap()
            .replace(r#""builder":"docker""#, r#""builder":"podman""#);
        assert!(serde_json::from_str::<SshHost>(&unknown).is_err(), "{unknown}");
    }
}
