//! Validated names. A value of these types is legal by construction: a `Workspace` is one
//! NATS subject token, an `ImageRef` carries no shell metacharacter, and so on. Everything
//! that reaches a subject, a path or a command line goes through one of them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused, with the rule it broke so a user can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} `{value}` is not valid: {rule}")]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
    pub rule: &'static str,
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

/// The longest build id: its lease keys (`<id>-r<attempt>`, attempt up to 255) stay tokens.
pub const MAX_BUILD_ID: usize = 56;

/// A lowercase token: 1-63 of `a-z 0-9 - _`, starting with a letter or digit (a build id:
/// 1-56, see [`MAX_BUILD_ID`]).
fn check_token(kind: &'static str, value: &str) -> Result<(), NameError> {
    let (max, rule) = if kind == "build id" {
        (
            MAX_BUILD_ID,
            "use 1-56 characters of a-z, 0-9, '-' or '_', starting with a letter or digit",
        )
    } else {
        (
            63,
            "use 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit",
        )
    };
    let ok = !value.is_empty()
        && value.len() <= max
        && value.chars().all(is_token_char)
        && value.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind,
            value: shorten(value),
            rule,
        })
    }
}

/// Keeps error messages readable when someone sends a 300-character name.
fn shorten(value: &str) -> String {
    if value.chars().count() > 80 {
        let head: String = value.chars().take(77).collect();
        format!("{head}...")
    } else {
        value.to_string()
    }
}

macro_rules! token_name {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_token($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        // Eq, Ord and Hash are the inner string's, so maps keyed by name look up by &str.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

token_name!(
    /// A workspace: one NATS subject token, the second token of every `lian.` subject.
    Workspace,
    "workspace"
);
token_name!(
    /// A build id: one NATS subject token (`lian.<ws>.build.<id>.<event>`).
    BuildId,
    "build id"
);
token_name!(
    /// A lamina catalog layer name.
    LayerName,
    "layer name"
);
token_name!(
    /// The key a runner lease is recorded under before the provider is called, so a worker
    /// that takes over a build finds the runner instead of spawning a second one.
    LeaseKey,
    "lease key"
);
token_name!(
    /// A cascade id: one subject token (`lian.<ws>.cascade.<id>.<event>`).
    CascadeId,
    "cascade id"
);
token_name!(
    /// The id of a build secret (`RUN --mount=type=secret,id=<id>`). Requests name secrets;
    /// only workers hold their values.
    SecretId,
    "secret id"
);

impl LeaseKey {
    /// The lease key of a build's n-th runner attempt (1-based): deterministic, so replaying
    /// the history names the same runner.
    pub fn for_attempt(build: &BuildId, attempt: u8) -> Self {
        Self(format!("{build}-r{attempt}"))
    }

    /// The build this key belongs to (`<build>-r<attempt>`), if it is a lifecycle key.
    pub fn build(&self) -> Option<BuildId> {
        let (build, attempt) = self.0.rsplit_once("-r")?;
        attempt.parse::<u8>().ok()?;
        BuildId::new(build).ok()
    }
}

impl CascadeId {
    /// A cascade started by a root build is named after it, so a redelivered completion
    /// event starts the same cascade, not a second one.
    pub fn rooted_at(build: &BuildId) -> Self {
        Self(format!("c-{build}"))
    }
}

/// An OCI image reference `[registry[:port]/]path[:tag]`: lowercase path components,
/// no spaces, no shell metacharacters, safe to pass as one argument.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef(String);

impl ImageRef {
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        let err = |rule| NameError {
            kind: "image",
            value: shorten(&value),
            rule,
        };
        if value.is_empty() || value.len() > 255 {
            return Err(err("use 1-255 characters"));
        }
        let (path, tag) = split_tag(&value);
        if let Some(tag) = tag {
            let tag_ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                && !tag.starts_with(['.', '-']);
            if !tag_ok {
                return Err(err("a tag is 1-128 of A-Z a-z 0-9 _ . - not starting with . or -"));
            }
        }
        let path_ok = path.split('/').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | ':'))
                && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                && part.ends_with(|c: char| c.is_ascii_alphanumeric())
        });
        if !path_ok {
            return Err(err(
                "use lowercase [registry/]path[:tag] with no spaces or shell characters",
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Splits `host:5000/a/b:tag` into (`host:5000/a/b`, `Some("tag")`): a colon after the last
/// slash is a tag, one before it is a registry port.
fn split_tag(value: &str) -> (&str, Option<&str>) {
    let last_slash = value.rfind('/').map_or(0, |i| i + 1);
    match value[last_slash..].find(':') {
        Some(i) => (&value[..last_slash + i], Some(&value[last_slash + i + 1..])),
        None => (value, None),
    }
}

impl TryFrom<String> for ImageRef {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, NameError> {
        Self::new(value)
    }
}

impl From<ImageRef> for String {
    fn from(value: ImageRef) -> String {
        value.0
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A short, fixed-length token for a name that becomes part of a path the OS limits (a unix
/// socket has 108 bytes, 104 on some systems): the first 16 hex digits of its sha256. Every
/// name the validators accept, however long, gives a path of the same length.
pub fn path_token(name: &str) -> String {
    use sha2::{Digest, Sha256};
    data_encoding::HEXLOWER.encode(&Sha256::digest(name.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_build_id_gives_valid_lease_and_cascade_names() {
        let longest = BuildId::new("b".repeat(MAX_BUILD_ID)).unwrap();
        assert!(BuildId::new("b".repeat(MAX_BUILD_ID + 1)).is_err());
        let key = LeaseKey::for_attempt(&longest, u8::MAX);
        assert!(LeaseKey::new(key.as_str()).is_ok(), "{key}");
        assert_eq!(key.build(), Some(longest.clone()));
        assert!(CascadeId::new(CascadeId::rooted_at(&longest).as_str()).is_ok());
    }

    #[test]
    fn lease_keys_name_their_build() {
        let b = BuildId::new("01abc-x").unwrap();
        assert_eq!(LeaseKey::for_attempt(&b, 2).build(), Some(b));
        assert_eq!(LeaseKey::new("no-attempt").unwrap().build(), None);
    }

    #[test]
    fn workspace_is_one_subject_token() {
        for good in ["lian-build", "a", "ws_1", "0abc"] {
            assert!(Workspace::new(good).is_ok(), "{good}");
        }
        let long = "a".repeat(300);
        for bad in ["a.b", "*", ">", "has space", "", long.as_str(), "Upper", "-lead", "ü"] {
            let err = Workspace::new(bad).unwrap_err();
            assert_eq!(err.kind, "workspace");
        }
    }

    #[test]
    fn long_names_are_shortened_in_errors() {
        let err = Workspace::new("x".repeat(300)).unwrap_err();
        assert!(err.to_string().len() < 250, "{err}");
    }

    #[test]
    fn image_refs_refuse_shell_characters() {
        for good in [
            "lamina/rust:latest",
            "127.0.0.1:5000/ci/ws/app:1.0",
            "registry.example.com/a/b",
            "busybox",
        ] {
            assert!(ImageRef::new(good).is_ok(), "{good}");
        }
        for bad in [
            "a b",
            "x;rm -rf /",
            "$(id)",
            "a`b`",
            "UPPER/case",
            "a:",
            "a:-x",
            "a/../b",
            "",
            "a|b",
        ] {
            assert!(ImageRef::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_deserialize_through_validation() {
        let err = serde_json::from_str::<Workspace>("\"a.b\"").unwrap_err();
        assert!(err.to_string().contains("workspace `a.b` is not valid"), "{err}");
    }

    #[test]
    fn lease_keys_are_deterministic_per_attempt() {
        let b = BuildId::new("b1").unwrap();
        assert_eq!(LeaseKey::for_attempt(&b, 2).as_str(), "b1-r2");
    }
}
