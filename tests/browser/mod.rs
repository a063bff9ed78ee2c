//! A headless Chromium (Debian's `chromium`) driven over WebDriver (Debian's
//! `chromium-driver`) with fantoccini, for the web view's tests and benchmark.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use lian_test_support::{free_port, workspace_root};

/// chromedriver on a free port, and one headless Chromium session through it.
pub struct Browser {
    pub rt: tokio::runtime::Runtime,
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Self {
        let chromedriver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromedriver (apt-get install chromium-driver; scripts/setup.sh does)");
        let port = free_port();
        let mut driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let out = driver.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("chromedriver said it started within 30 s");
            if line.contains("started successfully") {
                break;
            }
        }
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a Chromium session");
        Self {
            rt,
            client,
            driver,
            _profile: profile,
        }
    }

    pub fn goto(&self, url: &str) {
        self.rt.block_on(self.client.goto(url)).unwrap();
    }

    pub fn url(&self) -> String {
        self.rt.block_on(self.client.current_url()).unwrap().to_string()
    }

    /// The rendered text of every element matching `css`, read in one script run (the
    /// live refresh may redraw `<main>` between two WebDriver calls).
    pub fn texts(&self, css: &str) -> Vec<String> {
        let js = "return Array.from(document.querySelectorAll(arguments[0])).map((e) => e.textContent);";
        serde_json::from_value(self.script_with(js, css)).unwrap()
    }

    pub fn attrs(&self, css: &str, attr: &str) -> Vec<String> {
        let js = format!(
            "return Array.from(document.querySelectorAll(arguments[0])).map((e) => e.getAttribute({}) || '');",
            serde_json::json!(attr)
        );
        serde_json::from_value(self.script_with(&js, css)).unwrap()
    }

    /// Waits (bounded) until an element matching `css` is on the page; its text. A
    /// WebDriver error while the page redraws is retried within the same bound.
    pub fn wait_for(&self, css: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        self.rt.block_on(async {
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match self.client.wait().at_most(left).for_element(Locator::Css(css)).await {
                    Ok(_) => return,
                    Err(e) if left.is_zero() || matches!(e, fantoccini::error::CmdError::WaitTimeout) => {
                        panic!("no {css} within {within:?}: {e}")
                    }
                    Err(e) => eprintln!("waiting for {css}: {e}; retrying"),
                }
            }
        });
        self.texts(css).into_iter().next().unwrap_or_default()
    }

    pub fn log_in(&self, token: &str) {
        self.rt.block_on(async {
            let form = self.client.form(Locator::Css("section.login form")).await.unwrap();
            form.set_by_name("token", token).await.unwrap();
            form.submit().await.unwrap();
        });
    }

    pub fn script(&self, js: &str) -> serde_json::Value {
        self.rt.block_on(self.client.execute(js, vec![])).unwrap()
    }

    pub fn script_with(&self, js: &str, arg: &str) -> serde_json::Value {
        self.rt
            .block_on(self.client.execute(js, vec![serde_json::json!(arg)]))
            .unwrap()
    }

    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.rt.block_on(self.client.screenshot()).unwrap();
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("web-view");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.client.clone().close());
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
