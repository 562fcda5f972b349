//! Text ↔ token ids, special tokens, and UTF-8-safe incremental decoding for streaming.

use std::collections::BTreeSet;

use crate::error::{EngineError, Result};

/// A tokenizer with the special tokens generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<String>,
    eos: Option<String>,
    /// Every token that ends generation (EOS, end-of-turn, ...).
    stop_ids: BTreeSet<u32>,
    /// GPT-2 style vocabulary: token texts spell bytes with printable stand-in characters.
    byte_level: bool,
}

/// Texts of tokens that llama.cpp also treats as end of generation.
const END_OF_GENERATION: &[&str] = &["</s>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"];

impl Tokenizer {
    /// `bos`/`eos` are token texts; `stop_ids` are extra end-of-generation ids (e.g. from
    /// `generation_config.json`).
    pub fn new(inner: tokenizers::Tokenizer, bos: Option<String>, eos: Option<String>, stop_ids: impl IntoIterator<Item = u32>) -> Self {
        let mut stop_ids: BTreeSet<u32> = stop_ids.into_iter().collect();
        stop_ids.extend(eos.as_deref().and_then(|t| inner.token_to_id(t)));
        stop_ids.extend(
            END_OF_GENERATION
                .iter()
                .filter_map(|t| inner.token_to_id(t))
                .filter(|&id| inner.get_added_vocabulary().is_special_token(&inner.id_to_token(id).unwrap_or_default())),
        );
        let byte_level = serde_json::to_string(&inner.get_decoder()).is_ok_and(|d| d.contains("\"ByteLevel\""));
        Self { inner, bos, eos, stop_ids, byte_level }
    }

    /// The tokenizer a `tokenizer.json` text describes, checked before tokenizers reads it.
    pub fn from_json(json: &str) -> Result<tokenizers::Tokenizer> {
        crate::tokenizer_json::read(json)
    }

    /// Encodes `text`; with `add_special_tokens` the tokenizer's post-processor adds BOS/EOS as
    /// configured (what `tokenizer(text)` does in transformers).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(EngineError::tokenizer)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(EngineError::tokenizer)
    }

    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(EngineError::tokenizer)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// The id of the end-of-sequence token, when the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_deref().and_then(|t| self.inner.token_to_id(t))
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    pub fn stop_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.stop_ids.iter().copied()
    }

    /// The bytes token `id` stands for in decoded text (a token may hold part of a UTF-8
    /// character); special tokens give their own text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else { return Vec::new() };
        if self.inner.get_added_vocabulary().is_special_token(&piece) {
            return piece.into_bytes();
        }
        if self.byte_level {
            return piece.chars().filter_map(byte_level_byte).collect();
        }
        // SentencePiece: byte-fallback tokens `<0xAB>`, and `▁` for spaces.
        match piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(byte) if piece.len() == 6 => vec![byte],
            _ => piece.replace('\u{2581}', " ").into_bytes(),
        }
    }

    /// One more than the largest id the tokenizer can produce.
    pub fn id_limit(&self) -> usize {
        let added = self.inner.get_added_tokens_decoder().keys().max().map_or(0, |&m| m as usize + 1);
        self.inner.get_vocab_size(false).max(added)
    }

    /// Fails when the tokenizer can emit ids the model has no embedding for.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let limit = self.id_limit();
        if limit > vocab_size {
            return Err(EngineError::Tokenizer(format!("the tokenizer has ids up to {} but the model's vocabulary has only {vocab_size} entries", limit - 1)));
        }
        Ok(())
    }
}

/// GPT-2's byte-level alphabet: printable Latin-1 bytes are themselves, the other 68 bytes are
/// mapped in order to U+0100 and up.
fn byte_level_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The byte a GPT-2 byte-level character stands for.
fn byte_level_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 && byte_level_printable(code as u8) {
        return Some(code as u8);
    }
    let n = code.checked_sub(256)? as usize;
    (0..=255u8).filter(|&b| !byte_level_printable(b)).nth(n)
}

/// The character that stands for each byte (index) in a byte-level BPE vocabulary.
pub fn byte_level_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = match byte_level_printable(b) {
            true => b as char,
            false => {
                next += 1;
                char::from_u32(next - 1).unwrap_or('\u{FFFD}')
            }
        };
    }
    chars
}

/// Turns a stream of token ids into text pieces, never splitting a UTF-8 character: a token
/// that ends inside a multi-byte character is held back until the character is complete.
/// The concatenated pieces equal decoding all ids at once.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

/// Prompt tokens decoded before the first generated one: enough for the tokenizer to see a
/// word boundary, so a completion keeps its leading space (as in vLLM, llama.cpp and the
/// transformers pipeline: prompt text + completion text = the decoded whole).
const CONTEXT_TOKENS: usize = 6;

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self { ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// A decoder for tokens that continue `prompt`.
    pub fn after(prompt: &[u32]) -> Self {
        let context = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let read_offset = context.len();
        Self { ids: context, prefix_offset: 0, read_offset }
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// The text still held back (an incomplete character at the end of the stream).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}
