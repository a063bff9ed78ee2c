//! `lian submit`: evaluate and check directives, upload the context, publish the request,
//! and with `--wait` follow the build to its end.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use lian_bus::Bus;
use lian_core::{BuildDirectives, BuildId, LayerName, cache, subjects};
use lian_nickel::{Contract, EvalLimits, Evaluator, Schemas};

use crate::cli::{Global, SubmitArgs};
use crate::config::Settings;
use crate::exit::Exit;
use crate::output;

pub async fn run(global: Global, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let directives = evaluate(&args.directives).await?;
    cache::check(&directives)
        .map_err(|e| anyhow::Error::new(e).context(format!("{}: cache policy refused", args.directives.display())))?;
    let layer = args.layer.as_deref().map(LayerName::new).transpose()?;
    let build_id = match (&args.build_id, &args.request_id) {
        (Some(id), _) => BuildId::new(id.as_str())?,
        (None, Some(request)) => build_id_for_request(&directives.workspace, request),
        (None, None) => new_build_id(),
    };
    let settings = Settings::load(global.config.as_deref())?;
    let bus = crate::roles::connect(&global, "lian-submit", &settings).await?;
    let workspace = directives.workspace.clone();
    let appended = send(&bus, directives, &args.context, layer, &build_id, &args.limits.limits()).await?;
    if appended.duplicate {
        eprintln!("build {build_id} was already submitted; this is the same build");
    }
    let json = global.json(args.json);
    if json {
        println!(
            "{}",
            serde_json::json!({"build_id": build_id, "subject": subjects::request(&workspace), "duplicate": appended.duplicate})
        );
    } else {
        println!("{build_id}");
    }
    if !args.wait {
        return Ok(Exit::Ok.code());
    }
    let wait = output::follow(&bus, &build_id, json);
    match args.timeout {
        None => wait.await,
        Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), wait).await {
            Ok(result) => result,
            Err(_) => {
                eprintln!("gave up waiting for build {build_id} after {secs} s; it goes on (lian status {build_id})");
                Ok(Exit::TimedOut.code())
            }
        },
    }
}

/// Uploads the context (showing progress on stderr) and publishes the request.
pub async fn send(
    bus: &Bus,
    directives: BuildDirectives,
    context_dir: &Path,
    layer: Option<LayerName>,
    build_id: &BuildId,
    limits: &lian_bus::ContextLimits,
) -> anyhow::Result<lian_bus::Appended> {
    let started = std::time::Instant::now();
    let mut display = UploadDisplay::new();
    let (appended, context, uploaded) = bus
        .submit_dir(
            context_dir,
            directives,
            lian_bus::Lineage {
                layer,
                ..Default::default()
            },
            build_id,
            lian_bus::Upload {
                limits,
                progress: &mut |p| display.show(p),
            },
        )
        .await
        .with_context(|| format!("cannot submit the build context {}", context_dir.display()))?;
    display.finish();
    eprintln!(
        "context {}: {} files, {} ({} files, {} uploaded; {} already stored) in {:.1} s",
        context_dir.display(),
        context.files,
        indicatif::HumanBytes(context.bytes),
        uploaded.uploaded_files,
        indicatif::HumanBytes(uploaded.uploaded_bytes),
        indicatif::HumanBytes(context.bytes - uploaded.uploaded_bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(appended)
}

/// Upload progress: a bar on a terminal (unless NO_COLOR), a plain line per phase and per tenth sent
/// otherwise (CI logs), nothing on stdout.
struct UploadDisplay {
    bar: Option<indicatif::ProgressBar>,
    scanned: (u64, u64),
    sending: bool,
    tenths: u64,
}

impl UploadDisplay {
    fn new() -> Self {
        let bar = crate::term::decorated(&std::io::stderr()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_message("hashing the context");
            bar
        });
        Self {
            bar,
            scanned: (0, 0),
            sending: false,
            tenths: 0,
        }
    }

    fn show(&mut self, progress: lian_bus::UploadProgress) {
        match progress {
            lian_bus::UploadProgress::Scanning { files, bytes } => {
                self.scanned = (files, bytes);
                if let Some(bar) = &self.bar
                    && files % 256 == 0
                {
                    bar.set_message(format!("hashing: {files} files, {}", indicatif::HumanBytes(bytes)));
                    bar.tick();
                }
            }
            lian_bus::UploadProgress::Sending { sent, total } => {
                if !self.sending {
                    self.sending = true;
                    let (files, bytes) = self.scanned;
                    match &self.bar {
                        Some(bar) => {
                            bar.set_length(total);
                            bar.set_style(
                                indicatif::ProgressStyle::with_template(
                                    "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                                )
                                .expect("a valid template"),
                            );
                        }
                        None => eprintln!(
                            "context: {files} entries, {} hashed; uploading {} the store lacks",
                            indicatif::HumanBytes(bytes),
                            indicatif::HumanBytes(total)
                        ),
                    }
                }
                match &self.bar {
                    Some(bar) => bar.set_position(sent),
                    None => {
                        let tenths = sent * 10 / total.max(1);
                        if tenths > self.tenths {
                            self.tenths = tenths;
                            eprintln!(
                                "uploaded {} of {}",
                                indicatif::HumanBytes(sent),
                                indicatif::HumanBytes(total)
                            );
                        }
                    }
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The build a caller's request id names: the same (workspace, request id) always gives
/// the same build id, whatever characters the request id has.
pub fn build_id_for_request(workspace: &lian_core::Workspace, request: &str) -> BuildId {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{workspace}\n{request}").as_bytes());
    let hex = data_encoding::HEXLOWER.encode(&digest[..12]);
    BuildId::new(format!("r{hex}")).expect("hex is a token")
}

/// A fresh build id: a lowercase ULID, sortable by submit time.
pub fn new_build_id() -> BuildId {
    BuildId::new(ulid::Ulid::new().to_string().to_lowercase()).expect("a ULID is a token")
}

/// Evaluates a `.ncl` or `.json` directives file against the contract.
pub async fn evaluate(path: &Path) -> anyhow::Result<BuildDirectives> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "ncl" | "json") {
        return Err(crate::exit::Coded::error(
            Exit::Usage,
            format!("{}: directives are a .ncl or .json file", path.display()),
        ));
    }
    eval_file(path, Contract::BuildDirectives).await
}

/// Evaluates a user's file against a contract in the bounded evaluator (a `lian __eval`
/// child), off the async runtime: it blocks until the child answers or is stopped.
pub async fn eval_file<T: serde::de::DeserializeOwned + Send + 'static>(
    path: &Path,
    contract: Contract,
) -> anyhow::Result<T> {
    let evaluator = Evaluator::this_binary(Schemas::embedded()?, EvalLimits::default())?;
    let path = path.to_path_buf();
    let result = tokio::task::spawn_blocking(move || evaluator.eval_file::<T>(&path, contract))
        .await
        .expect("the evaluator's parent side does not panic");
    Ok(result?)
}
