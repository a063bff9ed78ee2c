use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot reach NATS at {url}: {message} (is the server running? `lian up` starts one)")]
    Connect { url: String, message: String },
    #[error("nats {op}: {message}")]
    Nats { op: &'static str, message: String },
    #[error("another writer appended on {subject} first")]
    Conflict { subject: String },
    #[error("{what} is not what lian expects: {source}")]
    Decode { what: String, source: serde_json::Error },
    #[error("build context {path}: {why}")]
    Context { path: PathBuf, why: String },
    /// A context over the abuse limits, refused before any byte travelled.
    #[error("build context refused: {why}")]
    ContextLimit { why: String },
    #[error("context object {name} is missing from the store: submit the build again")]
    MissingObject { name: String },
    #[error("i/o on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl BusError {
    pub(crate) fn nats(op: &'static str, err: impl std::fmt::Display) -> Self {
        Self::Nats {
            op,
            message: err.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
