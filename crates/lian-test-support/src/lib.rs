//! Real services for tests, started per test on free ports and stopped on drop: a
//! nats-server with JetStream in a temp store, an OCI registry and an S3 store (as `lian
//! up` runs them), a raw NATS protocol client (so end-to-end
//! tests read `lian.>` with a client that is not ours), and the `lian` binary.

mod fake_hcloud;
mod fake_proxmox;
mod http;
mod nats;
mod raw;
mod serve;
mod sshd;
mod stores;

pub use fake_hcloud::{Behaviour as HcloudBehaviour, FakeHcloud, FakeServer};
pub use fake_proxmox::{Behaviour as ProxmoxBehaviour, FakeProxmox, FakeVm};
pub use http::{HttpAnswer, http, http_status};
pub use nats::{ClusterNode, Member, NatsCluster, NatsServer};
pub use raw::{RawMessage, RawNats};
pub use sshd::Sshd;
pub use stores::{Registry, S3Store};

use std::path::PathBuf;
use std::process::Command;

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The repository root (where the top-level Cargo.toml is).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/lian-test-support sits two levels below the root")
        .to_path_buf()
}

/// Whether a Docker engine answers; tests that build images need one.
pub fn docker_available() -> bool {
    Command::new(docker_cli())
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Debian's docker CLI builds with BuildKit without buildx; prefer it where installed.
pub fn docker_cli() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/docker");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("docker")
    }
}
