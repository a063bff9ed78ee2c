//! SSH transport and incremental sync against a real sshd on 127.0.0.1.

use std::path::Path;

use lian_runner::ssh::{SshError, SshSession, SshTarget};
use lian_runner::sync::sync_dir;
use lian_test_support::Sshd;

fn target(sshd: &Sshd) -> SshTarget {
    SshTarget {
        address: format!("127.0.0.1:{}", sshd.port),
        user: sshd.user.clone(),
        key: sshd.client_key.clone(),
        host_key: sshd.host_key.clone(),
    }
}

fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                if rel != ".lian-sync.json" {
                    out.push((rel, std::fs::read(&p).unwrap()));
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn exec_quotes_arguments_and_reports_exit_status() {
    let sshd = Sshd::start();
    let session = SshSession::connect(&target(&sshd)).await.unwrap();
    let out = session
        .exec(&["printf", "%s", "a b; echo injected"], &[])
        .await
        .unwrap();
    assert_eq!(
        (out.status, out.stdout.as_slice()),
        (0, b"a b; echo injected".as_slice())
    );
    let out = session.exec(&["sh", "-c", "kill -9 $$"], &[]).await.unwrap();
    assert_eq!(out.status, 137, "a KILLed command reads as 137");
    let out = session.exec(&["cat"], b"through stdin").await.unwrap();
    assert_eq!(out.stdout, b"through stdin");
    session.close().await;
}

/// Hostile arguments reach the remote program byte for byte, through `exec` and through the
/// sync's fixed scripts (the remote directory is their `$1`): nothing in them runs.
#[tokio::test]
async fn hostile_arguments_reach_the_remote_program_unchanged() {
    let sshd = Sshd::start();
    let session = SshSession::connect(&target(&sshd)).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let canary = scratch.path().join("ran");
    let canary_str = canary.to_str().unwrap();
    let hostile = [
        format!("'; touch {canary_str}; '"),
        format!("\"; touch {canary_str}; \""),
        format!("$(touch {canary_str})"),
        format!("`touch {canary_str}`"),
        format!("a\ntouch {canary_str}\n"),
        format!("x && touch {canary_str} || touch {canary_str}"),
        "  spaces  and\ttabs ".to_string(),
        "*".to_string(),
        "~".to_string(),
        "$HOME ${PATH} $1 \\ !! #comment".to_string(),
        String::new(),
    ];
    for arg in &hostile {
        let out = session.exec(&["printf", "%s", arg], &[]).await.unwrap();
        assert_eq!(out.status, 0, "{arg:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), *arg, "{arg:?} arrived as it was");
    }
    let err = session.exec(&["printf", "%s", "nul\0byte"], &[]).await.unwrap_err();
    assert!(err.to_string().contains("cannot be passed"), "{err}");

    // The sync's remote directory with every kind of shell syntax in its name.
    let local = tempfile::tempdir().unwrap();
    write(local.path(), "Dockerfile", b"FROM scratch\n");
    let remote_dir = scratch
        .path()
        .join(format!("ctx '$(touch {canary_str})' \"`touch {canary_str}`\" ; x\ny"));
    let stats = sync_dir(&session, local.path(), remote_dir.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(stats.sent_files, 1);
    assert_eq!(
        tree(&remote_dir),
        tree(local.path()),
        "the files landed in that directory"
    );
    let again = sync_dir(&session, local.path(), remote_dir.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(again.sent_files, 0, "its manifest was read back from there");
    assert!(!canary.exists(), "no argument ran as a command");
    session.close().await;
}

#[tokio::test]
async fn a_host_key_that_is_not_the_pinned_one_is_refused() {
    let sshd = Sshd::start();
    let other = Sshd::start();
    let mut t = target(&sshd);
    t.host_key = other.host_key.clone();
    let err = SshSession::connect(&t).await.err().expect("refused");
    assert!(matches!(err, SshError::HostKey { .. }), "{err}");
}

#[tokio::test]
async fn only_changed_files_travel_and_deleted_files_go() {
    let sshd = Sshd::start();
    let session = SshSession::connect(&target(&sshd)).await.unwrap();
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let remote_dir = remote.path().join("ctx");
    let remote_str = remote_dir.to_str().unwrap();
    write(local.path(), "Dockerfile", b"FROM scratch\n");
    write(local.path(), "src/main.rs", &vec![b'x'; 100_000]);
    write(local.path(), "src/lib.rs", b"pub fn f() {}\n");
    write(local.path(), "with space/it's.txt", b"odd names travel too\n");
    // Staged contexts are already filtered at upload; what is kept despite .dockerignore
    // (the Dockerfile, say) must reach the runner, whose `docker build` applies it again.
    write(local.path(), ".dockerignore", b"Dockerfile\n");

    let cold = sync_dir(&session, local.path(), remote_str).await.unwrap();
    assert_eq!((cold.files, cold.sent_files), (5, 5), "{cold:?}");
    assert_eq!(
        tree(&remote_dir),
        tree(local.path()),
        "the runner has the staged context"
    );

    let warm = sync_dir(&session, local.path(), remote_str).await.unwrap();
    assert_eq!(
        (warm.sent_files, warm.sent_bytes, warm.deleted),
        (0, 0, 0),
        "an unchanged re-sync sends no content"
    );

    write(local.path(), "src/lib.rs", b"pub fn g() {}\n");
    std::fs::remove_file(local.path().join("src/main.rs")).unwrap();
    let delta = sync_dir(&session, local.path(), remote_str).await.unwrap();
    assert_eq!(
        (delta.sent_files, delta.sent_bytes, delta.deleted),
        (1, 14, 1),
        "{delta:?}"
    );
    assert_eq!(tree(&remote_dir), tree(local.path()));
}
