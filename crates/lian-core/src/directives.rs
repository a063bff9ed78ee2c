//! `BuildDirectives`: what a caller says about one build. Mirrors `schemas/build_directives.ncl`
//! (the Nickel contract is the first gate, these types the second: unknown fields are refused
//! here too, so a request that skipped Nickel is held to the same shape).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::{ImageRef, SecretId, Workspace};
use crate::sizing::{Language, RunnerType};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildDirectives {
    pub workspace: Workspace,
    pub artifact: Artifact,
    pub compute_provider: ComputeProvider,
    pub registry_provider: RegistryProvider,
    pub cache_policy: CachePolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_override: Option<RunnerOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_events: Option<NatsEvents>,
}

impl BuildDirectives {
    /// Labels the caller asked to see on this build's events.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.nats_events.as_ref().map(|n| n.labels.clone()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub image: ImageRef,
    #[serde(default = "default_dockerfile")]
    pub dockerfile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    #[serde(default)]
    pub language: Language,
    /// Secrets mounted into RUN steps (`--mount=type=secret,id=...`): ids only; the values
    /// live on the workers and never enter a request, an event, a log or a layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretId>,
}

fn default_dockerfile() -> String {
    "Dockerfile".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeProvider {
    DockerLocal,
    SshPool,
    Hcloud,
    Proxmox,
    /// For benchmarks only: a lease that returns at once and a build that runs nothing. A
    /// worker refuses it unless started with it enabled, so no production build can be
    /// completed with a fake image by naming it.
    Noop,
}

impl ComputeProvider {
    /// Every provider a build can name.
    pub const ALL: [ComputeProvider; 5] = [
        Self::DockerLocal,
        Self::SshPool,
        Self::Hcloud,
        Self::Proxmox,
        Self::Noop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DockerLocal => "docker_local",
            Self::SshPool => "ssh_pool",
            Self::Hcloud => "hcloud",
            Self::Proxmox => "proxmox",
            Self::Noop => "noop",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryProvider {
    Zot,
    Harbor,
    Ghcr,
    Dockerhub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    Ci,
    Human,
    Agent,
    CiAux,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    Export,
    Discard,
    Rollback,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePolicy {
    pub actor: Actor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disposition: Option<Disposition>,
    #[serde(default)]
    pub cache_from: Vec<String>,
    #[serde(default)]
    pub cache_to: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_type: Option<RunnerType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_budget_min: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsEvents {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn directives(workspace: &str) -> BuildDirectives {
        BuildDirectives {
            workspace: Workspace::new(workspace).unwrap(),
            artifact: Artifact {
                image: ImageRef::new("lian-example/base:latest").unwrap(),
                dockerfile: default_dockerfile(),
                target: None,
                build_args: BTreeMap::new(),
                language: Language::Rust,
                secrets: vec![],
            },
            compute_provider: ComputeProvider::DockerLocal,
            registry_provider: RegistryProvider::Zot,
            cache_policy: CachePolicy {
                actor: Actor::Ci,
                actor_id: None,
                disposition: None,
                cache_from: vec![format!("ci/{workspace}")],
                cache_to: vec![format!("ci/{workspace}")],
            },
            runner_override: None,
            nats_events: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let mut json = serde_json::to_value(fixtures::directives("ws")).unwrap();
        json["artifact"]["imgae"] = "typo".into();
        let err = serde_json::from_value::<BuildDirectives>(json).unwrap_err();
        assert!(err.to_string().contains("imgae"), "{err}");
    }

    #[test]
    fn round_trips_through_json() {
        let d = fixtures::directives("ws");
        let back: BuildDirectives = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}
