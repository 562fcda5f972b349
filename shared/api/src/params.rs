//! Request parameters checked against OpenAI's ranges and this server's limits, and turned into
//! engine requests. Every rejection names the parameter (HTTP 400).

use std::collections::HashMap;
use std::time::Duration;

use llm_engine::{GenerationRequest, SamplingParams};

use crate::error::ApiError;
use crate::openai::Sampling;

/// Limits that protect the function; configuration with safe defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_tokens: usize,
    /// Cap on `max_tokens`, and the default when a request gives none.
    pub max_tokens: usize,
    /// Cap on sequences in one request (`n` × prompts).
    pub max_sequences: usize,
    /// Sequences that generate together: a request joins the running batch between two decode
    /// steps when its sequences keep it within this (or when nothing runs), and waits otherwise.
    pub max_batch_sequences: usize,
    /// Requests that may wait to join the running batch (one always may); more are refused with
    /// 503 (shed load rather than hold connections without bound).
    pub max_queued: usize,
    /// What the prompt cache may hold, besides the last entry, which it always keeps (see
    /// [`llm_engine::PromptCache`]).
    pub prompt_cache_bytes: usize,
    /// Generation stops this long before a request's [`Deadline`](crate::Deadline), leaving
    /// time to send the answer.
    pub deadline_margin: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_prompt_tokens: 4096,
            max_tokens: 512,
            max_sequences: 16,
            max_batch_sequences: 8,
            max_queued: 64,
            prompt_cache_bytes: llm_engine::DEFAULT_PROMPT_CACHE_BYTES,
            deadline_margin: Duration::from_millis(1500),
        }
    }
}

/// Most alternatives per token a request may ask for (OpenAI's chat limit; vLLM's default).
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A request's generation settings, validated.
#[derive(Debug, Clone)]
pub struct Generation {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Start from, and leave the sequence in, the server's prompt cache.
    pub cache_prompt: bool,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per token when log-probabilities were asked for.
    pub logprobs: Option<usize>,
}

fn in_range(param: &'static str, value: Option<f32>, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && (lo..=hi).contains(&v) => Ok(v),
        Some(v) => Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {v}."))),
    }
}

impl Generation {
    /// `min_tokens` is 1, or 0 where a request may only score its prompt (`echo`).
    pub fn from_request(s: &Sampling, limits: &Limits, min_tokens: i64) -> Result<Self, ApiError> {
        let (param, requested) = match (s.max_completion_tokens, s.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", Some(v)),
            (None, v) => ("max_tokens", v),
        };
        let max_tokens = match requested {
            None => limits.max_tokens,
            Some(v) if v < min_tokens => return Err(ApiError::invalid(param, format!("`{param}` must be at least {min_tokens}, got {v}."))),
            Some(v) if v as u64 > limits.max_tokens as u64 => {
                return Err(ApiError::invalid(param, format!("`{param}` is {v}; this server allows at most {}.", limits.max_tokens)))
            }
            Some(v) => v as usize,
        };
        let n = match s.n {
            None => 1,
            Some(v) if (1..=limits.max_sequences as i64).contains(&v) => v as usize,
            Some(v) => return Err(ApiError::invalid("n", format!("`n` must be between 1 and {}, got {v}.", limits.max_sequences))),
        };
        let top_k = match s.top_k {
            None | Some(-1) => 0,
            Some(v) if v >= 0 => v as usize,
            Some(v) => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1, 0 or positive, got {v}."))),
        };
        let seed = match s.seed {
            None => rand_seed(),
            Some(v) => v as u64,
        };
        let stop = s.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "`stop` takes up to 4 non-empty strings."));
        }
        let sampling = SamplingParams {
            temperature: in_range("temperature", s.temperature, 0.0, 2.0, 1.0)?,
            top_p: in_range("top_p", s.top_p, 0.0, 1.0, 1.0)?,
            min_p: in_range("min_p", s.min_p, 0.0, 1.0, 0.0)?,
            presence_penalty: in_range("presence_penalty", s.presence_penalty, -2.0, 2.0, 0.0)?,
            frequency_penalty: in_range("frequency_penalty", s.frequency_penalty, -2.0, 2.0, 0.0)?,
            repetition_penalty: in_range("repetition_penalty", s.repetition_penalty, 0.01, 10.0, 1.0)?,
            logit_bias: logit_bias(s.logit_bias.as_ref())?,
            top_k,
            seed,
        };
        let include_usage = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let (ignore_eos, cache_prompt) = (s.ignore_eos.unwrap_or(false), s.cache_prompt.unwrap_or(true));
        Ok(Self { max_tokens, sampling, stop, ignore_eos, cache_prompt, n, stream: s.stream, include_usage, logprobs: None })
    }

    /// Chat's `logprobs: true` with `top_logprobs` alternatives (which needs `logprobs`).
    pub fn with_chat_logprobs(self, logprobs: Option<bool>, top_logprobs: Option<i64>) -> Result<Self, ApiError> {
        let top = top_count("top_logprobs", top_logprobs)?;
        match (logprobs.unwrap_or(false), top) {
            (true, top) => Ok(Self { logprobs: Some(top.unwrap_or(0)), ..self }),
            (false, Some(_)) => Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`.")),
            (false, None) => Ok(self),
        }
    }

    /// The legacy completion's `logprobs: N`: log-probabilities with N alternatives.
    pub fn with_completion_logprobs(self, logprobs: Option<i64>) -> Result<Self, ApiError> {
        Ok(Self { logprobs: top_count("logprobs", logprobs)?, ..self })
    }

    /// One engine request per prompt and choice: prompt `p`'s choice `c` is at `p * n + c`.
    /// Seeds differ per choice so that sampled choices differ.
    pub fn requests(&self, prompts: &[Vec<u32>]) -> Vec<GenerationRequest> {
        let mut requests = Vec::with_capacity(prompts.len() * self.n);
        for prompt in prompts {
            for choice in 0..self.n {
                let sampling = SamplingParams { seed: self.sampling.seed.wrapping_add(choice as u64), ..self.sampling.clone() };
                requests.push(GenerationRequest {
                    prompt: prompt.clone(),
                    max_tokens: self.max_tokens,
                    sampling,
                    stop: self.stop.clone(),
                    ignore_eos: self.ignore_eos,
                    logprobs: self.logprobs,
                });
            }
        }
        requests
    }
}

/// `logit_bias`: token ids (checked against the vocabulary once the model is known, in
/// `prepare`) to biases in [-100, 100], as OpenAI takes them.
fn logit_bias(bias: Option<&HashMap<String, f32>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut parsed = Vec::new();
    for (id, &value) in bias.into_iter().flatten() {
        let Ok(id) = id.parse::<u32>() else {
            return Err(ApiError::invalid("logit_bias", format!("`logit_bias` keys are token ids, got {id:?}.")));
        };
        parsed.push((id, in_range("logit_bias", Some(value), -100.0, 100.0, 0.0)?));
    }
    parsed.sort_unstable_by_key(|&(id, _)| id);
    // "5" and "05" are one token, and their biases would add up past the range.
    if let Some(pair) = parsed.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(ApiError::invalid("logit_bias", format!("`logit_bias` names token id {} twice.", pair[0].0)));
    }
    Ok(parsed)
}

fn top_count(param: &'static str, value: Option<i64>) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if (0..=MAX_TOP_LOGPROBS).contains(&v) => Ok(Some(v as usize)),
        Some(v) => Err(ApiError::invalid(param, format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS}, got {v}."))),
    }
}

/// Checks the prompts against the limits and the context window.
pub fn check_prompts(prompts: &[Vec<u32>], generation: &Generation, limits: &Limits, context: usize) -> Result<(), ApiError> {
    if prompts.len() * generation.n > limits.max_sequences {
        return Err(ApiError::invalid(
            "n",
            format!("{} prompts × n = {} sequences; this server allows at most {}.", prompts.len(), generation.n, limits.max_sequences),
        ));
    }
    for prompt in prompts {
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "The prompt is empty."));
        }
        if prompt.len() > limits.max_prompt_tokens {
            return Err(ApiError::invalid(
                "prompt",
                format!("The prompt has {} tokens; this server allows at most {}.", prompt.len(), limits.max_prompt_tokens),
            ));
        }
        if prompt.len() >= context {
            return Err(ApiError::invalid("prompt", format!("The prompt has {} tokens; the model's context is {context}.", prompt.len())));
        }
    }
    Ok(())
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Generation, ApiError> {
        Generation::from_request(&serde_json::from_str(json).unwrap(), &Limits::default(), 1)
    }

    #[test]
    fn accepts_openai_ranges_and_rejects_the_rest() {
        let g = parse(r#"{"max_tokens": 5, "temperature": 0, "stop": "x", "n": 2, "seed": 7}"#).unwrap();
        assert_eq!((g.max_tokens, g.sampling.temperature, g.stop.as_slice(), g.n, g.sampling.seed), (5, 0.0, &["x".to_string()][..], 2, 7));
        assert_eq!(parse(r#"{"max_completion_tokens": 3, "max_tokens": 9}"#).unwrap().max_tokens, 3);
        for (body, param) in [
            (r#"{"max_tokens": -1}"#, "max_tokens"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_completion_tokens": 100000}"#, "max_completion_tokens"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"temperature": -0.1}"#, "temperature"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"n": 0}"#, "n"),
            (r#"{"presence_penalty": 3}"#, "presence_penalty"),
            (r#"{"stop": ["a", "b", "c", "d", "e"]}"#, "stop"),
        ] {
            assert_eq!(parse(body).unwrap_err().param, Some(param), "{body}");
        }
    }

    #[test]
    fn logprobs_parameters() {
        let chat = |lp, top| parse("{}").unwrap().with_chat_logprobs(lp, top).map(|g| g.logprobs);
        assert_eq!(chat(Some(true), Some(3)).unwrap(), Some(3));
        assert_eq!(chat(Some(true), None).unwrap(), Some(0));
        assert_eq!(chat(None, None).unwrap(), None);
        assert_eq!(chat(Some(false), Some(2)).unwrap_err().param, Some("top_logprobs"));
        assert_eq!(chat(Some(true), Some(21)).unwrap_err().param, Some("top_logprobs"));
        let legacy = |lp| parse("{}").unwrap().with_completion_logprobs(lp).map(|g| g.logprobs);
        assert_eq!(legacy(Some(0)).unwrap(), Some(0));
        assert_eq!(legacy(Some(-1)).unwrap_err().param, Some("logprobs"));
    }
}
