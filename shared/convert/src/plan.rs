//! The conversion itself: read the checkpoint's headers, plan every output tensor (name, shape,
//! type), write the GGUF header, then stream the tensors one at a time.

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llm_engine::config::RopeScaling;
use llm_engine::weights::{LayerTensor, TensorName};
use llm_engine::LlamaConfig;
use rayon::prelude::*;

use crate::error::{ConvertError, Result};
use crate::gguf_writer::{self, MetaValue, TensorEntry};
use crate::kquants::KQuant;
use crate::source::CheckpointSource;
use crate::target::{tensor_type, ModelShape, QuantType};

/// Reported after each tensor is written.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub tensor: &'a str,
    pub index: usize,
    pub count: usize,
    pub bytes_written: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub tensors: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
}

/// Where one source tensor lives in the checkpoint.
struct SourceTensor {
    /// File name within the checkpoint.
    file: String,
    dtype: SourceDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// The float formats a checkpoint may store.
#[derive(Debug, Clone, Copy)]
enum SourceDtype {
    F32,
    F16,
    BF16,
}

/// What fills one output tensor.
enum Data {
    /// A checkpoint tensor; Q and K rows are permuted into llama.cpp's RoPE order.
    Checkpoint { hf_name: String, permute_heads: Option<usize> },
    /// Computed by the converter (`rope_freqs`).
    Computed(Vec<f32>),
}

struct Planned {
    entry: TensorEntry,
    data: Data,
}

/// Converts the Hugging Face checkpoint in `input` to GGUF of type `q`, written to `out`.
pub fn convert(input: &CheckpointSource, out: &mut impl Write, q: QuantType, mut on_progress: impl FnMut(&Progress<'_>)) -> Result<ConvertReport> {
    let started = Instant::now();
    let (config, sources, plan) = prepare(input, q)?;
    let metadata = [model_metadata(input, &config, q), crate::tokenizer_meta::tokenizer_metadata(input)?].concat();

    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    let header = gguf_writer::header(&metadata, &entries);
    let total_bytes = gguf_writer::file_size(header.len() as u64, &entries);
    out.write_all(&header)?;
    let mut written = header.len() as u64;
    let mut input_bytes = 0;
    for (index, p) in plan.iter().enumerate() {
        let values = match &p.data {
            Data::Computed(v) => v.clone(),
            Data::Checkpoint { hf_name, permute_heads } => {
                let source = &sources[hf_name];
                input_bytes += source.end - source.start;
                let values = read_f32(input, source)?;
                match permute_heads {
                    Some(heads) => permute_rope_rows(&values, *heads, source.shape[0], source.shape[1])?,
                    None => values,
                }
            }
        };
        let bytes = quantize_tensor(&values, &p.entry.dims, p.entry.dtype)?;
        written += gguf_writer::write_tensor(out, &p.entry, &bytes)?;
        on_progress(&Progress { tensor: &p.entry.name, index, count: plan.len(), bytes_written: written, total_bytes });
    }
    out.flush()?;
    Ok(ConvertReport { tensors: plan.len(), input_bytes, output_bytes: written, seconds: started.elapsed().as_secs_f64() })
}

/// What a conversion will read, known from the headers alone: lets a caller refuse a job (a
/// malformed checkpoint, too large for its time or memory) before writing anything.
#[derive(Debug, Clone)]
pub struct CheckpointSurvey {
    pub config: LlamaConfig,
    /// Bytes of tensor data the conversion reads.
    pub tensor_bytes: u64,
    /// Elements of the largest tensor: memory holds a few copies of it at a time.
    pub largest_tensor_elements: usize,
}

/// Reads and checks everything but the tensor data: config, tokenizer, every header and shape.
pub fn survey(input: &CheckpointSource) -> Result<CheckpointSurvey> {
    let (config, sources, _) = prepare(input, QuantType::F32)?;
    crate::tokenizer_meta::tokenizer_metadata(input)?;
    Ok(CheckpointSurvey {
        config,
        tensor_bytes: sources.values().map(|s| s.end - s.start).sum(),
        largest_tensor_elements: sources.values().map(|s| s.shape.iter().product::<usize>()).max().unwrap_or(0),
    })
}

/// The config, the checkpoint's tensor directory and the plan of output tensors.
fn prepare(input: &CheckpointSource, q: QuantType) -> Result<(LlamaConfig, HashMap<String, SourceTensor>, Vec<Planned>)> {
    let config_text = input.read_text("config.json")?.ok_or_else(|| ConvertError::input(input.describe("config.json"), "missing"))?;
    let config = LlamaConfig::from_hf_json(&config_text)?;
    let sources = read_directory(input)?;
    let tied = config.tie_word_embeddings || !sources.contains_key("lm_head.weight");
    let plan = plan_tensors(&config, &sources, q, tied)?;
    Ok((config, sources, plan))
}

/// The checkpoint's safetensors files: the shards its index lists, or `model.safetensors`.
fn shard_files(input: &CheckpointSource) -> Result<Vec<String>> {
    let index = "model.safetensors.index.json";
    match input.read_text(index)? {
        Some(text) => llm_engine::hf::shard_names(&text).map_err(|e| ConvertError::input(input.describe(index), e)),
        None if input.size("model.safetensors")?.is_some() => Ok(vec!["model.safetensors".into()]),
        None => Err(ConvertError::input(input.root().to_string(), "no model.safetensors or model.safetensors.index.json")),
    }
}

/// Tensor directory of every safetensors file (headers only; data is read per tensor).
fn read_directory(input: &CheckpointSource) -> Result<HashMap<String, SourceTensor>> {
    let mut sources = HashMap::new();
    for file in shard_files(input)? {
        let path = input.describe(&file);
        let file_len = input.size(&file)?.ok_or_else(|| ConvertError::input(&path, "missing"))?;
        if file_len < 8 {
            return Err(ConvertError::input(&path, "too short for a safetensors header: truncated?"));
        }
        let len = input.read_range(&file, 0, 8)?;
        let header_len = u64::from_le_bytes(len.try_into().unwrap_or_default());
        if header_len > 100 << 20 || 8 + header_len > file_len {
            return Err(ConvertError::input(&path, format!("safetensors header of {header_len} bytes does not fit the file")));
        }
        let header = input.read_range(&file, 8, header_len)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| ConvertError::input(&path, format!("safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        for (name, info) in header.into_iter().filter(|(k, _)| k != "__metadata__") {
            let source = parse_entry(&file, &path, &name, &info, data_start, file_len)?;
            sources.insert(name, source);
        }
    }
    Ok(sources)
}

/// One safetensors header entry, validated: known dtype, offsets inside the file, and a byte
/// length that matches the shape.
fn parse_entry(file: &str, path: &str, name: &str, info: &serde_json::Value, data_start: u64, file_len: u64) -> Result<SourceTensor> {
    let bad = |reason: String| ConvertError::tensor(name, format!("{path}: {reason}"));
    let (dtype, width) = match info["dtype"].as_str() {
        Some("F32") => (SourceDtype::F32, 4),
        Some("F16") => (SourceDtype::F16, 2),
        Some("BF16") => (SourceDtype::BF16, 2),
        other => return Err(bad(format!("unsupported dtype {other:?}"))),
    };
    let shape: Vec<usize> =
        info["shape"].as_array().and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect()).ok_or_else(|| bad("malformed shape".into()))?;
    let offsets: Vec<u64> = info["data_offsets"]
        .as_array()
        .and_then(|o| o.iter().map(serde_json::Value::as_u64).collect())
        .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
        .ok_or_else(|| bad("malformed data_offsets".into()))?;
    let bytes = shape.iter().try_fold(width as u64, |acc, &d| acc.checked_mul(d as u64));
    if bytes != Some(offsets[1] - offsets[0]) {
        return Err(bad(format!("shape {shape:?} does not match its {} bytes", offsets[1] - offsets[0])));
    }
    let (start, end) = (data_start + offsets[0], data_start + offsets[1]);
    if end > file_len {
        return Err(bad(format!("ends at byte {end}, past the end of the file ({file_len} bytes): truncated?")));
    }
    Ok(SourceTensor { file: file.to_string(), dtype, shape, start, end })
}

/// The tensors a converted file holds, in order, with their dims (PyTorch order).
fn layout(c: &LlamaConfig, tied: bool) -> Vec<(TensorName, Vec<usize>)> {
    use LayerTensor::*;
    let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut names = vec![(TensorName::TokenEmbedding, vec![c.vocab_size, c.hidden_size])];
    for i in 0..c.num_layers {
        let l = |t| TensorName::Layer(i, t);
        names.extend([
            (l(AttnNorm), vec![c.hidden_size]),
            (l(Q), vec![q_dim, c.hidden_size]),
            (l(K), vec![kv_dim, c.hidden_size]),
            (l(V), vec![kv_dim, c.hidden_size]),
            (l(O), vec![c.hidden_size, q_dim]),
            (l(FfnNorm), vec![c.hidden_size]),
            (l(Gate), vec![c.intermediate_size, c.hidden_size]),
            (l(Up), vec![c.intermediate_size, c.hidden_size]),
            (l(Down), vec![c.hidden_size, c.intermediate_size]),
        ]);
    }
    names.push((TensorName::OutputNorm, vec![c.hidden_size]));
    if !tied {
        names.push((TensorName::Output, vec![c.vocab_size, c.hidden_size]));
    }
    names
}

/// The GGML type of every checkpoint tensor in a conversion to `q` (GGUF names).
pub fn tensor_types(config: &LlamaConfig, tied: bool, q: QuantType) -> Vec<(String, GgmlDType)> {
    let shape = ModelShape { num_layers: config.num_layers, gqa: config.num_heads / config.num_kv_heads, tied_embeddings: tied };
    layout(config, tied).into_iter().map(|(name, dims)| (name.gguf(), tensor_type(q, name, *dims.last().unwrap_or(&0), dims.len(), &shape))).collect()
}

fn plan_tensors(config: &LlamaConfig, sources: &HashMap<String, SourceTensor>, q: QuantType, tied: bool) -> Result<Vec<Planned>> {
    let c = config;
    let mut plan = Vec::new();
    if let (RopeScaling::Llama3 { .. }, Some(factors)) = (&c.rope_scaling, llm_engine::rope::scaling_factors(c)) {
        let entry = TensorEntry { name: TensorName::RopeFreqs.gguf(), dims: vec![factors.len()], dtype: GgmlDType::F32 };
        plan.push(Planned { entry, data: Data::Computed(factors) });
    }
    let types = tensor_types(c, tied, q);
    for ((name, dims), (_, dtype)) in layout(c, tied).into_iter().zip(types) {
        let hf_name = name.hf();
        let source = sources.get(&hf_name).ok_or_else(|| ConvertError::tensor(&hf_name, "missing from the checkpoint"))?;
        if source.shape != dims {
            return Err(ConvertError::tensor(&hf_name, format!("has shape {:?}, the config implies {dims:?}", source.shape)));
        }
        let permute_heads = match name {
            TensorName::Layer(_, LayerTensor::Q) => Some(c.num_heads),
            TensorName::Layer(_, LayerTensor::K) => Some(c.num_kv_heads),
            _ => None,
        };
        plan.push(Planned { entry: TensorEntry { name: name.gguf(), dims, dtype }, data: Data::Checkpoint { hf_name, permute_heads } });
    }
    Ok(plan)
}

fn model_metadata(input: &CheckpointSource, c: &LlamaConfig, q: QuantType) -> Vec<(String, MetaValue)> {
    let root = input.root().to_string();
    let name = root.trim_end_matches('/').rsplit('/').find(|part| !part.is_empty() && *part != ".").unwrap_or("model").to_string();
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut meta = vec![
        ("general.architecture", MetaValue::Str("llama".into())),
        ("general.type", MetaValue::Str("model".into())),
        ("general.name", MetaValue::Str(name)),
        ("llama.block_count", u(c.num_layers)),
        ("llama.context_length", u(c.max_position_embeddings)),
        ("llama.embedding_length", u(c.hidden_size)),
        ("llama.feed_forward_length", u(c.intermediate_size)),
        ("llama.attention.head_count", u(c.num_heads)),
        ("llama.attention.head_count_kv", u(c.num_kv_heads)),
        ("llama.rope.freq_base", MetaValue::F32(c.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(c.rms_norm_eps as f32)),
        ("llama.attention.key_length", u(c.head_dim)),
        ("llama.attention.value_length", u(c.head_dim)),
        ("general.file_type", MetaValue::U32(q.file_type())),
        ("llama.vocab_size", u(c.vocab_size)),
        ("llama.rope.dimension_count", u(c.head_dim)),
    ];
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        meta.push(("llama.rope.scaling.type", MetaValue::Str("linear".into())));
        meta.push(("llama.rope.scaling.factor", MetaValue::F32(factor as f32)));
    }
    meta.push(("general.quantization_version", MetaValue::U32(2)));
    meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// One tensor's values as f32, read with one positioned (or ranged) read.
fn read_f32(input: &CheckpointSource, source: &SourceTensor) -> Result<Vec<f32>> {
    // Read errors keep their kind: a storage fault is retryable, a bad file is not.
    let bytes = input.read_range(&source.file, source.start, source.end - source.start)?;
    Ok(match source.dtype {
        SourceDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        SourceDtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        SourceDtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    })
}

/// llama.cpp's Q/K row order (see [`llm_engine::rope::interleave_heads`]).
fn permute_rope_rows(w: &[f32], heads: usize, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let matrix = candle_core::Tensor::from_slice(w, (rows, cols), &candle_core::Device::Cpu)?;
    Ok(llm_engine::rope::interleave_heads(&matrix, heads)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The tensor's bytes in its planned type; quantization runs over row chunks on all cores
/// (blocks never cross rows, so chunking does not change the bytes). candle's quantizers give
/// llama.cpp's bytes for the legacy types and Q3_K; the other K-quants are our own.
pub fn quantize_tensor(values: &[f32], dims: &[usize], dtype: GgmlDType) -> Result<Vec<u8>> {
    Ok(match dtype {
        GgmlDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlDType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlDType::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        dtype => {
            let cols = *dims.last().unwrap_or(&1);
            let rows = values.len() / cols;
            let chunk_rows = rows.div_ceil(rayon::current_num_threads() * 4).max(1);
            let chunks: Vec<Vec<u8>> = values
                .par_chunks(chunk_rows * cols)
                .map(|chunk| -> Result<Vec<u8>> {
                    if let Some(k) = KQuant::for_dtype(dtype) {
                        return Ok(k.quantize(chunk));
                    }
                    let t = Tensor::from_slice(chunk, (chunk.len() / cols, cols), &Device::Cpu)?;
                    Ok(QTensor::quantize(&t, dtype)?.data()?.into_owned())
                })
                .collect::<Result<_>>()?;
            chunks.concat()
        }
    })
}
