//! Cold and warm sync of a 200 MB context to a runner over SSH: lian's russh sync against
//! `rsync -e ssh` in the same run, on the same sshd. `cargo bench -p lian-runner --bench sync`
//! prints a Markdown table (recorded in BENCHMARKS.md).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use lian_runner::ssh::{SshSession, SshTarget};
use lian_runner::sync::sync_dir;
use lian_test_support::Sshd;

const FILES: usize = 200;
const FILE_BYTES: usize = 1024 * 1024;

/// Incompressible content without a random-number dependency (xorshift).
fn fill(root: &Path) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..FILES {
        let dir = root.join(format!("dir{}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        let mut buf = Vec::with_capacity(FILE_BYTES);
        while buf.len() < FILE_BYTES {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            buf.extend_from_slice(&state.to_le_bytes());
        }
        std::fs::write(dir.join(format!("file{i}.bin")), buf).unwrap();
    }
}

fn rsync(sshd: &Sshd, local: &Path, remote: &Path) -> f64 {
    let ssh = format!(
        "ssh -i {} -p {} -c aes256-gcm@openssh.com -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        sshd.client_key.display(),
        sshd.port
    );
    let started = Instant::now();
    let status = Command::new("rsync")
        .args(["-a", "--delete", "-e", &ssh])
        .arg(format!("{}/", local.display()))
        .arg(format!("{}@127.0.0.1:{}/", sshd.user, remote.display()))
        .status()
        .expect("rsync runs (apt-get install rsync)");
    assert!(status.success());
    started.elapsed().as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sshd = Sshd::start();
    let local = tempfile::tempdir().unwrap();
    fill(local.path());
    let megabytes = (FILES * FILE_BYTES) as f64 / 1e6;
    let remote = tempfile::tempdir().unwrap();
    let target = SshTarget {
        address: format!("127.0.0.1:{}", sshd.port),
        user: sshd.user.clone(),
        key: sshd.client_key.clone(),
        host_key: sshd.host_key.clone(),
    };
    let (cold, warm, cold_stats, warm_stats) = runtime.block_on(async {
        let session = SshSession::connect(&target).await.unwrap();
        let dir = remote.path().join("lian");
        let dir = dir.to_str().unwrap();
        let t = Instant::now();
        let cold_stats = sync_dir(&session, local.path(), dir).await.unwrap();
        let cold = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let warm_stats = sync_dir(&session, local.path(), dir).await.unwrap();
        (cold, t.elapsed().as_secs_f64(), cold_stats, warm_stats)
    });
    let rsync_dir = remote.path().join("rsync");
    std::fs::create_dir_all(&rsync_dir).unwrap();
    let rsync_cold = rsync(&sshd, local.path(), &rsync_dir);
    let rsync_warm = rsync(&sshd, local.path(), &rsync_dir);
    println!("| tool | cold | warm (no change) |");
    println!("| --- | --- | --- |");
    println!(
        "| lian russh sync | {cold:.2} s ({:.0} MB/s, {} files sent) | {warm:.2} s ({} files sent) |",
        megabytes / cold,
        cold_stats.sent_files,
        warm_stats.sent_files
    );
    println!(
        "| rsync -e 'ssh -c aes256-gcm' | {rsync_cold:.2} s ({:.0} MB/s) | {rsync_warm:.2} s |",
        megabytes / rsync_cold
    );
    println!(
        "({FILES} files, {megabytes:.0} MB, loopback sshd, this machine: {} cores)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
}
