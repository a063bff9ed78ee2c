//! The registry images, parents and build cache travel through (distribution's HTTP API,
//! v2): how a runner reaches it (host, credentials written as a Docker client config for the
//! lease) and the one question the worker asks it directly: which digest a tag points to.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use time::OffsetDateTime;

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

/// One layer of an image in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:...` of the blob (compressed), what `docker pull` names it by.
    pub digest: String,
    /// `sha256:...` of its content (uncompressed), what `docker push` names it by.
    pub diff_id: String,
    /// Bytes of the blob.
    pub size: u64,
}

impl Layer {
    /// Whether `short` (12 hex digits, as the docker CLI prints them) names this layer's
    /// blob or content.
    pub fn is(&self, short: &str) -> bool {
        [&self.digest, &self.diff_id]
            .iter()
            .any(|d| d.strip_prefix("sha256:").is_some_and(|hex| hex.starts_with(short)))
    }
}

/// Bytes of the layers among `layers` that `shorts` name.
pub fn bytes_of(layers: &[Layer], shorts: &[String]) -> u64 {
    layers
        .iter()
        .filter(|l| shorts.iter().any(|s| l.is(s)))
        .map(|l| l.size)
        .sum()
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

    /// A request to this registry's API, with the credentials and a 30 s bound.
    fn request(&self, method: reqwest::Method, path: &str) -> Result<reqwest::RequestBuilder, RegistryError> {
        let scheme = if self.plain_http { "http" } else { "https" };
        let http = crate::http_client()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| self.unreachable(e.to_string()))?;
        let mut request = http.request(method, format!("{scheme}://{}{path}", self.host));
        if let Some(user) = &self.username {
            request = request.basic_auth(user, self.password.as_deref());
        }
        Ok(request)
    }

    fn unreachable(&self, message: String) -> RegistryError {
        RegistryError::Unreachable {
            host: self.host.clone(),
            message,
        }
    }

    /// Sends `request`; a refusal (401/403) or another failure names `what`.
    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response, RegistryError> {
        let answer = request.send().await.map_err(|e| self.unreachable(e.to_string()))?;
        match answer.status() {
            // Callers read these two: absent, and deletes switched off.
            s if s.is_success() || s == StatusCode::NOT_FOUND || s == StatusCode::METHOD_NOT_ALLOWED => Ok(answer),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(RegistryError::Refused {
                host: self.host.clone(),
                what: what.to_string(),
                message: s.to_string(),
            }),
            s => Err(self.unreachable(format!("{s} for {what}"))),
        }
    }

    /// A JSON document of the API; `None` when it is not there.
    async fn json(&self, path: &str, accept: Option<&str>) -> Result<Option<serde_json::Value>, RegistryError> {
        let mut request = self.request(reqwest::Method::GET, path)?;
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        let answer = self.send(request, &format!("GET {path}")).await?;
        if answer.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        answer
            .json()
            .await
            .map(Some)
            .map_err(|e| self.unreachable(format!("GET {path}: {e}")))
    }

    /// The digest `repository:tag` points to, or `None` when the tag does not exist.
    pub async fn digest(&self, repository: &str, tag: &str) -> Result<Option<String>, RegistryError> {
        let request = self
            .request(reqwest::Method::HEAD, &format!("/v2/{repository}/manifests/{tag}"))?
            .header("Accept", MANIFEST_ACCEPT);
        let answer = self.send(request, &format!("reading {repository}:{tag}")).await?;
        if answer.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(answer
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string))
    }

    /// Every repository of the registry (distribution's catalog; a gate refuses it).
    pub async fn repositories(&self) -> Result<Vec<String>, RegistryError> {
        // distribution answers at most 1,000 a page; the next page starts after the last.
        const PAGE: usize = 1000;
        let mut all: Vec<String> = Vec::new();
        loop {
            let path = match all.last() {
                Some(last) => format!("/v2/_catalog?n={PAGE}&last={last}"),
                None => format!("/v2/_catalog?n={PAGE}"),
            };
            let page = strings(&self.json(&path, None).await?.unwrap_or_default()["repositories"]);
            let done = page.len() < PAGE;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    pub async fn tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        let listed = self
            .json(&format!("/v2/{repository}/tags/list"), None)
            .await?
            .unwrap_or_default();
        Ok(strings(&listed["tags"]))
    }

    /// The digest of `repository:tag` and when its image was made (its config's `created`).
    pub async fn created(
        &self,
        repository: &str,
        tag: &str,
    ) -> Result<Option<(String, OffsetDateTime)>, RegistryError> {
        let Some(digest) = self.digest(repository, tag).await? else {
            return Ok(None);
        };
        let Some(manifest) = self
            .json(&format!("/v2/{repository}/manifests/{digest}"), Some(MANIFEST_ACCEPT))
            .await?
        else {
            return Ok(None);
        };
        let Some(config) = manifest["config"]["digest"].as_str() else {
            return Ok(None);
        };
        let config = self
            .json(&format!("/v2/{repository}/blobs/{config}"), None)
            .await?
            .unwrap_or_default();
        let created = config["created"]
            .as_str()
            .and_then(|t| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok());
        Ok(created.map(|c| (digest, c)))
    }

    /// The layers of the image `repository:reference` (a tag or a digest) as stored: each
    /// blob's digest and size, with the diff id its config gives it (same order). Empty
    /// when it is not there or is an index of several platforms.
    pub async fn layers(&self, repository: &str, reference: &str) -> Result<Vec<Layer>, RegistryError> {
        let Some(manifest) = self
            .json(
                &format!("/v2/{repository}/manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?
        else {
            return Ok(Vec::new());
        };
        let Some(config) = manifest["config"]["digest"].as_str() else {
            return Ok(Vec::new());
        };
        let config = self
            .json(&format!("/v2/{repository}/blobs/{config}"), None)
            .await?
            .unwrap_or_default();
        let diff_ids = strings(&config["rootfs"]["diff_ids"]);
        let blobs = manifest["layers"].as_array().cloned().unwrap_or_default();
        Ok(blobs
            .iter()
            .zip(diff_ids)
            .filter_map(|(blob, diff_id)| {
                Some(Layer {
                    digest: blob["digest"].as_str()?.to_string(),
                    diff_id,
                    size: blob["size"].as_u64()?,
                })
            })
            .collect())
    }

    /// Deletes a manifest: every tag naming it goes; its blobs stay until the registry's
    /// own garbage collection.
    pub async fn delete(&self, repository: &str, digest: &str) -> Result<(), RegistryError> {
        let what = format!("deleting {repository}@{digest}");
        let request = self.request(reqwest::Method::DELETE, &format!("/v2/{repository}/manifests/{digest}"))?;
        let answer = self.send(request, &what).await?;
        if answer.status() == StatusCode::METHOD_NOT_ALLOWED {
            return Err(RegistryError::Refused {
                host: self.host.clone(),
                what,
                message: "deletes are disabled: set `storage: delete: enabled: true` in its config".into(),
            });
        }
        Ok(())
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

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
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
