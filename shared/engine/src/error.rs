use std::path::PathBuf;

/// Everything that can go wrong while loading a model or generating text.
///
/// Messages are meant for the person who supplied the input: they name the file, the tensor or
/// the key that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a valid model file: {reason}", path.display())]
    InvalidFile { path: PathBuf, reason: String },
    #[error("unsupported architecture `{0}`: only `llama` models are supported")]
    UnsupportedArchitecture(String),
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("model config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A batch's step failed; every job in it gets this (the first error, as text).
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("threads: {0}")]
    Threads(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn invalid_file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::InvalidFile { path: path.into(), reason: reason.to_string() }
    }

    pub(crate) fn tokenizer(reason: impl ToString) -> Self {
        Self::Tokenizer(reason.to_string())
    }

    pub(crate) fn tensor(name: impl Into<String>, reason: impl ToString) -> Self {
        Self::Tensor { name: name.into(), reason: reason.to_string() }
    }
}
