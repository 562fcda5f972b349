//! Batched text generation: one prefill pass over all prompts, then one decode pass per step,
//! each sequence with its own sampler, stop conditions and streaming text.

use std::ops::{ControlFlow, Range};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::logprobs::{token_logprob, TokenLogprob};
use crate::model::{KvCache, Llama, Logits, ONE_UNPADDED_ROW};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    /// Token ids, special tokens included (see [`Tokenizer::encode`]).
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these; the text excludes it.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens (benchmarks, parity checks).
    pub ignore_eos: bool,
    /// Record each generated token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context window ran out, or the caller stopped generation.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated ids; an end-of-generation token that stopped the sequence is the last one.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// One entry per generated id when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
}

/// One generated token, as it is produced.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    /// Index of the request in the batch.
    pub index: usize,
    /// `None` for text released after the last token (held-back bytes at the end).
    pub token_id: Option<u32>,
    /// Text this token completes; empty while a character or a possible stop string is pending.
    pub text: &'a str,
    /// The token's log-probability, when the request asked for them.
    pub logprob: Option<&'a TokenLogprob>,
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt tokens whose keys and values came from the [`PromptCache`], not a prefill.
    pub cached_prompt_tokens: usize,
    pub prefill: Duration,
    pub decode: Duration,
    /// Decode steps (each extends every unfinished sequence by one token).
    pub decode_steps: usize,
}

/// The KV cache of the last request of one sequence and the tokens it holds, kept between
/// requests: a prompt that starts as that request's prompt and completion did (a system prompt,
/// a conversation's earlier turns) runs only what follows, as llama.cpp's server
/// (`cache_prompt`) and vLLM's prefix caching do. It holds one row: the last request's sequence
/// when it had one; else the prompt its sequences shared, or the start its prompts shared, copied
/// before the batch's rows were made of it (one row beside the batch's own).
#[derive(Debug, Default)]
pub struct PromptCache {
    tokens: Vec<u32>,
    kv: Option<KvCache>,
}

impl PromptCache {
    /// A cache for a batch whose prompts all start with `start`, and how many of those tokens
    /// it already holds.
    fn take(&mut self, model: &Llama, start: &[u32]) -> Result<(KvCache, usize)> {
        let shared = shared_start(&self.tokens, start);
        let kv = self.kv.take();
        self.tokens.clear();
        Ok(match kv {
            Some(mut kv) if shared > 0 => {
                kv.truncate(shared)?;
                (kv, shared)
            }
            _ => (model.new_cache(), 0),
        })
    }

    /// Holds `kv`, one row whose positions hold `tokens`, for the next batch.
    fn keep(&mut self, tokens: &[u32], kv: KvCache) {
        self.tokens = tokens.to_vec();
        self.kv = Some(kv);
    }
}

/// How many tokens `a` and `b` start with alike.
fn shared_start(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(a, b)| a == b).count()
}

/// Positions a batch's shared start must save (its length beyond the prompt cache's, times
/// the rows but one) to run once in a pass of its own: a pass reads every weight, as a decode
/// step does, whatever its length.
const SHARED_START_SAVES: usize = 16;

/// Generates completions for `requests` in one batch. `on_token` sees every token as it is
/// sampled; returning `Break` ends generation for all sequences (`finish_reason: length`).
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    requests: &[GenerationRequest],
    on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<(Vec<Completion>, GenerationStats)> {
    generate_cached(model, tokenizer, requests, &mut PromptCache::default(), on_token)
}

/// [`generate`], starting from what `prompt_cache` holds of the start the prompts share, and
/// leaving there what the next request may start from (see [`PromptCache`]).
pub fn generate_cached(
    model: &Llama,
    tokenizer: &Tokenizer,
    requests: &[GenerationRequest],
    prompt_cache: &mut PromptCache,
    mut on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<(Vec<Completion>, GenerationStats)> {
    let context = model.config().max_position_embeddings;
    let vocab = model.config().vocab_size;
    for r in requests {
        validate(r, context, vocab)?;
    }
    let mut seqs: Vec<Sequence> = requests.iter().map(|r| Sequence::new(r, context)).collect();
    let mut stats = GenerationStats { prompt_tokens: requests.iter().map(|r| r.prompt.len()).sum(), ..Default::default() };
    if requests.is_empty() {
        return Ok((Vec::new(), stats));
    }

    let started = Instant::now();
    let Prefilled { mut cache, mut logits, mut padding, cached } = prefill_batch(model, requests, prompt_cache)?;
    stats.cached_prompt_tokens = cached;
    stats.prefill = started.elapsed();

    // `active[row]` is the sequence index decoded in batch row `row`.
    let mut active: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].finished()).collect();
    let started = Instant::now();
    let mut stopped_by_caller = false;
    while !active.is_empty() {
        let rows = logits.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(active.len());
        for (row, &i) in active.iter().enumerate() {
            let seq = &mut seqs[i];
            let token = seq.sampler.sample(&rows[row], &seq.context);
            if let Some(top_n) = seq.top_logprobs {
                seq.logprobs.push(token_logprob(&rows[row], token, top_n));
            }
            let piece = seq.push(tokenizer, token)?;
            stats.generated_tokens += 1;
            let flow = on_token(TokenEvent { index: i, token_id: Some(token), text: &piece, logprob: seq.logprobs.last() });
            stopped_by_caller |= flow.is_break();
            next.push(token);
        }
        if stopped_by_caller {
            for &i in &active {
                seqs[i].finish.get_or_insert(FinishReason::Length);
            }
        }
        let keep: Vec<usize> = (0..active.len()).filter(|&row| !seqs[active[row]].finished()).collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            let rows: Vec<u32> = keep.iter().map(|&row| row as u32).collect();
            cache.retain_rows(&rows)?;
            padding = keep.iter().map(|&row| padding[row].clone()).collect();
            next = keep.iter().map(|&row| next[row]).collect();
            active = keep.iter().map(|&row| active[row]).collect();
        }
        let input = Tensor::from_vec(next, (active.len(), 1), model.device())?;
        logits = model.forward(&input, &padding, &mut cache, Logits::Last)?;
        stats.decode_steps += 1;
    }
    stats.decode = started.elapsed();
    if let [seq] = seqs.as_slice() {
        prompt_cache.keep(&seq.context[..cache.len()], cache);
    }

    let mut completions = Vec::with_capacity(seqs.len());
    for (i, mut seq) in seqs.into_iter().enumerate() {
        let tail = seq.close(tokenizer)?;
        if !tail.is_empty() {
            let _ = on_token(TokenEvent { index: i, token_id: None, text: &tail, logprob: None });
        }
        completions.push(Completion {
            token_ids: seq.generated,
            text: seq.text,
            finish_reason: seq.finish.unwrap_or(FinishReason::Length),
            logprobs: seq.logprobs,
        });
    }
    Ok((completions, stats))
}

/// A batch after its prompts ran: a cache row per request, each request's logits at its last
/// prompt position, each row's padding, and how many prompt tokens the prompt cache held.
struct Prefilled {
    cache: KvCache,
    logits: Tensor,
    padding: Vec<Range<usize>>,
    cached: usize,
}

/// Runs the prompts of `requests` as little as it can. Identical prompts (a request's `n`
/// choices) run once and their cache rows are copied. The start all prompts share (but the
/// last token of the shortest, whose logits start its generation) comes from the prompt cache,
/// or runs once in a row of its own when that saves enough; that row is copied to every
/// prompt's, and each prompt's rest is padded after it, so that all end together.
fn prefill_batch(model: &Llama, requests: &[GenerationRequest], prompt_cache: &mut PromptCache) -> Result<Prefilled> {
    let mut prompts: Vec<&[u32]> = Vec::new();
    let row_of: Vec<u32> = requests
        .iter()
        .map(|r| {
            let row = prompts.iter().position(|p| *p == r.prompt.as_slice()).unwrap_or_else(|| {
                prompts.push(&r.prompt);
                prompts.len() - 1
            });
            row as u32
        })
        .collect();
    let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
    let common = prompts.iter().map(|p| shared_start(p, prompts[0])).min().unwrap_or(0).min(shortest - 1);
    let (mut cache, cached) = prompt_cache.take(model, &prompts[0][..common])?;
    let start = if (prompts.len() - 1) * (common - cached) >= SHARED_START_SAVES {
        prefill(model, &prompts[0][cached..common], ONE_UNPADDED_ROW, &mut cache)?;
        common
    } else {
        cached
    };
    if start > 0 && prompts.len() > 1 {
        let rows = cache.copy_rows(&vec![0; prompts.len()])?;
        prompt_cache.keep(&prompts[0][..start], std::mem::replace(&mut cache, rows));
    }
    let longest = prompts.iter().map(|p| p.len() - start).max().unwrap_or(0);
    let prompt_padding: Vec<Range<usize>> = prompts.iter().map(|p| start..start + longest - (p.len() - start)).collect();
    let mut tokens = Vec::with_capacity(prompts.len() * longest);
    for (p, padding) in prompts.iter().zip(&prompt_padding) {
        tokens.extend(std::iter::repeat_n(0u32, padding.len()));
        tokens.extend(&p[start..]);
    }
    let mut logits = prefill(model, &tokens, &prompt_padding, &mut cache)?;
    let padding = row_of.iter().map(|&row| prompt_padding[row as usize].clone()).collect();
    if prompts.len() < requests.len() {
        let rows = cache.copy_rows(&row_of)?;
        let prompt = std::mem::replace(&mut cache, rows);
        if let [one] = prompts.as_slice() {
            prompt_cache.keep(one, prompt);
        }
        logits = logits.index_select(&Tensor::new(row_of.as_slice(), model.device())?, 0)?;
    }
    Ok(Prefilled { cache, logits, padding, cached })
}

/// Positions of all rows that one forward pass of a prompt takes at most, as llama.cpp's
/// `n_ubatch` (512) bounds its: a pass's activations grow with its positions (one pass over a
/// 2,000-token prompt of TinyLlama's shape peaked 130 MiB above the weights and KV cache).
const PREFILL_POSITIONS: usize = 512;

/// Runs `tokens` (rows of equal length, padded at `padding`) through `model` after what `cache`
/// holds, in passes of at most [`PREFILL_POSITIONS`]; the last position's logits.
fn prefill(model: &Llama, tokens: &[u32], padding: &[Range<usize>], cache: &mut KvCache) -> Result<Tensor> {
    let (rows, len) = (padding.len(), tokens.len() / padding.len());
    let chunk = (PREFILL_POSITIONS / rows).max(1);
    let mut start = 0;
    loop {
        let n = chunk.min(len - start);
        let part: Vec<u32> = tokens.chunks_exact(len).flat_map(|row| &row[start..start + n]).copied().collect();
        let logits = model.forward(&Tensor::from_vec(part, (rows, n), model.device())?, padding, cache, Logits::Last)?;
        start += n;
        if start == len {
            return Ok(logits);
        }
    }
}

fn validate(r: &GenerationRequest, context: usize, vocab: usize) -> Result<()> {
    let bad = |m: String| Err(EngineError::InvalidRequest(m));
    if r.prompt.is_empty() {
        return bad("the prompt is empty".into());
    }
    if r.prompt.len() >= context {
        return bad(format!("the prompt has {} tokens; the model's context window is {context}", r.prompt.len()));
    }
    if let Some(id) = r.prompt.iter().find(|&&id| id as usize >= vocab) {
        return bad(format!("token id {id} is outside the vocabulary ({vocab})"));
    }
    if let Some((id, _)) = r.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
        return bad(format!("logit_bias names token id {id}, outside the vocabulary ({vocab})"));
    }
    if r.stop.iter().any(String::is_empty) {
        return bad("stop strings must not be empty".into());
    }
    r.sampling.validate()
}

/// The state of one sequence during generation.
struct Sequence {
    sampler: Sampler,
    /// Prompt and generated ids (for the repetition penalty).
    context: Vec<u32>,
    generated: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    /// `Some(n)` records log-probabilities with `n` alternatives.
    top_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    decoder: IncrementalDecoder,
    /// Decoded text so far; cut at a stop string when one appears.
    text: String,
    /// How much of `text` has been handed to the caller.
    emitted: usize,
    /// No more text will be appended (the decoder was flushed or a stop string cut it).
    text_final: bool,
    finish: Option<FinishReason>,
}

impl Sequence {
    fn new(r: &GenerationRequest, context: usize) -> Self {
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

    fn finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Records `token`; returns the text that can be released to a stream now.
    fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String> {
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
    fn close(&mut self, tokenizer: &Tokenizer) -> Result<String> {
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
