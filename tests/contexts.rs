//! Contexts of real size and shape, through a real fleet (nats-server, workers, per-lease
//! Docker engines): what reaches the image is what plain `docker build` puts there, a
//! 20,000-file context builds, and while it does, small builds complete.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Fleet, directives_json, image_tree, lian, text};
use lian_test_support::docker_cli;

fn write(root: &Path, rel: &str, content: &[u8], mode: u32) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `lian submit` of `context` with `directives` to the fleet, plus `extra` arguments.
fn submit(fleet: &Fleet, directives: &Path, context: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--nats-url",
        fleet.server.url.as_str(),
        "submit",
        directives.to_str().unwrap(),
        "--context",
        context.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lian(&args)
}

fn submit_wait(fleet: &Fleet, dir: &Path, image: &str) -> String {
    let directives = directives_json(dir.parent().unwrap(), fleet.workspace, image);
    let out = submit(fleet, &directives, dir, &["--wait", "--timeout", "300"]);
    assert!(out.status.success(), "the build through lian failed:\n{}", text(&out));
    text(&out)
}

#[test]
fn what_reaches_the_image_is_what_docker_build_sends() {
    let fleet = Fleet::new("fidelity");
    let _worker = fleet.worker("w1", &[]);
    let outer = tempfile::tempdir().unwrap();
    let ctx = outer.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    write(&ctx, "Dockerfile", b"FROM scratch\nCOPY . /ctx\n", 0o644);
    write(&ctx, "src/main.rs", b"fn main() {}\n", 0o644);
    write(&ctx, "src/private.key", b"not really\n", 0o600);
    write(&ctx, "bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
    write(&ctx, "bin/odd", b"group-writable\n", 0o664);
    write(
        &ctx,
        "big.bin",
        &(0..700_000u32).map(|i| (i * 7 % 256) as u8).collect::<Vec<_>>(),
        0o640,
    );
    std::fs::create_dir_all(ctx.join(".cargo")).unwrap();
    std::fs::create_dir_all(ctx.join("empty/nested")).unwrap();
    std::fs::create_dir(ctx.join("locked")).unwrap();
    write(&ctx, "locked/inside", b"x", 0o444);
    std::fs::set_permissions(ctx.join("locked"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("src/main.rs", ctx.join("main-link")).unwrap();
    write(&ctx, "target/debug/huge", b"ignored", 0o644);
    write(&ctx, "notes.log", b"ignored", 0o644);
    write(&ctx, "deep/er/trace.log", b"ignored", 0o644);
    write(&ctx, "keep.log", b"kept by an exception", 0o644);
    write(&ctx, "docs/a.md", b"ignored", 0o644);
    write(&ctx, "docs/KEEP.md", b"kept inside an excluded directory", 0o644);
    write(
        &ctx,
        ".dockerignore",
        b"target\n**/*.log\n!keep.log\ndocs\n!docs/KEEP.md\n",
        0o644,
    );

    let docker = docker_cli();
    let plain = Command::new(&docker)
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "-q", "-t", "lian-fidelity-plain:1"])
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    submit_wait(&fleet, &ctx, "lian-fidelity-lian:1");

    let (expected, _) = image_tree("lian-fidelity-plain:1");
    let (got, got_mtimes) = image_tree("lian-fidelity-lian:1");
    for must in [
        ".cargo",
        "empty/nested",
        "keep.log",
        "docs/KEEP.md",
        "main-link",
        "locked/inside",
    ] {
        assert!(
            expected.contains_key(must),
            "plain docker build has {must}: {expected:#?}"
        );
    }
    assert!(!expected.contains_key("target") && !expected.contains_key("notes.log"));
    assert_eq!(
        got, expected,
        "the image built through lian differs from plain docker build's"
    );
    // Modification times travel too (plain BuildKit may serve its COPY from cache with older
    // ones, so they are checked against the source, not its image).
    let source = std::fs::metadata(ctx.join("src/main.rs")).unwrap().modified().unwrap();
    let source = source.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(got_mtimes["src/main.rs"], source, "the file's mtime reached the image");
    for image in ["lian-fidelity-plain:1", "lian-fidelity-lian:1"] {
        let _ = Command::new(&docker).args(["rmi", image]).output();
    }
}

#[test]
fn a_twenty_thousand_file_context_builds_and_small_builds_are_not_held_up() {
    let fleet = Fleet::new("big");
    let _w1 = fleet.worker("w1", &[]);
    let _w2 = fleet.worker("w2", &[]);
    let mut wire = fleet.wire();
    let outer = tempfile::tempdir().unwrap();
    let big = outer.path().join("big");
    std::fs::create_dir(&big).unwrap();
    write(&big, "Dockerfile", b"FROM scratch\nCOPY . /ctx\n", 0o644);
    for i in 0..20_000u32 {
        let rel = format!("crate{}/src/m{}/f{i}.rs", i % 50, i % 17);
        write(&big, &rel, format!("pub const N{i}: u32 = {i};\n").as_bytes(), 0o644);
    }
    let directives = directives_json(outer.path(), fleet.workspace, "lian-big:1");
    let out = submit(&fleet, &directives, &big, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let big_id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // Small builds submitted while the big one is in flight complete on their own.
    for n in 0..3 {
        let small = outer.path().join(format!("small{n}"));
        std::fs::create_dir(&small).unwrap();
        write(&small, "Dockerfile", b"FROM scratch\nCOPY hello /hello\n", 0o644);
        write(&small, "hello", format!("small build {n}\n").as_bytes(), 0o644);
        submit_wait(&fleet, &small, &format!("lian-small:{n}"));
    }
    let synced = wire.wait_for(Duration::from_secs(300), "the big context synced", |m| {
        m.subject == fleet.event(&big_id, "context_synced")
    });
    let event = synced.json();
    assert_eq!(event["files"], 20_001, "{event}");
    assert!(event["seconds"].as_f64().is_some(), "{event}");
    let done = wire.wait_for(Duration::from_secs(300), "the big build ended", |m| {
        m.subject == fleet.event(&big_id, "completed") || m.subject == fleet.event(&big_id, "failed")
    });
    assert!(done.subject.ends_with("completed"), "{}", done.json());
    let docker = docker_cli();
    for image in ["lian-big:1", "lian-small:0", "lian-small:1", "lian-small:2"] {
        let _ = Command::new(&docker).args(["rmi", image]).output();
    }
}

#[test]
fn a_context_over_the_limits_is_refused_before_upload_with_the_way_to_raise_them() {
    let fleet = Fleet::new("limits");
    let outer = tempfile::tempdir().unwrap();
    let ctx = outer.path().join("ctx");
    for i in 0..20 {
        write(&ctx, &format!("f{i}"), b"x", 0o644);
    }
    let directives = directives_json(outer.path(), fleet.workspace, "lian-limits:1");
    let out = submit(&fleet, &directives, &ctx, &["--max-context-files", "10"]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("limit of 10") && said.contains("--max-context-files"),
        "{said}"
    );
    // A FIFO is named, not skipped.
    std::fs::remove_dir_all(&ctx).unwrap();
    write(&ctx, "Dockerfile", b"FROM scratch\n", 0o644);
    let fifo = std::ffi::CString::new(ctx.join("pipe").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let out = submit(&fleet, &directives, &ctx, &[]);
    let said = text(&out);
    assert!(
        !out.status.success() && said.contains("pipe") && said.contains("FIFO"),
        "{said}"
    );
}

/// The longest build id and workspace the validators accept, under a deep state directory:
/// every path the lease's engine needs (its sockets above all) stays within the OS limits,
/// and the lease leaves nothing behind.
#[test]
fn the_longest_accepted_identifiers_build_end_to_end() {
    let workspace = "w".repeat(63);
    let build_id = format!("b{}", "0123456789".repeat(7))[..lian_core::names::MAX_BUILD_ID].to_string();
    let fleet = Fleet::new("unused");
    let deep = fleet
        .state
        .path()
        .join("a-rather-long-directory-name-as-deployments-have".repeat(2));
    std::fs::create_dir_all(&deep).unwrap();
    let _worker = common::Running::start(
        &[
            "--nats-url",
            &fleet.server.url,
            "worker",
            "--state-dir",
            deep.to_str().unwrap(),
            "--name",
            "w1",
        ],
        "",
    );
    let outer = tempfile::tempdir().unwrap();
    let ctx = outer.path().join("ctx");
    write(&ctx, "Dockerfile", b"FROM scratch\nCOPY hello /hello\n", 0o644);
    write(&ctx, "hello", b"hi\n", 0o644);
    let directives = directives_json(outer.path(), &workspace, "lian-long/app:1");
    let out = submit(
        &fleet,
        &directives,
        &ctx,
        &["--build-id", &build_id, "--wait", "--timeout", "180"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(common::runners_left(&deep).is_empty(), "the lease is destroyed");
    let _ = Command::new(docker_cli()).args(["rmi", "lian-long/app:1"]).output();
}
