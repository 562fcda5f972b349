//! The KV caches of earlier prompts, kept between requests: see [`PromptCache`].

use crate::error::Result;
use crate::model::{KvCache, Llama};

/// What a [`PromptCache`] holds by default: 256 MiB, about 11,600 positions of TinyLlama's
/// shape in f16 (22.5 KiB each), 8,200 of Llama 3.2 1B's (32 KiB), 2,000 of an 8B Llama 3's
/// (128 KiB).
pub const DEFAULT_PROMPT_CACHE_BYTES: usize = 256 << 20;

/// The KV caches of the last jobs to end (each one row: its sequence's prompt and completion)
/// and of the starts that batches' prompts shared, kept between requests. A prompt that starts
/// as one of them did (a system prompt, a conversation's earlier turns) runs only what follows,
/// as llama.cpp's server (`cache_prompt`, `--cache-ram`) and vLLM's prefix caching do.
///
/// Several are kept, not only the last, so that conversations taking turns on one server (or
/// on one warm Lambda instance, which serves whichever conversation comes) each find their
/// own, and requests that run at once find a start they share: the least recently used go
/// first once the entries hold more than the budget, but the newest stays whatever its size (a
/// budget of zero keeps the last one only).
#[derive(Debug)]
pub struct PromptCache {
    /// Least recently used first.
    entries: Vec<Entry>,
    budget: usize,
}

/// One row of keys and values, unpadded, whose positions hold `tokens`: a job's `prompt`
/// tokens, then what it generated, if any.
#[derive(Debug)]
struct Entry {
    tokens: Vec<u32>,
    prompt: usize,
    kv: KvCache,
}

impl Default for PromptCache {
    fn default() -> Self {
        Self::with_budget(DEFAULT_PROMPT_CACHE_BYTES)
    }
}

impl PromptCache {
    /// A cache whose entries hold at most `bytes` together, but for the newest.
    pub fn with_budget(bytes: usize) -> Self {
        Self { entries: Vec::new(), budget: bytes }
    }

    /// How many tokens at the start of `prompt` the entry that shares the longest start with it
    /// holds: what [`take`](Self::take) would give a job of this one prompt.
    pub(crate) fn holds(&self, prompt: &[u32]) -> usize {
        self.entries.iter().map(|entry| shared_start(&entry.tokens, prompt)).max().unwrap_or(0)
    }

    /// A cache for a job whose prompts all start with `start`, and how many of those tokens it
    /// already holds: from the entry that shares the longest start with them (the newest of
    /// equals). The entry moves to the job when it is a conversation's turn that the job goes on
    /// with: the job shares all of the entry's prompt and some of its completion (a reply the
    /// caller changed or generated again leaves it for the next), and
    /// `leaves_one` in its place (it runs one distinct prompt). Otherwise the shared positions
    /// are copied and the entry stays for others: another conversation's turn that starts with
    /// the same system prompt, a start that the prompts of requests running at once share.
    pub(crate) fn take(&mut self, model: &Llama, start: &[u32], leaves_one: bool) -> Result<(KvCache, usize)> {
        let best = self.entries.iter().enumerate().map(|(i, entry)| (shared_start(&entry.tokens, start), i)).max();
        let Some((shared, i)) = best.filter(|&(shared, _)| shared > 0) else {
            return Ok((model.new_cache(), 0));
        };
        let entry = self.entries.remove(i);
        if leaves_one && shared > entry.prompt {
            let mut kv = entry.kv;
            kv.truncate(shared)?;
            return Ok((kv, shared));
        }
        let (kv, _) = KvCache::join(&[(&entry.kv, 0, &(shared..entry.kv.len()))])?;
        self.entries.push(entry);
        Ok((kv, shared))
    }

    /// Keeps `kv`, one unpadded row whose positions hold `tokens` (a `prompt`, then what was
    /// generated after it), for the next jobs, unless an entry holds these tokens already (it
    /// is then the most recently used); entries it holds all of go.
    pub(crate) fn keep(&mut self, tokens: &[u32], prompt: usize, kv: KvCache) {
        if let Some(i) = self.entries.iter().position(|entry| entry.tokens.starts_with(tokens)) {
            let entry = self.entries.remove(i);
            self.entries.push(entry);
            return;
        }
        self.entries.retain(|entry| !tokens.starts_with(&entry.tokens));
        self.entries.push(Entry { tokens: tokens.to_vec(), prompt: prompt.min(tokens.len()), kv });
        let mut held: usize = self.entries.iter().map(|entry| entry.kv.bytes()).sum();
        while held > self.budget && self.entries.len() > 1 {
            held -= self.entries.remove(0).kv.bytes();
        }
    }
}

/// How many tokens `a` and `b` start with alike.
pub(crate) fn shared_start(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(a, b)| a == b).count()
}
