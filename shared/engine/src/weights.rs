//! Format-neutral access to a Llama checkpoint's tensors.
//!
//! Each file format (Hugging Face safetensors, GGUF) implements [`WeightSource`]; the model is
//! built from canonical [`TensorName`]s and never sees format-specific names.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use llm_kernels::{BlockType, Float, Kernels, QMatrix, WeightFormat};

use crate::error::{EngineError, Result};

/// One tensor of a Llama decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// A tensor of the model, independent of the file format that stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorName {
    TokenEmbedding,
    OutputNorm,
    Output,
    /// llama.cpp's per-frequency RoPE divisors (Llama 3.1+ scaling), GGUF only.
    RopeFreqs,
    Layer(usize, LayerTensor),
}

impl TensorName {
    /// The name in a Hugging Face `LlamaForCausalLM` checkpoint.
    pub fn hf(self) -> String {
        use LayerTensor::*;
        match self {
            Self::TokenEmbedding => "model.embed_tokens.weight".into(),
            Self::OutputNorm => "model.norm.weight".into(),
            Self::Output => "lm_head.weight".into(),
            Self::RopeFreqs => "rope_freqs.weight".into(),
            Self::Layer(i, t) => {
                let suffix = match t {
                    AttnNorm => "input_layernorm",
                    Q => "self_attn.q_proj",
                    K => "self_attn.k_proj",
                    V => "self_attn.v_proj",
                    O => "self_attn.o_proj",
                    FfnNorm => "post_attention_layernorm",
                    Gate => "mlp.gate_proj",
                    Up => "mlp.up_proj",
                    Down => "mlp.down_proj",
                };
                format!("model.layers.{i}.{suffix}.weight")
            }
        }
    }

    /// The name llama.cpp gives the tensor in a GGUF file.
    pub fn gguf(self) -> String {
        use LayerTensor::*;
        match self {
            Self::TokenEmbedding => "token_embd.weight".into(),
            Self::OutputNorm => "output_norm.weight".into(),
            Self::Output => "output.weight".into(),
            Self::RopeFreqs => "rope_freqs.weight".into(),
            Self::Layer(i, t) => {
                let suffix = match t {
                    AttnNorm => "attn_norm",
                    Q => "attn_q",
                    K => "attn_k",
                    V => "attn_v",
                    O => "attn_output",
                    FfnNorm => "ffn_norm",
                    Gate => "ffn_gate",
                    Up => "ffn_up",
                    Down => "ffn_down",
                };
                format!("blk.{i}.{suffix}.weight")
            }
        }
    }
}

/// A loaded tensor: plain f32, still in a GGML block format, or in a format that
/// [`llm_kernels`] reads where it lies in the file (its block types, f32, f16 and bf16).
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    InPlace(InPlace),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Dense(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
            Self::InPlace(t) => &t.dims,
        }
    }

    /// The tensor as f32, dequantizing if needed (for small tensors such as norms).
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(t) => t.to_dtype(DType::F32)?,
            Self::Quantized(q) => q.dequantize(&q.device())?,
            Self::InPlace(t) => t.to_qtensor()?.dequantize(&Device::Cpu)?,
        })
    }
}

/// The bytes of a whole model file, shared by the tensors read from it in place: its memory map,
/// or the object downloaded from S3.
pub type FileBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A matrix in a format the kernels read, left where it lies in its file (rearranged there if
/// the kernels read another layout faster, [`laid_out`]): loading it copies nothing, and the
/// file's pages are its only memory.
#[derive(Clone)]
pub struct InPlace {
    file: FileBytes,
    range: Range<usize>,
    pub format: WeightFormat,
    pub dims: Vec<usize>,
}

impl std::fmt::Debug for InPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPlace").field("format", &self.format).field("dims", &self.dims).field("range", &self.range).finish()
    }
}

impl InPlace {
    /// `file[range]`, a `dims` matrix in `format` (the caller checked the range).
    pub fn new(file: FileBytes, range: Range<usize>, format: WeightFormat, dims: Vec<usize>) -> Self {
        Self { file, range, format, dims }
    }

    /// A copy of a candle tensor's bytes (a weight quantized at load time, in `format`), laid out
    /// as the kernels read them fastest ([`laid_out`]).
    pub fn from_qtensor(q: &QTensor, format: WeightFormat) -> Result<Self> {
        let (mut bytes, dims) = (q.data()?.into_owned(), q.shape().dims().to_vec());
        let format = lay_out(format, &mut bytes, dims[dims.len() - 1]);
        let range = 0..bytes.len();
        Ok(Self::new(Arc::new(bytes), range, format, dims))
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.file).as_ref()[self.range.clone()]
    }

    /// Row `i` of the matrix in f32 (an embedding lookup).
    pub fn dequantize_row(&self, i: usize) -> Result<Vec<f32>> {
        let (rows, cols) = (self.dims[0], self.dims[1]);
        if i >= rows {
            return Err(EngineError::InvalidRequest(format!("row {i} of a matrix of {rows} rows (a token id outside the vocabulary?)")));
        }
        // A kernels' layout is read back as the file has the row (`QMatrix::row_in_file`).
        let row = match self.format {
            WeightFormat::Blocks(ty) => QMatrix::new(ty, rows, cols, self.bytes()).map_err(|e| EngineError::InvalidRequest(e.to_string()))?.row_in_file(i),
            float => Cow::Borrowed(&self.bytes()[i * float.row_bytes(cols)..][..float.row_bytes(cols)]),
        };
        let row = qtensor_from_ggml(ggml_type(self.format), &row, vec![cols], &Device::Cpu)?;
        Ok(row.dequantize(&Device::Cpu)?.to_vec1()?)
    }

    /// A copy as candle's tensor, for the paths that need one.
    pub fn to_qtensor(&self) -> Result<QTensor> {
        Ok(qtensor_from_ggml(ggml_type(self.format), &self.in_file_layout(self.bytes()), self.dims.clone(), &Device::Cpu)?)
    }

    /// Whole rows of the matrix as a file has them (rearranged back from the kernels' layout).
    fn in_file_layout<'b>(&self, rows: &'b [u8]) -> Cow<'b, [u8]> {
        match self.format {
            WeightFormat::Blocks(ty) if ty != ty.in_file() => {
                let mut copy = rows.to_vec();
                ty.rearrange(&mut copy, self.dims[1], true);
                Cow::Owned(copy)
            }
            _ => Cow::Borrowed(rows),
        }
    }
}

/// The layout the kernels read a matrix of `rows` rows in `format` (as a file has it) fastest.
pub(crate) fn laid_out(format: WeightFormat, rows: usize) -> WeightFormat {
    match format {
        WeightFormat::Blocks(ty) => WeightFormat::Blocks(Kernels::best().layout(ty, rows)),
        floats => floats,
    }
}

/// A matrix's rows of `cols` values in `format` (as a file has them) rearranged in place into
/// the layout the kernels read fastest, which it returns.
pub(crate) fn lay_out(format: WeightFormat, rows: &mut [u8], cols: usize) -> WeightFormat {
    let laid_out = laid_out(format, rows.len() / format.row_bytes(cols));
    if let WeightFormat::Blocks(ty) = laid_out {
        ty.rearrange(rows, cols, false);
    }
    laid_out
}

/// The kernels' format for a matrix of `dtype` whose rows have `cols` values, when they take it
/// on this CPU: a row must be whole blocks (always so for a block type that candle or the file
/// holds) or, for plain floats, whole registers.
pub(crate) fn kernel_format(dtype: GgmlDType, cols: usize) -> Option<WeightFormat> {
    let ty = match dtype {
        GgmlDType::F32 => return whole_rows(WeightFormat::Float(Float::F32), cols),
        GgmlDType::F16 => return whole_rows(WeightFormat::Float(Float::F16), cols),
        GgmlDType::BF16 => return whole_rows(WeightFormat::Float(Float::Bf16), cols),
        GgmlDType::Q8_0 => BlockType::Q8_0,
        GgmlDType::Q4_0 => BlockType::Q4_0,
        GgmlDType::Q4_1 => BlockType::Q4_1,
        GgmlDType::Q5_0 => BlockType::Q5_0,
        GgmlDType::Q5_1 => BlockType::Q5_1,
        GgmlDType::Q2K => BlockType::Q2K,
        GgmlDType::Q3K => BlockType::Q3K,
        GgmlDType::Q4K => BlockType::Q4K,
        GgmlDType::Q5K => BlockType::Q5K,
        GgmlDType::Q6K => BlockType::Q6K,
        _ => return None,
    };
    whole_rows(WeightFormat::Blocks(ty), cols)
}

/// `format`, when this CPU has the kernels and rows of `cols` values suit them.
fn whole_rows(format: WeightFormat, cols: usize) -> Option<WeightFormat> {
    (llm_kernels::available() && cols.is_multiple_of(format.row_multiple())).then_some(format)
}

fn ggml_type(format: WeightFormat) -> GgmlDType {
    let ty = match format {
        WeightFormat::Blocks(ty) => ty,
        WeightFormat::Float(Float::F32) => return GgmlDType::F32,
        WeightFormat::Float(Float::F16) => return GgmlDType::F16,
        WeightFormat::Float(Float::Bf16) => return GgmlDType::BF16,
    };
    match ty.in_file() {
        BlockType::Q8_0 => GgmlDType::Q8_0,
        BlockType::Q4_0 => GgmlDType::Q4_0,
        BlockType::Q4_1 => GgmlDType::Q4_1,
        BlockType::Q5_0 => GgmlDType::Q5_0,
        BlockType::Q5_1 => GgmlDType::Q5_1,
        BlockType::Q2K => GgmlDType::Q2K,
        BlockType::Q3K => GgmlDType::Q3K,
        BlockType::Q4K => GgmlDType::Q4K,
        BlockType::Q5K => GgmlDType::Q5K,
        BlockType::Q6K => GgmlDType::Q6K,
        _ => unreachable!("`in_file` is a file's type"),
    }
}

/// Where the model's tensors come from.
pub trait WeightSource {
    /// Loads one tensor, or `None` when the checkpoint does not have it.
    fn load(&mut self, name: TensorName) -> Result<Option<Weight>>;

    /// Human-readable name of `name` in this format, for error messages.
    fn display_name(&self, name: TensorName) -> String;
}

/// Loads a tensor that must exist and have `expected` dims (PyTorch order: `[out, in]`).
pub(crate) fn load_expected(source: &mut dyn WeightSource, name: TensorName, expected: &[usize]) -> Result<Weight> {
    let display = source.display_name(name);
    let weight = source.load(name)?.ok_or_else(|| EngineError::tensor(&display, "missing from the checkpoint"))?;
    check_dims(&display, weight.dims(), expected)?;
    Ok(weight)
}

pub(crate) fn check_dims(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(EngineError::tensor(name, format!("has shape {actual:?}, the config implies {expected:?}")));
    }
    Ok(())
}

/// Quantizes a 2-D weight to `dtype` at load time. Rows whose length is not a multiple of the
/// type's block size get llama.cpp's fallback type instead; tensors that fit none stay f32.
pub(crate) fn quantize_weight(weight: Weight, dtype: GgmlDType) -> Result<Weight> {
    let tensor = match &weight {
        Weight::Dense(t) => t.clone(),
        Weight::Quantized(q) if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => q.dequantize(&q.device())?,
        Weight::InPlace(t) if matches!(t.format, WeightFormat::Float(_)) => weight.to_f32()?,
        // Already quantized by whoever wrote the file: re-quantizing would only add error.
        Weight::Quantized(_) | Weight::InPlace(_) => return Ok(weight),
    };
    let row_len = tensor.dims().last().copied().unwrap_or(0);
    match crate::quant::type_for_row(dtype, row_len) {
        Some(dtype) => Ok(Weight::Quantized(Arc::new(QTensor::quantize(&tensor, dtype)?))),
        None => Ok(Weight::Dense(tensor)),
    }
}
