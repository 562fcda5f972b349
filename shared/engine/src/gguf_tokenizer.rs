//! Rebuilds a Hugging Face `tokenizer.json` from a GGUF file's `tokenizer.ggml.*` keys, for
//! files that do not carry `tokenizer.huggingface.json`.
//!
//! Two vocabularies occur in Llama files: `gpt2` (byte-level BPE with merges, Llama 3) and
//! `llama` (SentencePiece pieces with scores, Llama 2). The SentencePiece vocabulary becomes a
//! byte-fallback BPE whose merges are ordered by piece score, the same conversion transformers
//! applies to `tokenizer.model`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama 3's pre-tokenizer split (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's split, llama.cpp's `default` pre-tokenizer.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The `tokenizer.json` document equivalent to the file's GGML tokenizer.
pub fn tokenizer_json(gguf: &GgufFile) -> Result<Json> {
    let model = gguf
        .get_string("tokenizer.ggml.model")
        .ok_or_else(|| EngineError::Tokenizer("the GGUF file has no tokenizer (tokenizer.ggml.model)".into()))?;
    let tokens = string_array(gguf, "tokenizer.ggml.tokens")?
        .ok_or_else(|| EngineError::Tokenizer("missing tokenizer.ggml.tokens".into()))?;
    let types = match gguf.get("tokenizer.ggml.token_type") {
        Some(Value::Array(values)) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let special_id = |key: &str| gguf.get_usize(&format!("tokenizer.ggml.{key}_token_id")).ok().flatten();
    let bos = special_id("bos").and_then(|id| tokens.get(id).map(|t| (id, t.clone())));
    let eos = special_id("eos").and_then(|id| tokens.get(id).map(|t| (id, t.clone())));
    let add_bos = gguf.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
    let add_eos = gguf.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);

    let added_tokens: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| matches!(t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED | TOKEN_TYPE_UNKNOWN))
        .map(|(id, (content, &t))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": t != TOKEN_TYPE_USER_DEFINED,
            })
        })
        .collect();
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    let post_processor = template_processing(bos.filter(|_| add_bos), eos.filter(|_| add_eos));

    let (pre_tokenizer, model_json, decoder) = match model {
        "gpt2" => {
            let pre = gguf.get_string("tokenizer.ggml.pre").unwrap_or("default");
            let (split, ignore_merges) = match pre {
                "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => (LLAMA3_SPLIT, true),
                "default" | "gpt-2" | "gpt2" => (GPT2_SPLIT, false),
                other => {
                    return Err(EngineError::Tokenizer(format!(
                        "unsupported BPE pre-tokenizer `{other}` (supported: llama-bpe, default)"
                    )))
                }
            };
            let merges: Vec<Json> = string_array(gguf, "tokenizer.ggml.merges")?
                .unwrap_or_default()
                .iter()
                .map(|m| match m.split_once(' ') {
                    Some((a, b)) => Ok(json!([a, b])),
                    None => Err(EngineError::Tokenizer(format!("malformed merge `{m}`"))),
                })
                .collect::<Result<_>>()?;
            (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
                ]}),
                json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                       "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                       "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}),
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            )
        }
        "llama" => {
            let scores: Vec<f32> = match gguf.get("tokenizer.ggml.scores") {
                Some(Value::Array(values)) => values.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                _ => vec![0.0; tokens.len()],
            };
            let unk = special_id("unknown").and_then(|id| tokens.get(id).cloned());
            let add_space_prefix = gguf.get_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let merges = sentencepiece_merges(&tokens, &scores, &types);
            (
                json!({"type": "Metaspace", "replacement": "▁",
                       "prepend_scheme": if add_space_prefix { "first" } else { "never" }, "split": false}),
                json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                       "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                       "ignore_merges": false, "vocab": vocab, "merges": merges}),
                json!({"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": if add_space_prefix { 1 } else { 0 }, "stop": 0}
                ]}),
            )
        }
        other => {
            return Err(EngineError::Tokenizer(format!(
                "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
            )))
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model_json,
    }))
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(EngineError::Tokenizer(format!("`{key}` holds a non-string"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => Err(EngineError::Tokenizer(format!("`{key}` is not an array"))),
    }
}

/// BOS/EOS insertion, as `tokenizer.json` spells it.
fn template_processing(bos: Option<(usize, String)>, eos: Option<(usize, String)>) -> Json {
    if bos.is_none() && eos.is_none() {
        return Json::Null;
    }
    let special = |t: &Option<(usize, String)>| t.as_ref().map(|(_, s)| json!({"SpecialToken": {"id": s, "type_id": 0}}));
    let sequence = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    let wrap = |id: &str| -> Vec<Json> {
        special(&bos).into_iter().chain([sequence(id)]).chain(special(&eos)).collect()
    };
    let mut pair = wrap("A");
    pair.extend(wrap("B"));
    let special_tokens: serde_json::Map<String, Json> = [&bos, &eos]
        .into_iter()
        .flatten()
        .map(|(id, s)| (s.clone(), json!({"id": s, "ids": [id], "tokens": [s]})))
        .collect();
    json!({"type": "TemplateProcessing", "single": wrap("A"), "pair": pair, "special_tokens": special_tokens})
}

/// Merges for a SentencePiece vocabulary: every split of a piece into two known pieces, ranked
/// by the merged piece's score, then by longer left and right halves (transformers'
/// `generate_merges`; the tie-break matters for vocabularies whose scores are all equal).
fn sentencepiece_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<Json> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).is_some_and(|&t| t != 1) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .collect();
        local.sort();
        merges.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    let chars = |id: usize| tokens[id].chars().count();
    // A stable sort, descending, as Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| chars(b.1).cmp(&chars(a.1)))
            .then_with(|| chars(b.2).cmp(&chars(a.2)))
    });
    merges
        .into_iter()
        .map(|(_, l, r)| json!([tokens[l], tokens[r]]))
        .collect()
}
