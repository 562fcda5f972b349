//! `llm inspect`: what a model file or directory contains.

use std::path::PathBuf;

use gguf_json::describe_value;
use llm_engine::gguf::GgufFile;
use llm_engine::{hf, ModelFormat};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file or a Hugging Face model directory.
    pub path: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (format, metadata, tensors) = match llm_engine::loader::detect_format(&args.path)? {
        ModelFormat::Gguf => {
            let gguf = GgufFile::open(&args.path)?;
            let mut metadata: Vec<(String, Value)> = gguf.metadata().iter().map(|(k, v)| (k.clone(), describe_value(v))).collect();
            metadata.sort_by(|a, b| a.0.cmp(&b.0));
            ("gguf", metadata, gguf.tensor_infos())
        }
        ModelFormat::HuggingFace => {
            let config_path = args.path.join("config.json");
            let config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
            let metadata = match config {
                Value::Object(map) => map.into_iter().collect(),
                other => vec![("config".to_string(), other)],
            };
            let files = hf::safetensors_files(&args.path)?;
            ("huggingface", metadata, hf::tensor_infos(&files)?)
        }
    };
    if args.json {
        let output = json!({
            "format": format,
            "metadata": metadata.iter().cloned().collect::<serde_json::Map<_, _>>(),
            "tensors": tensors.iter().map(|(n, t, s)| json!({"name": n, "type": t, "shape": s})).collect::<Vec<_>>(),
        });
        println!("{output}");
        return Ok(());
    }
    println!("format: {format}");
    println!("metadata ({} keys):", metadata.len());
    for (key, value) in &metadata {
        println!("  {key} = {value}");
    }
    let params: usize = tensors.iter().map(|(_, _, s)| s.iter().product::<usize>()).sum();
    println!("tensors ({}, {params} parameters):", tensors.len());
    for (name, dtype, shape) in &tensors {
        println!("  {name:<40} {dtype:<6} {shape:?}");
    }
    Ok(())
}

/// GGUF metadata values as JSON; long arrays (vocabularies) are summarised.
mod gguf_json {
    use llm_engine::gguf::GgufValue as V;
    use serde_json::{json, Value};

    const SHOWN: usize = 8;

    pub fn describe_value(v: &V) -> Value {
        match v {
            V::U8(x) => json!(x),
            V::I8(x) => json!(x),
            V::U16(x) => json!(x),
            V::I16(x) => json!(x),
            V::U32(x) => json!(x),
            V::I32(x) => json!(x),
            V::U64(x) => json!(x),
            V::I64(x) => json!(x),
            V::F32(x) => json!(x),
            V::F64(x) => json!(x),
            V::Bool(x) => json!(x),
            V::String(s) if s.len() > 256 => json!(format!("{}… ({} bytes)", &s[..s.floor_char_boundary(256)], s.len())),
            V::String(s) => json!(s),
            V::Array(items) if items.len() > SHOWN => {
                let head: Vec<Value> = items.iter().take(SHOWN).map(describe_value).collect();
                json!({"len": items.len(), "first": head})
            }
            V::Array(items) => Value::Array(items.iter().map(describe_value).collect()),
        }
    }
}
