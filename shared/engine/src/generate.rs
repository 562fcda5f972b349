//! Batched text generation: jobs (one caller's requests each) join one batch after a prefill of
//! their prompts (of several jobs' at once when they wait together), and leave it as they end;
//! every step decodes one token of every sequence in it, each sequence with its own sampler,
//! stop conditions and streaming text.

use std::collections::VecDeque;
use std::ops::{ControlFlow, Range};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::logprobs::{token_logprob, TokenLogprob};
use crate::model::{KvCache, Llama, Logits, Part};
use crate::prefill::{PromptRun, PREFILL_POSITIONS};
use crate::prompt_cache::{shared_start, PromptCache};
use crate::sampling::SamplingParams;
use crate::sequence::Sequence;
use crate::tokenizer::Tokenizer;

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
    /// Index of the request among its job's requests (those given to [`generate`]).
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
    /// Tokens at the start of each of the job's prompts whose keys and values came from the
    /// [`PromptCache`], not a prefill (the same for every job whose prompts ran with its).
    pub cached_prompt_tokens: usize,
    /// Running the job's prompts and making its rows of them (not the decode steps between
    /// their parts).
    pub prefill: Duration,
    /// From the job's start to its first token: its prefill, the decode steps between its
    /// parts, and what ran of the next job's prompts before the step that sampled it.
    pub first_token: Duration,
    /// From the end of the prefill to the last token (with other jobs' prefills that ran
    /// meanwhile).
    pub decode: Duration,
    /// Decode steps (each extends every unfinished sequence by one token).
    pub decode_steps: usize,
    /// The most sequences that sampled a token together in one step, the job's and others'.
    pub batch_rows: usize,
}

/// Generates completions for `requests` in one batch. `on_token` sees every token as it is
/// sampled; returning `Break` ends generation for all sequences (`finish_reason: length`).
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    requests: &[GenerationRequest],
    on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<Generated> {
    generate_cached(model, tokenizer, requests, &mut PromptCache::default(), on_token)
}

/// [`generate`], starting from what `prompt_cache` holds of the start the prompts share, and
/// leaving there what the next request may start from (see [`PromptCache`]).
pub fn generate_cached(
    model: &Llama,
    tokenizer: &Tokenizer,
    requests: &[GenerationRequest],
    prompt_cache: &mut PromptCache,
    on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<Generated> {
    let mut result = None;
    let handler = Collect { on_token, result: &mut result };
    let mut job = Some(Job { requests: requests.to_vec(), cache_prompt: true, handler: Box::new(handler) });
    generate_jobs(model, tokenizer, prompt_cache, usize::MAX, move |_| job.take());
    result.expect("every job that joins a batch is done when the batch is")
}

/// A job's completions (one per request, in order) and what generating them took.
pub type Generated = (Vec<Completion>, GenerationStats);

/// One caller's requests, generated in a batch beside other jobs' (see [`generate_jobs`]).
pub struct Job<'a> {
    pub requests: Vec<GenerationRequest>,
    /// Start from, and leave to, the [`PromptCache`].
    pub cache_prompt: bool,
    pub handler: Box<dyn JobHandler + 'a>,
}

/// What a job's caller sees of its generation.
pub trait JobHandler {
    /// The job is about to join the batch; `false` drops it unrun (its caller went away).
    fn start(&mut self) -> bool {
        true
    }

    /// Whether the job's caller went away while it waits, or while its prompts run: it is
    /// dropped before it starts, or before its prompts' next part when the jobs whose prompts
    /// run with its are all cancelled too (else it ends at its first token), leaving room for
    /// the next; what ran of its prompt stays in the prompt cache.
    fn cancelled(&self) -> bool {
        false
    }

    /// Each of the job's tokens as it is sampled ([`TokenEvent::index`] counts the job's own
    /// requests). `Break` ends the job's sequences (`finish_reason: length`), not other jobs'.
    fn token(&mut self, event: TokenEvent<'_>) -> ControlFlow<()>;

    /// The job's completions once its last sequence ended, or why it failed. Not called for a
    /// job that `start` or `cancelled` dropped, or whose generation panicked (the handler is
    /// dropped instead).
    fn done(self: Box<Self>, result: Result<Generated>);
}

/// The handler of [`generate_cached`]'s one job: tokens to a closure, the result kept.
struct Collect<'r, F> {
    on_token: F,
    result: &'r mut Option<Result<Generated>>,
}

impl<F: FnMut(TokenEvent<'_>) -> ControlFlow<()>> JobHandler for Collect<'_, F> {
    fn token(&mut self, event: TokenEvent<'_>) -> ControlFlow<()> {
        (self.on_token)(event)
    }

    fn done(self: Box<Self>, result: Result<Generated>) {
        *self.result = Some(result);
    }
}

/// Generates the jobs `next_job` hands over in one batch, which jobs join between decode steps
/// and leave as their last sequence ends (continuous batching, as vLLM's and llama.cpp's
/// servers do): a job that comes while others generate does not wait for them to end. A
/// joining job's prompts run beside the batch's rows (through `prompt_cache` when the job
/// asks), in parts of at most [`JOIN_POSITIONS`] positions while other rows decode, then its
/// rows join the batch's (see [`KvCache::join`]); each step is one pass of the decode step and
/// every joining run's next part (see [`pass`]). The jobs waiting when prompts can start start
/// together (see [`starting`]): their prompts run as one, a start they share once. Jobs that
/// come while prompts join start beside them, each run in the same passes, when what they run
/// is less than half of what the oldest joining run has left (shorter prompts, conversations'
/// next turns whose starts the prompt cache holds, behind a long prompt): they share up to half
/// of each step's positions, the long prompt's parts take the rest, and their first tokens do
/// not wait for all of its parts. A job starts when the batch is empty or keeps within
/// `max_rows` sequences with it; else it waits, and the jobs behind it too.
///
/// `next_job(idle)` may wait for a job when `idle` (nothing generates), and `None` then ends
/// this function; otherwise `None` says that no job is waiting.
pub fn generate_jobs<'a>(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt_cache: &mut PromptCache,
    max_rows: usize,
    mut next_job: impl FnMut(bool) -> Option<Job<'a>>,
) {
    let mut batch = Batch::default();
    let mut waiting: VecDeque<Job<'a>> = VecDeque::new();
    loop {
        loop {
            let idle = batch.jobs.is_empty() && batch.joining.is_empty() && waiting.is_empty();
            match next_job(idle) {
                Some(job) => waiting.push_back(job),
                None if idle => return,
                None => break,
            }
        }
        waiting.retain(|job| !job.handler.cancelled());
        batch.drop_abandoned(prompt_cache);
        let positions = batch.step_positions();
        loop {
            let jobs = match batch.joining.as_slice() {
                // With no rows to decode, nothing waits for prompts that start together to run through.
                [] => starting(&mut waiting, prompt_cache, batch.sequences(), max_rows, if batch.rows.is_some() { positions } else { usize::MAX }, false),
                [front, cut_in @ ..] => {
                    // Passes are bound by arithmetic here, so prompts that share them each end
                    // later than alone: p positions beside the front's f left, half a pass each,
                    // end after 2p and f + p; after the front, after f + p and f. Starting
                    // beside it lowers the two first tokens' total wait only when p < f / 2
                    // (equal conversation turns that came at once and started together got
                    // their first tokens later than one after another). Runs beside the front
                    // share up to half of each pass (see `pass`), so p may take several.
                    let room = (front.run.left().saturating_sub(1) / 2).saturating_sub(cut_in.iter().map(|joining| joining.run.left()).sum());
                    starting(&mut waiting, prompt_cache, batch.sequences(), max_rows, room, true)
                }
            };
            if jobs.is_empty() {
                break;
            }
            batch.start(model, tokenizer, prompt_cache, jobs);
        }
        match batch.rows {
            Some(_) => batch.step(model, tokenizer, prompt_cache),
            None => batch.prefill(model, prompt_cache),
        }
    }
}

/// The jobs at the front of `waiting` that start together beside `occupied` rows (decoding or
/// joining): the first when it keeps within `max_rows` (or nothing runs: a larger job runs
/// alone), then each next one that keeps within it too, asks for the prompt cache as the first
/// does, loses nothing the cache holds of its prompts (the run takes from it only the start all
/// prompts share), and whose prompts are alike enough in length that all of them padded to the
/// longest at most double the positions that run (a prompt's rows run as long as the longest
/// beside it); the positions that run, padded, keep within `budget` for the jobs but the first,
/// or for all of them when they `cut_in` beside prompts that join already. While rows decode,
/// the first's first token so waits for no other prompt (prompts run as one in parts would all
/// get their first tokens after the last part; one after another, each gets its own as soon as
/// its parts ran).
fn starting<'a>(waiting: &mut VecDeque<Job<'a>>, prompt_cache: &PromptCache, occupied: usize, max_rows: usize, budget: usize, cut_in: bool) -> Vec<Job<'a>> {
    let mut jobs: Vec<Job<'a>> = Vec::new();
    let mut run = Together { common: usize::MAX, ..Together::default() };
    while let Some(job) = waiting.front() {
        let first = jobs.first().unwrap_or(job).requests.first().map_or(&[][..], |r| r.prompt.as_slice());
        let mut with = run;
        for r in &job.requests {
            let held = if job.cache_prompt { prompt_cache.holds(&r.prompt) } else { 0 };
            let shared = shared_start(&r.prompt, first);
            // The run takes from the cache only the start its prompts share.
            let to_run = (r.prompt.len() - held.min(shared)).max(1);
            with = Together {
                rows: with.rows + 1,
                positions: with.positions + to_run,
                longest: with.longest.max(to_run),
                common: with.common.min(shared),
                held: with.held.max(held),
            };
        }
        let padded = with.rows * with.longest;
        let fits = occupied + with.rows <= max_rows || (occupied == 0 && jobs.is_empty());
        let within = (jobs.is_empty() && !cut_in) || padded <= budget;
        let alike = jobs.first().is_none_or(|first| first.cache_prompt == job.cache_prompt && with.held <= with.common && padded <= 2 * with.positions);
        if !(fits && within && alike) {
            break;
        }
        run = with;
        jobs.extend(waiting.pop_front());
    }
    jobs
}

/// What the prompts of jobs that start together run: their rows, the positions that the prompt
/// cache does not hold, and the longest row's; how long a start they share, and the most the
/// cache holds of one.
#[derive(Clone, Copy, Default)]
struct Together {
    rows: usize,
    positions: usize,
    longest: usize,
    common: usize,
    held: usize,
}

/// Prompt positions that run with each decode step while rows decode (chunked prefill, as vLLM
/// schedules and mixes it): a longer prompt runs in parts, each in one pass with a step of the
/// batch, so that the streams running meanwhile go on instead of waiting for all of it; the
/// first of several prompts sent at once gets its first token after at most this many
/// positions of the next ones a step (half of them, of prompts that start beside it).
const JOIN_POSITIONS: usize = 128;

/// The jobs generating together, in the order they joined, and their rows: each job's in the
/// order of its [`Running::rows`].
#[derive(Default)]
struct Batch<'a> {
    jobs: Vec<Running<'a>>,
    /// `None` exactly when `jobs` is empty.
    rows: Option<Rows>,
    /// The jobs whose prompts run, before their rows join: each run's jobs together, the runs in
    /// the order they started.
    joining: Vec<Joining<'a>>,
}

/// Jobs whose prompts run as one, in the order their rows join.
struct Joining<'a> {
    jobs: Vec<Running<'a>>,
    run: PromptRun,
    /// A throwaway prompt cache for jobs that do not use the batch's.
    unshared: Option<PromptCache>,
}

/// Rows of sequences that generate together.
pub(crate) struct Rows {
    pub(crate) cache: KvCache,
    pub(crate) padding: Vec<Range<usize>>,
    /// `[rows, vocab]`: what each row samples its next token from.
    pub(crate) logits: Tensor,
}

/// A job in the batch.
struct Running<'a> {
    handler: Box<dyn JobHandler + 'a>,
    seqs: Vec<Sequence>,
    /// The sequences that have a row in the batch, in the rows' order.
    rows: Vec<usize>,
    cache_prompt: bool,
    stats: GenerationStats,
    started: Instant,
    decoding_since: Instant,
    /// Why the job ended early; its sequences are finished.
    failed: Option<EngineError>,
}

impl<'a> Batch<'a> {
    /// Sequences that decode or join.
    fn sequences(&self) -> usize {
        self.jobs.iter().chain(self.joining.iter().flat_map(|joining| &joining.jobs)).map(|job| job.rows.len()).sum()
    }

    /// Prompt positions that run in the next step: with a decode step or in a pass of their own.
    fn step_positions(&self) -> usize {
        if self.rows.is_some() {
            JOIN_POSITIONS
        } else {
            PREFILL_POSITIONS
        }
    }

    /// Starts the jobs: their sequences, and the run of their prompts as one; or hands a job its
    /// end when none of its sequences generates, or its error.
    fn start(&mut self, model: &Llama, tokenizer: &Tokenizer, prompt_cache: &mut PromptCache, jobs: Vec<Job<'a>>) {
        let started = Instant::now();
        let (mut joining, mut prompts) = (Vec::new(), Vec::new());
        for Job { requests, cache_prompt, mut handler } in jobs {
            if !handler.start() {
                continue;
            }
            let mut running = Running::new(handler, cache_prompt);
            match running.begin(model, &requests) {
                Err(e) => running.handler.done(Err(e)),
                Ok(()) if running.rows.is_empty() => running.finish(tokenizer),
                Ok(()) => {
                    prompts.extend(running.rows.iter().map(|&i| &requests[i].prompt).cloned());
                    joining.push(running);
                }
            }
        }
        let Some(first) = joining.first() else { return };
        let mut unshared = (!first.cache_prompt).then(PromptCache::default);
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        match PromptRun::start(model, &prompts, cache_for(&mut unshared, prompt_cache)) {
            Err(e) => fail(joining, e),
            Ok(run) => {
                for job in &mut joining {
                    job.stats.cached_prompt_tokens = run.cached;
                    job.stats.prefill = started.elapsed();
                }
                self.joining.push(Joining { jobs: joining, run, unshared });
            }
        }
    }

    /// Drops each run of joining jobs whose callers all went away (one of several goes on, to
    /// end at its first token), leaving what ran of its prompt to the prompt cache.
    fn drop_abandoned(&mut self, prompt_cache: &mut PromptCache) {
        for Joining { run, mut unshared, .. } in self.joining.extract_if(.., |joining| joining.jobs.iter().all(|job| job.handler.cancelled())) {
            run.abandon(cache_for(&mut unshared, prompt_cache));
        }
    }

    /// Runs the next pass of the joining jobs' prompts, with no rows decoding, and joins the
    /// rows of those through.
    fn prefill(&mut self, model: &Llama, prompt_cache: &mut PromptCache) {
        // A pass that fails hands its jobs the error itself.
        let positions = self.step_positions();
        let _ = pass(&mut self.joining, model, prompt_cache, positions, None);
        self.join_through(prompt_cache);
    }

    /// The rows of the joining jobs whose prompts are through join the batch's.
    fn join_through(&mut self, prompt_cache: &mut PromptCache) {
        let through: Vec<Joining> = self.joining.extract_if(.., |joining| joining.run.is_through()).collect();
        for Joining { mut jobs, run, mut unshared } in through {
            let started = Instant::now();
            let joined = run.into_rows(cache_for(&mut unshared, prompt_cache)).and_then(|new| self.joined(new));
            add_prefill(&mut jobs, started);
            match joined {
                Err(e) => fail(jobs, e),
                Ok(rows) => {
                    for job in &mut jobs {
                        job.decoding_since = Instant::now();
                    }
                    self.rows = Some(rows);
                    self.jobs.extend(jobs);
                }
            }
        }
    }

    /// The batch's rows, then `new`.
    fn joined(&self, new: Rows) -> Result<Rows> {
        let Some(old) = &self.rows else { return Ok(new) };
        let (cache, padding) = KvCache::join(&old.each().chain(new.each()).collect::<Vec<_>>())?;
        Ok(Rows { cache, padding, logits: Tensor::cat(&[&old.logits, &new.logits], 0)? })
    }

    /// Samples every row's next token, lets the jobs whose sequences all ended leave, and runs
    /// the rest one position further. An error there fails every job in the batch (its rows
    /// may be half updated): a job alone gets the error, several get its text.
    fn step(&mut self, model: &Llama, tokenizer: &Tokenizer, prompt_cache: &mut PromptCache) {
        if let Err(e) = self.try_step(model, tokenizer, prompt_cache) {
            self.rows = None;
            fail(std::mem::take(&mut self.jobs), e);
        }
        self.join_through(prompt_cache);
    }

    fn try_step(&mut self, model: &Llama, tokenizer: &Tokenizer, prompt_cache: &mut PromptCache) -> Result<()> {
        let positions = self.step_positions();
        let batch_rows = self.rows.as_mut().expect("a batch with jobs has rows");
        let logits = batch_rows.logits.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(logits.len());
        for job in &mut self.jobs {
            job.stats.batch_rows = job.stats.batch_rows.max(logits.len());
            let mut stop = false;
            for &i in &job.rows {
                let seq = &mut job.seqs[i];
                let row_logits = &logits[next.len()];
                let token = seq.sampler.sample(row_logits, &seq.context);
                next.push(token);
                if let Some(top_n) = seq.top_logprobs {
                    seq.logprobs.push(token_logprob(row_logits, token, top_n));
                }
                match seq.push(tokenizer, token) {
                    Ok(piece) => {
                        if job.stats.generated_tokens == 0 {
                            job.stats.first_token = job.started.elapsed();
                        }
                        job.stats.generated_tokens += 1;
                        stop |= job.handler.token(TokenEvent { index: i, token_id: Some(token), text: &piece, logprob: seq.logprobs.last() }).is_break();
                    }
                    Err(e) => {
                        job.failed.get_or_insert(e);
                        stop = true;
                    }
                }
            }
            if stop {
                for &i in &job.rows {
                    job.seqs[i].finish.get_or_insert(FinishReason::Length);
                }
            }
        }

        let (mut keep, mut leaving) = (Vec::new(), Vec::new());
        let mut row = 0;
        for job in &mut self.jobs {
            for i in std::mem::take(&mut job.rows) {
                if !job.seqs[i].finished() {
                    keep.push(row);
                    job.rows.push(i);
                } else if job.cache_prompt && job.seqs.len() == 1 && job.failed.is_none() {
                    let seq = &job.seqs[i];
                    leaving.push((row, seq.context.clone(), seq.context.len() - seq.generated.len()));
                }
                row += 1;
            }
        }
        for mut job in std::mem::take(&mut self.jobs) {
            match (job.rows.is_empty(), job.failed.take()) {
                (false, _) => self.jobs.push(job),
                (true, None) => job.finish(tokenizer),
                (true, Some(e)) => job.handler.done(Err(e)),
            }
        }
        for (row, tokens, prompt) in leaving {
            // Best effort: a copy that fails leaves the row out of the cache, not the jobs failed.
            match batch_rows.take_row(model, row, keep.is_empty()) {
                Ok(kv) => prompt_cache.keep(&tokens[..kv.len()], prompt, kv),
                Err(e) => tracing::warn!(error = %e, "the prompt cache keeps nothing: its row could not be copied"),
            }
        }
        if keep.is_empty() {
            self.rows = None;
            return Ok(());
        }

        if keep.len() < next.len() {
            let rows: Vec<_> = keep.iter().map(|&row| (&batch_rows.cache, row, &batch_rows.padding[row])).collect();
            (batch_rows.cache, batch_rows.padding) = KvCache::join(&rows)?;
            next = keep.iter().map(|&row| next[row]).collect();
        }
        let input = Tensor::from_vec(next, (keep.len(), 1), model.device())?;
        let step = Part { tokens: &input, padding: &batch_rows.padding, cache: &mut batch_rows.cache, logits: Some(Logits::Last) };
        let logits = pass(&mut self.joining, model, prompt_cache, positions, Some(step))?;
        batch_rows.logits = logits.ok_or_else(|| EngineError::Generation("a decode step gave no logits".into()))?;
        for job in &mut self.jobs {
            job.stats.decode_steps += 1;
        }
        Ok(())
    }
}

/// Hands `jobs` the error: a job alone gets it, several get its text.
fn fail(mut jobs: Vec<Running>, e: EngineError) {
    if let [_] = jobs.as_slice() {
        return jobs.remove(0).handler.done(Err(e));
    }
    let message = e.to_string();
    for job in jobs {
        job.handler.done(Err(EngineError::Generation(message.clone())));
    }
}

/// Runs one pass (see [`Llama::forward_parts`]): the batch's decode `step`, when rows decode,
/// and the next part of each joining run, at most `budget` positions of them: the oldest run's
/// first, which leaves the runs that started beside it what they have left, up to half of the
/// budget, and takes the rest; theirs next, the one with the fewest positions left first (as
/// the rule that starts them beside the oldest, this gives their first tokens the least total
/// wait), the older of two alike. Returns the step's logits. A pass that fails hands every
/// joining job the error; a run that fails before or after it, its own jobs.
fn pass(joining: &mut Vec<Joining>, model: &Llama, prompt_cache: &mut PromptCache, budget: usize, step: Option<Part>) -> Result<Option<Tensor>> {
    let beside = joining.iter().skip(1).map(|joining| joining.run.left()).sum::<usize>().min(budget / 2);
    let mut order: Vec<usize> = (0..joining.len()).collect();
    order.sort_by_key(|&i| (i > 0, joining[i].run.left()));
    let (mut left, mut failed) = (budget, Vec::new());
    for i in order {
        match joining[i].run.plan(model, if i == 0 { budget - beside } else { left }) {
            Ok(planned) => left = left.saturating_sub(planned),
            Err(e) => failed.push((i, e)),
        }
    }
    // From the last, so that the other indices stay.
    failed.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
    for (i, e) in failed {
        fail(joining.remove(i).jobs, e);
    }
    let started = Instant::now();
    let stepped = step.is_some();
    let mut parts: Vec<Part> = step.into_iter().chain(joining.iter_mut().filter_map(|joining| joining.run.part())).collect();
    let ran = model.forward_parts(&mut parts);
    drop(parts);
    let mut logits = match ran {
        Ok(logits) => logits.into_iter(),
        Err(e) => {
            for Joining { jobs, .. } in std::mem::take(joining) {
                fail(jobs, EngineError::Generation(e.to_string()));
            }
            return Err(e);
        }
    };
    let step_logits = if stepped { logits.next().flatten() } else { None };
    joining.retain_mut(|Joining { jobs, run, unshared }| {
        if !run.is_planned() {
            return true;
        }
        let recorded = run.ran(cache_for(unshared, prompt_cache), logits.next().flatten());
        add_prefill(jobs, started);
        match recorded {
            Ok(()) => true,
            Err(e) => {
                fail(std::mem::take(jobs), e);
                false
            }
        }
    });
    Ok(step_logits)
}

/// `unshared`, when a job has one (it does not use the batch's prompt cache), else `shared`.
fn cache_for<'c>(unshared: &'c mut Option<PromptCache>, shared: &'c mut PromptCache) -> &'c mut PromptCache {
    match unshared {
        Some(cache) => cache,
        None => shared,
    }
}

/// Adds the time since `started` to the jobs' prefill time.
fn add_prefill(jobs: &mut [Running], started: Instant) {
    for job in jobs {
        job.stats.prefill += started.elapsed();
    }
}

impl Rows {
    /// Every row, as [`KvCache::join`] takes them.
    fn each(&self) -> impl Iterator<Item = (&KvCache, usize, &Range<usize>)> {
        self.padding.iter().enumerate().map(|(row, padding)| (&self.cache, row, padding))
    }

    /// Row `row`'s cache without its padding: moved out when it is the only row, unpadded, and
    /// `last` (nothing runs after it), else copied.
    fn take_row(&mut self, model: &Llama, row: usize, last: bool) -> Result<KvCache> {
        if last && self.padding.len() == 1 && self.padding[0].is_empty() {
            return Ok(std::mem::replace(&mut self.cache, model.new_cache()));
        }
        Ok(KvCache::join(&[(&self.cache, row, &self.padding[row])])?.0)
    }
}

impl<'a> Running<'a> {
    fn new(handler: Box<dyn JobHandler + 'a>, cache_prompt: bool) -> Self {
        let now = Instant::now();
        Self { handler, seqs: Vec::new(), rows: Vec::new(), cache_prompt, stats: GenerationStats::default(), started: now, decoding_since: now, failed: None }
    }

    /// Starts the job's sequences; [`Running::rows`] are those that generate.
    fn begin(&mut self, model: &Llama, requests: &[GenerationRequest]) -> Result<()> {
        let context = model.config().max_position_embeddings;
        let vocab = model.config().vocab_size;
        for r in requests {
            validate(r, context, vocab)?;
        }
        self.seqs = requests.iter().map(|r| Sequence::new(r, context)).collect();
        self.stats.prompt_tokens = requests.iter().map(|r| r.prompt.len()).sum();
        self.rows = (0..self.seqs.len()).filter(|&i| !self.seqs[i].finished()).collect();
        Ok(())
    }

    /// Hands the job its completions (and each sequence's held-back text first).
    fn finish(mut self, tokenizer: &Tokenizer) {
        self.stats.decode = self.decoding_since.elapsed();
        let mut completions = Vec::with_capacity(self.seqs.len());
        for (i, mut seq) in self.seqs.into_iter().enumerate() {
            let tail = match seq.close(tokenizer) {
                Ok(tail) => tail,
                Err(e) => return self.handler.done(Err(e)),
            };
            if !tail.is_empty() {
                let _ = self.handler.token(TokenEvent { index: i, token_id: None, text: &tail, logprob: None });
            }
            completions.push(Completion {
                token_ids: seq.generated,
                text: seq.text,
                finish_reason: seq.finish.unwrap_or(FinishReason::Length),
                logprobs: seq.logprobs,
            });
        }
        self.handler.done(Ok((completions, self.stats)))
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
