//! Warm builds on runners that start empty: a real registry (Debian's docker-registry) and
//! a real S3 store (`weed mini`), a real fleet, a fresh per-lease Docker engine for every
//! build. What is asserted is what the build reports it reused (its `completed` event) and
//! what the registry holds, never a timing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Fleet, Running, lian, text};
use lian_test_support::{Registry, S3Store, docker_cli, http};
use serde_json::{Value, json};

/// A two-stage build: a `cooker` stage that "cooks" from Cargo.lock only, and a final stage
/// that takes its output and the sources.
const DOCKERFILE: &str = "FROM scratch AS cooker
COPY busybox /bin/busybox
COPY Cargo.lock /Cargo.lock
RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox cp /Cargo.lock /cooked\"]

FROM scratch
COPY busybox /bin/busybox
COPY --from=cooker /cooked /cooked
COPY main.txt /main.txt
RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox cat /main.txt /cooked > /out\"]
";

fn project(dir: &Path, main: &str, lock: &str, dockerfile: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(dir.join("main.txt"), main).unwrap();
    std::fs::write(dir.join("Cargo.lock"), lock).unwrap();
}

struct Warm {
    fleet: Fleet,
    registry: Registry,
    _worker: Running,
    work: tempfile::TempDir,
}

impl Warm {
    fn start(workspace: &'static str, extra_env: &[(&str, &str)]) -> Self {
        let fleet = Fleet::new(workspace);
        let registry = Registry::start();
        let mut env = vec![("LIAN_REGISTRY_URL", registry.url.as_str())];
        env.extend_from_slice(extra_env);
        let worker = fleet.worker("w1", &env);
        Self {
            fleet,
            registry,
            _worker: worker,
            work: tempfile::tempdir().unwrap(),
        }
    }

    /// Submits `context` as `policy`'s actor and waits; the terminal event's JSON.
    fn build(&self, context: &Path, image: &str, policy: Value) -> Value {
        let directives = self
            .work
            .path()
            .join(format!("{}.json", image.replace(['/', ':'], "-")));
        let json = json!({
            "workspace": self.fleet.workspace,
            "artifact": {"image": image, "language": "rust"},
            "compute_provider": "docker_local",
            "registry_provider": "zot",
            "cache_policy": policy,
        });
        std::fs::write(&directives, json.to_string()).unwrap();
        let mut wire = self.fleet.wire();
        let out = lian(&[
            "--nats-url",
            &self.fleet.server.url,
            "submit",
            directives.to_str().unwrap(),
            "--context",
            context.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let ws = self.fleet.workspace;
        wire.wait_for(Duration::from_secs(240), "the build's end", |m| {
            m.subject == format!("lian.{ws}.build.{id}.completed")
                || m.subject == format!("lian.{ws}.build.{id}.failed")
        })
        .json()
    }

    /// The tags of a repository in the registry (empty when it has none).
    fn tags(&self, repository: &str) -> Vec<String> {
        let answer = http(
            "GET",
            &format!("{}/v2/{repository}/tags/list", self.registry.url),
            None,
            None,
        );
        let mut tags: Vec<String> = answer.json()["tags"]
            .as_array()
            .map(|t| t.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        tags.sort();
        tags
    }

    /// Removes this host's engine stores, as if the next build ran on another host.
    fn forget_engine_stores(&self) {
        let stores = self.fleet.state.path().join("runners/.stores");
        std::fs::remove_dir_all(&stores).unwrap_or_else(|e| panic!("{}: {e}", stores.display()));
    }

    fn digest(&self, repository: &str, tag: &str) -> Option<String> {
        let answer = http(
            "HEAD",
            &format!("{}/v2/{repository}/manifests/{tag}", self.registry.url),
            None,
            None,
        );
        answer.header("Docker-Content-Digest").map(str::to_string)
    }
}

fn ci() -> Value {
    json!({"actor": "ci", "cache_from": [], "cache_to": []})
}

fn session(disposition: &str) -> Value {
    json!({"actor": "human", "actor_id": "jpl", "disposition": disposition, "cache_from": [], "cache_to": []})
}

#[test]
fn a_second_build_on_a_new_runner_reuses_the_registrys_cache() {
    let warm = Warm::start("warm", &[]);
    let ctx = warm.work.path().join("app");
    project(&ctx, "v1\n", "lock v1\n", DOCKERFILE);
    let first = warm.build(&ctx, "lian-warm/app:1", ci());
    assert_eq!(first["type"], "completed", "{first}");
    let cache = &first["cache"];
    assert_eq!(cache["cooker"]["hit"], false, "{cache}");
    assert_eq!(cache["exported_to"], "ci/warm", "{cache}");
    assert_eq!(warm.tags("ci/warm/lian-warm/app"), ["1", "lian-cache"]);
    assert_eq!(
        warm.tags("ci/warm/lian-warm/app/cooker").len(),
        1,
        "the cooker, tagged by its key"
    );

    assert_eq!(
        cache["engine_store"],
        json!({"namespace": "ci/warm", "hit": false}),
        "the first build's engine starts empty: {cache}"
    );
    assert_eq!(cache["bytes_pulled"], 0, "no parent image: {cache}");
    assert!(
        cache["bytes_pushed"].as_u64().unwrap() > 1_000_000,
        "busybox's layer and the rest went to the registry: {cache}"
    );

    // One line of the project changes, and the build runs as if on another host: the
    // runner is new and this host keeps no engine store, so all it has is the registry.
    warm.forget_engine_stores();
    project(&ctx, "v2\n", "lock v1\n", DOCKERFILE);
    let second = warm.build(&ctx, "lian-warm/app:2", ci());
    assert_eq!(second["type"], "completed", "{second}");
    let cache = &second["cache"];
    assert_eq!(cache["engine_store"]["hit"], false, "{cache}");
    assert_eq!(cache["cooker"]["hit"], true, "the cooker is found by its key: {cache}");
    let (steps, cached) = (
        cache["steps"].as_u64().unwrap(),
        cache["cached_steps"].as_u64().unwrap(),
    );
    // Cooker: busybox, Cargo.lock, RUN all cached; final: busybox and the cooked copy cached,
    // main.txt and the last RUN rebuilt.
    assert!(
        cached >= 5 && cached < steps,
        "{cached} of {steps} steps from the registry's cache: {cache}"
    );

    // A dependency bump misses the cooker; its engine is the one the second build left.
    project(&ctx, "v2\n", "lock v2\n", DOCKERFILE);
    let third = warm.build(&ctx, "lian-warm/app:3", ci());
    assert_eq!(third["cache"]["cooker"]["hit"], false, "{third}");
    assert_eq!(
        third["cache"]["engine_store"],
        json!({"namespace": "ci/warm", "hit": true}),
        "{third}"
    );
    assert_eq!(warm.tags("ci/warm/lian-warm/app/cooker").len(), 2);

    // Back to the first lock: the engine store still holds that cooker's steps.
    project(&ctx, "v3\n", "lock v1\n", DOCKERFILE);
    let fourth = warm.build(&ctx, "lian-warm/app:4", ci());
    let cache = &fourth["cache"];
    assert_eq!(cache["engine_store"]["hit"], true, "{cache}");
    assert!(
        cache["bytes_pushed"].as_u64().unwrap() < 100_000,
        "busybox's layer is in the registry already: only the changed layers go: {cache}"
    );
    assert_eq!(
        cache["cached_steps"].as_u64().unwrap() + 2,
        cache["steps"].as_u64().unwrap(),
        "all but main.txt and the last RUN from the engine store: {cache}"
    );
}

#[test]
fn sessions_write_their_own_namespace_and_ci_never_reads_it() {
    let warm = Warm::start("ns", &[]);
    let ctx = warm.work.path().join("app");
    project(&ctx, "v1\n", "lock\n", DOCKERFILE);

    let exported = warm.build(&ctx, "lian-ns/app:s1", session("export"));
    assert_eq!(exported["type"], "completed", "{exported}");
    assert_eq!(exported["cache"]["exported_to"], "dev/jpl-ns");
    assert_eq!(exported["cache"]["imported_from"], json!(["dev/jpl-ns", "ci/ns"]));
    assert_eq!(exported["cache"]["engine_store"]["namespace"], "dev/jpl-ns");
    assert_eq!(warm.tags("dev/jpl-ns/lian-ns/app"), ["lian-cache", "s1"]);
    assert!(warm.tags("ci/ns/lian-ns/app").is_empty(), "a session never writes ci/");

    // CI builds the same project: it reads ci/ only, so the session's cooker is no hit.
    let ci_build = warm.build(&ctx, "lian-ns/app:c1", ci());
    assert_eq!(
        ci_build["cache"]["engine_store"],
        json!({"namespace": "ci/ns", "hit": false}),
        "CI never starts from a session's engine: {ci_build}"
    );
    assert_eq!(ci_build["cache"]["imported_from"], json!(["ci/ns"]), "{ci_build}");
    assert_eq!(
        ci_build["cache"]["cooker"]["hit"], false,
        "CI never imports from dev/: {ci_build}"
    );

    // Discard: reads, writes nothing.
    project(&ctx, "v2\n", "lock\n", DOCKERFILE);
    let discarded = warm.build(&ctx, "lian-ns/app:s2", session("discard"));
    assert_eq!(discarded["type"], "completed", "{discarded}");
    assert!(discarded["cache"]["pushed"].is_null(), "{discarded}");
    assert!(
        discarded["cache"]["engine_store"].is_null(),
        "a discarding session keeps no engine: {discarded}"
    );
    assert_eq!(
        warm.tags("dev/jpl-ns/lian-ns/app"),
        ["lian-cache", "s1"],
        "discard leaves no trace"
    );

    // Rollback: a failed build moves no tag.
    let before = warm.digest("dev/jpl-ns/lian-ns/app", "lian-cache");
    let broken = DOCKERFILE.replace("cat /main.txt /cooked > /out", "false");
    project(&ctx, "v3\n", "lock\n", &broken);
    let failed = warm.build(&ctx, "lian-ns/app:s3", session("rollback"));
    assert_eq!(failed["type"], "failed", "{failed}");
    assert_eq!(
        warm.digest("dev/jpl-ns/lian-ns/app", "lian-cache"),
        before,
        "tags move only on success"
    );
    assert_eq!(warm.tags("dev/jpl-ns/lian-ns/app"), ["lian-cache", "s1"]);

    // The failed build took the session's engine store and did not give it back: the next
    // build starts from the registry's last good state, not from the failed build's cache.
    project(&ctx, "v4\n", "lock\n", DOCKERFILE);
    let after = warm.build(&ctx, "lian-ns/app:s4", session("export"));
    assert_eq!(after["type"], "completed", "{after}");
    assert_eq!(
        after["cache"]["engine_store"],
        json!({"namespace": "dev/jpl-ns", "hit": false}),
        "{after}"
    );
}

#[test]
fn the_sccache_secret_reaches_the_build_and_no_layer_or_event() {
    let store = S3Store::start();
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), &store.secret_access_key).unwrap();
    let warm = Warm::start(
        "sccache",
        &[
            ("LIAN_SCCACHE_ENDPOINT", store.endpoint.as_str()),
            ("LIAN_SCCACHE_ACCESS_KEY_ID", store.access_key_id.as_str()),
            (
                "LIAN_SCCACHE_SECRET_ACCESS_KEY_FILE",
                secret_file.path().to_str().unwrap(),
            ),
        ],
    );
    let ctx = warm.work.path().join("app");
    // The step proves it read the settings (a count, not the value) and writes no secret.
    let dockerfile = "FROM scratch
COPY busybox /bin/busybox
RUN --mount=type=secret,id=lian-sccache,target=/run/secrets/lian-sccache [\"/bin/busybox\", \"sh\", \"-c\", \". /run/secrets/lian-sccache && test -n \\\"$AWS_SECRET_ACCESS_KEY\\\" && echo \\\"$SCCACHE_S3_KEY_PREFIX\\\" > /prefix\"]
";
    project(&ctx, "x\n", "lock\n", dockerfile);
    let done = warm.build(&ctx, "lian-sccache/app:1", ci());
    assert_eq!(done["type"], "completed", "{done}");

    let docker = docker_cli();
    let saved = Command::new(&docker)
        .args(["save", "lian-sccache/app:1"])
        .output()
        .unwrap();
    assert!(saved.status.success());
    let needle = store.secret_access_key.as_bytes();
    assert!(
        !saved.stdout.windows(needle.len()).any(|w| w == needle),
        "the S3 secret is in no image layer"
    );
    assert!(
        saved.stdout.windows(b"ci/sccache".len()).any(|w| w == b"ci/sccache"),
        "the step read the settings: its namespace is the key prefix"
    );
    let id = done["build_id"].as_str().unwrap();
    let history = lian(&["--nats-url", &warm.fleet.server.url, "status", id, "--json"]);
    assert!(history.status.success());
    assert!(
        !text(&history).contains(&store.secret_access_key),
        "the S3 secret is in no event"
    );
}
