//! The long-running roles, each a thin shell around its service crate.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use lian_bus::Bus;
use lian_nickel::{EvalLimits, Evaluator, Schemas};
use lian_runner::DockerBuilder;

use crate::cli::{CascadeArgs, ControlArgs, Global, WorkerArgs};
use crate::config::Settings;
use crate::exit::Exit;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A listening socket this process inherited as descriptor `fd` (from `lian up`).
fn inherited_listener(fd: i32) -> anyhow::Result<tokio::net::TcpListener> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        anyhow::bail!("--listen-fd {fd}: descriptors 0 to 2 are stdio, not a listener");
    }
    // SAFETY: the descriptor is ours alone: `lian up` put it there for us before exec, and
    // nothing else in this process opened or uses it.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // Not passed on to what this process starts (dockerd, docker): close it on their exec.
    // SAFETY: fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        anyhow::bail!("--listen-fd {fd}: {}", std::io::Error::last_os_error());
    }
    listener
        .set_nonblocking(true)
        .with_context(|| format!("descriptor {fd} is not an inherited listening socket"))?;
    listener
        .local_addr()
        .with_context(|| format!("descriptor {fd} is not a TCP socket"))?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

pub async fn connect(global: &Global, name: &str, settings: &Settings) -> anyhow::Result<Bus> {
    let bus = Bus::connect(&global.nats_url, name, global.connect_timeout.into()).await?;
    bus.ensure_topology(&settings.topology())
        .await
        .context("cannot create the JetStream topology")?;
    Ok(bus)
}

/// `connect`, then, for a role starting (worker, cascade, control, `lian up`), the leaders
/// spread over the cluster once (`Bus::spread_leaders`): a move that fails is logged and the
/// role starts all the same; a cluster already spread is left alone.
pub async fn connect_role(global: &Global, name: &str, settings: &Settings) -> anyhow::Result<Bus> {
    let bus = connect(global, name, settings).await?;
    if let Err(err) = bus.spread_leaders().await {
        tracing::warn!(%err, "cannot read the streams' leaders to spread them; starting anyway");
    }
    Ok(bus)
}

pub async fn worker(global: Global, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(global.config.as_deref())?;
    let bus = connect_role(&global, &args.name, &settings).await?;
    let options = lian_worker::WorkerOptions {
        name: args.name,
        runners_dir: args.state_dir.join("runners"),
        builder: DockerBuilder {
            cli: settings.docker_cli.clone(),
            host: (!settings.docker_host.is_empty()).then(|| settings.docker_host.clone()),
            network: settings.build_network.clone(),
            config: None,
        },
        // Resolved at start: the running binary serves `lian __eval`.
        evaluator: Evaluator::this_binary(Schemas::embedded()?, EvalLimits::default())?,
        ack_wait: settings.topology().ack_wait,
        max_deliver: settings.max_deliver,
        catalog_layers: match &args.catalog {
            Some(dir) => {
                let catalog = lian_cascade::load_catalog(dir, &Schemas::embedded()?)?;
                Some(catalog.layers().map(|l| l.name.to_string()).collect())
            }
            None => None,
        },
        pause_before: std::env::var("LIAN_FAILPOINT")
            .ok()
            .and_then(|f| f.strip_prefix("pause_before:").map(String::from)),
        fail_at: std::env::var("LIAN_FAILPOINT")
            .ok()
            .and_then(|f| f.strip_prefix("fail_at:").map(String::from)),
        reap_every: Duration::from_secs(settings.reap_every_secs.max(1)),
        ssh_hosts: settings.ssh_hosts.clone(),
        isolation: settings.isolation(),
        secrets: settings.secrets.clone(),
        control: settings.control()?,
        runner_ssh_key: settings.runner_ssh_key.clone(),
        registry: settings.registry_endpoint()?,
        sccache: settings.sccache_endpoint()?,
        context_limits: lian_bus::ContextLimits {
            max_files: settings.max_context_files,
            max_bytes: settings.max_context_bytes,
        },
        // Read here, not from lian.toml: a fake build must take an explicit act on the
        // worker's own host, never a shared config file.
        builds_in_flight: settings.builds_in_flight,
        enable_noop_provider: std::env::var("LIAN_ENABLE_NOOP_PROVIDER").is_ok_and(|v| v == "1"),
    };
    lian_worker::run(bus, options, shutdown_signal()).await?;
    Ok(Exit::Ok.code())
}

pub async fn cascade(global: Global, args: CascadeArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(global.config.as_deref())?;
    let bus = connect_role(&global, "cascade", &settings).await?;
    let options = lian_cascade::CascadeOptions {
        catalog_dir: args.catalog,
        schemas: Schemas::embedded()?,
        gate: lian_cascade::Gate {
            max_layers: args.approve_over_layers,
            max_minutes: args.approve_over_minutes,
            refuse: args.refuse_over_limit,
        },
    };
    lian_cascade::run(bus, options, shutdown_signal()).await?;
    Ok(Exit::Ok.code())
}

pub async fn control(global: Global, args: ControlArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(global.config.as_deref())?;
    let Some(token) = settings.control_token().map(String::from) else {
        return Err(crate::config::ConfigError::Incomplete(
            "the control plane needs a bearer token: set control_token in lian.toml or LIAN_CONTROL_TOKEN",
        )
        .into());
    };
    // The cloud providers live here only: workers lease cloud runners through us. A cloud
    // configuration that cannot work stops us before anything starts.
    let providers = settings
        .providers(&args.state_dir)
        .with_clouds(settings.hcloud.clone(), settings.proxmox.clone())?;
    let bus = connect_role(&global, &args.name, &settings).await?;
    let listener = match args.listen_fd {
        Some(fd) => inherited_listener(fd)?,
        None => tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?,
    };
    let addr = listener.local_addr()?;
    let gate_listener = match (args.registry_listen_fd, args.registry_listen) {
        (Some(fd), _) => Some(inherited_listener(fd)?),
        (None, Some(listen)) => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?,
        ),
        (None, None) => None,
    };
    let gate = match gate_listener {
        Some(listener) => {
            let registry = settings
                .registry_endpoint()?
                .context("--registry-listen needs the registry to front: set [registry] url or LIAN_REGISTRY_URL")?;
            if registry.username.is_some() || registry.password.is_some() {
                anyhow::bail!(
                    "the registry gate fronts a registry without auth of its own; [registry] has credentials"
                );
            }
            Some(lian_control::RegistryGate {
                listener,
                upstream: registry.url,
            })
        }
        None => None,
    };
    let options = lian_control::ControlOptions {
        name: args.name,
        token,
        providers,
        reap_every: Duration::from_secs(settings.reap_every_secs.max(1)),
        catalog: match &args.catalog {
            Some(dir) => Some(lian_cascade::load_catalog(dir, &Schemas::embedded()?)?),
            None => None,
        },
    };
    let gate_url = match &gate {
        Some(gate) => Some(format!("http://{}", gate.listener.local_addr()?)),
        None => None,
    };
    if global.json(false) {
        println!(
            "{}",
            serde_json::json!({"serving": format!("http://{addr}"), "web": format!("http://{addr}/"), "registry_gate": gate_url})
        );
    } else {
        println!("lian control: serving http://{addr}");
        println!("lian control: web view http://{addr}/ (log in with the token)");
        if let Some(gate) = &gate_url {
            println!("lian control: registry gate {gate}");
        }
    }
    lian_control::run(bus, options, listener, gate, shutdown_signal()).await?;
    Ok(Exit::Ok.code())
}
