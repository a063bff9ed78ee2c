//! The registry and the S3 store: the ones `lian up` starts and the test harness's own
//! (`Registry::start`, `S3Store::start`) take a real push of a small image and serve it back
//! by digest, and sccache compiles through the store (a miss, then a hit after `cargo
//! clean`). Nothing is left running once `lian up` stops.

mod common;

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{Running, staged_examples};
use lian_test_support::{Registry, S3Store, docker_available, docker_cli, free_port};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn docker() -> Command {
    let mut cmd = Command::new(docker_cli());
    cmd.env("DOCKER_BUILDKIT", "1");
    cmd
}

/// Builds a busybox image (FROM scratch: nothing is pulled) carrying a nonce, pushes it to
/// `registry_host`, drops it from the engine, pulls it back by digest and runs it. Returns
/// the repository path in the registry.
fn push_then_pull_by_digest(registry_host: &str) -> String {
    let context = tempfile::tempdir().unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a static busybox (apt-get install busybox-static)");
    std::fs::copy(busybox, context.path().join("busybox")).unwrap();
    let nonce = format!("{}-{}", std::process::id(), free_port());
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo {nonce} > /nonce\"]\n"),
    )
    .unwrap();
    let repo = format!("lian-test/busybox-{}", free_port());
    let tagged = format!("{registry_host}/{repo}:t");
    run(docker()
        .args(["build", "--network", "none", "-q", "-t", &tagged])
        .arg(context.path()));
    let pushed = run(docker().args(["push", &tagged]));
    let digest = pushed
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in the push output:\n{pushed}"))
        .to_string();
    assert!(digest.starts_with("sha256:"), "{pushed}");
    run(docker().args(["rmi", &tagged]));
    let by_digest = format!("{registry_host}/{repo}@{digest}");
    run(docker().args(["pull", &by_digest]));
    let served = run(docker().args([
        "run",
        "--rm",
        "--network",
        "none",
        &by_digest,
        "/bin/busybox",
        "cat",
        "/nonce",
    ]));
    assert_eq!(
        served.trim(),
        nonce,
        "the image served back by digest is the one pushed"
    );
    run(docker().args(["rmi", &by_digest]));
    repo
}

/// An sccache server of its own (port, SCCACHE_DIR), stopped on drop.
struct Sccache {
    env: Vec<(String, String)>,
}

impl Sccache {
    fn start(store_env: &[(&str, String)], dir: &Path) -> Self {
        let mut env: Vec<(String, String)> = store_env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        env.extend([
            ("SCCACHE_DIR".into(), dir.join("sccache").display().to_string()),
            ("SCCACHE_SERVER_PORT".into(), free_port().to_string()),
            ("SCCACHE_LOG".into(), "warn".into()),
        ]);
        let sccache = Self { env };
        run(sccache.command().arg("--start-server"));
        sccache
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(std::env::var("LIAN_SCCACHE_BIN").unwrap_or_else(|_| "sccache".into()));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Rust compilations served from the cache, and compiled for want of it.
    fn hits_and_misses(&self) -> (u64, u64) {
        let text = run(self.command().args(["--show-stats", "--stats-format=json"]));
        let stats: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let rust = |kind: &str| stats["stats"][kind]["counts"]["Rust"].as_u64().unwrap_or(0);
        (rust("cache_hits"), rust("cache_misses"))
    }
}

impl Drop for Sccache {
    fn drop(&mut self) {
        let _ = self.command().arg("--stop-server").output();
    }
}

/// Compiles a tiny library crate through sccache with the store's environment: a miss, and
/// after `cargo clean` a hit served from the bucket.
fn sccache_miss_then_hit(store_env: &[(&str, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let krate = dir.path().join("tiny");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"tiny\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\npath = \"src/lib.rs\"\n",
    )
    .unwrap();
    // A nonce: the bucket may already hold this crate from an earlier run.
    std::fs::write(
        krate.join("src/lib.rs"),
        format!(
            "pub fn nonce() -> &'static str {{ \"{}-{}\" }}\n",
            std::process::id(),
            free_port()
        ),
    )
    .unwrap();
    let sccache = Sccache::start(store_env, dir.path());
    let cargo = |args: &[&str]| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(args)
            .arg("--offline")
            .current_dir(&krate)
            .envs(sccache.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUSTC_WRAPPER",
                std::env::var("LIAN_SCCACHE_BIN").unwrap_or_else(|_| "sccache".into()),
            )
            .env("CARGO_INCREMENTAL", "0")
            .env("CARGO_TARGET_DIR", dir.path().join("target"));
        run(&mut cmd)
    };
    cargo(&["build", "-q"]);
    assert_eq!(sccache.hits_and_misses(), (0, 1), "the first build misses");
    cargo(&["clean", "-q"]);
    cargo(&["build", "-q"]);
    assert_eq!(
        sccache.hits_and_misses(),
        (1, 1),
        "after cargo clean, a hit from the bucket"
    );
}

fn refuses(url: &str) -> bool {
    let authority = url.trim_start_matches("http://");
    TcpStream::connect(authority).is_err()
}

#[test]
fn the_harness_registry_and_s3_store_serve_images_and_sccache() {
    assert!(docker_available(), "this test pushes an image: start a Docker engine");
    let registry = Registry::start();
    let store = S3Store::start();
    push_then_pull_by_digest(&registry.host);
    sccache_miss_then_hit(&store.sccache_env());
    let (registry_url, endpoint) = (registry.url.clone(), store.endpoint.clone());
    drop((registry, store));
    assert!(refuses(&registry_url) && refuses(&endpoint), "stopped on drop");
}

#[test]
fn lian_up_serves_a_registry_and_an_s3_store_and_stops_them() {
    assert!(docker_available(), "this test pushes an image: start a Docker engine");
    let catalog = staged_examples();
    let state = tempfile::tempdir().unwrap();
    let fleet = Running::start(
        &[
            "up",
            "--nats-port",
            "0",
            "--workers",
            "0",
            "--state-dir",
            state.path().to_str().unwrap(),
            "--catalog",
            catalog.path().to_str().unwrap(),
        ],
        "Ctrl-C stops everything",
    );
    let served = |name: &str| -> String {
        let line = fleet
            .stdout_lines
            .iter()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("lian up printed no {name} line: {:#?}", fleet.stdout_lines));
        line.split_whitespace().nth(1).unwrap().to_string()
    };
    let (registry_url, s3_url) = (served("registry"), served("s3"));
    // The control plane's gate fronts it, and lets nobody in without a grant.
    let gate = served("gate");
    let challenge = lian_test_support::http("GET", &format!("{gate}/v2/"), None, None);
    assert_eq!(
        (challenge.status, challenge.header("www-authenticate")),
        (401, Some("Basic realm=\"lian-registry\"")),
        "{challenge:?}"
    );

    let repo = push_then_pull_by_digest(registry_url.trim_start_matches("http://"));
    assert!(
        state
            .path()
            .join("registry/data/docker/registry/v2/repositories")
            .join(&repo)
            .is_dir(),
        "the registry keeps its data in the fleet's state dir"
    );

    let s3 = state.path().join("s3");
    let secret_file = s3.join("secret_access_key");
    let mode = std::fs::metadata(&secret_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secret key is the owner's only");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    let key_id = std::fs::read_to_string(s3.join("access_key_id")).unwrap();
    assert!(
        fleet.stdout_lines.iter().all(|l| !l.contains(secret.trim())),
        "lian up never prints the secret key"
    );
    sccache_miss_then_hit(&[
        ("SCCACHE_BUCKET", "sccache".into()),
        ("SCCACHE_ENDPOINT", s3_url.clone()),
        ("SCCACHE_REGION", "us-east-1".into()),
        ("SCCACHE_S3_USE_SSL", "false".into()),
        ("AWS_ACCESS_KEY_ID", key_id.trim().into()),
        ("AWS_SECRET_ACCESS_KEY", secret.trim().into()),
    ]);

    let printed = fleet.stop();
    assert!(
        refuses(&registry_url) && refuses(&s3_url),
        "the registry and the S3 store stop with lian up: {printed:#?}"
    );
    let logs = std::fs::read_dir(state.path().join("logs")).unwrap();
    for log in logs {
        let text = std::fs::read_to_string(log.unwrap().path()).unwrap_or_default();
        assert!(!text.contains(secret.trim()), "no log shows the secret key");
    }
}

#[test]
fn lian_up_uses_the_configured_stores_and_starts_none() {
    let registry = Registry::start();
    let store = S3Store::start();
    let catalog = staged_examples();
    let state = tempfile::tempdir().unwrap();
    let secret_file = state.path().join("s3-secret");
    std::fs::write(&secret_file, &store.secret_access_key).unwrap();
    let env = [
        ("LIAN_REGISTRY_URL", registry.url.as_str()),
        ("LIAN_SCCACHE_ENDPOINT", store.endpoint.as_str()),
        ("LIAN_SCCACHE_ACCESS_KEY_ID", store.access_key_id.as_str()),
        ("LIAN_SCCACHE_SECRET_ACCESS_KEY_FILE", secret_file.to_str().unwrap()),
    ];
    let fleet = Running::start_with(
        &[
            "up",
            "--nats-port",
            "0",
            "--workers",
            "0",
            "--state-dir",
            state.path().to_str().unwrap(),
            "--catalog",
            catalog.path().to_str().unwrap(),
        ],
        &env,
        "Ctrl-C stops everything",
    );
    let lines = fleet.stop();
    let line = |name: &str| {
        lines
            .iter()
            .find(|l| l.trim_start().starts_with(name))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        line("registry").contains(&registry.url) && line("registry").contains("not started here"),
        "{lines:#?}"
    );
    assert!(
        line("s3").contains(&store.endpoint) && line("s3").contains("not started here"),
        "{lines:#?}"
    );
    for ours in ["logs/registry.log", "logs/s3.log", "registry", "s3"] {
        assert!(!state.path().join(ours).exists(), "lian up started its own ({ours})");
    }
    assert!(
        lines.iter().all(|l| !l.contains(&store.secret_access_key)),
        "the secret key is never printed"
    );
}

#[test]
fn bootstrap_without_a_registry_stops_before_any_work() {
    let state = tempfile::tempdir().unwrap();
    let out = common::lian(&["catalog", "bootstrap", "--state-dir", state.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(common::text(&out).contains("no registry"), "{}", common::text(&out));

    let nobody = format!("http://127.0.0.1:{}", free_port());
    let out = common::lian(&[
        "catalog",
        "bootstrap",
        "--registry",
        &nobody,
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    assert!(common::text(&out).contains("does not answer"), "{}", common::text(&out));
    assert!(
        !state.path().join("bootstrap/debootstrap").exists(),
        "nothing was debootstrapped for a registry that is not there"
    );
}

/// The whole bootstrap, as `lian catalog bootstrap` runs it: debootstrap (about 2 minutes),
/// the host's toolchain, import, push; then the image is pulled back by digest and builds a
/// crate that fetches from crates.io over HTTPS. Run with `cargo test -p lian --test
/// stores -- --ignored`.
#[test]
#[ignore = "about 3 minutes (debootstrap); run by hand"]
fn bootstrap_pushes_a_rust_base_that_builds_a_crate() {
    assert!(docker_available(), "this test imports an image: start a Docker engine");
    let registry = Registry::start();
    let state = tempfile::tempdir().unwrap();
    let out = common::lian(&[
        "catalog",
        "bootstrap",
        "--registry",
        &registry.url,
        "--state-dir",
        state.path().to_str().unwrap(),
        "--no-cargo-chef",
    ]);
    let printed = common::text(&out);
    assert!(out.status.success(), "{printed}");
    let digest = printed
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest printed:\n{printed}"))
        .to_string();
    let image = format!("{}/lamina/rust-base@{digest}", registry.host);
    run(docker().args(["rmi", &format!("{}/lamina/rust-base:bookworm", registry.host)]));
    run(docker().args(["pull", &image]));
    let built = run(docker()
        .args(["run", "--rm", "--network", "host", &image, "sh", "-c"])
        .arg(
            "cd /tmp && cargo new -q probe && cd probe && echo 'itoa = \"1\"' >> Cargo.toml \
         && cargo build -q && rustup show active-toolchain && sccache --version",
        ));
    assert!(built.contains("sccache"), "{built}");
    run(docker().args(["rmi", &image]));
}
