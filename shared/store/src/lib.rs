//! Storage for model files: `s3://bucket/key` objects and local paths behind one small blocking
//! interface (ranged reads, whole-object reads, streamed multipart writes that appear only when
//! complete). The same aws-sdk-s3 code runs in Lambda and against a local S3-compatible server;
//! only the endpoint differs (`AWS_ENDPOINT_URL`, which also switches to path-style addressing).
//!
//! Knows nothing of models: callers interpret the bytes.

mod location;
mod s3;

pub use location::Location;
pub use s3::{MultipartWriter, S3};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid location `{0}`: expected s3://bucket/key or a local path")]
    InvalidLocation(String),
    #[error("s3://{bucket}/{key}: {message}")]
    S3 { bucket: String, key: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;
