//! Storage for model files: `s3://bucket/key` objects and local paths behind one small blocking
//! interface (ranged reads, whole-object reads, streamed multipart writes that appear only when
//! complete). The same aws-sdk-s3 code runs in Lambda and against a local S3-compatible server;
//! only the endpoint differs (`AWS_ENDPOINT_URL`, which also switches to path-style addressing).
//!
//! Also the model registry's layout in a bucket ([`registry`]): versions, manifests and the
//! `latest` alias, and the checksums a manifest lists ([`checksum`]); and whole directories to
//! and from S3 ([`sync`]). Knows nothing of model formats: callers interpret the bytes.

pub mod checksum;
mod event_key;
mod location;
pub mod registry;
mod s3;
pub mod sync;

pub use event_key::event_key;
pub use location::Location;
pub use s3::{MultipartWriter, ObjectInfo, Parts, S3};

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
