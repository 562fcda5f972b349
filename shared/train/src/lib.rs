//! Training: a differentiable Llama (the forward pass of `shared/engine`, written with ops that
//! have gradients), LoRA adapters that PEFT reads and writes, the losses (cross-entropy,
//! distillation), AdamW with its schedule, quantization-aware training, checkpoints that resume
//! exactly, and the runs built from them: fine-tuning, distillation and adapter merging.
//!
//! It reads checkpoints through the engine's Hugging Face loader and knows nothing of S3, HTTP
//! or Lambda: callers hand it local paths.

pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod distill;
pub mod error;
pub mod eval;
pub mod finetune;
pub mod lora;
pub mod loss;
pub mod merge;
pub mod model;
pub mod optim;
pub mod plot;
pub mod qat;
pub mod soft_targets;

pub use error::{Result, TrainError};
pub use lora::LoraConfig;
pub use model::{TrainLlama, Trainable};
