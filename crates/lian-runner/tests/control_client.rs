//! `ControlClient::lease_info` against a stub control plane on 127.0.0.1 (the real one is
//! exercised end to end in tests/cloud_control.rs): the path, the bearer token, the
//! lease with its host key, and a 404 as a refusal.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use lian_core::LeaseKey;
use lian_runner::{ControlClient, ControlError};

/// Answers each request with the next of `answers` (status, body); records request lines
/// and authorization headers.
fn stub(answers: Vec<(u16, String)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for ((status, body), stream) in answers.into_iter().zip(listener.incoming()) {
            let stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if lower.starts_with("get ") || lower.starts_with("authorization:") {
                    log.lock().unwrap().push(line.trim().to_string());
                }
            }
            let mut out = stream;
            let _ = write!(
                out,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[tokio::test]
async fn lease_info_reads_one_lease_with_its_host_key_and_a_404_is_a_refusal() {
    let lease = r#"{"lease_id":"b1-r1","provider":"hcloud","runner_type":"cax11","workspace":"ws","build_id":"b1","owner":"w1","state":"ready","host":"203.0.113.7","provider_id":"hcloud:1001","created_at":5,"host_key":"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost","ssh_port":22,"age_secs":3}"#;
    let missing = r#"{"error":{"code":"not_found","message":"no lease b2-r1: it was never leased here or is destroyed already"}}"#;
    let (url, seen) = stub(vec![(200, lease.into()), (404, missing.into())]);
    let client = ControlClient::new(&url, "stub-token");

    let got = client.lease_info(&LeaseKey::new("b1-r1").unwrap()).await.unwrap();
    assert_eq!(
        (got.host.as_str(), got.ssh_port, got.host_key.as_deref()),
        (
            "203.0.113.7",
            Some(22),
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost")
        )
    );
    let err = client.lease_info(&LeaseKey::new("b2-r1").unwrap()).await.unwrap_err();
    assert!(
        matches!(&err, ControlError::Refused { status: 404, code, .. } if code == "not_found"),
        "{err}"
    );
    assert!(err.to_string().contains("no lease b2-r1"), "{err}");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "GET /api/v1/vm-pool/b1-r1 HTTP/1.1",
            "authorization: Bearer stub-token",
            "GET /api/v1/vm-pool/b2-r1 HTTP/1.1",
            "authorization: Bearer stub-token",
        ]
    );
}
