//! Hugging Face checkpoint directories: `config.json` and safetensors weights (single file or
//! sharded with `model.safetensors.index.json`), in f32, f16 or bf16.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::weights::{TensorName, Weight, WeightSource};

pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    LlamaConfig::from_hf_json(&text)
}

/// The safetensors files of a checkpoint directory, in a stable order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        return Ok(shard_names(&text).map_err(|e| EngineError::invalid_file(&index, e))?.iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(EngineError::invalid_file(dir, "no model.safetensors or model.safetensors.index.json"))
}

/// The shard file names listed by a `model.safetensors.index.json`, sorted; names that could
/// leave the checkpoint directory are refused.
pub fn shard_names(index_json: &str) -> std::result::Result<Vec<String>, String> {
    let parsed: serde_json::Value = serde_json::from_str(index_json).map_err(|e| e.to_string())?;
    let map = parsed.get("weight_map").and_then(|m| m.as_object()).ok_or("no `weight_map` object")?;
    let mut files = BTreeSet::new();
    for file in map.values() {
        let file = file
            .as_str()
            .filter(|f| !f.is_empty() && !f.contains('/') && !f.contains('\\') && !f.starts_with('.'))
            .ok_or_else(|| format!("bad shard name {file}"))?;
        files.insert(file.to_string());
    }
    Ok(files.into_iter().collect())
}

/// Tensors of a safetensors checkpoint, memory-mapped, converted to f32 as they are read.
pub struct SafetensorsSource {
    tensors: MmapedSafetensors,
    names: HashSet<String>,
    device: Device,
}

impl SafetensorsSource {
    pub fn open(files: &[PathBuf], device: &Device) -> Result<Self> {
        let names = tensor_infos(files)?.into_iter().map(|(name, _, _)| name).collect();
        // SAFETY: read-only maps of files whose headers were validated just now.
        let tensors = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| EngineError::invalid_file(files.first().cloned().unwrap_or_default(), e))?;
        Ok(Self { tensors, names, device: device.clone() })
    }
}

impl WeightSource for SafetensorsSource {
    fn load(&mut self, name: TensorName) -> Result<Option<Weight>> {
        let key = name.hf();
        if !self.names.contains(&key) {
            return Ok(None);
        }
        let tensor = self.tensors.load(&key, &self.device).map_err(|e| EngineError::tensor(&key, e))?;
        match tensor.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => Ok(Some(Weight::Dense(tensor.to_dtype(DType::F32)?))),
            other => Err(EngineError::tensor(key, format!("unsupported dtype {other:?}"))),
        }
    }

    fn display_name(&self, name: TensorName) -> String {
        name.hf()
    }
}

/// Name, dtype and shape of every tensor in the checkpoint's files, sorted by name.
pub fn tensor_infos(files: &[PathBuf]) -> Result<Vec<(String, String, Vec<usize>)>> {
    let mut infos = Vec::new();
    for file in files {
        let bytes = std::fs::File::open(file).map_err(|e| EngineError::io(file, e))?;
        // SAFETY: read-only map of a checkpoint file.
        let map = unsafe { memmap2::Mmap::map(&bytes) }.map_err(|e| EngineError::io(file, e))?;
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| EngineError::invalid_file(file, e))?;
        for (name, info) in metadata.tensors() {
            infos.push((name, format!("{:?}", info.dtype), info.shape.clone()));
        }
    }
    infos.sort();
    Ok(infos)
}

/// The chat template of a checkpoint directory: `chat_template.jinja` (transformers v5) or
/// `chat_template` in `tokenizer_config.json`.
pub fn chat_template(dir: &Path, tokenizer_config: Option<&serde_json::Value>) -> Result<Option<String>> {
    let file = dir.join("chat_template.jinja");
    let jinja = if file.exists() { Some(std::fs::read_to_string(&file).map_err(|e| EngineError::io(&file, e))?) } else { None };
    Ok(chat_template_source(jinja, tokenizer_config))
}

/// The template file's text wins; otherwise `chat_template` from `tokenizer_config.json`, a string
/// or a list of named templates of which `default` is the one.
pub fn chat_template_source(jinja: Option<String>, tokenizer_config: Option<&serde_json::Value>) -> Option<String> {
    if jinja.is_some() {
        return jinja;
    }
    match tokenizer_config.and_then(|c| c.get("chat_template")) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(named)) => {
            named.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default")).and_then(|t| t.get("template")?.as_str()).map(str::to_string)
        }
        _ => None,
    }
}
