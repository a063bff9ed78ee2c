//! How a worker reaches a cloud runner the control plane leased, against a real sshd on
//! 127.0.0.1 standing in for the runner: the lease's address, port and host key are all it
//! needs; the right key syncs, any other is refused before anything is sent; the build is
//! `buildctl` over SSH (a stand-in script here: no buildkitd on this machine), its rawjson
//! progress streamed step by step, out of memory recognised by exit code 137.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use lian_core::LeaseKey;
use lian_core::control::{Lease, LeaseState};
use lian_core::directives::ComputeProvider;
use lian_core::sizing::RunnerType;
use lian_runner::buildctl::Buildctl;
use lian_runner::progress::StepState;
use lian_runner::ssh::generate_host_key;
use lian_runner::{BuildInvocation, CloudRunner, RunnerError};
use lian_test_support::Sshd;

fn lease(key: &str, sshd: &Sshd, host_key: &str) -> Lease {
    Lease {
        lease_id: LeaseKey::new(key).unwrap(),
        provider: ComputeProvider::Hcloud,
        runner_type: RunnerType::Cax11,
        workspace: "ws".parse().unwrap(),
        build_id: "b1".parse().unwrap(),
        owner: "w1".into(),
        state: LeaseState::Ready,
        host: "127.0.0.1".into(),
        provider_id: "hcloud:1001".into(),
        created_at: 0,
        host_key: Some(host_key.to_string()),
        ssh_port: Some(sshd.port),
    }
}

/// The runner of `lease`, reached as the test sshd's user with its work dir under `dir`.
fn runner(lease: &Lease, sshd: &Sshd, dir: &Path) -> CloudRunner {
    CloudRunner::from_lease(lease, &sshd.client_key, &dir.join("staging"))
        .unwrap()
        .as_user(&sshd.user, dir.join("runner").to_str().unwrap())
}

fn stage(runner: &CloudRunner) {
    let staging = runner.staging();
    std::fs::create_dir_all(staging.join("src")).unwrap();
    std::fs::write(staging.join("Dockerfile"), "FROM scratch\nCOPY src /src\n").unwrap();
    std::fs::write(staging.join("src/main.rs"), "fn main() {}\n").unwrap();
}

#[tokio::test]
async fn the_context_syncs_to_the_leased_address_only_with_the_pinned_host_key() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();

    let good = runner(&lease("b1-r1", &sshd, &sshd.host_key), &sshd, dir.path());
    assert_eq!(good.ssh_host().target.address, format!("127.0.0.1:{}", sshd.port));
    assert_eq!(good.ssh_host().target.host_key, sshd.host_key);
    stage(&good);
    let stats = good.sync().await.unwrap();
    assert_eq!((stats.files, stats.sent_files), (2, 2));
    let remote = dir.path().join("runner/b1-r1/context");
    assert_eq!(
        std::fs::read_to_string(remote.join("src/main.rs")).unwrap(),
        "fn main() {}\n"
    );

    // A runner showing any other key than the lease's is refused before anything is sent.
    let impostor = generate_host_key("someone else").unwrap().public_key;
    let bad = runner(&lease("b2-r1", &sshd, &impostor), &sshd, dir.path());
    stage(&bad);
    let err = bad.sync().await.unwrap_err();
    assert!(matches!(err, RunnerError::HostKey { .. }), "{err}");
    assert!(err.to_string().contains("not the pinned one"), "{err}");
    assert!(!dir.path().join("runner/b2-r1").exists(), "nothing reached the host");

    // A lease that is not a ready cloud lease cannot be reached at all.
    let mut bare = lease("b3-r1", &sshd, &sshd.host_key);
    bare.host_key = None;
    let err = CloudRunner::from_lease(&bare, &sshd.client_key, dir.path()).unwrap_err();
    assert!(err.to_string().contains("no pinned host key"), "{err}");
}

/// A `buildctl` stand-in: records its argv, prints rawjson progress on stderr as buildctl
/// does, then either writes the metadata file or fails a step as the OOM killer would.
const FAKE_BUILDCTL: &str = r#"#!/bin/sh
printf '%s\n' "$@" > "$(dirname "$0")/args"
meta=""
while [ $# -gt 0 ]; do
  if [ "$1" = "--metadata-file" ]; then meta="$2"; fi
  shift
done
echo '{"vertexes":[{"digest":"sha256:a","name":"[1/2] FROM scratch","started":"2026-01-01T00:00:00Z","completed":"2026-01-01T00:00:00Z","cached":true},{"digest":"sha256:b","name":"[2/2] RUN make","started":"2026-01-01T00:00:01Z"}]}' >&2
if [ -e "$(dirname "$0")/oom" ]; then
  echo '{"vertexes":[{"digest":"sha256:b","name":"[2/2] RUN make","started":"2026-01-01T00:00:01Z","completed":"2026-01-01T00:00:02Z","error":"process \"/bin/sh -c make\" did not complete successfully: exit code: 137"}]}' >&2
  echo 'error: failed to solve: process "/bin/sh -c make" did not complete successfully: exit code: 137' >&2
  exit 1
fi
echo '{"vertexes":[{"digest":"sha256:b","name":"[2/2] RUN make","started":"2026-01-01T00:00:01Z","completed":"2026-01-01T00:00:02Z"}]}' >&2
printf '{"containerimage.digest":"sha256:feed"}' > "$meta"
"#;

#[tokio::test]
async fn the_build_is_buildctl_over_ssh_with_progress_streamed_and_oom_read_from_exit_137() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let cli = tools.join("buildctl");
    std::fs::write(&cli, FAKE_BUILDCTL).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();

    let runner = runner(&lease("b4-r1", &sshd, &sshd.host_key), &sshd, dir.path()).with_buildctl(Buildctl {
        cli: cli.display().to_string(),
        addr: "unix:///run/buildkit/buildkitd.sock".into(),
    });
    stage(&runner);
    runner.sync().await.unwrap();
    let spec = BuildInvocation {
        context: runner.staging(),
        dockerfile: "Dockerfile",
        image: "registry.example/ws/app:1",
        target: None,
        build_args: vec![("A", "x y")],
        secrets: vec![],
        cache_from: vec![],
        inline_cache: false,
    };
    let mut steps = Vec::new();
    let out = runner.build(&spec, &mut |s| steps.push(s)).await.unwrap();
    assert_eq!(out.image_id, "sha256:feed");
    let states: Vec<(String, StepState)> = steps.iter().map(|s| (s.id.clone(), s.state.clone())).collect();
    assert_eq!(
        states,
        [
            ("sha256:a".to_string(), StepState::Cached),
            ("sha256:b".to_string(), StepState::Started),
            ("sha256:b".to_string(), StepState::Done),
        ]
    );
    let args = std::fs::read_to_string(tools.join("args")).unwrap();
    let remote_context = format!("context={}/runner/b4-r1/context", dir.path().display());
    for expected in [
        remote_context.as_str(),
        "type=image,name=registry.example/ws/app:1,push=true",
        "build-arg:A=x y",
        "rawjson",
    ] {
        assert!(args.lines().any(|l| l == expected), "{expected:?} in {args}");
    }

    std::fs::write(tools.join("oom"), "").unwrap();
    let mut steps = Vec::new();
    let failure = runner.build(&spec, &mut |s| steps.push(s)).await.unwrap_err();
    assert!(failure.oom, "exit code 137 reads as out of memory: {failure:?}");
    assert!(failure.reason.contains("exit code: 137"), "{}", failure.reason);
    assert!(
        steps
            .iter()
            .any(|s| matches!(&s.state, StepState::Failed(e) if e.contains("137"))),
        "{steps:?}"
    );

    let secret = Path::new("/etc/hostname");
    let with_secret = BuildInvocation {
        secrets: vec![("creds", secret)],
        cache_from: vec![],
        inline_cache: false,
        ..spec.clone()
    };
    let refused = runner.build(&with_secret, &mut |_| {}).await.unwrap_err();
    assert!(
        refused.reason.contains("secrets are not supported"),
        "{}",
        refused.reason
    );
}
