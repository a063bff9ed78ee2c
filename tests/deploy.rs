//! What `deploy/` ships is checked by each file's own tool: every systemd unit by
//! `systemd-analyze verify` (as written, with the binaries' paths pointed at this build),
//! every nats-server config by `nats-server -t`, and the three cluster members, rewritten only
//! to this test's free ports and stores, form one cluster on which `lian` makes every stream
//! and bucket three copies.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::nats_streams;
use lian_test_support::{NatsCluster, workspace_root};

fn deploy() -> PathBuf {
    workspace_root().join("deploy")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    out.sort();
    out
}

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool} is not installed (see scripts/setup.sh)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn every_systemd_unit_passes_systemd_analyze_verify() {
    let analyze = which("systemd-analyze");
    let nats_server = which("nats-server");
    let units = files(&deploy().join("systemd"), "service");
    assert!(units.len() >= 4, "{units:?}");
    let dir = tempfile::tempdir().unwrap();
    for unit in units {
        let text = std::fs::read_to_string(&unit).unwrap();
        let text = text
            .replace("/usr/local/bin/lian ", &format!("{} ", common::lian_bin().display()))
            .replace("/usr/local/bin/nats-server ", &format!("{} ", nats_server.display()));
        // A template is verified as one of its instances.
        let name = unit.file_name().unwrap().to_string_lossy().replace("@.", "@1.");
        let copy = dir.path().join(&name);
        std::fs::write(&copy, text).unwrap();
        let out = Command::new(&analyze).arg("verify").arg(&copy).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        // systemd-analyze exits 0 on an unknown key or a bad value, and says so.
        let about_it: Vec<&str> = said.lines().filter(|l| l.contains(&name)).collect();
        assert!(
            out.status.success() && about_it.is_empty(),
            "{}: {said}",
            unit.display()
        );
    }
}

#[test]
fn every_nats_config_passes_nats_server_t() {
    let mut confs = files(&deploy().join("nats"), "conf");
    confs.extend(files(&deploy().join("nats/cluster"), "conf"));
    assert_eq!(confs.len(), 4, "{confs:?}");
    for conf in confs {
        let out = Command::new("nats-server")
            .arg("-t")
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_shipped_cluster_members_form_one_cluster_with_three_copies_of_everything() {
    let shipped: Vec<String> = files(&deploy().join("nats/cluster"), "conf")
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(shipped.len(), 3);
    // The shipped layout: member i listens on 4222+i for clients and 6222+i for routes.
    let cluster = NatsCluster::start_with(3, |m| {
        let i: usize = m.name[1..].parse::<usize>().unwrap() - 1;
        let mut text = shipped[i]
            .replace(&format!("127.0.0.1:{}", 4222 + i), &format!("127.0.0.1:{}", m.port))
            .replace(
                &format!("/var/lib/lian/nats-{}", m.name),
                &m.store.display().to_string(),
            );
        for (j, route) in m.routes.iter().enumerate() {
            text = text.replace(&format!("nats://127.0.0.1:{}", 6222 + j), route);
        }
        text.replace(
            &format!("listen: \"127.0.0.1:{}\"", 6222 + i),
            &format!("listen: \"{}\"", m.routes[i].trim_start_matches("nats://")),
        )
    });
    let streams = nats_streams(&cluster.seeds());
    assert_eq!(streams.len(), 10, "{streams:?}");
    for s in &streams {
        assert_eq!(s["replicas"], 3, "{s}");
        assert_eq!(s["followers"].as_array().unwrap().len(), 2, "{s}");
    }
}
