//! Jobs' prompts running through the model, a bounded number of positions at a time, so that
//! the batch's decode steps go on between the parts of a long prompt, each step in one pass
//! with the parts that run beside it (chunked prefill, as vLLM schedules and mixes it): see
//! [`PromptRun`].

use std::ops::Range;

use candle_core::Tensor;

use crate::error::Result;
use crate::generate::Rows;
use crate::model::{KvCache, Llama, Logits, Part, ONE_UNPADDED_ROW};
use crate::prompt_cache::{shared_start, PromptCache};

/// Positions a batch's shared start must save (its length beyond the prompt cache's, times
/// the rows but one) to run once in a pass of its own: a pass reads every weight, as a decode
/// step does, whatever its length.
const SHARED_START_SAVES: usize = 16;

/// Positions of all rows that one forward pass of a prompt takes at most, as llama.cpp's
/// `n_ubatch` (512) bounds its: a pass's activations grow with its positions (one pass over a
/// 2,000-token prompt of TinyLlama's shape peaked 130 MiB above the weights and KV cache).
pub(crate) const PREFILL_POSITIONS: usize = 512;

/// The prompts of the generating sequences of one job, or of jobs that start together (one
/// prompt per row), run as little as they
/// can be. Identical prompts (a request's `n` choices) run once and their cache rows are
/// copied. The start all prompts share (but the last token of the shortest, whose logits start
/// its generation) comes from the prompt cache, or runs once in a row of its own when that
/// saves enough; that row is copied to every prompt's, and each prompt's rest is padded after
/// it, so that all end together. Each pass runs one part of the run (see [`plan`](Self::plan)),
/// beside the parts of other runs and a decode step.
pub(crate) struct PromptRun {
    /// The distinct prompts, and the one each row runs.
    prompts: Vec<Vec<u32>>,
    row_of: Vec<u32>,
    cache: KvCache,
    /// Prompt tokens the prompt cache held.
    pub(crate) cached: usize,
    /// The shared start, while it runs in a row of its own.
    shared: Option<Segment>,
    /// Each distinct prompt's tokens after the start, padded to end together: the last
    /// position's logits start generation.
    rest: Segment,
    /// The tokens `[rows, n]` of the part that runs in the next pass, and whether it asks for
    /// logits.
    planned: Option<(Tensor, Option<Logits>)>,
}

/// Rows of tokens of equal length (padded at `padding`) that run, part by part, after what a
/// cache holds.
struct Segment {
    tokens: Vec<u32>,
    padding: Vec<Range<usize>>,
    /// Positions of each row that ran.
    done: usize,
    /// The last position's logits, once every position ran, when they were asked for.
    logits: Option<Tensor>,
}

impl PromptRun {
    /// Plans the run of `row_prompts`, taking from `prompt_cache` what it holds of their start.
    pub(crate) fn start(model: &Llama, row_prompts: &[&[u32]], prompt_cache: &mut PromptCache) -> Result<Self> {
        let mut prompts: Vec<Vec<u32>> = Vec::new();
        let row_of: Vec<u32> = row_prompts
            .iter()
            .map(|&prompt| {
                let row = prompts.iter().position(|p| p == prompt).unwrap_or_else(|| {
                    prompts.push(prompt.to_vec());
                    prompts.len() - 1
                });
                row as u32
            })
            .collect();
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
        let common = prompts.iter().map(|p| shared_start(p, &prompts[0])).min().unwrap_or(0).min(shortest - 1);
        let (cache, cached) = prompt_cache.take(model, &prompts[0][..common], prompts.len() == 1)?;
        let start = if (prompts.len() - 1) * (common - cached) >= SHARED_START_SAVES { common } else { cached };
        let shared = (start > cached).then(|| Segment::new(prompts[0][cached..start].to_vec(), ONE_UNPADDED_ROW.to_vec()));
        let longest = prompts.iter().map(|p| p.len() - start).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(prompts.len() * longest);
        let mut padding = Vec::with_capacity(prompts.len());
        for p in &prompts {
            let pad = longest - (p.len() - start);
            tokens.extend(std::iter::repeat_n(0u32, pad));
            tokens.extend(&p[start..]);
            padding.push(start..start + pad);
        }
        let mut run = Self { prompts, row_of, cache, cached, shared, rest: Segment::new(tokens, padding), planned: None };
        if run.shared.is_none() {
            run.spread_start(prompt_cache, start)?;
        }
        Ok(run)
    }

    /// Plans the part that runs in the next pass: the next positions of the shared start while
    /// it runs, else of the rest, at most `budget` of them, or [`PREFILL_POSITIONS`], but at
    /// least one of each row (none when `budget` is 0); returns how many.
    pub(crate) fn plan(&mut self, model: &Llama, budget: usize) -> Result<usize> {
        let segment = self.shared.as_ref().unwrap_or(&self.rest);
        let rows = segment.padding.len();
        let len = segment.tokens.len() / rows;
        if budget == 0 || segment.done == len {
            return Ok(0);
        }
        let n = (PREFILL_POSITIONS.min(budget) / rows).clamp(1, len - segment.done);
        let part: Vec<u32> = segment.tokens.chunks_exact(len).flat_map(|row| &row[segment.done..segment.done + n]).copied().collect();
        let logits = (self.shared.is_none() && segment.done + n == len).then_some(Logits::Last);
        self.planned = Some((Tensor::from_vec(part, (rows, n), model.device())?, logits));
        Ok(n * rows)
    }

    /// The part [`plan`](Self::plan) planned, for [`Llama::forward_parts`].
    pub(crate) fn part(&mut self) -> Option<Part<'_>> {
        let (tokens, logits) = self.planned.as_ref()?;
        let segment = self.shared.as_ref().unwrap_or(&self.rest);
        Some(Part { tokens, padding: &segment.padding, cache: &mut self.cache, logits: *logits })
    }

    pub(crate) fn is_planned(&self) -> bool {
        self.planned.is_some()
    }

    /// Records that the planned part ran, with the `logits` it asked for: a shared start that
    /// is through becomes every prompt's (see [`PromptRun::start`]).
    pub(crate) fn ran(&mut self, prompt_cache: &mut PromptCache, logits: Option<Tensor>) -> Result<()> {
        let Some((tokens, _)) = self.planned.take() else { return Ok(()) };
        let n = tokens.dim(1)?;
        if let Some(shared) = &mut self.shared {
            shared.done += n;
            if !shared.is_through() {
                return Ok(());
            }
            self.shared = None;
            return self.spread_start(prompt_cache, self.rest.padding[0].start);
        }
        self.rest.done += n;
        if logits.is_some() {
            self.rest.logits = logits;
        }
        Ok(())
    }

    pub(crate) fn is_through(&self) -> bool {
        self.rest.is_through()
    }

    /// Positions of all rows that are still to run.
    pub(crate) fn left(&self) -> usize {
        self.shared.as_ref().map_or(0, Segment::left) + self.rest.left()
    }

    /// The rows of a run that [`is_through`](Self::is_through), each with its logits at its
    /// last prompt position.
    pub(crate) fn into_rows(self, prompt_cache: &mut PromptCache) -> Result<Rows> {
        let Self { prompts, row_of, cache, rest, .. } = self;
        let logits = rest.logits.expect("the run is through");
        if prompts.len() == row_of.len() {
            return Ok(Rows { cache, padding: rest.padding, logits });
        }
        let rows: Vec<_> = row_of.iter().map(|&row| (&cache, row as usize, &rest.padding[row as usize])).collect();
        let (rows, padding) = KvCache::join(&rows)?;
        if let [one] = prompts.as_slice() {
            prompt_cache.keep(one, one.len(), cache);
        }
        let logits = logits.index_select(&Tensor::new(row_of.as_slice(), logits.device())?, 0)?;
        Ok(Rows { cache: rows, padding, logits })
    }

    /// Leaves what ran of a run dropped before it is through (its callers went away) to the
    /// prompt cache, when it ran one prompt, whose start the cache then holds: a request sent
    /// again, or a conversation's next turn, starts from it.
    pub(crate) fn abandon(self, prompt_cache: &mut PromptCache) {
        if let [one] = self.prompts.as_slice() {
            let ran = self.cache.len();
            if ran > 0 {
                prompt_cache.keep(&one[..ran], ran, self.cache);
            }
        }
    }

    /// Once the cache holds the `start` all prompts share, makes it a row for each distinct
    /// prompt, and leaves it to the prompt cache.
    fn spread_start(&mut self, prompt_cache: &mut PromptCache, start: usize) -> Result<()> {
        if start > 0 && self.prompts.len() > 1 {
            let (rows, _) = KvCache::join(&vec![(&self.cache, 0, &(0..0)); self.prompts.len()])?;
            prompt_cache.keep(&self.prompts[0][..start], start, std::mem::replace(&mut self.cache, rows));
        }
        Ok(())
    }
}

impl Segment {
    fn new(tokens: Vec<u32>, padding: Vec<Range<usize>>) -> Self {
        Self { tokens, padding, done: 0, logits: None }
    }

    fn is_through(&self) -> bool {
        self.left() == 0
    }

    fn left(&self) -> usize {
        self.tokens.len() - self.done * self.padding.len()
    }
}
