//! What a registry grant lets through the gate: the rule alone, no I/O, so each refusal can
//! be tested against the request line that provokes it.
//!
//! The repository name is read from the path exactly as distribution's router reads it:
//! the suffixes `manifests/<ref>`, `blobs/<digest>`, `blobs/uploads/[<uuid>]` and `tags/list`
//! sit at fixed positions from the end (a reference, digest or upload id holds no `/`), so a
//! name that itself contains `blobs` or `manifests` cannot make the gate check one
//! repository while the registry acts on another.

use axum::http::Method;
use lian_core::cache::Namespaces;

/// Why the gate refused a request (403 `DENIED`, with this as its message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("`{path}` is not a registry API path the gate serves (/v2/<name>/manifests|blobs|tags/...)")]
    NotRegistryApi { path: String },
    #[error("listing the registry's repositories (/v2/_catalog) is refused: a build sees only its own namespaces")]
    Catalog,
    #[error("{method} is not a registry API method the gate serves")]
    Method { method: String },
    #[error("`{name}` is not a repository name: lowercase components of a-z 0-9 . _ -, without escapes")]
    BadName { name: String },
    #[error("the query of a cross-repository mount could not be read: {query}")]
    BadQuery { query: String },
    #[error("a {actor} actor may not {access} {name}: allowed {allowed}")]
    Namespace {
        actor: String,
        access: &'static str,
        name: String,
        allowed: String,
    },
}

/// What one grant allows.
pub struct Allowed<'a> {
    /// `ci`, `human`, ...: named in refusals.
    pub actor: &'a str,
    pub reads: &'a [String],
    pub writes: &'a [String],
}

/// Whether `method path?query` may pass with this grant.
pub fn authorize(method: &Method, path: &str, query: Option<&str>, grant: &Allowed) -> Result<(), Refusal> {
    let write = match *method {
        Method::GET | Method::HEAD => false,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE => true,
        _ => {
            return Err(Refusal::Method {
                method: method.to_string(),
            });
        }
    };
    let not_api = || Refusal::NotRegistryApi { path: path.into() };
    let rest = path.strip_prefix("/v2").ok_or_else(not_api)?;
    // The version check every client starts with: any valid grant may ask it.
    if rest.is_empty() || rest == "/" {
        return if write { Err(not_api()) } else { Ok(()) };
    }
    let rest = rest.strip_prefix('/').ok_or_else(not_api)?;
    if rest == "_catalog" || rest.starts_with("_catalog?") || rest.starts_with("_catalog/") {
        return Err(Refusal::Catalog);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    let upload = n >= 3 && segments[n - 3] == "blobs" && segments[n - 2] == "uploads";
    let name_end = if upload {
        n - 3
    } else if n >= 2
        && (matches!(segments[n - 2], "manifests" | "blobs")
            || (segments[n - 2] == "tags" && segments[n - 1] == "list"))
    {
        n - 2
    } else {
        return Err(not_api());
    };
    let name = segments[..name_end].join("/");
    check_name(&name)?;
    let (access, allowed, list) = if write {
        ("write", grant.writes, "is")
    } else {
        ("read", grant.reads, "are")
    };
    within(&name, access, allowed, list, grant)?;
    // A cross-repository mount (`POST .../blobs/uploads/?mount=<digest>&from=<repo>`) reads
    // `from`: every `from` the registry might pick must be readable.
    if upload && write {
        for from in query_values(query.unwrap_or(""), "from")? {
            check_name(&from)?;
            within(&from, "read", grant.reads, "are", grant)?;
        }
    }
    Ok(())
}

fn within(name: &str, access: &'static str, allowed: &[String], list: &str, grant: &Allowed) -> Result<(), Refusal> {
    if Namespaces::within(name, allowed) {
        return Ok(());
    }
    let allowed = if allowed.is_empty() {
        "is nothing".to_string()
    } else {
        let shown: Vec<String> = allowed.iter().map(|a| format!("{a}/*")).collect();
        format!("{list} {}", shown.join(", "))
    };
    Err(Refusal::Namespace {
        actor: grant.actor.into(),
        access,
        name: name.into(),
        allowed,
    })
}

/// Distribution's name grammar, strictly enough that no escape, empty or dot component
/// reaches the registry (which would resolve it to some other repository).
fn check_name(name: &str) -> Result<(), Refusal> {
    let component_ok = |c: &str| {
        let bytes = c.as_bytes();
        !c.is_empty()
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
            && bytes
                .iter()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || matches!(b, b'.' | b'_' | b'-'))
            && !c.contains("..")
    };
    if name.len() <= 255 && name.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(Refusal::BadName { name: name.into() })
    }
}

/// Every value of `key` in a URL query, decoded as Go's `url.ParseQuery` decodes it (`+` is
/// a space, `%XX` a byte); anything it would read differently is refused instead of guessed.
fn query_values(query: &str, key: &str) -> Result<Vec<String>, Refusal> {
    let bad = || Refusal::BadQuery { query: query.into() };
    let mut values = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if pair.contains(';') {
            return Err(bad());
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(k).ok_or_else(bad)? == key {
            values.push(decode(v).ok_or_else(bad)?);
        }
    }
    Ok(values)
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn check(grant: (&str, &[String], &[String]), method: Method, target: &str) -> Result<(), Refusal> {
        let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
        let (actor, reads, writes) = grant;
        authorize(&method, path, query, &Allowed { actor, reads, writes })
    }

    #[test]
    fn ci_reads_and_writes_its_own_namespace_only() {
        let ci = strings(&["ci/ws"]);
        let g = ("ci", &ci[..], &ci[..]);
        for (method, target) in [
            (Method::GET, "/v2/"),
            (Method::GET, "/v2"),
            (Method::HEAD, "/v2/ci/ws/app/manifests/latest"),
            (Method::GET, "/v2/ci/ws/app/blobs/sha256:abc"),
            (Method::GET, "/v2/ci/ws/app/tags/list?n=10"),
            (Method::POST, "/v2/ci/ws/app/blobs/uploads/"),
            (Method::PATCH, "/v2/ci/ws/app/blobs/uploads/0f2a-b?_state=x"),
            (Method::PUT, "/v2/ci/ws/app/blobs/uploads/0f2a-b?digest=sha256%3Aabc"),
            (Method::PUT, "/v2/ci/ws/app/manifests/latest"),
            (Method::DELETE, "/v2/ci/ws/deep/er/app/manifests/sha256:abc"),
            (
                Method::POST,
                "/v2/ci/ws/app/blobs/uploads/?mount=sha256:abc&from=ci%2Fws%2Fbase",
            ),
        ] {
            assert_eq!(check(g, method.clone(), target), Ok(()), "{method} {target}");
        }
        let err = check(g, Method::PUT, "/v2/dev/jpl-ws/app/manifests/latest").unwrap_err();
        assert_eq!(
            err.to_string(),
            "a ci actor may not write dev/jpl-ws/app: allowed is ci/ws/*"
        );
        let err = check(g, Method::GET, "/v2/dev/jpl-ws/app/blobs/sha256:abc").unwrap_err();
        assert_eq!(
            err.to_string(),
            "a ci actor may not read dev/jpl-ws/app: allowed are ci/ws/*"
        );
        assert!(check(g, Method::GET, "/v2/ci/wsx/app/manifests/latest").is_err());
        assert!(check(g, Method::GET, "/v2/ci/ws/manifests/latest").is_ok());
    }

    #[test]
    fn a_session_writes_its_own_dev_and_reads_ci() {
        let reads = strings(&["ci/ws", "dev/jpl-ws"]);
        let writes = strings(&["dev/jpl-ws"]);
        let g = ("human", &reads[..], &writes[..]);
        assert_eq!(check(g, Method::PUT, "/v2/dev/jpl-ws/app/manifests/1"), Ok(()));
        assert_eq!(check(g, Method::GET, "/v2/ci/ws/app/manifests/1"), Ok(()));
        let err = check(g, Method::PUT, "/v2/ci/ws/app/manifests/1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "a human actor may not write ci/ws/app: allowed is dev/jpl-ws/*"
        );
        assert!(check(g, Method::GET, "/v2/dev/other-ws/app/manifests/1").is_err());
        let nothing: Vec<String> = vec![];
        let discard = ("agent", &reads[..], &nothing[..]);
        assert_eq!(check(discard, Method::GET, "/v2/dev/jpl-ws/app/manifests/1"), Ok(()));
        let err = check(discard, Method::POST, "/v2/dev/jpl-ws/app/blobs/uploads/").unwrap_err();
        assert!(err.to_string().ends_with("allowed is nothing"), "{err}");
    }

    #[test]
    fn a_mount_must_read_what_it_mounts_from() {
        let ci = strings(&["ci/ws"]);
        let g = ("ci", &ci[..], &ci[..]);
        for from in [
            "dev%2Fjpl-ws%2Fapp",
            "dev/jpl-ws/app",
            "ci%2Fws%2Fa&from=dev%2Fjpl-ws%2Fapp",
            "dev%2fjpl-ws%2fapp",
        ] {
            let target = format!("/v2/ci/ws/app/blobs/uploads/?mount=sha256:abc&from={from}");
            let err = check(g, Method::POST, &target).unwrap_err();
            assert!(err.to_string().contains("may not read dev/jpl-ws/app"), "{from}: {err}");
        }
        for query in ["from=ci%2", "from=ci%zz", "mount=x;from=dev/a"] {
            let target = format!("/v2/ci/ws/app/blobs/uploads/?{query}");
            assert!(check(g, Method::POST, &target).is_err(), "{query}");
        }
        let target = "/v2/ci/ws/app/blobs/uploads/?mount=sha256:abc&fr%6Fm=dev%2Fjpl-ws%2Fapp";
        assert!(check(g, Method::POST, target).is_err());
    }

    #[test]
    fn names_are_read_as_the_registry_reads_them() {
        let ci = strings(&["ci/ws"]);
        let g = ("ci", &ci[..], &ci[..]);
        // A repository called `.../blobs` or `.../manifests` is still the one checked.
        assert!(check(g, Method::PUT, "/v2/dev/x/blobs/blobs/uploads/u1").is_err());
        assert!(check(g, Method::GET, "/v2/dev/x/manifests/blobs/sha256:a").is_err());
        assert_eq!(check(g, Method::GET, "/v2/ci/ws/blobs/manifests/latest"), Ok(()));
        for target in [
            "/v2/ci/ws/../../dev/x/manifests/latest",
            "/v2/ci/ws/%2e%2e/dev/manifests/latest",
            "/v2/ci/ws%2F..%2Fdev/manifests/latest",
            "/v2//ci/ws/app/manifests/latest",
            "/v2/ci/ws/App/manifests/latest",
            "/v2/ci/ws/./app/manifests/latest",
        ] {
            assert!(
                matches!(check(g, Method::GET, target), Err(Refusal::BadName { .. })),
                "{target}"
            );
        }
    }

    #[test]
    fn the_catalog_other_paths_and_methods_are_refused() {
        let ci = strings(&["ci/ws"]);
        let g = ("ci", &ci[..], &ci[..]);
        assert_eq!(check(g, Method::GET, "/v2/_catalog"), Err(Refusal::Catalog));
        assert!(matches!(
            check(g, Method::GET, "/v3/ci/ws/app/manifests/x"),
            Err(Refusal::NotRegistryApi { .. })
        ));
        assert!(matches!(
            check(g, Method::GET, "/v2/ci/ws/app"),
            Err(Refusal::NotRegistryApi { .. })
        ));
        assert!(matches!(
            check(g, Method::POST, "/v2/"),
            Err(Refusal::NotRegistryApi { .. })
        ));
        assert!(matches!(
            check(g, Method::OPTIONS, "/v2/ci/ws/app/manifests/x"),
            Err(Refusal::Method { .. })
        ));
    }
}
