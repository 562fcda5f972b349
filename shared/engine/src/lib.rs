//! The Llama engine: everything between a model file and generated text, on CPU.
//!
//! Owns model loading (GGUF as llama.cpp writes it, Hugging Face safetensors directories),
//! the forward pass ([`model::Llama`]: batched prefill, KV cache, GQA, Llama 3 RoPE scaling),
//! tokenization and chat templates, sampling, and batched generation with streaming callbacks.
//!
//! It knows nothing of S3, HTTP or Lambda: callers hand it local paths and token callbacks.

pub mod adapter;
pub mod allocator;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf;
pub mod loader;
pub mod logprobs;
mod memory;
pub mod model;
mod prefill;
mod prompt_cache;
pub mod quant;
pub mod rope;
pub mod sampling;
#[cfg(target_os = "linux")]
mod sandbox;
mod sequence;
pub mod threads;
pub mod tokenizer;
mod tokenizer_json;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::LlamaConfig;
pub use error::{EngineError, Result};
pub use generate::{
    generate, generate_cached, generate_jobs, Completion, FinishReason, Generated, GenerationRequest, GenerationStats, Job, JobHandler, TokenEvent,
};
pub use loader::{hf_tokenizer, load, load_gguf_bytes, GgufHead, LoadedModel, ModelFormat, DEMO_GGUF, DEMO_MODEL};
pub use logprobs::{prompt_logprobs, TokenLogprob};
pub use model::{KvCache, KvCacheType, Llama, LoadOptions, Logits, Part};
pub use prompt_cache::{PromptCache, DEFAULT_PROMPT_CACHE_BYTES};
pub use quant::parse_ggml_dtype;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{byte_level_chars, IncrementalDecoder, Tokenizer};
