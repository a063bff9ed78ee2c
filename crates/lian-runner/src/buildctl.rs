//! `buildctl` for runners that run buildkitd (cloud VMs): the command line and the metadata
//! it writes. Nothing here is run on this machine (it has no buildkitd); the argv and the
//! parsing are unit-tested.

use std::path::Path;

use crate::BuildInvocation;

#[derive(Debug, Clone)]
pub struct Buildctl {
    pub cli: String,
    /// buildkitd's address on the runner, e.g. `unix:///run/buildkit/buildkitd.sock`.
    pub addr: String,
}

/// Where cache and image go, beyond the build itself.
#[derive(Debug, Clone, Default)]
pub struct Outputs<'a> {
    pub push: bool,
    /// Registry cache refs to import (`--import-cache type=registry,ref=...`).
    pub cache_from: Vec<&'a str>,
    /// Registry cache refs to export, with all intermediate layers (`mode=max`).
    pub cache_to: Vec<&'a str>,
}

impl Buildctl {
    pub fn args(&self, spec: &BuildInvocation<'_>, outputs: &Outputs<'_>, metadata: &Path) -> Vec<String> {
        let dockerfile = spec.context.join(spec.dockerfile);
        let dockerfile_dir = dockerfile.parent().unwrap_or(spec.context);
        let file_name = dockerfile
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut args = vec![
            "--addr".to_string(),
            self.addr.clone(),
            "build".into(),
            "--frontend".into(),
            "dockerfile.v0".into(),
            "--local".into(),
            format!("context={}", spec.context.display()),
            "--local".into(),
            format!("dockerfile={}", dockerfile_dir.display()),
            "--opt".into(),
            format!("filename={file_name}"),
            "--output".into(),
            format!("type=image,name={},push={}", spec.image, outputs.push),
            "--progress".into(),
            "rawjson".into(),
            "--metadata-file".into(),
            metadata.display().to_string(),
        ];
        if let Some(target) = spec.target {
            args.extend(["--opt".into(), format!("target={target}")]);
        }
        for (k, v) in &spec.build_args {
            args.extend(["--opt".into(), format!("build-arg:{k}={v}")]);
        }
        for (id, file) in &spec.secrets {
            args.extend(["--secret".into(), format!("id={id},src={}", file.display())]);
        }
        for r in &outputs.cache_from {
            args.extend(["--import-cache".into(), format!("type=registry,ref={r}")]);
        }
        for r in &outputs.cache_to {
            args.extend(["--export-cache".into(), format!("type=registry,ref={r},mode=max")]);
        }
        args
    }
}

/// The image digest from the `--metadata-file` buildctl writes.
pub fn image_digest(metadata: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(metadata).ok()?;
    v["containerimage.digest"].as_str().map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_every_input_as_its_own_argument() {
        let b = Buildctl {
            cli: "buildctl".into(),
            addr: "unix:///run/buildkit/buildkitd.sock".into(),
        };
        let spec = BuildInvocation {
            context: Path::new("/work/ctx"),
            dockerfile: "docker/Dockerfile.rust",
            image: "registry.local/ci/ws/app:abc",
            target: Some("final"),
            build_args: vec![("PROFILE", "release mode")],
            secrets: vec![("sccache_creds", Path::new("/etc/lian/sccache"))],
            cache_from: vec![],
            inline_cache: false,
        };
        let outputs = Outputs {
            push: true,
            cache_from: vec!["registry.local/ci/ws/cache"],
            cache_to: vec!["registry.local/ci/ws/cache"],
        };
        let args = b.args(&spec, &outputs, Path::new("/work/meta.json"));
        let pairs: Vec<(&str, &str)> = args.windows(2).map(|w| (w[0].as_str(), w[1].as_str())).collect();
        for expected in [
            ("--addr", "unix:///run/buildkit/buildkitd.sock"),
            ("--local", "context=/work/ctx"),
            ("--local", "dockerfile=/work/ctx/docker"),
            ("--opt", "filename=Dockerfile.rust"),
            ("--opt", "target=final"),
            ("--opt", "build-arg:PROFILE=release mode"),
            ("--output", "type=image,name=registry.local/ci/ws/app:abc,push=true"),
            ("--secret", "id=sccache_creds,src=/etc/lian/sccache"),
            ("--import-cache", "type=registry,ref=registry.local/ci/ws/cache"),
            (
                "--export-cache",
                "type=registry,ref=registry.local/ci/ws/cache,mode=max",
            ),
            ("--progress", "rawjson"),
            ("--metadata-file", "/work/meta.json"),
        ] {
            assert!(pairs.contains(&expected), "{expected:?} in {args:?}");
        }
    }

    #[test]
    fn the_digest_comes_from_the_metadata_file() {
        assert_eq!(
            image_digest(r#"{"containerimage.digest":"sha256:abc","image.name":"x"}"#),
            Some("sha256:abc".into())
        );
        assert_eq!(image_digest("{}"), None);
    }
}
