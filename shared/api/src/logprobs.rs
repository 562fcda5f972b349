//! The engine's token log-probabilities in OpenAI's two shapes: chat's `content` entries
//! (token, logprob, bytes, alternatives) and the legacy completion's parallel lists.

use llm_engine::{TokenLogprob, Tokenizer};

use crate::openai::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};

/// As JSON numbers: JSON has no -inf, so vLLM's floor stands in for it. Widened to f64 so
/// that JSON bodies and streamed chunks (built as `serde_json::Value`) print the same digits.
fn json_logprob(logprob: f32) -> f64 {
    f64::from(logprob.max(-9999.0))
}

/// A token's text as OpenAI writes it: the text when its bytes are whole UTF-8, else
/// `bytes:\xNN...` for a token holding part of a character.
fn token_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.iter().fold("bytes:".to_string(), |s, b| s + &format!("\\x{b:02x}")),
    }
}

/// Whether clients see `entry`: an end-of-generation token that stopped the sequence adds no
/// text, so it has no entry either (with `ignore_eos`, none stops it, and each has one).
pub fn is_visible(tokenizer: &Tokenizer, entry: &TokenLogprob, ignore_eos: bool) -> bool {
    ignore_eos || !tokenizer.is_stop(entry.token_id)
}

/// The entries clients see ([`is_visible`]).
pub fn visible<'a>(tokenizer: &'a Tokenizer, entries: &'a [TokenLogprob], ignore_eos: bool) -> impl Iterator<Item = &'a TokenLogprob> + 'a {
    entries.iter().filter(move |e| is_visible(tokenizer, e, ignore_eos))
}

pub fn chat_entry(tokenizer: &Tokenizer, entry: &TokenLogprob) -> ChatTokenLogprob {
    let top = |&(id, logprob): &(u32, f32)| {
        let bytes = tokenizer.token_bytes(id);
        TopLogprob { token: token_text(&bytes), logprob: json_logprob(logprob), bytes }
    };
    let bytes = tokenizer.token_bytes(entry.token_id);
    ChatTokenLogprob { token: token_text(&bytes), logprob: json_logprob(entry.logprob), bytes, top_logprobs: entry.top.iter().map(top).collect() }
}

pub fn chat(tokenizer: &Tokenizer, entries: &[TokenLogprob], ignore_eos: bool) -> ChatLogprobs {
    ChatLogprobs { content: visible(tokenizer, entries, ignore_eos).map(|e| chat_entry(tokenizer, e)).collect(), refusal: None }
}

/// The legacy lists for `entries`, whose text starts at byte `offset` of the choice's text.
/// Returns the offset after the last entry, for the next streamed chunk.
pub fn completion<'a>(tokenizer: &Tokenizer, entries: impl IntoIterator<Item = &'a TokenLogprob>, mut offset: usize) -> (CompletionLogprobs, usize) {
    let mut lists = CompletionLogprobs::default();
    for entry in entries {
        let bytes = tokenizer.token_bytes(entry.token_id);
        lists.tokens.push(token_text(&bytes));
        lists.token_logprobs.push(Some(json_logprob(entry.logprob)));
        lists.top_logprobs.push(Some(entry.top.iter().map(|&(id, lp)| (token_text(&tokenizer.token_bytes(id)), json_logprob(lp))).collect()));
        lists.text_offset.push(offset);
        offset += bytes.len();
    }
    (lists, offset)
}

/// The legacy lists for an echoed prompt: its first token (nothing predicts it: `null`), then
/// `entries` for the rest. Returns the offset after the prompt's tokens.
pub fn prompt(tokenizer: &Tokenizer, prompt: &[u32], entries: &[TokenLogprob]) -> (CompletionLogprobs, usize) {
    let mut lists = CompletionLogprobs::default();
    let first = prompt.first().map(|&id| tokenizer.token_bytes(id)).unwrap_or_default();
    lists.tokens.push(token_text(&first));
    lists.token_logprobs.push(None);
    lists.top_logprobs.push(None);
    lists.text_offset.push(0);
    let (rest, offset) = completion(tokenizer, entries, first.len());
    lists.append(rest);
    (lists, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_characters_are_written_as_bytes() {
        assert_eq!(token_text(b" caf\xc3\xa9"), " café");
        assert_eq!(token_text(b"\xe2\x80"), "bytes:\\xe2\\x80");
    }
}
