//! The OpenAI-compatible API over the engine: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /health`, as the official clients call them
//! (JSON or server-sent events), with errors in OpenAI's shape.
//!
//! One [`router`] serves every launcher: `llm serve` (a local TCP listener), the Lambda
//! function (lambda_http) and `cargo lambda watch`. The model is loaded on the first request
//! through a [`Loader`] ([`model_source`]: a local path, or S3 through the model registry).
//! Knows nothing of Lambda.

mod batch;
pub mod batch_file;
mod engine;
mod error;
mod from_env;
mod logprobs;
mod model_slot;
pub mod model_source;
mod openai;
mod params;
mod prepare;
mod router;
mod stream;

pub use error::ApiError;
pub use from_env::state_from_env;
pub use model_slot::{Loaded, Loader, ModelSlot};
pub use params::Limits;
pub use router::{router, AppState, Deadline, RequestId};
