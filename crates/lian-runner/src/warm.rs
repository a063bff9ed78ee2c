//! Warm builds on runners that start empty: where a build's image, its inline cache and its
//! cargo-chef cooker image live in the registry, by cache namespace (`ci/<ws>`,
//! `dev/<actor>-<ws>`), and the key a cooker image is found by.
//!
//! Docker 20.10's embedded BuildKit exports only inline cache (the final stage's layers), so
//! a Dockerfile's `cooker` stage (the compiled dependency graph) is built as an image of its
//! own, tagged by the hash of what it is cooked from (imported with `--cache-from` when
//! another build made it), and pushed while the final build, which finds its steps in the
//! same engine, runs with the previous final image as `--cache-from`.

use std::path::Path;

use lian_core::{CacheReport, CookerReport};
use sha2::{Digest, Sha256};

use crate::docker_build::{BuildFailure, BuildInvocation, BuildOutput, DockerBuilder, StepCounts};
use crate::dockerfile::{self, parent_images};
use crate::progress::StepProgress;
use crate::registry::{self, RegistryAccess};

/// The moving tag of a repository's last good build, imported as cache by the next one.
pub const CACHE_TAG: &str = "lian-cache";
/// The stage built and pushed as an image of its own.
pub const COOKER_STAGE: &str = "cooker";

/// Parents pulled from the registry: `(name in the Dockerfile, reference by digest)`, and
/// the bytes that came over the wire.
#[derive(Debug, Default)]
pub struct Pulled {
    pub parents: Vec<(String, String)>,
    pub bytes: u64,
}

/// Which namespaces a build reads cache from and writes to, in one registry.
#[derive(Debug, Clone)]
pub struct CachePlan {
    pub registry: RegistryAccess,
    /// Namespaces to import from, the build's own first.
    pub reads: Vec<String>,
    /// Where the image, its cache and its cooker go on success; `None` writes nothing.
    pub write: Option<String>,
    /// Other hosts that name the same registry (the registry behind a gate): a parent
    /// named with one of them is pulled from `registry`.
    pub aliases: Vec<String>,
    /// Parents pinned by digest (the catalog lock): the image the Dockerfile names ->
    /// `repository@sha256:…` in `registry`. A pinned parent is pulled as pinned or the
    /// build fails; it is never looked up by tag.
    pub pins: std::collections::BTreeMap<String, String>,
}

/// Where stand-ins for Docker Hub images live in the registry: `rust:slim-bookworm` (that
/// is `docker.io/library/rust:slim-bookworm`) at `lamina/hub/rust:slim-bookworm`. The
/// Dockerfile keeps naming the real image.
pub const HUB_STAND_INS: &str = "lamina/hub";

/// The stand-in `(repository path, tag)` of a Docker Hub image; `None` for an image of
/// another registry.
pub fn hub_stand_in(image: &str) -> Option<(String, String)> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let first = without_digest.split('/').next().unwrap_or_default();
    let hosted_elsewhere = (first.contains('.') || first.contains(':') || first == "localhost")
        && without_digest.contains('/')
        && !matches!(first, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    if hosted_elsewhere {
        return None;
    }
    let (repo, tag) = split_image(without_digest);
    let repo = repo
        .strip_prefix("docker.io/")
        .or_else(|| repo.strip_prefix("index.docker.io/"))
        .or_else(|| repo.strip_prefix("registry-1.docker.io/"))
        .unwrap_or(&repo);
    let repo = repo.strip_prefix("library/").unwrap_or(repo);
    Some((format!("{HUB_STAND_INS}/{repo}"), tag))
}

/// The repository path and tag of an image reference, without its registry host.
pub fn split_image(image: &str) -> (String, String) {
    let without_digest = image.split('@').next().unwrap_or(image);
    let (first, rest) = without_digest.split_once('/').unwrap_or(("", without_digest));
    let path = if first.contains('.') || first.contains(':') || first == "localhost" {
        rest.to_string()
    } else {
        without_digest.to_string()
    };
    match path.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo.to_string(), tag.to_string()),
        _ => (path, "latest".to_string()),
    }
}

impl CachePlan {
    /// `<host>/<ns>/<repo>:<tag>` of `image` in namespace `ns`.
    pub fn image_ref(&self, ns: &str, image: &str) -> String {
        let (repo, tag) = split_image(image);
        self.registry.reference(&format!("{ns}/{repo}:{tag}"))
    }

    /// The moving cache tag of `image`'s repository in `ns`.
    pub fn cache_ref(&self, ns: &str, image: &str) -> String {
        let (repo, _) = split_image(image);
        self.registry.reference(&format!("{ns}/{repo}:{CACHE_TAG}"))
    }

    /// `(repository path, tag)` of `image`'s cooker for `key` in `ns`.
    pub fn cooker_repo(&self, ns: &str, image: &str, key: &str) -> (String, String) {
        let (repo, _) = split_image(image);
        (format!("{ns}/{repo}/cooker"), key.to_string())
    }

    /// Where a parent image may be found, in the order to try: `(repository path, tag)`. A
    /// parent named in this registry (or an alias of it) is itself; another is looked for in
    /// each namespace the build reads (where the cascade pushed it), then among the shared
    /// layers; a Docker Hub image last under [`HUB_STAND_INS`], where a stand-in made here
    /// (`lian catalog bootstrap`) is kept for a host that cannot reach Docker Hub.
    pub fn parent_candidates(&self, parent: &str) -> Vec<(String, String)> {
        let (repo, tag) = split_image(parent);
        let named_here = std::iter::once(&self.registry.host)
            .chain(&self.aliases)
            .any(|host| parent.starts_with(&format!("{host}/")));
        if named_here {
            return vec![(repo, tag)];
        }
        let mut candidates: Vec<(String, String)> = self
            .reads
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(lian_core::cache::SHARED))
            .map(|ns| (format!("{ns}/{repo}"), tag.clone()))
            .collect();
        if let Some(stand_in) = hub_stand_in(parent) {
            candidates.push(stand_in);
        }
        candidates
    }
}

fn refused(e: impl std::fmt::Display) -> BuildFailure {
    BuildFailure {
        reason: e.to_string(),
        oom: false,
    }
}

impl CachePlan {
    /// The first of `candidates` that exists: its repository and digest.
    async fn find(&self, candidates: &[(String, String)]) -> Result<Option<(String, String)>, BuildFailure> {
        for (repo, tag) in candidates {
            if let Some(digest) = self.registry.digest(repo, tag).await.map_err(refused)? {
                return Ok(Some((repo.clone(), digest)));
            }
        }
        Ok(None)
    }

    /// Pushes `reference` (`repository:tag` in this registry); the bytes of the layers the
    /// registry did not have.
    async fn push(&self, builder: &DockerBuilder, reference: &str) -> Result<u64, BuildFailure> {
        let sent = builder.push(reference).await?;
        if sent.is_empty() {
            return Ok(0);
        }
        let (repo, tag) = split_image(reference);
        let layers = self.registry.layers(&repo, &tag).await.map_err(refused)?;
        Ok(registry::bytes_of(&layers, &sent))
    }

    /// Every one of `candidates` that exists, as `repository:tag`, in order.
    async fn existing(&self, candidates: &[(String, String)]) -> Result<Vec<String>, BuildFailure> {
        let mut found = Vec::new();
        for (repo, tag) in candidates {
            if self.registry.digest(repo, tag).await.map_err(refused)?.is_some() {
                found.push(self.registry.reference(&format!("{repo}:{tag}")));
            }
        }
        Ok(found)
    }

    /// Pulls into the builder's engine, by digest, each parent of the Dockerfile that a
    /// namespace this build reads holds, tagged with the name the Dockerfile uses. Returns
    /// the references pulled and the bytes downloaded (layers the engine did not have);
    /// parents not in the registry are left to the caller.
    pub async fn pull_parents(
        &self,
        builder: &DockerBuilder,
        dockerfile: &str,
        build_args: &[(&str, &str)],
    ) -> Result<Pulled, BuildFailure> {
        let mut pulled = Pulled::default();
        for parent in parent_images(dockerfile, build_args).map_err(refused)? {
            let found = match self.pins.get(&parent) {
                Some(pin) => {
                    let (repo, digest) = pin
                        .split_once('@')
                        .ok_or_else(|| refused(format!("parent pin {pin} is not repository@digest")))?;
                    Some((repo.to_string(), digest.to_string()))
                }
                None => self.find(&self.parent_candidates(&parent)).await?,
            };
            if let Some((repo, digest)) = found {
                let reference = self.registry.reference(&format!("{repo}@{digest}"));
                let fetched = builder.pull(&reference).await?;
                if !fetched.is_empty() {
                    let layers = self.registry.layers(&repo, &digest).await.map_err(refused)?;
                    pulled.bytes += registry::bytes_of(&layers, &fetched);
                }
                builder.tag(&reference, &parent).await?;
                pulled.parents.push((parent, reference));
            }
        }
        Ok(pulled)
    }

    /// Builds `spec` warm: its cooker stage first (found by key, or built and pushed), then
    /// the image with every cache this build may read; on success the image and its moving
    /// cache tag are pushed to the namespace the build writes. Nothing is pushed on failure,
    /// so a namespace's tags always name its last good build.
    pub async fn build(
        &self,
        builder: &DockerBuilder,
        spec: &BuildInvocation<'_>,
        on_step: &mut (dyn FnMut(StepProgress) + Send),
    ) -> Result<(BuildOutput, CacheReport), BuildFailure> {
        let dockerfile_path = spec.context.join(spec.dockerfile);
        let dockerfile = std::fs::read_to_string(&dockerfile_path)
            .map_err(|e| refused(format!("{}: {e}", dockerfile_path.display())))?;
        let finals: Vec<(String, String)> = self
            .reads
            .iter()
            .map(|ns| {
                let (repo, _) = split_image(spec.image);
                (format!("{ns}/{repo}"), CACHE_TAG.to_string())
            })
            .collect();
        let mut cache_from = self.existing(&finals).await?;
        let mut report = CacheReport {
            imported_from: self.reads.clone(),
            exported_to: self.write.clone(),
            ..CacheReport::default()
        };
        let mut counts = StepCounts::default();
        let mut pushed_bytes = 0;
        let mut cooker_push = None;
        if let Some(stage) = cooker_stage(&dockerfile) {
            let key = cooker_key(spec.context, &dockerfile).map_err(refused)?;
            let candidates: Vec<_> = self
                .reads
                .iter()
                .map(|ns| self.cooker_repo(ns, spec.image, &key))
                .collect();
            let found = self.existing(&candidates).await?;
            let reference = match &self.write {
                Some(ns) => {
                    let (repo, tag) = self.cooker_repo(ns, spec.image, &key);
                    self.registry.reference(&format!("{repo}:{tag}"))
                }
                None => format!("lian-cooker:{key}"),
            };
            let cooker = BuildInvocation {
                image: &reference,
                target: Some(&stage),
                cache_from: found.iter().chain(cache_from.iter()).cloned().collect(),
                inline_cache: true,
                ..spec.clone()
            };
            let out = builder.build(&cooker, on_step).await?;
            add(&mut counts, out.steps);
            if self.write.is_some() {
                // The final build finds the cooker's steps in this engine; the push, which
                // lets other engines find them, runs beside it.
                cooker_push = Some(reference.clone());
                report.pushed.push(reference.clone());
            } else {
                cache_from.extend(found.iter().cloned());
            }
            report.cooker = Some(CookerReport {
                reference,
                hit: !found.is_empty(),
            });
        }
        let fin = BuildInvocation {
            cache_from,
            inline_cache: self.write.is_some(),
            ..spec.clone()
        };
        let push_cooker = async {
            match &cooker_push {
                Some(reference) => self.push(builder, reference).await,
                None => Ok(0),
            }
        };
        let (built, cooker_pushed) = tokio::join!(builder.build(&fin, on_step), push_cooker);
        let mut out = built?;
        pushed_bytes += cooker_pushed?;
        add(&mut counts, out.steps);
        if let Some(ns) = &self.write {
            for target in [self.image_ref(ns, spec.image), self.cache_ref(ns, spec.image)] {
                builder.tag(spec.image, &target).await?;
                pushed_bytes += self.push(builder, &target).await?;
                report.pushed.push(target);
            }
            // What the catalog lock records: the image just pushed, by its manifest digest.
            let (repo, tag) = split_image(spec.image);
            let repo = format!("{ns}/{repo}");
            let digest = self.registry.digest(&repo, &tag).await.map_err(refused)?;
            report.pinned = digest.map(|d| format!("{repo}@{d}"));
        }
        report.bytes_pushed = self.write.is_some().then_some(pushed_bytes);
        report.steps = counts.steps;
        report.cached_steps = counts.cached;
        report.sccache_hits = counts.sccache_hits;
        report.sccache_misses = counts.sccache_misses;
        out.steps = Some(counts);
        Ok((out, report))
    }
}

fn add(total: &mut StepCounts, more: Option<StepCounts>) {
    let Some(more) = more else { return };
    total.steps += more.steps;
    total.cached += more.cached;
    // One sccache server per RUN step: the cooker's build and the final one add up.
    total.sccache_hits = crate::docker_build::sum(total.sccache_hits, more.sccache_hits);
    total.sccache_misses = crate::docker_build::sum(total.sccache_misses, more.sccache_misses);
}

/// The Dockerfile's cooker stage, as it names it, if it has one.
pub fn cooker_stage(dockerfile: &str) -> Option<String> {
    dockerfile::stage_named(dockerfile, COOKER_STAGE)
}

/// What a cooker is cooked from: `Cargo.lock`, every `Cargo.toml` (vendored crates too),
/// `rust-toolchain(.toml)`, a `recipe.json`/`recipe.txt` at the root, and the Dockerfile up
/// to the end of its cooker stage. Sources are not in it: cargo-chef cooks without them.
/// The key only names the image; BuildKit still checks every step it reuses.
pub fn cooker_key(context: &Path, dockerfile: &str) -> std::io::Result<String> {
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in walkdir::WalkDir::new(context)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.file_name() != "target")
    {
        let entry = entry.map_err(std::io::Error::other)?;
        let name = entry.file_name().to_string_lossy();
        let rel = entry.path().strip_prefix(context).unwrap_or(entry.path());
        let at_root = rel.components().count() == 1;
        let wanted = matches!(name.as_ref(), "Cargo.toml" | "Cargo.lock")
            || (at_root
                && matches!(
                    name.as_ref(),
                    "rust-toolchain" | "rust-toolchain.toml" | "recipe.json" | "recipe.txt"
                ));
        if wanted && entry.file_type().is_file() {
            inputs.push((rel.to_string_lossy().into_owned(), std::fs::read(entry.path())?));
        }
    }
    let mut hash = Sha256::new();
    for (path, content) in &inputs {
        hash.update(path.as_bytes());
        hash.update([0]);
        hash.update((content.len() as u64).to_le_bytes());
        hash.update(content);
    }
    hash.update(dockerfile::through_stage(dockerfile, COOKER_STAGE).as_bytes());
    Ok(data_encoding::HEXLOWER.encode(&hash.finalize()[..12]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_into_repository_and_tag() {
        assert_eq!(
            split_image("lian-example/base:latest"),
            ("lian-example/base".into(), "latest".into())
        );
        assert_eq!(
            split_image("registry.local/lian-build:abc"),
            ("lian-build".into(), "abc".into())
        );
        assert_eq!(
            split_image("127.0.0.1:5000/ci/ws/app"),
            ("ci/ws/app".into(), "latest".into())
        );
        assert_eq!(split_image("app"), ("app".into(), "latest".into()));
    }

    #[test]
    fn docker_hub_parents_have_a_stand_in_place_and_others_do_not() {
        let at = |r: &str, t: &str| Some((r.to_string(), t.to_string()));
        assert_eq!(
            hub_stand_in("rust:slim-bookworm"),
            at("lamina/hub/rust", "slim-bookworm")
        );
        assert_eq!(
            hub_stand_in("docker.io/library/rust:slim-bookworm"),
            at("lamina/hub/rust", "slim-bookworm")
        );
        assert_eq!(hub_stand_in("bitnami/redis"), at("lamina/hub/bitnami/redis", "latest"));
        assert_eq!(hub_stand_in("ghcr.io/owner/tool:1"), None);
        assert_eq!(hub_stand_in("127.0.0.1:5000/lamina/rust:latest"), None);
    }

    #[test]
    fn the_cooker_key_follows_manifests_not_sources() {
        let dir = tempfile::tempdir().unwrap();
        let df = "FROM base AS planner\nRUN plan\nFROM base AS cooker\nRUN cook\nFROM base\nCOPY src src\n";
        std::fs::write(dir.path().join("Cargo.toml"), "[package]\nname = \"x\"\n").unwrap();
        std::fs::write(dir.path().join("Cargo.lock"), "lock v1\n").unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/main.rs"), "fn main() {}\n").unwrap();
        let key = cooker_key(dir.path(), df).unwrap();
        std::fs::write(dir.path().join("src/main.rs"), "fn main() { println!() }\n").unwrap();
        let final_changed = df.replace("COPY src src", "COPY src /src");
        assert_eq!(
            cooker_key(dir.path(), &final_changed).unwrap(),
            key,
            "sources and the final stage do not count"
        );
        std::fs::write(dir.path().join("Cargo.lock"), "lock v2\n").unwrap();
        assert_ne!(cooker_key(dir.path(), df).unwrap(), key, "a dependency bump does");
        assert_eq!(cooker_stage(df).as_deref(), Some("cooker"));
        assert_eq!(cooker_stage("FROM a\nFROM b AS final\n"), None);
    }
}
