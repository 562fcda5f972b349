#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("writing the output: {0}")]
    Write(#[from] std::io::Error),
    #[error("{location}: {reason}")]
    InvalidInput { location: String, reason: String },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("unknown type `{0}` (expected one of f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k q4_k_m q5_k_m q4_k_s)")]
    UnknownType(String),
    #[error(transparent)]
    Engine(#[from] llm_engine::EngineError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Store(#[from] llm_store::StoreError),
}

pub type Result<T> = std::result::Result<T, ConvertError>;

impl ConvertError {
    /// A fault of the storage (reading the checkpoint or writing the result) that a retry may
    /// not meet, as opposed to a checkpoint that will never convert.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Write(_) | Self::Store(_))
    }

    pub(crate) fn input(location: impl ToString, reason: impl ToString) -> Self {
        Self::InvalidInput { location: location.to_string(), reason: reason.to_string() }
    }

    pub(crate) fn tensor(name: impl Into<String>, reason: impl ToString) -> Self {
        Self::Tensor { name: name.into(), reason: reason.to_string() }
    }
}
