use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("writing the output: {0}")]
    Write(#[from] std::io::Error),
    #[error("{}: {reason}", path.display())]
    InvalidInput { path: PathBuf, reason: String },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("unknown type `{0}` (expected one of f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k q4_k_m q5_k_m q4_k_s)")]
    UnknownType(String),
    #[error(transparent)]
    Engine(#[from] llm_engine::EngineError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ConvertError>;

impl ConvertError {
    pub(crate) fn input(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::InvalidInput { path: path.into(), reason: reason.to_string() }
    }

    pub(crate) fn tensor(name: impl Into<String>, reason: impl ToString) -> Self {
        Self::Tensor { name: name.into(), reason: reason.to_string() }
    }
}
