//! One sequence's state during generation: its sampler, context, stop conditions, and the
//! text it may hand to a stream (held back while it could still be the start of a stop string).

use crate::error::Result;
use crate::generate::{FinishReason, GenerationRequest};
use crate::logprobs::TokenLogprob;
use crate::sampling::Sampler;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// The state of one sequence during generation.
pub(crate) struct Sequence {
    pub(crate) sampler: Sampler,
    /// Prompt and generated ids (for the repetition penalty).
    pub(crate) context: Vec<u32>,
    pub(crate) generated: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    /// `Some(n)` records log-probabilities with `n` alternatives.
    pub(crate) top_logprobs: Option<usize>,
    pub(crate) logprobs: Vec<TokenLogprob>,
    decoder: IncrementalDecoder,
    /// Decoded text so far; cut at a stop string when one appears.
    pub(crate) text: String,
    /// How much of `text` has been handed to the caller.
    emitted: usize,
    /// No more text will be appended (the decoder was flushed or a stop string cut it).
    text_final: bool,
    pub(crate) finish: Option<FinishReason>,
}

impl Sequence {
    pub(crate) fn new(r: &GenerationRequest, context: usize) -> Self {
        let room = context.saturating_sub(r.prompt.len());
        let mut seq = Self {
            sampler: Sampler::new(r.sampling.clone()),
            context: r.prompt.clone(),
            generated: Vec::new(),
            max_tokens: r.max_tokens.min(room),
            stop: r.stop.clone(),
            ignore_eos: r.ignore_eos,
            top_logprobs: r.logprobs,
            logprobs: Vec::new(),
            decoder: IncrementalDecoder::after(&r.prompt),
            text: String::new(),
            emitted: 0,
            text_final: false,
            finish: None,
        };
        if seq.max_tokens == 0 {
            seq.finish = Some(FinishReason::Length);
            seq.text_final = true;
        }
        seq
    }

    pub(crate) fn finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Records `token`; returns the text that can be released to a stream now.
    pub(crate) fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String> {
        self.context.push(token);
        self.generated.push(token);
        if tokenizer.is_stop(token) && !self.ignore_eos {
            self.finalize(tokenizer, FinishReason::Stop)?;
            return Ok(self.take_all());
        }
        let piece = self.decoder.push(tokenizer, token)?;
        self.text.push_str(&piece);
        if self.cut_at_stop_string() {
            self.finish = Some(FinishReason::Stop);
            self.text_final = true;
            return Ok(self.take_all());
        }
        if self.generated.len() >= self.max_tokens {
            self.finalize(tokenizer, FinishReason::Length)?;
            return Ok(self.take_all());
        }
        Ok(self.take_releasable())
    }

    /// Ends the sequence: held-back bytes join the text, which may still reveal a stop string.
    fn finalize(&mut self, tokenizer: &Tokenizer, reason: FinishReason) -> Result<()> {
        self.finish = Some(reason);
        if !self.text_final {
            let tail = self.decoder.flush(tokenizer)?;
            self.text.push_str(&tail);
            if self.cut_at_stop_string() {
                self.finish = Some(FinishReason::Stop);
            }
            self.text_final = true;
        }
        Ok(())
    }

    /// Whatever was not released yet, once generation is over.
    pub(crate) fn close(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if !self.text_final {
            let reason = self.finish.unwrap_or(FinishReason::Length);
            self.finalize(tokenizer, reason)?;
        }
        Ok(self.take_all())
    }

    /// Truncates `text` at the earliest stop string; true if one was found.
    fn cut_at_stop_string(&mut self) -> bool {
        let earliest = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min();
        match earliest {
            Some(at) => {
                self.text.truncate(at);
                self.emitted = self.emitted.min(at);
                true
            }
            None => false,
        }
    }

    /// Text that cannot be the start of a stop string any more.
    fn take_releasable(&mut self) -> String {
        let mut end = self.text.len();
        if !self.finished() {
            let held = self.stop.iter().map(|s| longest_suffix_prefix(&self.text, s)).max().unwrap_or(0);
            end -= held;
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
        }
        let start = self.emitted.min(end);
        self.emitted = end.max(self.emitted);
        self.text[start..end].to_string()
    }

    fn take_all(&mut self) -> String {
        let start = self.emitted.min(self.text.len());
        self.emitted = self.text.len();
        self.text[start..].to_string()
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_prefix_overlap() {
        assert_eq!(longest_suffix_prefix("hello wor", "world"), 3);
        assert_eq!(longest_suffix_prefix("hello", "xyz"), 0);
        assert_eq!(longest_suffix_prefix("ab", "b"), 0);
    }
}
