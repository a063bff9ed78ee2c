//! The registry images, parents and build cache travel through (distribution's HTTP API,
//! v2): how a runner reaches it (host, credentials written as a Docker client config for the
//! lease) and the one question the worker asks it directly: which digest a tag points to.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;

/// Manifest kinds a tag may point to; the registry answers the digest of what it stores.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or answered 5xx: worth another try.
    #[error("registry {host} unreachable: {message}")]
    Unreachable { host: String, message: String },
    /// The registry refused (401/403): the credentials do not allow it.
    #[error("registry {host} refused {what}: {message}")]
    Refused {
        host: String,
        what: String,
        message: String,
    },
    #[error("writing the registry credentials for the runner to {path}: {source}")]
    Config {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Where a runner pushes and pulls, and as whom.
#[derive(Clone)]
pub struct RegistryAccess {
    /// `127.0.0.1:5000`, `ghcr.io`: the host part of image references.
    pub host: String,
    /// Plain HTTP (loopback registries); HTTPS otherwise.
    pub plain_http: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAccess")
            .field("host", &self.host)
            .field("plain_http", &self.plain_http)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RegistryAccess {
    /// `<host>/<path>`: a reference inside this registry.
    pub fn reference(&self, path: &str) -> String {
        format!("{}/{path}", self.host)
    }

    /// The digest `repository:tag` points to, or `None` when the tag does not exist.
    pub async fn digest(&self, repository: &str, tag: &str) -> Result<Option<String>, RegistryError> {
        let scheme = if self.plain_http { "http" } else { "https" };
        let url = format!("{scheme}://{}/v2/{repository}/manifests/{tag}", self.host);
        let unreachable = |message: String| RegistryError::Unreachable {
            host: self.host.clone(),
            message,
        };
        let http = crate::http_client()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        let mut request = http.head(&url).header("Accept", MANIFEST_ACCEPT);
        if let Some(user) = &self.username {
            request = request.basic_auth(user, self.password.as_deref());
        }
        let answer = request.send().await.map_err(|e| unreachable(e.to_string()))?;
        match answer.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(answer
                .headers()
                .get("Docker-Content-Digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(RegistryError::Refused {
                host: self.host.clone(),
                what: format!("reading {repository}:{tag}"),
                message: s.to_string(),
            }),
            s => Err(unreachable(format!("{s} for {repository}:{tag}"))),
        }
    }

    /// Writes a Docker client config holding these credentials into `dir` (mode 0700/0600),
    /// for the lease's `docker build` and `docker push` (`DOCKER_CONFIG=dir`).
    pub fn write_docker_config(&self, dir: &Path) -> Result<(), RegistryError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let err = |source| RegistryError::Config {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        let auths = match &self.username {
            Some(user) => {
                let pair = format!("{user}:{}", self.password.as_deref().unwrap_or_default());
                serde_json::json!({ &self.host: { "auth": data_encoding::BASE64.encode(pair.as_bytes()) } })
            }
            None => serde_json::json!({}),
        };
        let body = serde_json::to_vec(&serde_json::json!({ "auths": auths })).expect("json");
        let path = dir.join("config.json");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        std::io::Write::write_all(&mut file, &body).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show_in_debug_and_land_in_a_private_file() {
        let access = RegistryAccess {
            host: "127.0.0.1:5000".into(),
            plain_http: true,
            username: Some("b-123".into()),
            password: Some("s3cret-value".into()),
        };
        assert!(!format!("{access:?}").contains("s3cret-value"));
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("docker");
        access.write_docker_config(&config).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(config.join("config.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(config.join("config.json")).unwrap();
        assert!(
            text.contains("127.0.0.1:5000") && !text.contains("s3cret-value"),
            "{text}"
        );
    }
}
