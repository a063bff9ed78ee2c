//! Cache namespace rules (mission, "Cache namespaces"). Namespaces are registry path
//! prefixes: `ci/<workspace>` is canonical and written by CI; `dev/<actor_id>-<workspace>`
//! belongs to one session actor. CI never imports from `dev/*`: where the seed's table
//! lets `ci` read its own `dev/*`, the mission's stronger rule wins.

use crate::directives::{Actor, BuildDirectives, Disposition};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheRuleError {
    #[error("cache_policy.actor_id is required for a {actor} actor: it names the dev/<actor_id>-<workspace> namespace")]
    MissingActorId { actor: &'static str },
    #[error("cache_policy.disposition is required for a {actor} session: set 'export, 'discard or 'rollback")]
    MissingDisposition { actor: &'static str },
    #[error("a {actor} actor may not read cache namespace `{namespace}`: allowed are {allowed}")]
    ReadRefused {
        actor: &'static str,
        namespace: String,
        allowed: String,
    },
    #[error("a {actor} actor may not write cache namespace `{namespace}`: allowed is {allowed}")]
    WriteRefused {
        actor: &'static str,
        namespace: String,
        allowed: String,
    },
}

fn actor_name(actor: Actor) -> &'static str {
    match actor {
        Actor::Ci => "ci",
        Actor::Human => "human",
        Actor::Agent => "agent",
        Actor::CiAux => "ci_aux",
    }
}

/// The namespaces a request's actor may read and write (registry path prefixes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    pub reads: Vec<String>,
    pub writes: Vec<String>,
}

impl Namespaces {
    /// The one namespace a build's image and cache go to, if it may write any.
    pub fn home(&self) -> Option<&str> {
        self.writes.first().map(String::as_str)
    }

    /// Whether `path` (`ci/ws/app`) lies in one of `allowed`, by whole path components.
    pub fn within(path: &str, allowed: &[String]) -> bool {
        allowed
            .iter()
            .any(|a| path == a || path.strip_prefix(a.as_str()).is_some_and(|r| r.starts_with('/')))
    }
}

/// The catalog's shared toolchain layers (and the Rust base `lian catalog bootstrap`
/// makes): every actor reads them, no build writes them.
pub const SHARED: &str = "lamina";

/// What the actor rules allow a request, whatever its `cache_from`/`cache_to` ask for.
pub fn namespaces(directives: &BuildDirectives) -> Result<Namespaces, CacheRuleError> {
    let policy = &directives.cache_policy;
    let ws = directives.workspace.as_str();
    let actor = actor_name(policy.actor);
    let ci = format!("ci/{ws}");
    let (reads, writes) = match policy.actor {
        Actor::Ci | Actor::CiAux => (vec![ci.clone()], vec![ci.clone()]),
        Actor::Human | Actor::Agent => {
            let id = policy
                .actor_id
                .as_deref()
                .ok_or(CacheRuleError::MissingActorId { actor })?;
            if policy.disposition.is_none() {
                return Err(CacheRuleError::MissingDisposition { actor });
            }
            let own = format!("dev/{id}-{ws}");
            let writes = match policy.disposition {
                Some(Disposition::Discard) => vec![],
                _ => vec![own.clone()],
            };
            (vec![ci.clone(), own], writes)
        }
    };
    let mut reads = reads;
    reads.push(SHARED.to_string());
    Ok(Namespaces { reads, writes })
}

/// The namespace a build writes its image and cache to: the first of its `cache_to`, else
/// its actor's own; `None` for a session that discards.
pub fn write_namespace(directives: &BuildDirectives) -> Result<Option<String>, CacheRuleError> {
    let allowed = namespaces(directives)?;
    Ok(match directives.cache_policy.cache_to.first() {
        Some(ns) => Some(ns.clone()),
        None => allowed.home().map(str::to_string),
    })
}

/// Checks a request's cache policy against the actor rules; the first broken rule is
/// returned with what would have been allowed.
pub fn check(directives: &BuildDirectives) -> Result<(), CacheRuleError> {
    let policy = &directives.cache_policy;
    let actor = actor_name(policy.actor);
    let Namespaces { reads, writes } = namespaces(directives)?;
    let within = Namespaces::within;
    let list = |allowed: &[String]| {
        if allowed.is_empty() {
            "nothing".to_string()
        } else {
            allowed.iter().map(|a| format!("{a}/*")).collect::<Vec<_>>().join(", ")
        }
    };
    if let Some(ns) = policy.cache_from.iter().find(|ns| !within(ns, &reads)) {
        return Err(CacheRuleError::ReadRefused {
            actor,
            namespace: ns.clone(),
            allowed: list(&reads),
        });
    }
    if let Some(ns) = policy.cache_to.iter().find(|ns| !within(ns, &writes)) {
        return Err(CacheRuleError::WriteRefused {
            actor,
            namespace: ns.clone(),
            allowed: list(&writes),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directives::fixtures::directives;

    fn session(actor: Actor, disposition: Disposition) -> BuildDirectives {
        let mut d = directives("ws");
        d.cache_policy.actor = actor;
        d.cache_policy.actor_id = Some("jpl".into());
        d.cache_policy.disposition = Some(disposition);
        d.cache_policy.cache_from = vec!["ci/ws".into(), "dev/jpl-ws".into()];
        d.cache_policy.cache_to = vec!["dev/jpl-ws".into()];
        d
    }

    #[test]
    fn ci_reads_and_writes_ci_only() {
        assert_eq!(check(&directives("ws")), Ok(()));
        let mut d = directives("ws");
        d.cache_policy.cache_from.push("dev/jpl-ws".into());
        assert!(matches!(check(&d), Err(CacheRuleError::ReadRefused { .. })));
        let mut d = directives("ws");
        d.cache_policy.cache_to = vec!["ci/other".into()];
        assert!(matches!(check(&d), Err(CacheRuleError::WriteRefused { .. })));
    }

    #[test]
    fn sessions_read_ci_and_own_dev_and_write_own_dev() {
        assert_eq!(check(&session(Actor::Human, Disposition::Export)), Ok(()));
        assert_eq!(check(&session(Actor::Agent, Disposition::Rollback)), Ok(()));
        let mut d = session(Actor::Human, Disposition::Export);
        d.cache_policy.cache_to = vec!["ci/ws".into()];
        assert!(matches!(check(&d), Err(CacheRuleError::WriteRefused { .. })));
        let mut d = session(Actor::Agent, Disposition::Export);
        d.cache_policy.cache_from = vec!["dev/other-ws".into()];
        assert!(matches!(check(&d), Err(CacheRuleError::ReadRefused { .. })));
    }

    #[test]
    fn a_discarding_session_writes_nothing() {
        let d = session(Actor::Human, Disposition::Discard);
        let err = check(&d).unwrap_err();
        assert!(err.to_string().contains("allowed is nothing"), "{err}");
    }

    #[test]
    fn sessions_need_an_actor_id_and_a_disposition() {
        let mut d = session(Actor::Human, Disposition::Export);
        d.cache_policy.actor_id = None;
        assert!(matches!(check(&d), Err(CacheRuleError::MissingActorId { .. })));
        let mut d = session(Actor::Human, Disposition::Export);
        d.cache_policy.disposition = None;
        assert!(matches!(check(&d), Err(CacheRuleError::MissingDisposition { .. })));
    }

    #[test]
    fn prefixes_match_whole_path_components() {
        let mut d = directives("ws");
        d.cache_policy.cache_from = vec!["ci/ws/deps".into()];
        assert_eq!(check(&d), Ok(()));
        d.cache_policy.cache_from = vec!["ci/wsx".into()];
        assert!(check(&d).is_err());
    }
}
