//! A streaming GGUF v3 writer: the whole header (metadata and tensor directory with offsets) is
//! computed from shapes and types before any tensor data exists, then tensors are appended in
//! directory order. This is what lets a converter stream to a multipart upload.

use std::io::Write;

use candle_core::quantized::GgmlDType;

use crate::error::{ConvertError, Result};

const ALIGNMENT: u64 = 32;

/// A metadata value, with the GGUF value types the Llama keys use.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

/// A tensor as the directory describes it; `dims` in PyTorch order (`[rows, cols]`).
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorEntry {
    pub fn size_in_bytes(&self) -> u64 {
        let elems: usize = self.dims.iter().product();
        (elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// The bytes before the first tensor: header, metadata, tensor directory, padding.
pub fn header(metadata: &[(String, MetaValue)], tensors: &[TensorEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        put_value(&mut out, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += padded(t.size_in_bytes());
    }
    out.resize(padded(out.len() as u64) as usize, 0);
    out
}

/// Size of the whole file, known before any tensor is converted.
pub fn file_size(header_len: u64, tensors: &[TensorEntry]) -> u64 {
    header_len + tensors.iter().map(|t| padded(t.size_in_bytes())).sum::<u64>()
}

/// Appends one tensor's data, checking it against the directory, and its padding; returns the
/// bytes written.
pub fn write_tensor(out: &mut impl Write, entry: &TensorEntry, data: &[u8]) -> Result<u64> {
    if data.len() as u64 != entry.size_in_bytes() {
        return Err(ConvertError::tensor(&entry.name, format!("produced {} bytes, the header promised {}", data.len(), entry.size_in_bytes())));
    }
    out.write_all(data)?;
    let total = padded(data.len() as u64);
    out.write_all(&vec![0u8; (total - data.len() as u64) as usize])?;
    Ok(total)
}

fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF value type ids (`gguf_type`).
const UINT32: u32 = 4;
const INT32: u32 = 5;
const FLOAT32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;

fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
    let array_header = |out: &mut Vec<u8>, item_type: u32, len: usize| {
        out.extend_from_slice(&ARRAY.to_le_bytes());
        out.extend_from_slice(&item_type.to_le_bytes());
        out.extend_from_slice(&(len as u64).to_le_bytes());
    };
    match value {
        MetaValue::U32(v) => {
            out.extend_from_slice(&UINT32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        MetaValue::F32(v) => {
            out.extend_from_slice(&FLOAT32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        MetaValue::Bool(v) => {
            out.extend_from_slice(&BOOL.to_le_bytes());
            out.push(u8::from(*v));
        }
        MetaValue::Str(s) => {
            out.extend_from_slice(&STRING.to_le_bytes());
            put_str(out, s);
        }
        MetaValue::StrArray(items) => {
            array_header(out, STRING, items.len());
            items.iter().for_each(|s| put_str(out, s));
        }
        MetaValue::F32Array(items) => {
            array_header(out, FLOAT32, items.len());
            items.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        MetaValue::I32Array(items) => {
            array_header(out, INT32, items.len());
            items.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
    }
}

/// `ggml_type` ids as llama.cpp numbers them.
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}
