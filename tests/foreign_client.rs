//! A client that is not ours submits a build with a context using only what subjects.md
//! documents: `tests/python/submit_with_context.py` (nats-py, no lian code) stores the
//! context in LIAN_CONTEXTS, publishes the request and waits for the terminal event; the
//! image holds what plain `docker build` of the same directory puts there.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{Fleet, image_tree};
use lian_test_support::{docker_cli, workspace_root};

fn write(root: &Path, rel: &str, content: &[u8], mode: u32) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Removes the images a test made, also when it fails.
struct Images(Vec<&'static str>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new(docker_cli()).args(["rmi", "-f", image]).output();
        }
    }
}

#[test]
fn a_python_client_submits_a_build_with_a_context_from_subjects_md_alone() {
    let import = Command::new("python3").args(["-c", "import nats, nats.js"]).output();
    match import {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "this test needs nats-py (python3 -m pip install nats-py, as scripts/setup.sh does): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("this test needs python3 with nats-py (scripts/setup.sh installs it): {e}"),
    }

    let fleet = Fleet::new("foreign");
    let _worker = fleet.worker("w1", &[]);
    let _images = Images(vec!["lian-foreign-plain:1", "lian-foreign-py:1"]);

    let outer = tempfile::tempdir().unwrap();
    let ctx = outer.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    write(&ctx, "Dockerfile", b"FROM scratch\nCOPY . /ctx\n", 0o644);
    write(&ctx, "src/main.rs", b"fn main() {}\n", 0o644);
    write(&ctx, "src/copy.rs", b"fn main() {}\n", 0o600); // same content: one place in a pack
    write(&ctx, "bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
    write(&ctx, "empty-file", b"", 0o644);
    // 300,000 bytes: a blob of two chunks.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write(&ctx, "data/big.bin", &big, 0o640);
    std::fs::create_dir_all(ctx.join("empty/nested")).unwrap();
    std::os::unix::fs::symlink("src/main.rs", ctx.join("main-link")).unwrap();

    let plain = Command::new(docker_cli())
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "-q", "-t", "lian-foreign-plain:1"])
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));

    let script = workspace_root().join("tests/python/submit_with_context.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--nats-url", &fleet.server.url, "--workspace", fleet.workspace])
        .args([
            "--image",
            "lian-foreign-py:1",
            "--build-id",
            "foreign-1",
            "--timeout",
            "300",
        ])
        .arg("--context")
        .arg(&ctx)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "the Python client failed:\n{stdout}\n{stderr}");
    let terminal: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(terminal["type"], "completed", "{terminal}");
    assert_eq!(terminal["build_id"], "foreign-1");
    assert_eq!(terminal["image"], "lian-foreign-py:1");
    // Blobs and packs were both used, and the second upload of the same context sent nothing.
    assert!(
        stderr.contains("upload: 3 of 3 objects sent"),
        "big.bin, one pack, the manifest:\n{stderr}"
    );
    assert!(stderr.contains("resubmit: 0 of 3 objects to send, 0 bytes"), "{stderr}");

    let (expected, _) = image_tree("lian-foreign-plain:1");
    let (got, _) = image_tree("lian-foreign-py:1");
    for must in ["empty/nested", "empty-file", "bin/tool", "data/big.bin", "main-link"] {
        assert!(
            expected.contains_key(must),
            "plain docker build has no {must}: {expected:#?}"
        );
    }
    assert!(
        got["bin/tool"].starts_with("file 755 "),
        "the executable: {}",
        got["bin/tool"]
    );
    assert_eq!(
        got, expected,
        "the image built from the Python client's context differs from docker build's"
    );
}
