//! What a build gets of the caches that outlive runners: the registry namespaces it reads
//! and writes (the actor rules of `lian_core::cache`), and the sccache bucket as a BuildKit
//! secret (never a build argument, never in a layer).

use std::path::Path;

use lian_core::BuildRequest;
use lian_core::cache;
use lian_runner::registry::RegistryAccess;
use lian_runner::warm::CachePlan;

use crate::stores::{RegistryEndpoint, S3Endpoint};

/// The secret id a Dockerfile mounts to reach sccache's bucket:
/// `RUN --mount=type=secret,id=lian-sccache,target=/run/secrets/lian-sccache . /run/secrets/lian-sccache && cargo build`.
pub const SCCACHE_SECRET: &str = "lian-sccache";

/// Where a build's caches live. `cache_from` / `cache_to` of the request choose among the
/// namespaces its actor may use (intake refused any other); left empty, the actor's own:
/// a CI build reads and writes `ci/<ws>`, a session reads its `dev/<actor>-<ws>` then
/// `ci/<ws>` and writes its own unless it discards.
pub fn plan(registry: &RegistryEndpoint, request: &BuildRequest) -> Result<CachePlan, cache::CacheRuleError> {
    let allowed = cache::namespaces(&request.directives)?;
    let policy = &request.directives.cache_policy;
    let write = cache::write_namespace(&request.directives)?;
    let mut reads = if policy.cache_from.is_empty() {
        allowed.reads.clone()
    } else {
        policy.cache_from.clone()
    };
    // The shared toolchain layers are parents, not a cache of this build's own steps.
    reads.retain(|ns| ns != cache::SHARED);
    // A build's own namespace first: it is the freshest cache of what it builds.
    reads.sort_by_key(|ns| Some(ns) != write.as_ref());
    Ok(CachePlan {
        registry: RegistryAccess {
            host: registry.host().to_string(),
            plain_http: registry.plain_http(),
            username: registry.username.clone(),
            password: registry.password.as_ref().map(|p| p.expose().to_string()),
        },
        reads,
        write,
        aliases: Vec::new(),
        pins: request.parents.clone(),
    })
}

/// A registry grant from the control plane's gate: credentials for one build.
pub struct Grant(pub lian_core::control::RegistryGrant);

impl std::ops::Deref for Grant {
    type Target = lian_core::control::RegistryGrant;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Grant {
    /// The gate, reached as the grant's user (plain HTTP: the gate listens on loopback).
    pub fn access(&self) -> RegistryAccess {
        RegistryAccess {
            host: self.registry.clone(),
            plain_http: true,
            username: Some(self.username.clone()),
            password: Some(self.password.expose().to_string()),
        }
    }
}

/// Writes the sccache settings for a build as a shell fragment a RUN step sources (mode
/// 0600, in the lease's directory); compilation units are kept under the build's namespace,
/// so CI and sessions never share them.
pub(crate) fn write_sccache_secret(s3: &S3Endpoint, namespace: &str, file: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let vars = [
        ("SCCACHE_BUCKET", s3.bucket.as_str()),
        ("SCCACHE_ENDPOINT", s3.endpoint.as_str()),
        ("SCCACHE_REGION", s3.region.as_str()),
        ("SCCACHE_S3_USE_SSL", if s3.use_ssl() { "true" } else { "false" }),
        ("SCCACHE_S3_KEY_PREFIX", namespace),
        ("AWS_ACCESS_KEY_ID", s3.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key.expose()),
        ("RUSTC_WRAPPER", "sccache"),
        ("CARGO_INCREMENTAL", "0"),
    ];
    let mut text = String::new();
    for (name, value) in vars {
        if value.contains(['\'', '\n', '\0']) {
            return Err(format!(
                "the sccache setting {name} has a quote or newline: fix [sccache] in lian.toml"
            ));
        }
        text.push_str(&format!("export {name}='{value}'\n"));
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    std::io::Write::write_all(&mut out, text.as_bytes()).map_err(|e| format!("{}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(actor: &str, disposition: Option<&str>) -> BuildRequest {
        let mut policy = serde_json::json!({"actor": actor, "cache_from": [], "cache_to": []});
        if actor != "ci" {
            policy["actor_id"] = "jpl".into();
            policy["disposition"] = disposition.into();
        }
        serde_json::from_value(serde_json::json!({
            "directives": {
                "workspace": "ws",
                "artifact": {"image": "example/app:1"},
                "compute_provider": "docker_local",
                "registry_provider": "zot",
                "cache_policy": policy
            },
            "context": {"manifest": "m"}
        }))
        .unwrap()
    }

    fn registry() -> RegistryEndpoint {
        RegistryEndpoint {
            url: "http://127.0.0.1:5000".into(),
            username: None,
            password: None,
        }
    }

    #[test]
    fn namespaces_follow_the_actor_rules() {
        let ci = plan(&registry(), &request("ci", None)).unwrap();
        assert_eq!(
            (ci.reads, ci.write),
            (vec!["ci/ws".to_string()], Some("ci/ws".to_string()))
        );
        let session = plan(&registry(), &request("human", Some("export"))).unwrap();
        assert_eq!(session.reads, ["dev/jpl-ws", "ci/ws"]);
        assert_eq!(session.write.as_deref(), Some("dev/jpl-ws"));
        let discard = plan(&registry(), &request("agent", Some("discard"))).unwrap();
        assert_eq!(discard.write, None, "a discarding session writes nothing");
    }
}
