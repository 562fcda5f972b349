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
use llm_engine::{quant, KvCacheType, LoadOptions, LoadedModel};

/// How the commands that run a model hold it in memory.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Quantize f16/f32 weights to this type while loading (q8_0, q4_k, ...).
    #[arg(long)]
    pub quantize: Option<String>,
    /// The KV cache's type, f16 or f32 (default: f16 for a quantized model, as llama.cpp keeps
    /// it; f32 for a dense one).
    #[arg(long, value_parser = kv_cache_type)]
    pub kv_cache: Option<KvCacheType>,
}

impl LoadArgs {
    pub fn options(&self) -> anyhow::Result<LoadOptions> {
        let quantize = self.quantize.as_deref().map(quant::parse_ggml_dtype).transpose()?;
        Ok(LoadOptions { quantize, kv_cache: self.kv_cache })
    }
}

/// Which quantized kernels a command's products use.
#[derive(clap::Args, Debug)]
pub struct KernelArgs {
    /// Use no faster kernels than these (`avx512-vnni`, `avx2`, `neon-dot`, or `scalar` for
    /// candle's): what a host without the faster instructions would run.
    #[arg(long, value_parser = kernels)]
    pub kernels: Option<llm_kernels::Kernels>,
}

impl KernelArgs {
    /// The kernels every product of the process will use; call it before the first.
    pub fn choose(&self) -> llm_kernels::Kernels {
        match self.kernels {
            Some(limit) => llm_kernels::Kernels::limit(limit),
            None => llm_kernels::Kernels::best(),
        }
    }
}

fn kernels(name: &str) -> Result<llm_kernels::Kernels, String> {
    llm_kernels::Kernels::named(name).ok_or_else(|| format!("no kernels are called {name:?}: avx512-vnni, avx2, neon-dot or scalar"))
}

fn kv_cache_type(name: &str) -> Result<KvCacheType, String> {
    [KvCacheType::F16, KvCacheType::F32].into_iter().find(|t| t.name() == name).ok_or_else(|| format!("no KV cache type is called {name:?}: f16 or f32"))
}

/// Loads a model for a command.
pub fn load_model(path: &Path, options: LoadOptions) -> anyhow::Result<LoadedModel> {
    llm_engine::load(path, options).with_context(|| format!("cannot load model {}", path.display()))
}
