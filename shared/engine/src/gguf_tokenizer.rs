//! The tokenizer a GGUF file describes: its `tokenizer.huggingface.json` where it carries one,
//! otherwise the Hugging Face tokenizer equivalent to its `tokenizer.ggml.*` keys.
//!
//! Two vocabularies occur in Llama files: `gpt2` (byte-level BPE with merges, Llama 3) and
//! `llama` (SentencePiece pieces with scores, Llama 2). The SentencePiece vocabulary becomes a
//! byte-fallback BPE whose merges are ordered by piece score, the same conversion transformers
//! applies to `tokenizer.model`.
//!
//! The parts are built straight from the file's arrays, not through a `tokenizer.json` text:
//! for Llama 3's vocabulary (128,256 tokens, 280,147 merges) the text and its parse made the
//! tokenizer the largest part of a cold start's load time and memory peak.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The `tokenizer.ggml.pre` names llama.cpp reads as Llama 3's split (Falcon 3's and Pixtral's
/// files name theirs), adding BOS unless the file says otherwise.
const LLAMA3_NAMES: [&str; 5] = ["llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"];
/// Llama 3's pre-tokenizer split (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's split, llama.cpp's `default` pre-tokenizer.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Every digit alone, before GPT-2's split: llama.cpp's `smollm` pre-tokenizer, which SmolLM's
/// and SmolLM2's files name (their tokenizer.json's `Digits` with `individual_digits`).
const DIGITS_SPLIT: &str = r"\p{N}";

/// The file's tokenizer, its `tokenizer.` metadata dropped once read (for Llama 3's: 408,403
/// strings and a copy of tokenizer.json, 52 MiB). A tokenizer.json is taken out first and the
/// rest dropped before it is read, so that reading it reuses their memory rather than adding to
/// it: Llama 3's header and tokenizer peaked 111 MiB above the process's start, now 87 MiB. A
/// download from S3 builds it from the first part while the others arrive, so this peak adds to
/// theirs (most of the download's last 96 MiB wait until it is built).
pub fn read(gguf: &mut GgufFile) -> Result<Tokenizer> {
    let special = SpecialTokens::read(gguf);
    let inner = match gguf.take("tokenizer.huggingface.json") {
        Some(Value::String(json)) => {
            gguf.forget_metadata("tokenizer.");
            Tokenizer::from_json(&json)?
        }
        _ => {
            let inner = ggml_tokenizer(gguf, &special)?;
            gguf.forget_metadata("tokenizer.");
            inner
        }
    };
    // A special token's text is the token list's; a file without one (tokenizer.json only)
    // names its special tokens by id alone, which the tokenizer's vocabulary spells.
    let text = |token: &Option<SpecialToken>| token.as_ref().and_then(|t| t.text.clone().or_else(|| inner.id_to_token(t.id as u32)));
    let (bos, eos) = (text(&special.bos), text(&special.eos));
    Ok(Tokenizer::new(inner, bos, eos, special.stop_ids))
}

/// The tokenizer the file's `tokenizer.ggml.*` keys describe (what llama.cpp reads), whether or
/// not the file carries a tokenizer.json too.
pub fn tokenizer(gguf: &mut GgufFile) -> Result<tokenizers::Tokenizer> {
    let special = SpecialTokens::read(gguf);
    ggml_tokenizer(gguf, &special)
}

/// The special tokens llama.cpp reads from `tokenizer.ggml.*_token_id`.
struct SpecialTokens {
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    /// EOS, end of turn and end of message: each ends generation.
    stop_ids: Vec<u32>,
}

struct SpecialToken {
    id: usize,
    /// As the file's token list spells it, where it has one.
    text: Option<String>,
}

impl SpecialTokens {
    fn read(gguf: &GgufFile) -> Self {
        let id = |key: &str| gguf.get_usize(&format!("tokenizer.ggml.{key}_token_id")).ok().flatten();
        let tokens = match gguf.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => Some(tokens),
            _ => None,
        };
        let special = |key: &str| id(key).map(|id| SpecialToken { id, text: tokens.and_then(|t| t.get(id)).and_then(|t| t.to_string().ok()).cloned() });
        let stop_ids = ["eos", "eot", "eom"].iter().filter_map(|k| id(k)).map(|id| id as u32).collect();
        Self { bos: special("bos"), eos: special("eos"), unk: special("unknown"), stop_ids }
    }
}

/// The tokenizer equivalent to the file's GGML tokenizer, as transformers' `tokenizer.json`
/// for the same model would configure it. The vocabulary's arrays are taken out of the header,
/// not copied, and each merge's text is freed as it is split: with Llama 3's, the header and
/// tokenizer peaked 105 MiB above the process's start, now 74 MiB (a cold start from S3 builds
/// the tokenizer while the weights download, so this peak can add to theirs).
fn ggml_tokenizer(gguf: &mut GgufFile, special: &SpecialTokens) -> Result<tokenizers::Tokenizer> {
    let model = gguf
        .get_string("tokenizer.ggml.model")
        .ok_or_else(|| EngineError::Tokenizer("the GGUF file has no tokenizer (tokenizer.ggml.model)".into()))?
        .to_string();
    let pre = gguf.get_string("tokenizer.ggml.pre").unwrap_or("default").to_string();
    // Without the key, llama.cpp adds BOS for SentencePiece and for Llama 3's split.
    let add_bos = gguf.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama" || LLAMA3_NAMES.contains(&pre.as_str()));
    let add_eos = gguf.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
    let add_space_prefix = gguf.get_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let tokens = take_strings(gguf, "tokenizer.ggml.tokens")?.ok_or_else(|| EngineError::Tokenizer("missing tokenizer.ggml.tokens".into()))?;
    let types: Vec<i32> = match gguf.take("tokenizer.ggml.token_type") {
        Some(Value::Array(values)) => values.iter().map(|v| v.to_i32().unwrap_or(TOKEN_TYPE_NORMAL)).collect(),
        _ => vec![TOKEN_TYPE_NORMAL; tokens.len()],
    };
    let with_text = |token: &Option<SpecialToken>| token.as_ref().and_then(|t| Some((t.id, t.text.clone()?)));
    let (bos, eos, unk) = (with_text(&special.bos), with_text(&special.eos), with_text(&special.unk));
    // Control, unknown and user-defined tokens match whole in the text, before the model sees
    // it (tokenizer.json's `added_tokens`); every one of them is already in the vocabulary, so
    // each keeps its id.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| matches!(t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED | TOKEN_TYPE_UNKNOWN))
        .map(|(content, &t)| AddedToken::from(content.clone(), t != TOKEN_TYPE_USER_DEFINED).normalized(false))
        .collect();

    let (bpe, pre_tokenizer, decoder): (_, PreTokenizerWrapper, DecoderWrapper) = match model.as_str() {
        "gpt2" => {
            let (splits, ignore_merges): (&[&str], bool) = match pre.as_str() {
                name if LLAMA3_NAMES.contains(&name) => (&[LLAMA3_SPLIT], true),
                // Llama 3's split, but its merges kept, as llama.cpp reads Smaug's files.
                "smaug-bpe" => (&[LLAMA3_SPLIT], false),
                "smollm" => (&[DIGITS_SPLIT, GPT2_SPLIT], false),
                "default" | "gpt-2" | "gpt2" => (&[GPT2_SPLIT], false),
                other => return Err(EngineError::Tokenizer(format!("unsupported BPE pre-tokenizer `{other}` (supported: llama-bpe, smollm, default)"))),
            };
            let merges = take_strings(gguf, "tokenizer.ggml.merges")?
                .unwrap_or_default()
                .into_iter()
                .map(|m| match m.split_once(' ') {
                    Some((a, b)) => Ok((a.to_string(), b.to_string())),
                    None => Err(EngineError::Tokenizer(format!("malformed merge `{m}`"))),
                })
                .collect::<Result<Merges>>()?;
            let mut pre_tokenizers = splits
                .iter()
                .map(|&split| {
                    Ok(Split::new(SplitPattern::Regex(split.into()), SplitDelimiterBehavior::Isolated, false).map_err(EngineError::tokenizer)?.into())
                })
                .collect::<Result<Vec<PreTokenizerWrapper>>>()?;
            pre_tokenizers.push(ByteLevel::new(false, true, false).into());
            (
                BPE::builder().vocab_and_merges(vocab(tokens), merges).ignore_merges(ignore_merges),
                PreTokenizerSequence::new(pre_tokenizers).into(),
                ByteLevel::new(true, true, true).into(),
            )
        }
        "llama" => {
            let scores: Vec<f32> = match gguf.take("tokenizer.ggml.scores") {
                Some(Value::Array(values)) => values.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                _ => vec![0.0; tokens.len()],
            };
            let merges = sentencepiece_merges(&tokens, &scores, &types);
            let mut bpe = BPE::builder().vocab_and_merges(vocab(tokens), merges).fuse_unk(true).byte_fallback(true);
            if let Some((_, unk)) = unk {
                bpe = bpe.unk_token(unk);
            }
            let prepend = if add_space_prefix { PrependScheme::First } else { PrependScheme::Never };
            let decoders: Vec<DecoderWrapper> = vec![
                Replace::new("▁", " ").map_err(EngineError::tokenizer)?.into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
                Strip::new(' ', usize::from(add_space_prefix), 0).into(),
            ];
            (bpe, Metaspace::new('▁', prepend, false).into(), DecoderSequence::new(decoders).into())
        }
        other => return Err(EngineError::Tokenizer(format!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"))),
    };

    let mut tokenizer = tokenizers::Tokenizer::new(bpe.build().map_err(EngineError::tokenizer)?);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer)).with_decoder(Some(decoder));
    let (bos, eos) = (bos.as_ref().map(|(id, s)| (*id, s.as_str())), eos.as_ref().map(|(id, s)| (*id, s.as_str())));
    if let Some(processor) = template_processing(bos.filter(|_| add_bos), eos.filter(|_| add_eos))? {
        tokenizer.with_post_processor(Some(processor));
    }
    tokenizer.add_tokens(added).map_err(EngineError::tokenizer)?;
    Ok(tokenizer)
}

/// Token `i`'s text with id `i`, the texts moved, not copied.
fn vocab(tokens: Vec<String>) -> Vocab {
    tokens.into_iter().enumerate().map(|(id, t)| (t, id as u32)).collect()
}

/// The strings of the array under `key`, taken out of the header.
fn take_strings(gguf: &mut GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    match gguf.take(key) {
        None => Ok(None),
        Some(Value::Array(values)) => values
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(EngineError::Tokenizer(format!("`{key}` holds a non-string"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => Err(EngineError::Tokenizer(format!("`{key}` is not an array"))),
    }
}

/// BOS/EOS insertion; read from its `tokenizer.json` spelling because tokenizers' template
/// builder parses token texts as template syntax (a `:` or a leading `$` would change them).
fn template_processing(bos: Option<(usize, &str)>, eos: Option<(usize, &str)>) -> Result<Option<TemplateProcessing>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let special = |t: &Option<(usize, &str)>| t.map(|(_, s)| json!({"SpecialToken": {"id": s, "type_id": 0}}));
    let sequence = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    let wrap = |id: &str| -> Vec<Json> { special(&bos).into_iter().chain([sequence(id)]).chain(special(&eos)).collect() };
    let mut pair = wrap("A");
    pair.extend(wrap("B"));
    let special_tokens: serde_json::Map<String, Json> =
        [bos, eos].into_iter().flatten().map(|(id, s)| (s.to_string(), json!({"id": s, "ids": [id], "tokens": [s]}))).collect();
    let processor = json!({"type": "TemplateProcessing", "single": wrap("A"), "pair": pair, "special_tokens": special_tokens});
    serde_json::from_value(processor).map(Some).map_err(EngineError::tokenizer)
}

/// Merges for a SentencePiece vocabulary: every split of a piece into two known pieces, ranked
/// by the merged piece's score, then by longer left and right halves (transformers'
/// `generate_merges`; the tie-break matters for vocabularies whose scores are all equal).
fn sentencepiece_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Merges {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).is_some_and(|&t| t != TOKEN_TYPE_NORMAL) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize)> =
            piece.char_indices().skip(1).filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?))).collect();
        local.sort();
        merges.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    let chars = |id: usize| tokens[id].chars().count();
    // A stable sort, descending, as Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| chars(b.1).cmp(&chars(a.1))).then_with(|| chars(b.2).cmp(&chars(a.2))));
    merges.into_iter().map(|(_, l, r)| (tokens[l].to_string(), tokens[r].to_string())).collect()
}
