//! Where the fleet's shared caches live: the OCI registry images and build cache go to, and
//! the S3 bucket sccache keeps compilation units in. Plain data, resolved by the caller
//! from its configuration (`[registry]`, `[sccache]`; `lian up` fills in the ones it starts),
//! so a worker neither knows nor cares whether they are local or a user's own.

/// A credential held in memory, redacted in `Debug` and `Display`: one type for every
/// secret that crosses lian's seams.
pub use lian_core::control::Secret;

/// An OCI registry (distribution, zot, harbor, ghcr, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEndpoint {
    /// `http://127.0.0.1:5000` or `https://ghcr.io`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl RegistryEndpoint {
    /// The host part image references are written with (`127.0.0.1:5000`, `ghcr.io`).
    pub fn host(&self) -> &str {
        let rest = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"))
            .unwrap_or(&self.url);
        rest.trim_end_matches('/')
    }

    /// Plain HTTP: Docker accepts it for loopback registries only, BuildKit needs to be told.
    pub fn plain_http(&self) -> bool {
        self.url.starts_with("http://")
    }
}

/// An S3-compatible bucket (AWS S3, SeaweedFS, MinIO, ...) for sccache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Endpoint {
    /// `http://127.0.0.1:8333` or `https://s3.eu-central-1.amazonaws.com`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

impl S3Endpoint {
    /// sccache's `SCCACHE_S3_USE_SSL`: it wants to be told, whatever the URL says.
    pub fn use_ssl(&self) -> bool {
        !self.endpoint.starts_with("http://")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let s3 = S3Endpoint {
            endpoint: "http://127.0.0.1:8333".into(),
            bucket: "sccache".into(),
            region: "us-east-1".into(),
            access_key_id: "AKIDLIAN".into(),
            secret_access_key: Secret::new("s3-secret-1234"),
        };
        let registry = RegistryEndpoint {
            url: "https://ghcr.io/".into(),
            username: Some("ci".into()),
            password: Some(Secret::new("registry-pass-5678")),
        };
        let shown = format!("{s3:?} {registry:?} {}", s3.secret_access_key);
        assert!(
            !shown.contains("s3-secret-1234") && !shown.contains("registry-pass-5678"),
            "{shown}"
        );
        assert!(shown.contains("AKIDLIAN") && shown.contains("ghcr.io"), "{shown}");
        assert_eq!(
            (registry.host(), registry.plain_http(), s3.use_ssl()),
            ("ghcr.io", false, false)
        );
    }
}
