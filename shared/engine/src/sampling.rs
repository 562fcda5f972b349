//! Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, seeded RNG.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off, 0 = the
    /// most likely token alone).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// transformers' multiplicative penalty on every token already seen, prompt included (1 = off).
    pub repetition_penalty: f32,
    /// OpenAI's additive penalty on generated tokens: once present...
    pub presence_penalty: f32,
    /// ...and per occurrence.
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: added to these tokens' logits before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::InvalidRequest(m.to_string()));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be a non-negative number");
        }
        // 0 is allowed, as OpenAI allows it: the most likely token alone.
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad("top_p must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty must be positive");
        }
        if !(self.presence_penalty.is_finite() && self.frequency_penalty.is_finite()) {
            return bad("presence_penalty and frequency_penalty must be finite");
        }
        if self.logit_bias.iter().any(|(_, bias)| !bias.is_finite()) {
            return bad("logit_bias values must be finite");
        }
        Ok(())
    }
}

/// Samples one sequence's tokens; owns that sequence's random state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Counts of generated tokens, for presence/frequency penalties.
    generated: HashMap<u32, usize>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng, generated: HashMap::new() }
    }

    /// Picks the next token. `context` is every token the sequence holds so far (prompt and
    /// generated), for the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits, context);
        let p = &self.params;
        let token = if p.temperature == 0.0 || p.top_k == 1 { argmax(&logits) } else { self.sample_filtered(&logits) };
        *self.generated.entry(token).or_default() += 1;
        token
    }

    fn apply_penalties(&self, logits: &mut [f32], context: &[u32]) {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen: Vec<u32> = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    fn sample_filtered(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).filter(|(_, l)| !l.is_nan()).collect();
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            candidates.truncate(p.top_k);
        }
        let max = candidates.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|q| {
                    cumulative += q;
                    cumulative >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, q) in probs.iter().enumerate() {
            r -= q;
            if r <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}

/// Index of the largest logit; the lowest index wins ties, as in `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, ..Default::default() }
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params(1.0) });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_and_tiny_or_zero_top_p_are_greedy() {
        let logits = [0.0, 1.0, 5.0, 4.9];
        for p in [SamplingParams { top_k: 1, ..params(1.0) }, SamplingParams { top_p: 0.01, ..params(1.0) }, SamplingParams { top_p: 0.0, ..params(1.0) }] {
            p.validate().unwrap();
            let mut s = Sampler::new(p);
            assert!((0..50).all(|_| s.sample(&logits, &[]) == 2));
        }
    }

    #[test]
    fn min_p_cuts_unlikely_tokens() {
        let logits = [10.0, 9.5, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams { min_p: 0.5, ..params(1.0) });
        assert!((0..200).all(|_| s.sample(&logits, &[]) < 2));
    }

    #[test]
    fn penalties_steer_away_from_repeats() {
        let logits = [2.0, 1.9];
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.5, ..params(0.0) });
        assert_eq!(s.sample(&logits, &[0]), 1);
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 1.0, ..params(0.0) });
        assert_eq!(s.sample(&logits, &[]), 0);
        assert_eq!(s.sample(&logits, &[]), 1);
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens() {
        let logits = [2.0, 1.9, 0.0];
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(0, -100.0)], ..params(0.0) });
        assert_eq!(s.sample(&logits, &[]), 1);
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(2, 100.0), (7, 100.0)], ..params(1.0) });
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 2));
    }
}
