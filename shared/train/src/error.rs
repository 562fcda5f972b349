//! What can go wrong while training, with the file or tensor it concerns.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Engine(#[from] llm_engine::EngineError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("the loss became NaN or infinite at step {step}; the model was not saved to {}", output.display())]
    NonFinite { step: usize, output: PathBuf },
}

impl TrainError {
    pub fn file(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        Self::File { path: path.into(), message: message.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
