//! Helpers shared by the cross-crate tests: where the fixtures are and how to read them.
//! The fixtures are written by `infra/fixtures/make_fixtures.py` (transformers, llama.cpp).

pub mod cargo_lambda;
pub mod fault_proxy;
pub mod http;
pub mod local_batch;
pub mod local_s3;
pub mod recording_proxy;
pub mod s3_events;
pub mod template;

use std::path::PathBuf;

/// The workspace root (`Cargo.toml`, `template.yaml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A copy of fixture `model`'s Hugging Face checkpoint in `dir/hf`, for a test to change.
pub fn hf_copy(model: &str, dir: &std::path::Path) -> PathBuf {
    let dst = dir.join("hf");
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixtures_dir().join(model).join("hf")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

pub fn read_json(relative: &str) -> serde_json::Value {
    let path = fixtures_dir().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The reference cases of one fixture model (`reference.json`).
pub struct ReferenceCase {
    pub prompt: String,
    pub prompt_token_ids: Vec<u32>,
    pub greedy_token_ids: Vec<u32>,
}

pub fn reference_cases(model: &str) -> Vec<ReferenceCase> {
    let reference = read_json(&format!("{model}/reference.json"));
    reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| ReferenceCase {
            prompt: c["prompt"].as_str().expect("prompt").to_string(),
            prompt_token_ids: ids(&c["prompt_token_ids"]),
            greedy_token_ids: ids(&c["greedy_token_ids"]),
        })
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an array of ids").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

/// The tensors of a fixture's safetensors file, by name.
pub fn read_tensors(relative: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(fixtures_dir().join(relative), &candle_core::Device::Cpu).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("same shapes")
}

/// Logits `[s, vocab]` for one unpadded prompt.
pub fn prompt_logits(model: &llm_engine::Llama, ids: &[u32]) -> candle_core::Tensor {
    let input = candle_core::Tensor::new(ids, model.device()).and_then(|t| t.unsqueeze(0)).expect("input");
    let mut cache = model.new_cache();
    model.forward(&input, llm_engine::model::ONE_UNPADDED_ROW, &mut cache, llm_engine::Logits::All).and_then(|t| Ok(t.squeeze(0)?)).expect("forward")
}

/// Greedy ids, ignoring end-of-sequence, as the fixtures record them.
pub fn greedy(loaded: &llm_engine::LoadedModel, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let requests: Vec<_> =
        prompts.iter().map(|p| llm_engine::GenerationRequest { prompt: p.clone(), max_tokens, ignore_eos: true, ..Default::default() }).collect();
    let (completions, _) = llm_engine::generate(&loaded.model, &loaded.tokenizer, &requests, |_| std::ops::ControlFlow::Continue(())).expect("generate");
    completions.into_iter().map(|c| c.token_ids).collect()
}
