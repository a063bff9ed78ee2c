//! A NATS client written from the protocol text, ~100 lines: it proves the subjects and
//! payloads are usable by any client, not just async-nats.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RawMessage {
    pub subject: String,
    pub payload: Vec<u8>,
}

impl RawMessage {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

pub struct RawNats {
    writer: TcpStream,
    messages: Receiver<RawMessage>,
    /// Everything received so far, in order.
    pub seen: Vec<RawMessage>,
}

impl RawNats {
    /// Connects and subscribes to `subject`; returns once the server confirmed the SUB.
    pub fn subscribe(port: u16, subject: &str) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to nats");
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut info = String::new();
        reader.read_line(&mut info).unwrap();
        assert!(info.starts_with("INFO "), "unexpected greeting {info}");
        write!(
            writer,
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"name\":\"raw-test\"}}\r\nSUB {subject} 1\r\nPING\r\n"
        )
        .unwrap();
        let (tx, rx) = channel();
        let (ready_tx, ready_rx) = channel();
        let mut pong_writer = writer.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut ready = Some(ready_tx);
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let parts: Vec<&str> = line.split_whitespace().collect();
                match parts.first().copied() {
                    Some("PING") => {
                        let _ = pong_writer.write_all(b"PONG\r\n");
                    }
                    Some("PONG") => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Some("MSG") | Some("HMSG") => {
                        let headers = parts[0] == "HMSG";
                        let total: usize = parts.last().unwrap().parse().unwrap();
                        let header_len: usize = if headers {
                            parts[parts.len() - 2].parse().unwrap()
                        } else {
                            0
                        };
                        let mut body = vec![0u8; total + 2];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        body.truncate(total);
                        let payload = body.split_off(header_len);
                        if tx
                            .send(RawMessage {
                                subject: parts[1].to_string(),
                                payload,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the server confirms the subscription");
        Self {
            writer,
            messages: rx,
            seen: Vec::new(),
        }
    }

    /// Publishes on core NATS.
    pub fn publish(&mut self, subject: &str, payload: &[u8]) {
        write!(self.writer, "PUB {subject} {}\r\n", payload.len()).unwrap();
        self.writer.write_all(payload).unwrap();
        self.writer.write_all(b"\r\n").unwrap();
        self.writer.flush().unwrap();
    }

    /// Publishes on core NATS with a reply subject (one this client subscribed to, to read
    /// the answer with `wait_for`): a request, e.g. to the JetStream API.
    pub fn publish_with_reply(&mut self, subject: &str, reply: &str, payload: &[u8]) {
        write!(self.writer, "PUB {subject} {reply} {}\r\n", payload.len()).unwrap();
        self.writer.write_all(payload).unwrap();
        self.writer.write_all(b"\r\n").unwrap();
        self.writer.flush().unwrap();
    }

    /// Waits for the first message (new or already seen) that satisfies `pred`; panics
    /// with what was seen if none comes within `within`.
    pub fn wait_for(&mut self, within: Duration, what: &str, pred: impl Fn(&RawMessage) -> bool) -> RawMessage {
        if let Some(m) = self.seen.iter().find(|m| pred(m)) {
            return m.clone();
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(m) => {
                    self.seen.push(m.clone());
                    if pred(&m) {
                        return m;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    let subjects: Vec<&str> = self.seen.iter().map(|m| m.subject.as_str()).collect();
                    panic!("no {what} within {within:?}; saw {subjects:#?}");
                }
            }
        }
    }
}
