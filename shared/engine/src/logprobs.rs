//! Log-probabilities of sampled tokens and of prompt tokens, as OpenAI's `logprobs` (and
//! `echo`) report them: taken from the model's own distribution (log-softmax of the raw
//! logits, before penalties, temperature and filtering), as vLLM does by default.

use candle_core::Tensor;

use crate::error::Result;
use crate::model::{Llama, Logits, ONE_UNPADDED_ROW};

/// Prompt positions scored per forward pass: bounds the `[positions, vocab]` logits in memory.
const SCORE_CHUNK: usize = 256;

/// One generated token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Log-probability of `chosen` under `logits`, with the `top_n` most likely tokens.
pub fn token_logprob(logits: &[f32], chosen: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let logprob_of = |id: u32| logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| l - log_total);
    let mut top = Vec::new();
    if top_n > 0 {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let most_likely_first = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let n = top_n.min(ids.len());
        if n < ids.len() {
            ids.select_nth_unstable_by(n, most_likely_first);
            ids.truncate(n);
        }
        ids.sort_unstable_by(most_likely_first);
        top = ids.into_iter().map(|id| (id, logprob_of(id))).collect();
    }
    TokenLogprob { token_id: chosen, logprob: logprob_of(chosen), top }
}

/// The log-probability of every prompt token after the first, given the tokens before it
/// (what `echo` with `logprobs` reports for the prompt).
pub fn prompt_logprobs(model: &Llama, prompt: &[u32], top_n: usize) -> Result<Vec<TokenLogprob>> {
    let mut cache = model.new_cache();
    let mut entries = Vec::with_capacity(prompt.len().saturating_sub(1));
    for (chunk_index, chunk) in prompt.chunks(SCORE_CHUNK).enumerate() {
        let input = Tensor::new(chunk, model.device())?.unsqueeze(0)?;
        let rows = model.forward(&input, ONE_UNPADDED_ROW, &mut cache, Logits::All)?.squeeze(0)?.to_vec2::<f32>()?;
        for (offset, row) in rows.iter().enumerate() {
            // Position p predicts token p + 1.
            if let Some(&next) = prompt.get(chunk_index * SCORE_CHUNK + offset + 1) {
                entries.push(token_logprob(row, next, top_n));
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_top_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        let lp = token_logprob(&logits, 2, 3);
        assert!((lp.logprob - (2.0f32.exp() / total).ln()).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!((lp.top[0].1 - (3.0f32.exp() / total).ln()).abs() < 1e-6);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 0, 10).top.len(), 4);
    }
}
