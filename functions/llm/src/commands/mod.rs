pub mod batch;
pub mod bench;
pub mod demo_data;
pub mod distill;
pub mod eval;
pub mod finetune;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod quantize;
pub mod serve;
pub mod training;

use std::path::Path;

use anyhow::Context;
use llm_engine::{quant, LoadOptions, LoadedModel};

/// Loads a model for a command, with `--quantize` applied.
pub fn load_model(path: &Path, quantize: Option<&str>) -> anyhow::Result<LoadedModel> {
    let quantize = quantize.map(quant::parse_ggml_dtype).transpose()?;
    llm_engine::load(path, LoadOptions { quantize, ..Default::default() })
        .with_context(|| format!("cannot load model {}", path.display()))
}
