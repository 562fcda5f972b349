//! Reads a Hugging Face `tokenizer.json`: checked first (tokenizers panics on some malformed
//! files instead of refusing them), and with a BPE model's vocabulary and merges read straight
//! into the maps tokenizers builds from them.
//!
//! tokenizers' own reader takes the model through untagged enums, which hold the whole model
//! object as serde `Content` and then as a `serde_json::Value` before reading it: for Llama 3's
//! vocabulary (128,256 tokens, 280,147 merges) those copies were the largest part of a model
//! load's memory peak, which glibc keeps afterwards. Other models, and BPE ones without a
//! `type`, still go through tokenizers' reader. Where the two readers differ: a top-level key
//! given twice is refused here (tokenizers keeps the last one), and in a BPE model a later `null`
//! option leaves an earlier value standing (tokenizers keeps the `null`).

use serde::de::{Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder, TruncationParams,
};

use crate::error::{EngineError, Result};

/// The tokenizer a `tokenizer.json` text describes.
pub(crate) fn read(json: &str) -> Result<tokenizers::Tokenizer> {
    // tokenizers panics (`expect("Helper")`) on some malformed JSON inside a decoder object
    // instead of returning an error (found by fuzzing; a lone surrogate escape is one): only
    // JSON that serde_json reads as strictly as into a `Value` reaches it.
    serde_json::from_str::<CheckedJson>(json).map_err(|e| EngineError::Tokenizer(format!("tokenizer.json is not JSON: {e}")))?;
    // An error here (a second `post_processor`, say) must not let an unchecked one through.
    let outline = serde_json::from_str::<Outline>(json).map_err(|e| EngineError::Tokenizer(format!("tokenizer.json: {e}")))?;
    check_template_tokens(&outline.post_processor)?;
    match outline.model.kind.as_deref() {
        Some("BPE") => serde_json::from_str::<BpeTokenizerFile>(json).map_err(|e| EngineError::Tokenizer(format!("tokenizer.json: {e}")))?.build(),
        // Other models, and untyped ones (tokenizers guesses their type), tokenizers reads itself.
        _ => json.parse::<tokenizers::Tokenizer>().map_err(EngineError::tokenizer),
    }
}

/// Any JSON value, read as strictly as into a `serde_json::Value` (every string unescaped, so a
/// lone surrogate is an error, which `serde::de::IgnoredAny` lets through) and kept nowhere.
struct CheckedJson;

impl<'de> Deserialize<'de> for CheckedJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedJson)
    }
}

impl<'de> Visitor<'de> for CheckedJson {
    type Value = CheckedJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> std::result::Result<Self, A::Error> {
        while items.next_element::<CheckedJson>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> std::result::Result<Self, A::Error> {
        while entries.next_entry::<CheckedJson, CheckedJson>()?.is_some() {}
        Ok(self)
    }
}

/// The parts of a tokenizer.json read before the whole: the post-processor, for
/// [`check_template_tokens`], and the model's type. Every other field is skipped (after
/// [`CheckedJson`] has read it), not kept.
#[derive(Deserialize)]
struct Outline {
    #[serde(default)]
    post_processor: serde_json::Value,
    #[serde(default)]
    model: ModelOutline,
}

#[derive(Deserialize, Default)]
struct ModelOutline {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// A `TemplateProcessing` post-processor may only name special tokens it defines, and its
/// `single` template only the one sequence there is (`A`): tokenizers checks both when one is
/// built, not when one is read, and panics while encoding otherwise (found by fuzzing). Checked
/// by shape, not by `type`: tokenizers also reads untyped ones.
fn check_template_tokens(processor: &serde_json::Value) -> Result<()> {
    processor["processors"].as_array().into_iter().flatten().try_for_each(check_template_tokens)?;
    let pieces = ["single", "pair"].into_iter().flat_map(|t| processor[t].as_array().into_iter().flatten());
    for id in pieces.filter_map(|piece| piece["SpecialToken"]["id"].as_str()) {
        if processor["special_tokens"].get(id).is_none() {
            return Err(EngineError::Tokenizer(format!("the post-processor's template uses `{id}`, which is not among its special tokens")));
        }
    }
    let single = processor["single"].as_array().into_iter().flatten();
    if let Some(id) = single.filter_map(|piece| piece["Sequence"]["id"].as_str()).find(|id| *id != "A") {
        return Err(EngineError::Tokenizer(format!("the post-processor's single-sequence template uses sequence `{id}`")));
    }
    Ok(())
}

/// A tokenizer.json whose model is a BPE, with the fields tokenizers reads (its
/// `tokenizer/serialization.rs`, which refuses any other); the other parts are small and read by
/// tokenizers' own types.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BpeTokenizerFile {
    /// Present, it must be a string (tokenizers refuses `null`).
    #[serde(default, deserialize_with = "present_string")]
    version: Option<String>,
    truncation: Option<TruncationParams>,
    padding: Option<PaddingParams>,
    #[serde(default)]
    added_tokens: Vec<AddedTokenWithId>,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    model: BpeModel,
    decoder: Option<DecoderWrapper>,
    post_processor: Option<PostProcessorWrapper>,
}

fn present_string<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<String>, D::Error> {
    String::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct AddedTokenWithId {
    id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

impl BpeTokenizerFile {
    fn build(self) -> Result<tokenizers::Tokenizer> {
        if let Some(version) = self.version.filter(|v| v != "1.0") {
            return Err(EngineError::Tokenizer(format!("unknown tokenizer.json version `{version}`")));
        }
        // Assembled as tokenizers' reader assembles it: `TokenizerImpl::with_truncation` would
        // also check the truncation against the post-processor, in arithmetic that overflows
        // on hostile values, where tokenizers checks nothing.
        let mut tokenizer: tokenizers::Tokenizer = TokenizerBuilder::new()
            .with_model(ModelWrapper::from(self.model.0))
            .with_normalizer(self.normalizer)
            .with_pre_tokenizer(self.pre_tokenizer)
            .with_post_processor(self.post_processor)
            .with_decoder(self.decoder)
            .with_truncation(self.truncation)
            .with_padding(self.padding)
            .build()
            .map_err(EngineError::tokenizer)?
            .into();
        // As tokenizers does: a token already in the vocabulary keeps the vocabulary's id.
        for added in &self.added_tokens {
            if let Some(id) = tokenizer.token_to_id(&added.token.content).filter(|&id| id != added.id) {
                tracing::warn!(token = added.token.content, expected = added.id, id, "an added token's id differs from the vocabulary's");
            }
        }
        tokenizer.add_tokens(self.added_tokens.into_iter().map(|t| t.token)).map_err(EngineError::tokenizer)?;
        Ok(tokenizer)
    }
}

/// A BPE model object, read as tokenizers' `BPEVisitor` reads one, except that the merges go
/// straight into a list (tokenizers buffers them to tell their two spellings apart).
struct BpeModel(BPE);

impl<'de> Deserialize<'de> for BpeModel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(BpeModelVisitor)
    }
}

struct BpeModelVisitor;

impl<'de> Visitor<'de> for BpeModelVisitor {
    type Value = BpeModel;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a BPE model")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<BpeModel, A::Error> {
        let mut builder = BPE::builder();
        let (mut vocab, mut merges): (Option<Vocab>, Option<MergeList>) = (None, None);
        // An option's `null` leaves the builder's default, as in tokenizers.
        macro_rules! option {
            ($set:ident) => {
                match map.next_value()? {
                    Some(value) => builder.$set(value),
                    None => builder,
                }
            };
        }
        while let Some(key) = map.next_key::<String>()? {
            builder = match key.as_str() {
                "type" => match map.next_value::<String>()?.as_str() {
                    "BPE" => builder,
                    other => return Err(A::Error::invalid_value(serde::de::Unexpected::Str(other), &"BPE")),
                },
                "dropout" => option!(dropout),
                "unk_token" => option!(unk_token),
                "continuing_subword_prefix" => option!(continuing_subword_prefix),
                "end_of_word_suffix" => option!(end_of_word_suffix),
                "fuse_unk" => option!(fuse_unk),
                "byte_fallback" => option!(byte_fallback),
                "ignore_merges" => option!(ignore_merges),
                "vocab" => {
                    vocab = Some(map.next_value()?);
                    builder
                }
                "merges" => {
                    merges = Some(map.next_value()?);
                    builder
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    builder
                }
            };
        }
        let (Some(vocab), Some(MergeList(merges))) = (vocab, merges) else { return Err(A::Error::custom("Missing vocab/merges")) };
        builder.vocab_and_merges(vocab, merges).build().map(BpeModel).map_err(A::Error::custom)
    }
}

/// `merges` in either spelling, one per list: `["a", "b"]` pairs, or the older `"a b"` lines
/// (where, as in tokenizers, a `#version` line is skipped and a line must hold exactly two
/// tokens).
struct MergeList(Merges);

impl<'de> Deserialize<'de> for MergeList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_seq(MergeListVisitor)
    }
}

struct MergeListVisitor;

impl<'de> Visitor<'de> for MergeListVisitor {
    type Value = MergeList;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of merges")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> std::result::Result<MergeList, A::Error> {
        let mut merges = Merges::with_capacity(items.size_hint().unwrap_or(0));
        let mut lines = None;
        while let Some(merge) = items.next_element::<Merge>()? {
            if *lines.get_or_insert(merge.is_line()) != merge.is_line() {
                return Err(A::Error::custom("merges mix pairs and lines"));
            }
            match merge {
                Merge::Pair(a, b) | Merge::Line(a, b) => merges.push((a, b)),
                Merge::Version => {}
                Merge::Malformed => return Err(A::Error::custom(format!("Merges text file invalid at line {}", merges.len() + 1))),
            }
        }
        Ok(MergeList(merges))
    }
}

enum Merge {
    Pair(String, String),
    Line(String, String),
    /// A `#version` line.
    Version,
    /// A line of other than two tokens.
    Malformed,
}

impl Merge {
    fn is_line(&self) -> bool {
        !matches!(self, Merge::Pair(..))
    }
}

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(MergeVisitor)
    }
}

struct MergeVisitor;

impl<'de> Visitor<'de> for MergeVisitor {
    type Value = Merge;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a merge: a pair of tokens, or a line of two")
    }

    fn visit_str<E: serde::de::Error>(self, line: &str) -> std::result::Result<Merge, E> {
        if line.starts_with("#version") {
            return Ok(Merge::Version);
        }
        let mut parts = line.split(' ');
        Ok(match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => Merge::Line(a.to_string(), b.to_string()),
            _ => Merge::Malformed,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut pair: A) -> std::result::Result<Merge, A::Error> {
        let a = pair.next_element()?.ok_or_else(|| A::Error::invalid_length(0, &self))?;
        let b = pair.next_element()?.ok_or_else(|| A::Error::invalid_length(1, &self))?;
        if pair.next_element::<IgnoredAny>()?.is_some() {
            return Err(A::Error::invalid_length(3, &self));
        }
        Ok(Merge::Pair(a, b))
    }
}
