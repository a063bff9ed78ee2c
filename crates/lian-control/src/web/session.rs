//! Logging in to the web view: the token is typed once into a form (POSTed, never in a URL)
//! and the browser keeps a session cookie that is not the token but a digest of it
//! (`sha256("lian-web-session\0" + token)`, hex): every replica holding the same token
//! accepts it, with no session store, and the cookie cannot be turned back into the token
//! the API takes. Changing the token logs every browser out.
//!
//! The cookie is `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page
//! sends it, which is also what keeps the login form from cross-site posts), `Path=/`, and
//! `Secure` unless the browser reached us on a loopback address (`localhost`, `127.x`,
//! `[::1]`): on plain HTTP browsers drop `Secure` cookies except there, and loopback traffic
//! never leaves the machine. Served on another address over plain HTTP, a login therefore
//! does not stick: put TLS in front, as for the API's token.

use axum::http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};

pub const COOKIE: &str = "lian_session";

/// The cookie value a browser holding `token` carries.
pub fn session_value(token: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"lian-web-session\0")
        .chain_update(token.trim().as_bytes())
        .finalize();
    data_encoding::HEXLOWER.encode(&digest)
}

/// Whether the request carries the session cookie for `token`, or the token itself as
/// `Authorization: Bearer` (scripts and the API's callers).
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(presented) = bearer {
        return crate::auth::same(presented.trim().as_bytes(), token.trim().as_bytes());
    }
    let expected = session_value(token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .flatten()
        .any(|c| c.name() == COOKIE && crate::auth::same(c.value().as_bytes(), expected.as_bytes()))
}

/// Whether the `Host` the browser used names a loopback address.
pub fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `Set-Cookie` for a login (`Some(token)`) or a logout (`None`).
pub fn set_cookie(token: Option<&str>, secure: bool) -> HeaderValue {
    let mut c = cookie::Cookie::build((COOKIE, token.map(session_value).unwrap_or_default()))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(secure);
    if token.is_none() {
        c = c.max_age(cookie::time::Duration::ZERO);
    }
    HeaderValue::from_str(&c.build().to_string()).expect("a cookie is a header value")
}

/// Where to go after logging in: a path on this site only (`/builds?x=1`), never another
/// host (`//evil`, `https://...`); anything else is the catalog.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains(['\\', '\r', '\n']) => n.to_string(),
        _ => "/catalog".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_cookie_is_a_digest_of_the_token_not_the_token() {
        let v = session_value("s3cret");
        assert_eq!(v.len(), 64);
        assert!(!v.contains("s3cret"));
        assert_eq!(v, session_value(" s3cret\n"));
        assert_ne!(v, session_value("other"));
    }

    #[test]
    fn a_request_is_authorized_by_the_cookie_or_the_bearer_token_only() {
        let good = format!("a=b; {COOKIE}={}; c=d", session_value("tok"));
        assert!(authorized(&headers(&[(header::COOKIE, &good)]), "tok"));
        assert!(authorized(&headers(&[(header::AUTHORIZATION, "Bearer tok")]), "tok"));
        assert!(!authorized(&headers(&[(header::COOKIE, &good)]), "other-token"));
        assert!(!authorized(
            &headers(&[(header::COOKIE, &format!("{COOKIE}=tok"))]),
            "tok"
        ));
        assert!(!authorized(&headers(&[(header::AUTHORIZATION, "Bearer nope")]), "tok"));
        assert!(!authorized(&HeaderMap::new(), "tok"));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_off_loopback() {
        let set = set_cookie(Some("tok"), true).to_str().unwrap().to_string();
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(set.contains(part), "{set} lacks {part}");
        }
        assert!(!set.contains("tok;"));
        assert!(!set_cookie(Some("tok"), false).to_str().unwrap().contains("Secure"));
        assert!(set_cookie(None, false).to_str().unwrap().contains("Max-Age=0"));
        for (host, loopback) in [
            ("127.0.0.1:7420", true),
            ("localhost:80", true),
            ("[::1]:7420", true),
            ("127.3.4.5", true),
            ("10.0.0.5:7420", false),
            ("lian.example.com", false),
            ("localhost.evil.com", false),
        ] {
            assert_eq!(loopback_host(&headers(&[(header::HOST, host)])), loopback, "{host}");
        }
    }

    #[test]
    fn after_login_only_paths_of_this_site() {
        assert_eq!(safe_next(Some("/builds?state=failed")), "/builds?state=failed");
        for bad in ["//evil.com", "https://evil.com", "/\\evil", "", "catalog"] {
            assert_eq!(safe_next(Some(bad)), "/catalog", "{bad}");
        }
        assert_eq!(safe_next(None), "/catalog");
    }
}
