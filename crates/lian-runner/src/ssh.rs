//! SSH to a runner with russh: public-key auth, a pinned host key, and exec with argv
//! quoted for the remote shell (nothing from a request reaches a command line unquoted).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate, load_secret_key, ssh_key};
use russh::{ChannelMsg, Sig};
use tokio::io::AsyncWriteExt;

/// How a runner host is reached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SshTarget {
    /// `host:port`.
    pub address: String,
    pub user: String,
    /// The client's private key (OpenSSH format).
    pub key: PathBuf,
    /// The host's public key, `ssh-ed25519 AAAA...`: any other key is refused.
    pub host_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("ssh {address}: {message}")]
    Connect { address: String, message: String },
    #[error("ssh {address}: the host key is not the pinned one (expected {expected}); refusing to talk to it")]
    HostKey { address: String, expected: String },
    #[error("ssh {address}: {user} was refused with key {key}")]
    Auth { address: String, user: String, key: String },
    #[error("ssh channel: {0}")]
    Channel(String),
}

/// What a remote command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit status; a command killed by a signal reports 128 + its number (KILL: 137).
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

struct Pinned {
    expected: PublicKey,
    matched: Arc<std::sync::atomic::AtomicBool>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let ok =
            matches!(key, PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.expected.key_data());
        self.matched.store(ok, std::sync::atomic::Ordering::SeqCst);
        Ok(ok)
    }
}

/// One authenticated connection; several commands may run over it.
pub struct SshSession {
    handle: client::Handle<Pinned>,
    address: String,
}

/// An SSH host key pair made for one lease, so the runner's key is known before it boots
/// and the first connection can pin it. Debug shows the public half only.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKeyPair {
    /// The private key, OpenSSH PEM (`-----BEGIN OPENSSH PRIVATE KEY-----`).
    pub private_key: String,
    /// The public key line, `ssh-ed25519 AAAA... <comment>`.
    pub public_key: String,
}

impl std::fmt::Debug for HostKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKeyPair")
            .field("private_key", &"<redacted>")
            .field("public_key", &self.public_key)
            .finish()
    }
}

/// A fresh ed25519 host key pair from 32 bytes of the system's random source; `comment`
/// ends the public key line.
pub fn generate_host_key(comment: &str) -> std::io::Result<HostKeyPair> {
    let invalid = |e: ssh_key::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(std::io::Error::other)?;
    let keypair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    seed.fill(0);
    let private =
        ssh_key::PrivateKey::new(ssh_key::private::KeypairData::Ed25519(keypair), comment).map_err(invalid)?;
    let private_key = private
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(invalid)?
        .to_string();
    let public_key = private.public_key().to_openssh().map_err(invalid)?;
    Ok(HostKeyPair {
        private_key,
        public_key,
    })
}

/// The one place an argument vector becomes the command line an SSH server hands to the
/// remote user's shell (SSH carries one string, not an argv): each argument quoted by
/// `shlex` (POSIX sh and bash), so every byte of it reaches the remote program as it was. A
/// NUL byte cannot be passed in an argument at all and is refused.
fn command_line(argv: &[&str]) -> Result<String, SshError> {
    if argv.is_empty() {
        return Err(SshError::Channel("no command to run".into()));
    }
    shlex::try_join(argv.iter().copied())
        .map_err(|e| SshError::Channel(format!("argument cannot be passed to a remote command: {e}")))
}

/// The size of each write into a channel: 256 KiB moved 228 MB/s on loopback where the
/// default small writes moved 143 MB/s (field notes).
pub const WRITE_CHUNK: usize = 256 * 1024;

impl SshSession {
    pub async fn connect(target: &SshTarget) -> Result<Self, SshError> {
        let address = target.address.clone();
        let connect_err = |message: String| SshError::Connect {
            address: address.clone(),
            message,
        };
        let expected = PublicKey::from_openssh(target.host_key.trim())
            .map_err(|e| connect_err(format!("the pinned host key is not an OpenSSH public key: {e}")))?;
        let key = load_secret_key(&target.key, None)
            .map_err(|e| connect_err(format!("cannot read the key {}: {e}", target.key.display())))?;
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(Duration::from_secs(600)),
            ..Default::default()
        });
        let matched = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = Pinned {
            expected,
            matched: matched.clone(),
        };
        let mut handle = match client::connect(config, target.address.as_str(), handler).await {
            Ok(h) => h,
            Err(_) if !matched.load(std::sync::atomic::Ordering::SeqCst) => {
                return Err(SshError::HostKey {
                    address,
                    expected: target.host_key.chars().take(60).collect(),
                });
            }
            Err(e) => return Err(connect_err(e.to_string())),
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .flatten();
        let auth = handle
            .authenticate_publickey(&target.user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        if !auth.success() {
            return Err(SshError::Auth {
                address,
                user: target.user.clone(),
                key: target.key.display().to_string(),
            });
        }
        Ok(Self { handle, address })
    }

    /// Runs `argv` remotely, feeding `stdin` in 256 KiB writes. Pipes and `&&` are written
    /// as `["sh", "-c", "<fixed script using $1...>", "sh", <arguments>...]`: the script is a
    /// constant, and whatever varies travels as its positional arguments.
    pub async fn exec(&self, argv: &[&str], stdin: &[u8]) -> Result<ExecOutput, SshError> {
        let line = command_line(argv)?;
        let err = |e: russh::Error| SshError::Channel(format!("{}: {e}", self.address));
        let mut channel = self.handle.channel_open_session().await.map_err(err)?;
        channel.exec(true, line).await.map_err(err)?;
        let mut writer = channel.make_writer();
        let feed = async {
            for chunk in stdin.chunks(WRITE_CHUNK) {
                writer.write_all(chunk).await?;
            }
            writer.shutdown().await
        };
        let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), None);
        let read = async {
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, .. } => stderr.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, .. } => status = Some(128 + signal_number(&signal_name)),
                    _ => {}
                }
            }
        };
        let (fed, ()) = tokio::join!(feed, read);
        // A command that exits without reading its stdin closes the channel under us; its
        // exit status is what tells what happened.
        if let (Err(e), None) = (fed, status) {
            return Err(SshError::Channel(format!("{}: writing stdin: {e}", self.address)));
        }
        Ok(ExecOutput {
            status: status.unwrap_or(255),
            stdout,
            stderr,
        })
    }

    /// Runs `argv` remotely (as `exec` does) with no input, handing each line of its
    /// stderr to `on_stderr_line` as it arrives (the lines are kept in the output too).
    pub async fn exec_streaming(
        &self,
        argv: &[&str],
        on_stderr_line: &mut (dyn FnMut(&str) + Send),
    ) -> Result<ExecOutput, SshError> {
        let line = command_line(argv)?;
        let err = |e: russh::Error| SshError::Channel(format!("{}: {e}", self.address));
        let mut channel = self.handle.channel_open_session().await.map_err(err)?;
        channel.exec(true, line).await.map_err(err)?;
        channel.eof().await.map_err(err)?;
        let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), None);
        let mut pending: Vec<u8> = Vec::new();
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => {
                    stderr.extend_from_slice(&data);
                    pending.extend_from_slice(&data);
                    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        on_stderr_line(String::from_utf8_lossy(&line).trim_end());
                    }
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => status = Some(128 + signal_number(&signal_name)),
                _ => {}
            }
        }
        if !pending.is_empty() {
            on_stderr_line(String::from_utf8_lossy(&pending).trim_end());
        }
        Ok(ExecOutput {
            status: status.unwrap_or(255),
            stdout,
            stderr,
        })
    }

    pub async fn close(self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
}

fn signal_number(sig: &Sig) -> u32 {
    match sig {
        Sig::KILL => 9,
        Sig::TERM => 15,
        Sig::INT => 2,
        Sig::HUP => 1,
        Sig::ABRT => 6,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_vectors_become_one_quoted_line_and_nul_is_refused() {
        let line = command_line(&["printf", "%s", "a b", "it's", "$(id)", "x\ny", ""]).unwrap();
        assert_eq!(
            shlex::split(&line).unwrap(),
            ["printf", "%s", "a b", "it's", "$(id)", "x\ny", ""]
        );
        assert!(command_line(&["echo", "a\0b"]).is_err());
        assert!(command_line(&[]).is_err());
    }

    #[test]
    fn host_key_pairs_are_fresh_ed25519_pairs_whose_halves_match() {
        let a = generate_host_key("lian-runner b1-r1").unwrap();
        let b = generate_host_key("lian-runner b1-r1").unwrap();
        assert_ne!(a.public_key, b.public_key, "a fresh pair per lease");
        assert!(a.public_key.starts_with("ssh-ed25519 AAAA"), "{}", a.public_key);
        assert!(a.public_key.ends_with(" lian-runner b1-r1"), "{}", a.public_key);
        assert!(a.private_key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        let private = ssh_key::PrivateKey::from_openssh(&a.private_key).unwrap();
        let public = PublicKey::from_openssh(&a.public_key).unwrap();
        assert_eq!(private.public_key().key_data(), public.key_data());
        let debug = format!("{a:?}");
        assert!(
            !debug.contains("PRIVATE KEY") && debug.contains("ssh-ed25519"),
            "{debug}"
        );
    }
}
