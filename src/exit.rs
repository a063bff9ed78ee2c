//! The exit codes of `lian`, and the one place an error becomes one (`Exit::of`). Listed in
//! `lian --help` (`Exit::HELP`) and the README; each is tested (`tests/exit_codes.rs`).

use std::process::ExitCode;

/// What a `lian` command's exit status says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It did what was asked (a `--wait` build completed).
    Ok = 0,
    /// The build failed, or the command could not do what it was asked for a reason not
    /// listed below.
    Failed = 1,
    /// A bad command line, an invalid file it names (directives, lian.toml), or an id that
    /// names nothing.
    Usage = 2,
    /// NATS, the control plane or the registry could not be reached.
    Unreachable = 3,
    /// Gave up waiting (`--timeout`); the build goes on.
    TimedOut = 4,
    /// Refused by policy: cache-namespace rules, context limits, a control plane or registry
    /// that said no (401/403).
    Refused = 5,
}

impl Exit {
    /// The table `lian --help` ends with.
    pub const HELP: &'static str = "Exit codes:
  0  ok (a --wait build completed)
  1  the build failed, or the command failed for a reason not listed here
  2  usage: a bad flag, an invalid file (directives, lian.toml), an id that names nothing
  3  cannot reach NATS, the control plane or the registry
  4  timed out (--timeout); the build goes on
  5  refused by policy (cache namespaces, context limits, 401/403 from control or registry)";

    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }

    /// The word for it in an error printed with `--output json`.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Failed => "failed",
            Exit::Usage => "usage",
            Exit::Unreachable => "unreachable",
            Exit::TimedOut => "timed_out",
            Exit::Refused => "refused",
        }
    }

    /// The code an error exits with: the first cause in its chain that says, else `Failed`.
    pub fn of(err: &anyhow::Error) -> Exit {
        err.chain().find_map(Self::of_cause).unwrap_or(Exit::Failed)
    }

    fn of_cause(cause: &(dyn std::error::Error + 'static)) -> Option<Exit> {
        use lian_bus::BusError;
        use lian_runner::control::ControlError;
        use lian_runner::registry::RegistryError;
        if let Some(coded) = cause.downcast_ref::<Coded>() {
            return Some(coded.exit);
        }
        if let Some(err) = cause.downcast_ref::<BusError>() {
            return match err {
                BusError::Connect { .. } => Some(Exit::Unreachable),
                BusError::ContextLimit { .. } => Some(Exit::Refused),
                BusError::Context { .. } => Some(Exit::Usage),
                _ => None,
            };
        }
        if let Some(err) = cause.downcast_ref::<ControlError>() {
            return Some(match err {
                ControlError::Unreachable { .. } => Exit::Unreachable,
                ControlError::Refused { status: 401 | 403, .. } => Exit::Refused,
                ControlError::Refused { .. } => Exit::Failed,
            });
        }
        if let Some(err) = cause.downcast_ref::<RegistryError>() {
            return match err {
                RegistryError::Unreachable { .. } => Some(Exit::Unreachable),
                RegistryError::Refused { .. } => Some(Exit::Refused),
                RegistryError::Config { .. } => None,
            };
        }
        if cause.is::<lian_core::cache::CacheRuleError>() {
            return Some(Exit::Refused);
        }
        if let Some(err) = cause.downcast_ref::<lian_nickel::NickelError>() {
            return match err {
                // The evaluator itself could not run: not the user's file.
                lian_nickel::NickelError::Evaluator { .. } | lian_nickel::NickelError::Schemas { .. } => None,
                _ => Some(Exit::Usage),
            };
        }
        if cause.is::<lian_core::names::NameError>()
            || cause.is::<figment::Error>()
            || cause.is::<crate::config::EndpointError>()
            || cause.is::<crate::config::ConfigError>()
        {
            return Some(Exit::Usage);
        }
        if cause.is::<tokio::time::error::Elapsed>() {
            return Some(Exit::TimedOut);
        }
        None
    }
}

/// An error whose exit code the place that raised it decided.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub exit: Exit,
    pub message: String,
}

impl Coded {
    pub fn error(exit: Exit, message: impl Into<String>) -> anyhow::Error {
        Self {
            exit,
            message: message.into(),
        }
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_deep_in_the_chain_decides_and_anything_else_is_a_failure() {
        let unreachable = anyhow::Error::new(lian_bus::BusError::Connect {
            url: "nats://x".into(),
            message: "refused".into(),
        })
        .context("cannot submit");
        assert_eq!(Exit::of(&unreachable), Exit::Unreachable);
        let refused = anyhow::Error::new(lian_core::cache::CacheRuleError::MissingActorId { actor: "human" })
            .context("d.json: cache policy refused");
        assert_eq!(Exit::of(&refused), Exit::Refused);
        assert_eq!(Exit::of(&Coded::error(Exit::Usage, "no build b1")), Exit::Usage);
        assert_eq!(Exit::of(&anyhow::anyhow!("something else")), Exit::Failed);
        assert_eq!(Exit::TimedOut.code(), ExitCode::from(4));
    }

    #[test]
    fn help_lists_every_code() {
        for exit in [
            Exit::Ok,
            Exit::Failed,
            Exit::Usage,
            Exit::Unreachable,
            Exit::TimedOut,
            Exit::Refused,
        ] {
            assert!(Exit::HELP.contains(&format!("\n  {}  ", exit as u8)), "{exit:?}");
        }
    }
}
