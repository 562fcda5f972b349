//! Static post-training quantization: a Hugging Face Llama checkpoint (safetensors, `config.json`,
//! `tokenizer.json`) becomes the GGUF file llama.cpp's `convert_hf_to_gguf.py` + `llama-quantize`
//! would write: llama.cpp tensor names and Q/K row order, `general.*`/`llama.*` metadata,
//! `tokenizer.ggml.*` keys, the chat template, the whole `tokenizer.json`, `rope_freqs` for Llama 3
//! RoPE scaling, and llama.cpp's per-tensor choice of types for mixed formats such as Q4_K_M.
//!
//! Memory stays bounded by the largest tensor: the header is computed up front from shapes and
//! types, then tensors are read one at a time, quantized on all cores and written in order.
//! Reads a local directory or an S3 prefix ([`CheckpointSource`]) and writes to any `Write`
//! (a file, or an S3 multipart upload); knows nothing of Lambda.

mod error;
mod gguf_writer;
mod kquants;
mod plan;
mod source;
mod target;
mod tokenizer_meta;

pub use error::{ConvertError, Result};
/// The config type a [`CheckpointSurvey`] carries.
pub use llm_engine::LlamaConfig;
pub use plan::{convert, quantize_tensor, survey, tensor_types, CheckpointSurvey, ConvertReport, Progress};
pub use source::CheckpointSource;
pub use target::QuantType;
