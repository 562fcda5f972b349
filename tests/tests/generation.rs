//! Generation behaviour on a real (fixture) model: stop strings, streaming, seeds, limits, and the
//! Hugging Face loading variants (sharded f32 checkpoints, `chat_template.jinja`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::rc::Rc;

use llm_engine::{
    generate, generate_cached, generate_jobs, load, Completion, FinishReason, Generated, GenerationRequest, Job, JobHandler, LoadOptions, PromptCache,
    SamplingParams, TokenEvent,
};
use llm_tests::*;

fn llama3() -> llm_engine::LoadedModel {
    load(&fixtures_dir().join("llama3/llama3-bf16.gguf"), LoadOptions::default()).unwrap()
}

/// Runs one request; returns the completion and the text as it was streamed.
fn run(loaded: &llm_engine::LoadedModel, request: GenerationRequest) -> (llm_engine::Completion, String) {
    let mut streamed = String::new();
    let (mut completions, _) = generate(&loaded.model, &loaded.tokenizer, &[request], |event| {
        streamed.push_str(event.text);
        ControlFlow::Continue(())
    })
    .unwrap();
    (completions.remove(0), streamed)
}

#[test]
fn stop_string_cuts_text_and_stream_alike() {
    let loaded = llama3();
    let prompt = loaded.tokenizer.encode("Hello, my name is", true).unwrap();
    let base = GenerationRequest { prompt, max_tokens: 12, ignore_eos: true, ..Default::default() };
    let (full, streamed) = run(&loaded, base.clone());
    assert_eq!(full.text, streamed);
    assert_eq!(full.finish_reason, FinishReason::Length);
    // Stop in the middle of what greedy decoding produces.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 6, "{:?}", full.text);
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let expected = &full.text[..full.text.find(&stop).unwrap()];
    let (cut, streamed) = run(&loaded, GenerationRequest { stop: vec![stop.clone()], ..base });
    assert_eq!(cut.finish_reason, FinishReason::Stop, "stop {stop:?}");
    assert_eq!(cut.text, expected);
    assert_eq!(streamed, expected, "the stream must not leak the stop string");
}

#[test]
fn sampling_is_reproducible_per_sequence_in_a_batch() {
    let loaded = llama3();
    let prompt = loaded.tokenizer.encode("Once upon a time", true).unwrap();
    let request = |seed| GenerationRequest {
        prompt: prompt.clone(),
        max_tokens: 10,
        ignore_eos: true,
        sampling: SamplingParams { temperature: 1.0, top_k: 50, seed, ..Default::default() },
        ..Default::default()
    };
    let (batch, _) = generate(&loaded.model, &loaded.tokenizer, &[request(1), request(2), request(1)], |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(batch[0].token_ids, batch[2].token_ids);
    assert_ne!(batch[0].token_ids, batch[1].token_ids);
    let (alone, _) = run(&loaded, request(2));
    assert_eq!(alone.token_ids, batch[1].token_ids);
}

/// Sequences that share a prompt run it once and copy its cache rows, prompts that share a
/// start run that once (or take it from the prompt cache); each sequence still generates what
/// it generates alone, among prompts of other lengths. Greedy:
/// this random model's distributions are nearly flat over 128k tokens, so a sampled token moves
/// with the last bits of a logit, and padding changes how the products sum.
#[test]
fn shared_prompts_run_once_and_sample_as_alone() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let encode = |text: &str| tokenizer.encode(text, true).unwrap();
    let request = |prompt: &Vec<u32>| GenerationRequest {
        prompt: prompt.clone(),
        max_tokens: 6,
        ignore_eos: true,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        logprobs: Some(0),
        ..Default::default()
    };
    let alone = |r: &GenerationRequest| generate(model, tokenizer, std::slice::from_ref(r), |_| ControlFlow::Continue(())).unwrap().0.remove(0);
    let (short, long) = (encode("Once upon a time"), encode("In a land far away, long before the rivers had names"));
    let mut prompt_cache = PromptCache::default();
    let mut check = |requests: &[GenerationRequest]| {
        let (batch, stats) = generate_cached(model, tokenizer, requests, &mut prompt_cache, |_| ControlFlow::Continue(())).unwrap();
        for (r, together) in requests.iter().zip(&batch) {
            let alone = alone(r);
            assert_eq!(together.token_ids, alone.token_ids, "{} prompts, cached {}", requests.len(), stats.cached_prompt_tokens);
            for (a, b) in together.logprobs.iter().zip(&alone.logprobs) {
                assert!((a.logprob - b.logprob).abs() < 1e-3, "{} against {}", a.logprob, b.logprob);
            }
        }
        stats.cached_prompt_tokens
    };
    assert_eq!(check(&[request(&short), request(&long), request(&short), request(&long), request(&short)]), 0);
    assert_eq!(check(&[request(&long)]), 0);
    // Two choices of a prompt that starts as the last request did; the prompt stays cached.
    let next = [long.clone(), encode(" and then")].concat();
    assert_eq!(check(&[request(&next), request(&next)]), long.len());
    // Questions after one system prompt (which shares BOS with the cached prompt): its tokens
    // run once in a pass of their own, each question padded after them, and stay cached for
    // the next request, and the next batch.
    let system = encode("You are a careful assistant. Answer every question in one short sentence, and never more.");
    let ask = |question: &str| [system.clone(), tokenizer.encode(question, false).unwrap()].concat();
    let asks = [ask("Why is the sky blue?"), ask("Name a prime number above ninety."), ask("Hi")];
    assert_eq!(check(&asks.iter().map(request).collect::<Vec<_>>()), 1);
    assert_eq!(check(&[request(&ask("Hello"))]), system.len());
    assert_eq!(check(&[request(&asks[0]), request(&asks[1]), request(&asks[2]), request(&asks[0])]), system.len());
}

#[test]
fn limits_and_caller_stop() {
    let loaded = llama3();
    let prompt = loaded.tokenizer.encode("Hi", true).unwrap();
    let long = GenerationRequest { prompt: vec![1; 200_000], max_tokens: 1, ..Default::default() };
    let err = generate(&loaded.model, &loaded.tokenizer, &[long], |_| ControlFlow::Continue(())).unwrap_err();
    assert!(err.to_string().contains("context window"), "{err}");
    let request = GenerationRequest { prompt, max_tokens: 50, ignore_eos: true, ..Default::default() };
    let mut seen = 0;
    let (done, _) = generate(&loaded.model, &loaded.tokenizer, &[request], |_| {
        seen += 1;
        if seen == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(done[0].token_ids.len(), 3);
    assert_eq!(done[0].finish_reason, FinishReason::Length);
}

/// A sharded f32 checkpoint (`model.safetensors.index.json`) gives the f16 original's logits.
#[test]
fn sharded_f32_checkpoint_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("llama2/hf");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut shards: [HashMap<String, candle_core::Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let shard = i % 2;
        weight_map.insert(name.clone(), format!("model-0000{}-of-00002.safetensors", shard + 1).into());
        shards[shard].insert(name, t.to_dtype(candle_core::DType::F32).unwrap());
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(shard, tmp.path().join(format!("model-0000{}-of-00002.safetensors", i + 1))).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let sharded = load(tmp.path(), LoadOptions::default()).unwrap();
    let original = load(&src, LoadOptions::default()).unwrap();
    let ids = original.tokenizer.encode("Hello, my name is", true).unwrap();
    let diff = max_abs_diff(&prompt_logits(&sharded.model, &ids), &prompt_logits(&original.model, &ids));
    assert!(diff < 1e-6, "{diff}");
    assert!(sharded.chat_template.is_some());
}

#[test]
fn chat_template_jinja_file_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("llama3/hf");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(tmp.path().join("chat_template.jinja"), "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}").unwrap();
    let loaded = load(tmp.path(), LoadOptions::default()).unwrap();
    let text = loaded.chat_template.unwrap().render(&[llm_engine::ChatMessage::new("user", "hi")], true).unwrap();
    assert_eq!(text, "<user>hi");
}

/// A request that starts as the last one's prompt and completion did runs only what follows,
/// and generates what a fresh prefill of its whole prompt generates (the same tokens, their
/// log-probabilities within the rounding of sums taken in another order). A batch of several
/// sequences takes what it shares with the cache and leaves the start its prompts share.
#[test]
fn a_prompt_cache_serves_a_shared_start_as_a_fresh_prefill_would() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let request = |prompt: Vec<u32>| GenerationRequest { prompt, max_tokens: 8, ignore_eos: true, logprobs: Some(0), ..Default::default() };
    let mut prompt_cache = PromptCache::default();
    let mut cached = |requests: &[GenerationRequest]| {
        let (completions, stats) = generate_cached(model, tokenizer, requests, &mut prompt_cache, |_| ControlFlow::Continue(())).unwrap();
        let fresh = generate(model, tokenizer, requests, |_| ControlFlow::Continue(())).unwrap().0;
        for (cached, fresh) in completions.iter().zip(&fresh) {
            assert_eq!(cached.token_ids, fresh.token_ids);
            for (a, b) in cached.logprobs.iter().zip(&fresh.logprobs) {
                assert!((a.logprob - b.logprob).abs() < 1e-3, "{} against {}", a.logprob, b.logprob);
            }
        }
        (completions, stats.cached_prompt_tokens)
    };

    let first = tokenizer.encode("The system prompt says: answer briefly and well. The user asks", true).unwrap();
    let (completions, reused) = cached(&[request(first.clone())]);
    assert_eq!(reused, 0);
    // The next turn: the prompt, the completion but its last token (never run), and more.
    let mut turn = [first.clone(), completions[0].token_ids.clone()].concat();
    turn.extend(tokenizer.encode(" and then what?", false).unwrap());
    let (_, reused) = cached(&[request(turn)]);
    assert_eq!(reused, first.len() + 8 - 1);
    // Another question after the same system prompt.
    let mut other = first[..10].to_vec();
    other.extend(tokenizer.encode(" something else entirely", false).unwrap());
    assert_eq!(cached(&[request(other.clone())]).1, 10);
    // The same prompt again runs its last token only.
    assert_eq!(cached(&[request(other.clone())]).1, other.len() - 1);
    // A batch of two prompts takes the start they share with the cache's entries; the entry
    // of `other`'s last run, which holds that start too, stays.
    assert_eq!(cached(&[request(other.clone()), request(first)]).1, 10);
    assert_eq!(cached(&[request(other.clone())]).1, other.len() - 1);
}

/// Conversations that take turns each find their own earlier turns in the prompt cache, and
/// go on as a fresh prefill would; with no budget it keeps the last request's only.
#[test]
fn conversations_taking_turns_each_find_their_own_start() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let request = |prompt: Vec<u32>| GenerationRequest { prompt, max_tokens: 6, ignore_eos: true, logprobs: Some(0), ..Default::default() };
    let encode = |text: &str, bos| tokenizer.encode(text, bos).unwrap();
    let openings = ["The first conversation opens with a question about rivers", "Another one starts somewhere else, with mountains"];
    for (budget, reused_in_turn) in [(llm_engine::DEFAULT_PROMPT_CACHE_BYTES, true), (0, false)] {
        let mut prompt_cache = PromptCache::with_budget(budget);
        let mut turns: Vec<Vec<u32>> = openings.iter().map(|text| encode(text, true)).collect();
        for round in 0..3 {
            for (conversation, turn) in turns.iter_mut().enumerate() {
                let (completions, stats) =
                    generate_cached(model, tokenizer, &[request(turn.clone())], &mut prompt_cache, |_| ControlFlow::Continue(())).unwrap();
                let fresh = generate(model, tokenizer, &[request(turn.clone())], |_| ControlFlow::Continue(())).unwrap().0;
                assert_eq!(completions[0].token_ids, fresh[0].token_ids);
                for (a, b) in completions[0].logprobs.iter().zip(&fresh[0].logprobs) {
                    assert!((a.logprob - b.logprob).abs() < 1e-3, "{} against {}", a.logprob, b.logprob);
                }
                // The last turn and its completion but the last token (never run); else only
                // the begin-of-text token the openings share.
                let expected = match (round, conversation) {
                    (0, 0) => 0,
                    (0, _) => 1,
                    _ if reused_in_turn => turn.len() - encode(" Go on.", false).len() - 1,
                    _ => 1,
                };
                assert_eq!(stats.cached_prompt_tokens, expected, "budget {budget}, round {round}");
                turn.extend(&completions[0].token_ids);
                turn.extend(encode(" Go on.", false));
            }
        }
    }
}

/// `n` token ids of the fixture's vocabulary, a different run for each `seed`.
fn ids(n: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed) % 5000 + 10) as u32).collect()
}

/// Each token's job, in the order all of a test's jobs sampled them.
type Tokens = Rc<RefCell<Vec<usize>>>;
/// Each job's result.
type Results = Rc<RefCell<HashMap<usize, Generated>>>;

/// Empty lists for a test's [`Recorder`]s.
fn recording() -> (Tokens, Results) {
    (Rc::default(), Rc::default())
}

/// A test job's handler: records into [`recording`]'s lists.
struct Recorder {
    job: usize,
    tokens: Tokens,
    results: Results,
}

impl Recorder {
    fn new(job: usize, tokens: &Tokens, results: &Results) -> Self {
        Self { job, tokens: tokens.clone(), results: results.clone() }
    }
}

impl JobHandler for Recorder {
    fn token(&mut self, event: TokenEvent<'_>) -> ControlFlow<()> {
        if event.token_id.is_some() {
            self.tokens.borrow_mut().push(self.job);
        }
        ControlFlow::Continue(())
    }

    fn done(self: Box<Self>, result: llm_engine::Result<Generated>) {
        self.results.borrow_mut().insert(self.job, result.unwrap());
    }
}

/// A greedy request that ignores end-of-text and records its log-probabilities.
fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        ignore_eos: true,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        logprobs: Some(0),
        ..Default::default()
    }
}

/// Each job `j` (its requests `jobs[j]`) generated in a batch what it generates alone: the same
/// greedy tokens, log-probabilities within 1e-3.
fn assert_generated_as_alone(loaded: &llm_engine::LoadedModel, results: &HashMap<usize, Generated>, jobs: &[&Vec<GenerationRequest>]) {
    for (j, requests) in jobs.iter().enumerate() {
        let alone = generate(&loaded.model, &loaded.tokenizer, requests, |_| ControlFlow::Continue(())).unwrap().0;
        for (together, alone) in results[&j].0.iter().zip(&alone) {
            assert_eq!(together.token_ids, alone.token_ids, "job {j}");
            for (x, y) in together.logprobs.iter().zip(&alone.logprobs) {
                assert!((x.logprob - y.logprob).abs() < 1e-3, "job {j}: {} against {}", x.logprob, y.logprob);
            }
        }
    }
}

/// Jobs join a running batch between its steps and leave it as they end, each generating what
/// it generates alone (greedy; log-probabilities within 1e-3), with three rows at most:
/// B (one sequence) joins while A generates and, ending first, leaves its row to the prompt
/// cache without the batch's padding; C (two choices of B's next turn) joins from that cache;
/// D (two sequences) waits until C's rows leave room for it.
#[test]
fn jobs_join_a_running_batch_and_generate_as_alone() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let encode = |text: &str| tokenizer.encode(text, true).unwrap();
    let request = |prompt: &[u32], max_tokens| greedy(prompt.to_vec(), max_tokens);
    let a = vec![request(&encode("In a land far away, long before the rivers had names"), 16)];
    let b = vec![request(&encode("Once upon a time"), 4)];
    let d = vec![request(&encode("Hello"), 3), request(&encode("The quick brown fox jumps over"), 5)];
    let (tokens, results) = recording();
    let job = |job: usize, requests: &Vec<GenerationRequest>| Job {
        requests: requests.clone(),
        cache_prompt: true,
        handler: Box::new(Recorder::new(job, &tokens, &results)),
    };
    let next_turn = |b: &Completion| {
        let turn = [b.token_ids.clone(), tokenizer.encode(" and then", false).unwrap()].concat();
        vec![request(&[encode("Once upon a time"), turn].concat(), 6); 2]
    };
    let mut offered = 0;
    let mut prompt_cache = PromptCache::default();
    generate_jobs(model, tokenizer, &mut prompt_cache, 3, |_| {
        let a_tokens = tokens.borrow().iter().filter(|&&j| j == 0).count();
        let b_done = results.borrow().get(&1).map(|(completions, _): &(Vec<Completion>, _)| completions[0].clone());
        let next = match (offered, b_done) {
            (0, _) => job(0, &a),
            (1, _) if a_tokens >= 3 => job(1, &b),
            (2, Some(b)) => job(2, &next_turn(&b)),
            (3, _) => job(3, &d),
            _ => return None,
        };
        offered += 1;
        Some(next)
    });

    let results = results.borrow();
    let tokens = tokens.borrow();
    let first = |j: usize| tokens.iter().position(|&t| t == j).unwrap();
    let last = |j: usize| tokens.iter().rposition(|&t| t == j).unwrap();
    assert!(first(1) < last(0) && first(2) < last(0), "B and C join while A generates: {tokens:?}");
    assert!(first(3) > last(2), "D waits for C's rows: {tokens:?}");
    let c = next_turn(&results[&1].0[0]);
    assert_eq!(results[&2].1.cached_prompt_tokens, b[0].prompt.len() + 4 - 1, "C starts from B's row");
    assert_generated_as_alone(&loaded, &results, &[&a, &b, &c, &d]);
}

/// A long prompt that joins a running batch runs in parts, each in one pass with a decode step
/// of the batch (chunked prefill), and generates what it generates alone: B, one 600-token prompt
/// (five parts of at most 128 positions), and C, two prompts whose 300-token shared start runs
/// in a row of its own, in parts, before their own tokens; A decodes all along.
#[test]
fn long_prompts_run_in_parts_between_decode_steps() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let a = vec![greedy(ids(8, 1), 40)];
    let b = vec![greedy(ids(600, 2), 3)];
    let c = vec![greedy([ids(300, 3), ids(20, 4)].concat(), 3), greedy([ids(300, 3), ids(24, 5)].concat(), 3)];
    let (tokens, results) = recording();
    /// Marks in `tokens` where a job was offered.
    const OFFERED: usize = 100;
    let mut offered = 0;
    generate_jobs(model, tokenizer, &mut PromptCache::default(), 8, |_| {
        let a_tokens = tokens.borrow().iter().filter(|&&j| j == 0).count();
        let (job, requests) = match offered {
            0 => (0, &a),
            1 if a_tokens >= 2 => (1, &b),
            2 => (2, &c),
            _ => return None,
        };
        offered += 1;
        tokens.borrow_mut().push(OFFERED + job);
        Some(Job { requests: requests.clone(), cache_prompt: false, handler: Box::new(Recorder::new(job, &tokens, &results)) })
    });

    let tokens = tokens.borrow();
    let a_tokens_before_first = |job: usize| {
        let offer = tokens.iter().position(|&t| t == OFFERED + job).unwrap();
        let first = tokens.iter().position(|&t| t == job).unwrap();
        tokens[offer..first].iter().filter(|&&t| t == 0).count()
    };
    assert!(a_tokens_before_first(1) >= 4, "A decodes between B's parts: {tokens:?}");
    assert!(a_tokens_before_first(2) >= 2 + 4, "A decodes between C's parts, after B's: {tokens:?}");
    assert_generated_as_alone(&loaded, &results.borrow(), &[&a, &b, &c]);
}

/// Jobs that wait together start together: A, B and C, whose prompts share a 64-token start
/// and are alike in length, run as one, their start once, and leave that start to the prompt
/// cache, where E, which comes once they generate, finds it; D, a prompt five times as long,
/// waits for their start and runs on its own. Each generates what it generates alone.
#[test]
fn jobs_that_wait_together_start_together() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let start = ids(64, 1);
    let after_start = |tail: usize, seed: usize| vec![greedy([start.clone(), ids(tail, seed)].concat(), 4)];
    let jobs = [after_start(10, 2), after_start(14, 3), after_start(20, 4), vec![greedy(ids(400, 5), 4)], after_start(8, 6)];
    let (tokens, results) = recording();
    let mut offered = 0;
    generate_jobs(model, tokenizer, &mut PromptCache::default(), 8, |_| {
        let ready = offered < 4 || !tokens.borrow().is_empty();
        (offered < jobs.len() && ready).then(|| {
            offered += 1;
            let handler = Recorder::new(offered - 1, &tokens, &results);
            Job { requests: jobs[offered - 1].clone(), cache_prompt: true, handler: Box::new(handler) }
        })
    });
    let (tokens, results) = (tokens.borrow(), results.borrow());
    assert_eq!(tokens[..3], [0, 1, 2], "A, B and C sample their first tokens in one step: {tokens:?}");
    let cached: Vec<usize> = (0..5).map(|j| results[&j].1.cached_prompt_tokens).collect();
    assert_eq!(cached, [0, 0, 0, 0, start.len()], "E starts from the start A, B and C ran once");
    assert_generated_as_alone(&loaded, &results, &jobs.iter().collect::<Vec<_>>());
}

/// Jobs that come while a long prompt joins start beside it when they run less than half of
/// what it has left: S, a 150-token prompt (more than a step's half, so in parts), and Q, the
/// next turn of P's conversation (P's row in the prompt cache), get their first tokens before
/// B, a 600-token prompt that came with them, while A decodes between B's parts; Q, which runs
/// fewer positions, before S. Q runs apart from S (together they would share no start, and Q
/// would lose what the cache holds). Each generates what it generates alone.
#[test]
fn shorter_prompts_that_come_while_a_long_one_joins_start_beside_it() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let p = vec![greedy(ids(200, 7), 2)];
    let a = vec![greedy(ids(8, 1), 40)];
    let b = vec![greedy(ids(600, 2), 3)];
    let s = vec![greedy(ids(150, 3), 4)];
    let (tokens, results) = recording();
    let next_turn = |p: &Completion| vec![greedy([ids(200, 7), p.token_ids.clone(), ids(20, 9)].concat(), 4)];
    let mut offered = 0;
    generate_jobs(model, tokenizer, &mut PromptCache::default(), 8, |_| {
        let a_tokens = tokens.borrow().iter().filter(|&&j| j == 1).count();
        let p_done = results.borrow().get(&0).map(|(completions, _): &(Vec<Completion>, _)| completions[0].clone());
        let requests = match (offered, p_done) {
            (0, _) => p.clone(),
            (1, Some(_)) => a.clone(),
            (2, _) if a_tokens >= 2 => b.clone(),
            (3, _) => s.clone(),
            (4, Some(p)) => next_turn(&p),
            _ => return None,
        };
        offered += 1;
        Some(Job { requests, cache_prompt: true, handler: Box::new(Recorder::new(offered - 1, &tokens, &results)) })
    });

    let (tokens, results) = (tokens.borrow(), results.borrow());
    let first = |j: usize| tokens.iter().position(|&t| t == j).unwrap();
    assert!(first(3) < first(2) && first(4) < first(2), "S and Q do not wait for B's parts: {tokens:?}");
    assert!(first(4) < first(3), "Q, with fewer positions to run, goes before S: {tokens:?}");
    let a_tokens_before_b = tokens[..first(2)].iter().filter(|&&t| t == 1).count();
    assert!(a_tokens_before_b >= 2 + 4, "A decodes between B's parts: {tokens:?}");
    assert_eq!(results[&4].1.cached_prompt_tokens, 200 + 2 - 1, "Q starts from P's row");
    let q = next_turn(&results[&0].0[0]);
    assert_generated_as_alone(&loaded, &results, &[&p, &a, &b, &s, &q]);
}

/// A long prompt keeps at least half of each step however many shorter ones start beside it,
/// and those that start beside it run the older first when alike: while a 120-token prompt comes
/// every step, B (600 positions) gets its first token within 600 / 64 steps (rounded up) and
/// one, after the first of them, and the 120-token prompts get theirs in the order they came.
#[test]
fn a_long_prompt_keeps_half_of_each_step_however_many_start_beside_it() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let a = vec![greedy(ids(8, 1), 40)];
    let b = vec![greedy(ids(600, 2), 1)];
    let (tokens, results) = recording();
    let (mut offered, mut a_at_b, mut a_at_last) = (0, 0, 0);
    generate_jobs(model, tokenizer, &mut PromptCache::default(), 64, |_| {
        let a_tokens = tokens.borrow().iter().filter(|&&j| j == 0).count();
        let requests = match offered {
            0 => a.clone(),
            1 if a_tokens >= 2 => {
                a_at_b = a_tokens;
                b.clone()
            }
            2..14 if a_tokens > a_at_last.max(a_at_b) => {
                a_at_last = a_tokens;
                vec![greedy(ids(120, offered), 1)]
            }
            _ => return None,
        };
        offered += 1;
        Some(Job { requests, cache_prompt: false, handler: Box::new(Recorder::new(offered - 1, &tokens, &results)) })
    });

    let tokens = tokens.borrow();
    let first = |j: usize| tokens.iter().position(|&t| t == j).unwrap();
    let b_waited = tokens[..first(1)].iter().filter(|&&t| t == 0).count() - a_at_b;
    assert!(b_waited <= 600_usize.div_ceil(64) + 1, "B waited {b_waited} steps: {tokens:?}");
    assert!(first(2) < first(1), "the first 120-token prompt ran beside B: {tokens:?}");
    assert!((3..14).all(|j| first(j - 1) < first(j)), "the 120-token prompts end in the order they came: {tokens:?}");
}

/// The next turns of two conversations that wait together (nothing else runs) each start from
/// their own conversation's row in the prompt cache: prompts that run as one would take from it
/// only the start they share, none.
#[test]
fn next_turns_that_wait_together_each_start_from_their_own_conversation() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let mut prompt_cache = PromptCache::default();
    let firsts = [greedy(ids(60, 1), 2), greedy(ids(70, 2), 2)];
    let mut turns = Vec::new();
    for first in &firsts {
        let (completions, _) = generate_cached(model, tokenizer, std::slice::from_ref(first), &mut prompt_cache, |_| ControlFlow::Continue(())).unwrap();
        turns.push(vec![greedy([first.prompt.clone(), completions[0].token_ids.clone(), ids(10, 3)].concat(), 3)]);
    }
    let (tokens, results) = recording();
    let mut waiting: Vec<Job> = (0..2)
        .map(|job| Job { requests: turns[job].clone(), cache_prompt: true, handler: Box::new(Recorder::new(job, &tokens, &results)) as Box<dyn JobHandler> })
        .collect();
    generate_jobs(model, tokenizer, &mut prompt_cache, 8, |_| (!waiting.is_empty()).then(|| waiting.remove(0)));
    let results = results.borrow();
    let cached: Vec<usize> = (0..2).map(|j| results[&j].1.cached_prompt_tokens).collect();
    assert_eq!(cached, [60 + 1, 70 + 1], "each turn starts from its conversation's row");
    assert_generated_as_alone(&loaded, &results, &[&turns[0], &turns[1]]);
}

/// A [`Recorder`] whose caller goes away when `gone` is set.
struct Abandoning {
    recorder: Recorder,
    gone: Rc<Cell<bool>>,
}

impl JobHandler for Abandoning {
    fn cancelled(&self) -> bool {
        self.gone.get()
    }

    fn token(&mut self, event: TokenEvent<'_>) -> ControlFlow<()> {
        self.recorder.token(event)
    }

    fn done(self: Box<Self>, result: llm_engine::Result<Generated>) {
        Box::new(self.recorder).done(result)
    }
}

/// A job whose caller goes away while its long prompt runs in parts is dropped unanswered, and
/// what ran of its prompt stays in the prompt cache: C, the same prompt sent again, starts from
/// it and generates what it generates alone.
#[test]
fn a_prompt_abandoned_while_it_runs_leaves_what_ran_to_the_prompt_cache() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let a = vec![greedy(ids(8, 1), 40)];
    let b = vec![greedy(ids(600, 2), 3)];
    let (tokens, results) = recording();
    let gone = Rc::new(Cell::new(false));
    let mut offered = 0;
    generate_jobs(model, tokenizer, &mut PromptCache::default(), 8, |_| {
        let a_tokens = tokens.borrow().iter().filter(|&&j| j == 0).count();
        let recorder = |job| Recorder::new(job, &tokens, &results);
        let job: Box<dyn JobHandler> = match offered {
            0 => Box::new(recorder(0)),
            1 if a_tokens >= 2 => Box::new(Abandoning { recorder: recorder(1), gone: gone.clone() }),
            2 if a_tokens >= 5 => {
                gone.set(true);
                Box::new(recorder(2))
            }
            _ => return None,
        };
        offered += 1;
        Some(Job { requests: [&a, &b, &b][offered - 1].clone(), cache_prompt: true, handler: job })
    });
    let results = results.borrow();
    assert!(!results.contains_key(&1), "B is dropped unanswered");
    let cached = results[&2].1.cached_prompt_tokens;
    assert!((128..600).contains(&cached), "C starts from the parts of B that ran: {cached}");
    let alone = generate(model, tokenizer, &b, |_| ControlFlow::Continue(())).unwrap().0;
    assert_eq!(results[&2].0[0].token_ids, alone[0].token_ids);
}

/// A row that leaves the batch for the prompt cache, padded at its start there and of 256
/// positions (a whole number of the buffers' growth steps), serves the next prompt that starts
/// as its prompt did, as a fresh prefill would.
#[test]
fn a_row_left_to_the_prompt_cache_serves_the_next_prompt() {
    let loaded = llama3();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let request = |prompt: Vec<u32>, max_tokens| GenerationRequest { prompt, max_tokens, ignore_eos: true, ..Default::default() };
    let jobs = [vec![request(ids(300, 1), 8)], vec![request(ids(253, 2), 4)], vec![request([&ids(253, 2)[..100], &[7, 8, 9]].concat(), 2)]];
    let (tokens, results) = recording();
    let mut offered = 0;
    generate_jobs(model, tokenizer, &mut PromptCache::default(), 8, |_| {
        let ready = match offered {
            0 => true,
            1 => !tokens.borrow().is_empty(),
            _ => results.borrow().contains_key(&1),
        };
        (offered < jobs.len() && ready).then(|| {
            offered += 1;
            let handler = Recorder::new(offered - 1, &tokens, &results);
            Job { requests: jobs[offered - 1].clone(), cache_prompt: true, handler: Box::new(handler) }
        })
    });
    let results = results.borrow();
    assert_eq!(results[&2].1.cached_prompt_tokens, 100);
    let alone = generate(model, tokenizer, &jobs[2], |_| ControlFlow::Continue(())).unwrap().0;
    assert_eq!(results[&2].0[0].token_ids, alone[0].token_ids);
}

/// Caches of different lengths joined into one batch decode as they do alone (the shorter row
/// padded at its start), and a row taken back out, without its padding, decodes on: here the
/// padded one, of 256 positions, a whole number of the buffers' growth steps.
#[test]
fn joined_cache_rows_decode_as_alone() {
    use llm_engine::model::ONE_UNPADDED_ROW as UNPADDED;
    use llm_engine::{KvCache, Logits};
    let loaded = llama3();
    let model = &loaded.model;
    let forward = |cache: &mut KvCache, padding: &[std::ops::Range<usize>], rows: &[&[u32]]| {
        let tokens: Vec<u32> = rows.concat();
        let input = candle_core::Tensor::from_vec(tokens, (rows.len(), rows[0].len()), model.device()).unwrap();
        model.forward(&input, padding, cache, Logits::Last).unwrap()
    };
    let prefilled = |prompt: &[u32]| {
        let mut cache = model.new_cache();
        forward(&mut cache, UNPADDED, &[prompt]);
        cache
    };
    let (mut long, mut short) = (prefilled(&ids(300, 1)), prefilled(&ids(256, 2)));
    let (mut joined, padding) = KvCache::join(&[(&long, 0, &UNPADDED[0]), (&short, 0, &UNPADDED[0])]).unwrap();
    assert_eq!(padding, vec![0..0, 0..44]);
    let (mut taken, unpadded) = KvCache::join(&[(&joined, 1, &padding[1])]).unwrap();
    assert_eq!((taken.len(), unpadded.as_slice()), (256, UNPADDED));

    let together = forward(&mut joined, &padding, &[&[42], &[43]]);
    let alone = [forward(&mut long, UNPADDED, &[&[42]]), forward(&mut short, UNPADDED, &[&[43]])];
    let after_taken = forward(&mut taken, UNPADDED, &[&[43]]);
    for (row, alone) in alone.iter().enumerate() {
        let diff = max_abs_diff(&together.get(row).unwrap(), &alone.get(0).unwrap());
        assert!(diff < 1e-3, "row {row} joined differs from alone by {diff}");
    }
    let diff = max_abs_diff(&after_taken, &alone[1]);
    assert!(diff < 1e-3, "the taken row differs from alone by {diff}");
}

/// A batch's decode step and a prompt's part in one pass (`Llama::forward_parts`: their rows
/// through every product together, each attending over its own cache) give what each gives in
/// a pass of its own, and leave the same keys and values: the next step of each agrees too. On
/// candle's products (bf16) and the kernels' (Q8_0, whose product of the step's two rows alone
/// goes through tiles, and beside the part's fifty through panels).
#[test]
fn a_decode_step_and_a_prompt_part_in_one_pass_run_as_apart() {
    for file in ["llama3/llama3-bf16.gguf", "llama2/llama2-q8_0.gguf"] {
        let loaded = load(&fixtures_dir().join(file), LoadOptions::default()).unwrap();
        decode_step_and_prompt_part_run_as_apart(&loaded.model);
    }
}

fn decode_step_and_prompt_part_run_as_apart(model: &llm_engine::Llama) {
    use llm_engine::model::ONE_UNPADDED_ROW as UNPADDED;
    use llm_engine::{KvCache, Logits, Part};
    let tensor = |rows: &[&[u32]]| candle_core::Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), model.device()).unwrap();
    let prefilled = |rows: &[&[u32]], padding: &[std::ops::Range<usize>]| {
        let mut cache = model.new_cache();
        model.forward(&tensor(rows), padding, &mut cache, Logits::Last).unwrap();
        cache
    };
    // Two rows decoding (the second padded at its start), and a prompt whose part follows
    // the 40 positions of it that ran.
    let decoding_padding = [0..0, 0..10];
    let (a, b) = (ids(30, 1), [vec![0; 10], ids(20, 2)].concat());
    let prompt = ids(90, 3);
    let fresh = || (prefilled(&[&a, &b], &decoding_padding), prefilled(&[&prompt[..40]], UNPADDED));
    let (step, part) = (tensor(&[&[42], &[43]]), tensor(&[&prompt[40..]]));

    let (mut decoding, mut prompting) = fresh();
    let apart =
        [model.forward(&step, &decoding_padding, &mut decoding, Logits::Last).unwrap(), model.forward(&part, UNPADDED, &mut prompting, Logits::Last).unwrap()];
    let (mut decoding_together, mut prompting_together) = fresh();
    let together = model
        .forward_parts(&mut [
            Part { tokens: &step, padding: &decoding_padding, cache: &mut decoding_together, logits: Some(Logits::Last) },
            Part { tokens: &part, padding: UNPADDED, cache: &mut prompting_together, logits: Some(Logits::Last) },
        ])
        .unwrap();
    for (apart, together) in apart.iter().zip(&together) {
        let diff = max_abs_diff(apart, together.as_ref().unwrap());
        assert!(diff < 1e-3, "a part in one pass with another differs from it alone by {diff}");
    }
    let next = |cache: &mut KvCache, padding: &[std::ops::Range<usize>], rows: &[&[u32]]| model.forward(&tensor(rows), padding, cache, Logits::Last).unwrap();
    let diff = max_abs_diff(&next(&mut decoding, &decoding_padding, &[&[7], &[8]]), &next(&mut decoding_together, &decoding_padding, &[&[7], &[8]]));
    assert!(diff < 1e-3, "the step's keys and values differ by {diff}");
    let diff = max_abs_diff(&next(&mut prompting, UNPADDED, &[&[9]]), &next(&mut prompting_together, UNPADDED, &[&[9]]));
    assert!(diff < 1e-3, "the part's keys and values differ by {diff}");
}

/// A prompt longer than one prefill pass (512 positions of all rows) runs in several, and its
/// first generated token has the log-probability one pass over the prompt gives it: alone
/// (two passes) and beside a shorter prompt (256 positions a row, three passes).
#[test]
fn a_long_prompt_prefills_in_passes_as_in_one() {
    let loaded = llama3();
    let ids: Vec<u32> = (0..700).map(|i| (i * 7919 % 5000 + 10) as u32).collect();
    let one_pass = |ids: &[u32]| {
        let logits = prompt_logits(&loaded.model, ids).get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
        let best = llm_engine::sampling::argmax(&logits);
        (best, logits[best as usize] - log_sum)
    };
    let request = |prompt: &[u32]| GenerationRequest { prompt: prompt.to_vec(), max_tokens: 1, logprobs: Some(0), ..Default::default() };
    for prompts in [vec![&ids[..]], vec![&ids[..], &ids[..300]]] {
        let requests: Vec<_> = prompts.iter().map(|p| request(p)).collect();
        let (completions, _) = generate(&loaded.model, &loaded.tokenizer, &requests, |_| ControlFlow::Continue(())).unwrap();
        for (prompt, completion) in prompts.iter().zip(&completions) {
            let (best, logprob) = one_pass(prompt);
            let first = &completion.logprobs[0];
            assert_eq!(first.token_id, best);
            assert!((first.logprob - logprob).abs() < 1e-3, "{} against one pass's {logprob}", first.logprob);
        }
    }
}

/// Decoding one token at a time through the KV cache, past the point where its buffers grow,
/// gives the logits one pass over the whole sequence gives.
#[test]
fn cached_decode_matches_one_pass_across_a_cache_growth() {
    let loaded = llama3();
    let model = &loaded.model;
    let ids: Vec<u32> = (0..300).map(|i| (i * 7919 % 5000 + 10) as u32).collect();
    let whole = prompt_logits(model, &ids);

    let prompt = 250;
    for (at, logits) in (prompt..).zip(cached_decode(model, &ids, prompt)) {
        let diff = max_abs_diff(&logits, &whole.get(at).unwrap());
        assert!(diff < 1e-3, "position {at}: cached decode differs from one pass by {diff}");
    }
}

/// The logits of each position after `prompt`, decoded one token at a time through the cache.
fn cached_decode(model: &llm_engine::Llama, ids: &[u32], prompt: usize) -> Vec<candle_core::Tensor> {
    let mut cache = model.new_cache();
    let mut step = |tokens: &[u32]| {
        let input = candle_core::Tensor::new(tokens, model.device()).unwrap().unsqueeze(0).unwrap();
        model.forward(&input, llm_engine::model::ONE_UNPADDED_ROW, &mut cache, llm_engine::Logits::Last).unwrap().squeeze(0).unwrap()
    };
    step(&ids[..prompt]);
    let logits = (prompt..ids.len()).map(|at| step(&ids[at..at + 1])).collect();
    assert_eq!(cache.len(), ids.len());
    logits
}

/// A quantized model keeps its cache in f16, as llama.cpp does, and a dense one in f32. Through
/// an f16 cache, past a cache growth, the dense model's logits stay within f16's rounding of
/// its f32 cache's (4.3e-4 measured). The quantized model's move more (0.051 measured), as any
/// perturbation does there: a changed activation crosses a rounding step of the 8-bit blocks the
/// products quantize activations to (the f32 cache's own cached decode differs from one pass by
/// 0.032), but less than the weights' quantization moves them (0.088).
#[test]
fn a_quantized_model_decodes_through_an_f16_cache() {
    use llm_engine::KvCacheType::{F16, F32};
    let fixture = |name: &str, kv_cache| load(&fixtures_dir().join("llama2").join(name), LoadOptions { kv_cache, ..Default::default() }).unwrap();
    let (quantized, quantized_f32) = (fixture("llama2-q8_0.gguf", None), fixture("llama2-q8_0.gguf", Some(F32)));
    let (dense, dense_f16) = (fixture("llama2-f16.gguf", None), fixture("llama2-f16.gguf", Some(F16)));
    assert_eq!([&quantized, &dense].map(|loaded| loaded.model.kv_cache_type()), [F16, F32]);
    let ids: Vec<u32> = (0..300).map(|i| (i * 7919 % 5000 + 10) as u32).collect();
    let prompt = 250;
    let largest_difference = |a: &llm_engine::LoadedModel, b: &llm_engine::LoadedModel| {
        let (a, b) = (cached_decode(&a.model, &ids, prompt), cached_decode(&b.model, &ids, prompt));
        a.iter().zip(&b).map(|(a, b)| max_abs_diff(a, b)).fold(0f32, f32::max)
    };
    let dense_cache = largest_difference(&dense_f16, &dense);
    assert!(dense_cache > 0.0 && dense_cache < 1e-3, "the dense model's f16 cache moved a logit by {dense_cache}");
    let (cache, weights) = (largest_difference(&quantized, &quantized_f32), largest_difference(&quantized_f32, &dense));
    assert!(cache < weights, "the quantized model's f16 cache moved a logit by {cache}, the weights' quantization by {weights}");
}
