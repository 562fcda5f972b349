//! The engine against Hugging Face transformers (f32) on random Llama-2 and Llama-3.2 layouts,
//! loaded from the Hugging Face directory and from llama.cpp's conversion of it.

use llm_engine::{load, LoadOptions};
use llm_tests::*;

const TOLERANCE: f32 = 1e-4;

fn check(model: &str, file: &str) {
    let path = fixtures_dir().join(model).join(file);
    let loaded = load(&path, LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let logits = read_tensors(&format!("{model}/reference_logits.safetensors"));
    let cases = reference_cases(model);
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(loaded.tokenizer.encode(&case.prompt, true).unwrap(), case.prompt_token_ids, "{file}: prompt {i} tokens");
        let ours = prompt_logits(&loaded.model, &case.prompt_token_ids);
        let head = &logits[&format!("prompt{i}.logits_head")];
        let ours_head = ours.narrow(1, 0, head.dim(1).unwrap()).unwrap();
        let diff_head = max_abs_diff(&ours_head, head);
        let last = ours.get(case.prompt_token_ids.len() - 1).unwrap();
        let diff_last = max_abs_diff(&last, &logits[&format!("prompt{i}.logits_last")]);
        assert!(diff_head < TOLERANCE && diff_last < TOLERANCE, "{file}: prompt {i}: max |Δlogit| {diff_head:e} / {diff_last:e}");
    }
    let prompts: Vec<_> = cases.iter().map(|c| c.prompt_token_ids.clone()).collect();
    for (case, ours) in cases.iter().zip(greedy(&loaded, &prompts, case_len(&cases))) {
        assert_eq!(ours, case.greedy_token_ids, "{file}: greedy tokens for {:?}", case.prompt);
    }
}

fn case_len(cases: &[ReferenceCase]) -> usize {
    cases[0].greedy_token_ids.len()
}

#[test]
fn llama2_huggingface_directory_matches_transformers() {
    check("llama2", "hf");
}

#[test]
fn llama2_gguf_from_llama_cpp_converter_matches_transformers() {
    check("llama2", "llama2-f16.gguf");
}

#[test]
fn llama3_huggingface_directory_matches_transformers() {
    check("llama3", "hf");
}

#[test]
fn llama3_gguf_from_llama_cpp_converter_matches_transformers() {
    check("llama3", "llama3-bf16.gguf");
}

/// Rows of different lengths share one padded batch and still produce what they produce alone.
#[test]
fn batched_generation_equals_one_by_one() {
    let loaded = load(&fixtures_dir().join("llama3/llama3-bf16.gguf"), LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> =
        ["Hi", "The longest prompt of this little batch, by far", "A medium prompt here"].iter().map(|p| loaded.tokenizer.encode(p, true).unwrap()).collect();
    let batched = greedy(&loaded, &prompts, 8);
    for (prompt, together) in prompts.iter().zip(&batched) {
        let alone = greedy(&loaded, std::slice::from_ref(prompt), 8);
        assert_eq!(&alone[0], together);
    }
}
