//! Log-probabilities and token texts against transformers: the first generated token's
//! logprob and alternatives equal log-softmax of transformers' last-position logits, and the
//! tokens' bytes spell the completion text exactly.

use llm_engine::{generate, load, GenerationRequest, LoadOptions, LoadedModel};
use llm_tests::*;

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = max + row.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    row.iter().map(|l| l - log_total).collect()
}

fn run(loaded: &LoadedModel, prompt: Vec<u32>, max_tokens: usize, logprobs: usize) -> llm_engine::Completion {
    let request = GenerationRequest { prompt, max_tokens, logprobs: Some(logprobs), ignore_eos: true, ..Default::default() };
    let (mut completions, _) = generate(&loaded.model, &loaded.tokenizer, &[request], |_| std::ops::ControlFlow::Continue(())).unwrap();
    completions.remove(0)
}

fn check_first_token(model: &str, file: &str) {
    let loaded = load(&fixtures_dir().join(model).join(file), LoadOptions::default()).unwrap();
    let logits = read_tensors(&format!("{model}/reference_logits.safetensors"));
    for (i, case) in reference_cases(model).into_iter().enumerate() {
        let reference = log_softmax(&logits[&format!("prompt{i}.logits_last")].to_vec1::<f32>().unwrap());
        let completion = run(&loaded, case.prompt_token_ids, 1, 5);
        let first = &completion.logprobs[0];
        assert_eq!(first.token_id, case.greedy_token_ids[0]);
        assert!(
            (first.logprob - reference[first.token_id as usize]).abs() < 1e-3,
            "{file} prompt {i}: {} vs {}",
            first.logprob,
            reference[first.token_id as usize]
        );
        let mut order: Vec<usize> = (0..reference.len()).collect();
        order.sort_by(|&a, &b| reference[b].total_cmp(&reference[a]));
        let ours: Vec<u32> = first.top.iter().map(|t| t.0).collect();
        let theirs: Vec<u32> = order[..5].iter().map(|&id| id as u32).collect();
        assert_eq!(ours, theirs, "{file} prompt {i}: top-5 ids");
        for &(id, lp) in &first.top {
            assert!((lp - reference[id as usize]).abs() < 1e-3, "{file} prompt {i}: token {id}");
        }
    }
}

#[test]
fn llama2_first_token_logprobs_match_transformers() {
    check_first_token("llama2", "hf");
}

#[test]
fn llama3_first_token_logprobs_match_transformers() {
    check_first_token("llama3", "llama3-bf16.gguf");
}

/// Each generated token's bytes, concatenated, are the completion text; the completion keeps
/// its leading space, so prompt text + completion text = the decoded whole (as in the
/// transformers pipeline, vLLM and llama.cpp).
#[test]
fn token_bytes_spell_the_completion() {
    for (model, file) in [("llama2", "llama2-f16.gguf"), ("llama3", "llama3-bf16.gguf")] {
        let loaded = load(&fixtures_dir().join(model).join(file), LoadOptions::default()).unwrap();
        let tokenizer = &loaded.tokenizer;
        for prompt in ["Hello, my name is", "naïve café 🦙 日本語"] {
            let ids = tokenizer.encode(prompt, true).unwrap();
            let completion = run(&loaded, ids.clone(), 16, 0);
            let spelled: Vec<u8> = completion.logprobs.iter().flat_map(|lp| tokenizer.token_bytes(lp.token_id)).collect();
            assert_eq!(String::from_utf8_lossy(&spelled), completion.text, "{file}: {prompt:?}");
            let whole = tokenizer.decode(&[ids.clone(), completion.token_ids.clone()].concat()).unwrap();
            assert_eq!(whole, tokenizer.decode(&ids).unwrap() + &completion.text, "{file}: {prompt:?}");
        }
    }
}

/// Scoring a prompt (what `echo` reports) gives the same log-probabilities as generating it:
/// scoring prompt + greedy continuation, in chunks, reproduces the generation's entries.
#[test]
fn prompt_scores_equal_generation_logprobs() {
    let loaded = load(&fixtures_dir().join("llama3/llama3-bf16.gguf"), LoadOptions::default()).unwrap();
    let prompt = loaded.tokenizer.encode(&"the quick brown fox jumps over the lazy dog ".repeat(30), true).unwrap();
    assert!(prompt.len() > 256, "the prompt must span more than one scoring chunk");
    let completion = run(&loaded, prompt.clone(), 4, 3);
    let whole = [prompt.clone(), completion.token_ids.clone()].concat();
    let scored = llm_engine::prompt_logprobs(&loaded.model, &whole, 3).unwrap();
    assert_eq!(scored.len(), whole.len() - 1);
    for (generated, rescored) in completion.logprobs.iter().zip(&scored[prompt.len() - 1..]) {
        assert_eq!(generated.token_id, rescored.token_id);
        assert!((generated.logprob - rescored.logprob).abs() < 1e-3, "{generated:?} vs {rescored:?}");
        assert_eq!(generated.top.iter().map(|t| t.0).collect::<Vec<_>>(), rescored.top.iter().map(|t| t.0).collect::<Vec<_>>());
    }
}
