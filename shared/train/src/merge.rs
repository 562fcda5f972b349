//! `llm merge`: a base checkpoint plus a PEFT LoRA adapter → a plain Hugging Face directory,
//! each adapted weight replaced by `W + scaling · B · A` (what PEFT's `merge_and_unload()`
//! computes). Shards, tensor names and the other files of the base are kept; weights keep the
//! base's dtype unless one is asked for.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use llm_engine::hf;

use crate::error::{Result, TrainError};
use crate::lora::load_adapter;

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub merged_weights: usize,
    pub tensors: usize,
}

/// Writes into `<output>.partial` and renames it when complete, so a failed merge leaves no
/// directory that looks like a model; an existing non-empty `output` is never overwritten.
pub fn merge(base: &Path, adapter: &Path, output: &Path, dtype: Option<DType>) -> Result<MergeReport> {
    if std::fs::read_dir(output).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(TrainError::file(output, "already exists and is not empty"));
    }
    let partial = output.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let result = write_merged(base, adapter, &partial, dtype);
    match result {
        Ok(report) => {
            let _ = std::fs::remove_dir(output);
            std::fs::rename(&partial, output).map_err(|e| TrainError::file(output, e))?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

fn write_merged(base: &Path, adapter: &Path, output: &Path, dtype: Option<DType>) -> Result<MergeReport> {
    let device = Device::Cpu;
    let (config, pairs) = load_adapter(adapter, &device)?;
    let scaling = config.scaling();
    // PEFT's `base_model.model.<module>` is the base checkpoint's `<module>.weight`.
    let mut deltas: HashMap<String, (Tensor, Tensor)> = HashMap::new();
    for (prefix, pair) in pairs {
        let module = prefix.strip_prefix("base_model.model.").ok_or_else(|| TrainError::file(adapter, format!("unexpected adapter key {prefix}")))?;
        deltas.insert(format!("{module}.weight"), pair);
    }
    std::fs::create_dir_all(output).map_err(|e| TrainError::file(output, e))?;
    let mut report = MergeReport { merged_weights: 0, tensors: 0 };
    for shard in hf::safetensors_files(base)? {
        let tensors = candle_core::safetensors::load(&shard, &device).map_err(|e| TrainError::file(&shard, e))?;
        let mut merged = HashMap::with_capacity(tensors.len());
        for (name, tensor) in tensors {
            let target = dtype.unwrap_or(tensor.dtype());
            let tensor = match deltas.remove(&name) {
                Some((a, b)) => {
                    let delta = (b.matmul(&a)? * scaling)?;
                    if delta.dims() != tensor.dims() {
                        return Err(TrainError::file(adapter, format!("{name}: the adapter's update is {:?}, the weight {:?}", delta.dims(), tensor.dims())));
                    }
                    report.merged_weights += 1;
                    (tensor.to_dtype(DType::F32)? + delta)?
                }
                None => tensor,
            };
            merged.insert(name, tensor.to_dtype(target)?);
        }
        report.tensors += merged.len();
        let name = shard.file_name().ok_or_else(|| TrainError::file(&shard, "no file name"))?;
        let path = output.join(name);
        candle_core::safetensors::save(&merged, &path).map_err(|e| TrainError::file(&path, e))?;
    }
    if let Some(unused) = deltas.keys().next() {
        return Err(TrainError::file(adapter, format!("the adapter updates {unused}, which the base does not have")));
    }
    copy_other_files(base, output, dtype, &[])?;
    Ok(report)
}

/// `value` as pretty-printed JSON (what transformers and PEFT write) in `path`.
pub(crate) fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::file(path, e))?;
    std::fs::write(path, text).map_err(|e| TrainError::file(path, e))
}

/// What a training run writes beside its model: a base that is itself a run's output must not
/// hand these to the next run's output (they would replace its own).
const RUN_FILES: [&str; 2] = ["metrics.jsonl", "loss.png"];

/// Everything but the weights (config, tokenizer, index, chat template...), a run's own
/// [`RUN_FILES`] and `skip`, with `config.json`'s dtype changed when the weights' was.
pub(crate) fn copy_other_files(base: &Path, output: &Path, dtype: Option<DType>, skip: &[&str]) -> Result<()> {
    for entry in std::fs::read_dir(base).map_err(|e| TrainError::file(base, e))? {
        let path = entry.map_err(|e| TrainError::file(base, e))?.path();
        if !path.is_file() || path.extension().is_some_and(|e| e == "safetensors") {
            continue;
        }
        let Some(name) = path.file_name() else { continue };
        if name.to_str().is_some_and(|n| skip.contains(&n) || RUN_FILES.contains(&n)) {
            continue;
        }
        let target = output.join(name);
        match (name.to_str(), dtype) {
            (Some("config.json"), Some(dtype)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| TrainError::file(&path, e))?;
                let mut config: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::file(&path, e))?;
                for key in ["torch_dtype", "dtype"] {
                    if config.get(key).is_some() {
                        config[key] = serde_json::Value::String(torch_name(dtype).into());
                    }
                }
                write_json(&target, &config)?;
            }
            _ => {
                std::fs::copy(&path, &target).map_err(|e| TrainError::file(&target, e))?;
            }
        }
    }
    Ok(())
}

fn torch_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// `f32`, `f16` or `bf16`, as `--dtype` takes it.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(TrainError::Invalid(format!("unknown dtype `{other}` (f32, f16, bf16)"))),
    }
}
