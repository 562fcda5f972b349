//! `tokenizer.*` GGUF keys from a Hugging Face `tokenizer.json` and `tokenizer_config.json`, as
//! llama.cpp's converter writes them, plus the whole `tokenizer.json` as
//! `tokenizer.huggingface.json`.

use std::collections::HashMap;

use serde_json::Value;

use crate::error::{ConvertError, Result};
use crate::gguf_writer::MetaValue;
use crate::source::CheckpointSource;

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// llama.cpp's name for a byte-level tokenizer's split: Llama 3's regex (`llama-bpe`), every
/// digit alone before GPT-2's split (`smollm`: SmolLM's and SmolLM2's `Digits` pre-tokenizer),
/// or GPT-2's (`default`). llama.cpp's converter tells them apart by their tokens on a test
/// text; a `default` for SmolLM2 split "2024" as one piece where transformers splits four.
fn pre_tokenizer(json: &Value, text: &str) -> &'static str {
    let steps = match &json["pre_tokenizer"]["pretokenizers"] {
        Value::Array(steps) => steps.as_slice(),
        _ => std::slice::from_ref(&json["pre_tokenizer"]),
    };
    if text.contains(r"\\p{N}{1,3}") {
        "llama-bpe"
    } else if steps.iter().any(|step| step["type"] == "Digits" && step["individual_digits"] == true) {
        "smollm"
    } else {
        "default"
    }
}

pub fn tokenizer_metadata(input: &CheckpointSource) -> Result<Vec<(String, MetaValue)>> {
    let path = input.describe("tokenizer.json");
    let text = input.read_text("tokenizer.json")?.ok_or_else(|| ConvertError::input(&path, "missing"))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| ConvertError::input(&path, e))?;
    let config: Value = match input.read_text("tokenizer_config.json")? {
        Some(text) => serde_json::from_str(&text).map_err(|e| ConvertError::input(input.describe("tokenizer_config.json"), e))?,
        None => Value::Null,
    };
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(ConvertError::input(&path, "only BPE tokenizers (Llama 2 and 3 styles) are supported"));
    }
    let vocab = model["vocab"].as_object().ok_or_else(|| ConvertError::input(&path, "model.vocab is missing"))?;
    let added: Vec<(usize, String, bool)> = json["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter().filter_map(|t| Some((t["id"].as_u64()? as usize, t["content"].as_str()?.to_string(), t["special"].as_bool().unwrap_or(false)))).collect()
        })
        .unwrap_or_default();
    let size = vocab.values().filter_map(Value::as_u64).map(|id| id as usize + 1).chain(added.iter().map(|a| a.0 + 1)).max().unwrap_or(0);
    let mut tokens: Vec<Option<String>> = vec![None; size];
    for (token, id) in vocab {
        if let Some(id) = id.as_u64() {
            tokens[id as usize] = Some(token.clone());
        }
    }
    let mut types = vec![NORMAL; size];
    for (id, content, special) in &added {
        tokens[*id] = Some(content.clone());
        types[*id] = if *special { CONTROL } else { USER_DEFINED };
    }
    let tokens: Vec<String> = tokens.into_iter().enumerate().map(|(id, t)| t.unwrap_or_else(|| format!("[PAD{id}]"))).collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(pair) => Some(format!("{} {}", pair.first()?.as_str()?, pair.get(1)?.as_str()?)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();

    let byte_level = text.contains("\"ByteLevel\"");
    let mut meta = Vec::new();
    let key = |k: &str| format!("tokenizer.ggml.{k}");
    if byte_level {
        meta.push((key("model"), MetaValue::Str("gpt2".into())));
        meta.push((key("pre"), MetaValue::Str(pre_tokenizer(&json, &text).into())));
        meta.push((key("tokens"), MetaValue::StrArray(tokens.clone())));
        meta.push((key("token_type"), MetaValue::I32Array(types)));
        meta.push((key("merges"), MetaValue::StrArray(merges)));
    } else if model["byte_fallback"].as_bool().unwrap_or(false) {
        // SentencePiece pieces: scores rank the pieces in merge order, so that llama.cpp (which
        // merges the best-scoring pair) and a rebuild from these keys merge as the BPE does.
        let rank: HashMap<String, usize> = merges.iter().enumerate().rev().map(|(i, m)| (m.replace(' ', ""), i)).collect();
        let unk = model["unk_token"].as_str().or_else(|| config["unk_token"].as_str()).or_else(|| config["unk_token"]["content"].as_str());
        let scores: Vec<f32> = tokens.iter().map(|t| rank.get(t).map_or(-1e9, |&r| -(r as f32) - 1.0)).collect();
        for (i, t) in tokens.iter().enumerate() {
            if Some(t.as_str()) == unk {
                types[i] = UNKNOWN;
            } else if types[i] == NORMAL && t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                types[i] = BYTE;
            }
        }
        meta.push((key("model"), MetaValue::Str("llama".into())));
        meta.push((key("pre"), MetaValue::Str("default".into())));
        meta.push((key("tokens"), MetaValue::StrArray(tokens.clone())));
        meta.push((key("scores"), MetaValue::F32Array(scores)));
        meta.push((key("token_type"), MetaValue::I32Array(types)));
    } else {
        return Err(ConvertError::input(&path, "a BPE tokenizer that is neither byte-level nor byte-fallback"));
    }

    let ids: HashMap<&str, u32> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
    let special = |name: &str| -> Option<u32> {
        let v = &config[name];
        let text = v.as_str().or_else(|| v["content"].as_str())?;
        ids.get(text).copied()
    };
    for (name, gguf) in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")] {
        if let Some(id) = special(name) {
            meta.push((key(&format!("{gguf}_token_id")), MetaValue::U32(id)));
        }
    }
    // Without an explicit flag, BOS is added when the post-processor inserts the BOS token.
    let bos_text = config["bos_token"].as_str().or_else(|| config["bos_token"]["content"].as_str());
    let post_processor = json["post_processor"].to_string();
    let add_bos = config["add_bos_token"].as_bool().unwrap_or_else(|| bos_text.is_some_and(|b| post_processor.contains(&format!("\"{b}\""))));
    meta.push((key("add_bos_token"), MetaValue::Bool(add_bos)));
    if let Some(add_eos) = config["add_eos_token"].as_bool() {
        meta.push((key("add_eos_token"), MetaValue::Bool(add_eos)));
    }
    if let Some(template) = llm_engine::hf::chat_template_source(input.read_text("chat_template.jinja")?, Some(&config)) {
        meta.push(("tokenizer.chat_template".into(), MetaValue::Str(template)));
    }
    meta.push(("tokenizer.huggingface.json".into(), MetaValue::Str(text)));
    Ok(meta)
}
