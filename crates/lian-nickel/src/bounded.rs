//! Bounded evaluation of user-supplied documents. Nickel has no fuel, no memory cap and
//! recurses as deep as the document nests, so a hostile or careless document is evaluated in
//! a child process (the running binary re-executed as `lian __eval`) under setrlimit bounds
//! on address space and CPU time, with a wall-clock kill from here: whatever the document
//! does, the caller gets an answer naming the limit, and the caller's process lives.
//!
//! The protocol is one JSON request on the child's stdin and one JSON reply on its stdout.
//! The child's stderr is never shown to anyone: it is only searched for the Rust runtime's
//! own words for an allocation failure or a stack overflow.

use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::confine::Confinement;
use crate::{Contract, Exceeded, MAX_JSON_DEPTH, NickelError, Schemas, check_json_depth, typed};

/// The hidden subcommand of `lian` that evaluates one document (see [`serve_eval`]).
pub const EVAL_SUBCOMMAND: &str = "__eval";

/// A reply larger than this is not a lian document; the child is stopped.
const MAX_REPLY_BYTES: u64 = 16 << 20;
/// How much of the child's stderr is searched for the runtime's last words.
const MAX_STDERR_BYTES: u64 = 64 << 10;
/// Values remembered per evaluator, and the largest remembered: at most 16 MiB in all.
const REMEMBERED: NonZeroUsize = NonZeroUsize::new(256).expect("not zero");
const MAX_REMEMBERED_BYTES: usize = 64 << 10;

/// The bounds of one evaluation of a user-supplied document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalLimits {
    /// Wall-clock time; also the CPU time (plus a second), so a child whose parent died ends too.
    pub wall: Duration,
    /// Address space of the evaluator process (RLIMIT_AS), the binary's own mappings included.
    pub memory_bytes: u64,
    /// The document plus the files it imports from its own directory.
    pub input_bytes: u64,
}

impl Default for EvalLimits {
    /// A directives file or a build spec is a few hundred bytes and evaluates in well under a
    /// second with a few tens of MiB; these leave two orders of magnitude of headroom.
    fn default() -> Self {
        Self {
            wall: Duration::from_secs(10),
            memory_bytes: 1 << 30,
            input_bytes: 1 << 20,
        }
    }
}

/// What the child is asked to evaluate.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    schemas: PathBuf,
    contract: Contract,
    input: Input,
    input_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Input {
    /// A file on disk (absolute); it may import files under its own directory.
    File(PathBuf),
    /// Nickel held in memory; it may import the schemas only.
    Nickel {
        name: String,
        source: String,
    },
    Json {
        name: String,
        source: String,
    },
}

impl Input {
    fn name(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Nickel { name, .. } | Self::Json { name, .. } => name.clone(),
        }
    }
}

/// Evaluates user-supplied documents in a child process under [`EvalLimits`].
#[derive(Debug, Clone)]
pub struct Evaluator {
    schemas: Schemas,
    program: PathBuf,
    limits: EvalLimits,
    remembered: Arc<Mutex<Remembered>>,
}

/// Values of in-memory documents this evaluator accepted, by a digest of the request. Such
/// a document imports nothing but the schemas, so its value is a pure function of the
/// request and of the contracts' text; the same one (a workspace's directives, sent with
/// every build) costs a child process once, not once per build. Refusals are not
/// remembered: a limit hit under load may not be hit again.
struct Remembered(lru::LruCache<[u8; 32], serde_json::Value>);

impl std::fmt::Debug for Remembered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} remembered values", self.0.len())
    }
}

impl Evaluator {
    /// `program` must serve [`EVAL_SUBCOMMAND`] (the `lian` binary does).
    pub fn new(schemas: Schemas, program: PathBuf, limits: EvalLimits) -> Self {
        Self {
            schemas,
            program,
            limits,
            remembered: Arc::new(Mutex::new(Remembered(lru::LruCache::new(REMEMBERED)))),
        }
    }

    /// The running binary as the evaluator. Resolved now, once: a binary replaced on disk
    /// later (a rebuild, an upgrade) still resolves to the path it was started from.
    pub fn this_binary(schemas: Schemas, limits: EvalLimits) -> Result<Self, NickelError> {
        let program = std::env::current_exe().map_err(|source| NickelError::Evaluator {
            program: PathBuf::from("the running executable"),
            source,
        })?;
        Ok(Self::new(schemas, program, limits))
    }

    pub fn limits(&self) -> EvalLimits {
        self.limits
    }

    /// A `.ncl` or `.json` file on this machine (a client's directives or spec); Nickel in it
    /// may import the schemas and files under its own directory.
    pub fn eval_file<T: DeserializeOwned>(&self, path: &Path, contract: Contract) -> Result<T, NickelError> {
        let unreadable = |e: std::io::Error| NickelError::Eval(format!("cannot read {}: {e}", path.display()));
        let path = std::path::absolute(path).map_err(unreadable)?;
        let bytes = std::fs::metadata(&path).map_err(unreadable)?.len();
        self.check_size(&path.display().to_string(), bytes)?;
        self.eval(Input::File(path), contract)
    }

    /// Nickel source held in memory (a file read from a build context); it may import the
    /// schemas only.
    pub fn eval_str<T: DeserializeOwned>(
        &self,
        source: &str,
        name: &str,
        contract: Contract,
    ) -> Result<T, NickelError> {
        self.check_size(name, source.len() as u64)?;
        let input = Input::Nickel {
            name: name.to_string(),
            source: source.to_string(),
        };
        self.eval(input, contract)
    }

    /// A JSON document (a request published by any client).
    pub fn eval_json<T: DeserializeOwned>(&self, json: &str, name: &str, contract: Contract) -> Result<T, NickelError> {
        self.check_size(name, json.len() as u64)?;
        check_json_depth(json.as_bytes(), name, MAX_JSON_DEPTH)?;
        let input = Input::Json {
            name: name.to_string(),
            source: json.to_string(),
        };
        self.eval(input, contract)
    }

    /// Refused here, before a process is started for it.
    fn check_size(&self, what: &str, bytes: u64) -> Result<(), NickelError> {
        if bytes > self.limits.input_bytes {
            return Err(NickelError::TooLarge {
                what: what.to_string(),
                bytes,
                limit: self.limits.input_bytes,
            });
        }
        Ok(())
    }

    fn eval<T: DeserializeOwned>(&self, input: Input, contract: Contract) -> Result<T, NickelError> {
        let what = input.name();
        let request = Request {
            schemas: self.schemas.dir().to_path_buf(),
            contract,
            input,
            input_bytes: self.limits.input_bytes,
        };
        let value = self.run(&request, &what)?;
        typed(value, &what)
    }

    fn run(&self, request: &Request, what: &str) -> Result<serde_json::Value, NickelError> {
        let payload = serde_json::to_vec(request).expect("a request serializes");
        // Only with the contracts compiled in: schemas in a directory may change under us.
        let key = match (&request.input, self.schemas.fingerprint()) {
            (Input::File(_), _) | (_, None) => None,
            (_, Some(fingerprint)) => Some(<[u8; 32]>::from(
                Sha256::new()
                    .chain_update(fingerprint)
                    .chain_update(&payload)
                    .finalize(),
            )),
        };
        let lock = || self.remembered.lock().expect("remembered values lock");
        if let Some(value) = key.as_ref().and_then(|k| lock().0.get(k).cloned()) {
            return Ok(value);
        }
        let (value, reply_bytes) = self.spawn(payload, what)?;
        if let Some(key) = key
            && reply_bytes <= MAX_REMEMBERED_BYTES
        {
            lock().0.put(key, value.clone());
        }
        Ok(value)
    }

    /// One evaluation in a child process: its value and the size of its reply.
    fn spawn(&self, payload: Vec<u8>, what: &str) -> Result<(serde_json::Value, usize), NickelError> {
        let limits = self.limits;
        let mut command = Command::new(&self.program);
        command
            .arg(EVAL_SUBCOMMAND)
            // In-memory documents resolve relative imports against the working directory:
            // the schemas, which confinement allows (see confine.rs).
            .current_dir(self.schemas.dir())
            // The evaluator needs nothing from the environment; a worker's may hold settings
            // that are nobody else's business.
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only setrlimit/getrlimit run, which are
        // async-signal-safe and touch no memory of the parent.
        unsafe {
            command.pre_exec(move || apply_limits(&limits));
        }
        let mut child = command.spawn().map_err(|source| NickelError::Evaluator {
            program: self.program.clone(),
            source,
        })?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        // Three pipes, one thread each: the child may fill stdout or stderr while we write.
        let writer = std::thread::spawn(move || {
            // A child that dies before reading all of it is judged by its exit status.
            let _ = stdin.write_all(&payload);
        });
        let stderr_reader = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut stderr = stderr;
            let _ = stderr.by_ref().take(MAX_STDERR_BYTES).read_to_end(&mut seen);
            // Drained to the end so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            String::from_utf8_lossy(&seen).into_owned()
        });
        let (sender, replies) = mpsc::channel();
        let stdout_reader = std::thread::spawn(move || {
            let mut reply = Vec::new();
            let read = stdout.take(MAX_REPLY_BYTES + 1).read_to_end(&mut reply);
            let _ = sender.send(read.map(|_| reply));
        });
        // The reply ends with the child's stdout, that is with the child.
        let reply = replies.recv_timeout(limits.wall);
        let timed_out = reply.is_err();
        let too_large = matches!(&reply, Ok(Ok(r)) if r.len() as u64 > MAX_REPLY_BYTES);
        if timed_out || too_large {
            let _ = child.kill();
        }
        let status = child.wait().map_err(|source| NickelError::Evaluator {
            program: self.program.clone(),
            source,
        })?;
        let _ = writer.join();
        let _ = stdout_reader.join();
        let stderr = stderr_reader.join().unwrap_or_default();
        let exceeded = |limit| NickelError::Limit {
            what: what.to_string(),
            limit,
        };
        if timed_out {
            return Err(exceeded(Exceeded::WallTime(limits.wall)));
        }
        if status.signal() == Some(libc::SIGXCPU) {
            return Err(exceeded(Exceeded::CpuTime(cpu_limit(&limits))));
        }
        // The Rust runtime's words (and Nickel's, whose own allocator panics); the child
        // prints nothing else on stderr.
        if stderr.contains("memory allocation of") || stderr.contains("out of memory") {
            return Err(exceeded(Exceeded::Memory(limits.memory_bytes)));
        }
        if stderr.contains("has overflowed its stack") {
            return Err(exceeded(Exceeded::Stack));
        }
        if too_large {
            return Err(NickelError::TooLarge {
                what: format!("the value of {what}"),
                bytes: MAX_REPLY_BYTES + 1,
                limit: MAX_REPLY_BYTES,
            });
        }
        let crashed = |status: String| NickelError::Crashed {
            what: what.to_string(),
            status,
        };
        if !status.success() {
            return Err(crashed(status.to_string()));
        }
        let Ok(Ok(reply)) = reply else {
            return Err(crashed("its reply could not be read".into()));
        };
        let value = serde_json::from_slice::<Result<serde_json::Value, NickelError>>(&reply)
            .map_err(|e| crashed(format!("its reply is not readable: {e}")))??;
        Ok((value, reply.len()))
    }
}

/// CPU time: the wall-clock limit rounded up, plus one second, so the wall clock normally
/// decides and the CPU limit only ends a child whose parent is gone.
fn cpu_limit(limits: &EvalLimits) -> Duration {
    Duration::from_secs(limits.wall.as_secs() + u64::from(limits.wall.subsec_nanos() > 0) + 1)
}

/// Runs in the child between fork and exec.
fn apply_limits(limits: &EvalLimits) -> std::io::Result<()> {
    let cpu = cpu_limit(limits).as_secs();
    set_limit(libc::RLIMIT_AS, limits.memory_bytes)?;
    // SIGXCPU at the soft limit, SIGKILL a second later should it be ignored.
    set_limits(libc::RLIMIT_CPU, cpu, cpu + 1)?;
    // A crashed evaluator leaves no core file of a user's document behind.
    set_limit(libc::RLIMIT_CORE, 0)
}

#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

fn set_limit(resource: Resource, value: u64) -> std::io::Result<()> {
    set_limits(resource, value, value)
}

fn set_limits(resource: Resource, soft: u64, hard: u64) -> std::io::Result<()> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a stack value.
    unsafe {
        if libc::getrlimit(resource, &mut current) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Never above the hard limit we inherited: raising it needs privileges.
        let hard = hard.min(current.rlim_max);
        let wanted = libc::rlimit {
            rlim_cur: soft.min(hard),
            rlim_max: hard,
        };
        if libc::setrlimit(resource, &wanted) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The child's side of the evaluator: reads one request on stdin, evaluates it, writes the
/// reply on stdout. Called by `lian __eval` before anything else starts (no runtime, no
/// threads, no logging), so the address-space limit is the document's to use.
pub fn serve_eval() -> ExitCode {
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        return ExitCode::FAILURE;
    }
    let reply = match serde_json::from_slice::<Request>(&input) {
        Ok(request) => evaluate(&request),
        Err(e) => Err(NickelError::Eval(format!("the evaluator got a malformed request: {e}"))),
    };
    let Ok(reply) = serde_json::to_vec(&reply) else {
        return ExitCode::FAILURE;
    };
    match std::io::stdout().write_all(&reply) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Evaluates a request in this process: what the child does, callable from tests.
fn evaluate(request: &Request) -> Result<serde_json::Value, NickelError> {
    let schemas = Schemas::at(&request.schemas);
    let confine = |own_dir: Option<&Path>| Confinement::new(&request.schemas, own_dir, request.input_bytes);
    match &request.input {
        Input::Json { name, source } => {
            check_json_depth(source.as_bytes(), name, MAX_JSON_DEPTH)?;
            schemas.value_of_json(source, name, request.contract)
        }
        Input::Nickel { name, source } => {
            confine(None)?.check(name, source)?;
            schemas.value_of_str(source, name, request.contract)
        }
        Input::File(path) => {
            let name = path.display().to_string();
            let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if bytes > request.input_bytes {
                return Err(NickelError::TooLarge {
                    what: name,
                    bytes,
                    limit: request.input_bytes,
                });
            }
            let text =
                std::fs::read_to_string(path).map_err(|e| NickelError::Eval(format!("cannot read {name}: {e}")))?;
            if path.extension().is_some_and(|e| e == "json") {
                check_json_depth(text.as_bytes(), &name, MAX_JSON_DEPTH)?;
                return schemas.value_of_json(&text, &name, request.contract);
            }
            confine(path.parent())?.check(&name, &text)?;
            // Evaluated as the text just checked, under the file's own (absolute) name, so
            // its relative imports resolve against its directory as confinement assumed.
            schemas.value_of_str(&text, &name, request.contract)
        }
    }
}

/// What the child does, in this process: for tests of confinement and depth.
#[cfg(test)]
pub(crate) fn evaluate_here<T: DeserializeOwned>(
    schemas: &Schemas,
    input: Input,
    contract: Contract,
) -> Result<T, NickelError> {
    let what = input.name();
    let request = Request {
        schemas: schemas.dir().to_path_buf(),
        contract,
        input,
        input_bytes: EvalLimits::default().input_bytes,
    };
    typed(evaluate(&request)?, &what)
}
