//! Quantized GGUF files written by llama.cpp's quantizer. The yardstick is transformers' f32
//! logits, teacher-forced over prompt + reference continuation: our error on each file must be
//! no larger than llama.cpp's error on the same file (RMS over all positions and the vocabulary),
//! and we must keep at least as many of the reference's greedy choices.

use candle_core::Tensor;
use llm_engine::{load, parse_ggml_dtype, LoadOptions, LoadedModel};
use llm_tests::*;

const TYPES: &[&str] = &["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"];

/// Teacher-forced positions where the argmax is the f32 reference's next token.
fn agreement(logits: &Tensor, case: &ReferenceCase) -> usize {
    let forced: Vec<u32> = case.prompt_token_ids.iter().chain(&case.greedy_token_ids).copied().collect();
    let argmax = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    (case.prompt_token_ids.len() - 1..forced.len() - 1).filter(|&p| argmax[p] == forced[p + 1]).count()
}

fn rms_error(a: &Tensor, reference: &Tensor) -> f32 {
    (a - reference).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
}

struct Score {
    ours_rms: f32,
    llama_cpp_rms: f32,
    ours_agree: usize,
    llama_cpp_agree: usize,
}

/// Scores our model and llama.cpp's run `llama_cpp_key` against the f32 reference.
fn score(loaded: &LoadedModel, llama_cpp_key: &str, label: &str) -> Score {
    let llama_cpp = read_tensors("tinyq/llama_cpp_logits.safetensors");
    let reference = read_tensors("tinyq/reference_logits.safetensors");
    let mut s = Score { ours_rms: 0.0, llama_cpp_rms: 0.0, ours_agree: 0, llama_cpp_agree: 0 };
    let cases = reference_cases("tinyq");
    for (i, case) in cases.iter().enumerate() {
        let forced: Vec<u32> = case.prompt_token_ids.iter().chain(&case.greedy_token_ids).copied().collect();
        let ours = prompt_logits(&loaded.model, &forced);
        let theirs = &llama_cpp[&format!("{llama_cpp_key}.prompt{i}")];
        let truth = &reference[&format!("prompt{i}.forced_head")];
        s.ours_rms += rms_error(&ours, truth) / cases.len() as f32;
        s.llama_cpp_rms += rms_error(theirs, truth) / cases.len() as f32;
        s.ours_agree += agreement(&ours, case);
        s.llama_cpp_agree += agreement(theirs, case);
    }
    eprintln!(
        "{label:>12}: RMS logit error vs f32 — ours {:.4}, llama.cpp {:.4}; greedy choices kept — ours {}, llama.cpp {}",
        s.ours_rms, s.llama_cpp_rms, s.ours_agree, s.llama_cpp_agree
    );
    s
}

fn assert_no_worse_than_llama_cpp(s: &Score, label: &str) {
    // 5 % slack: the two runtimes round activations differently.
    assert!(s.ours_rms <= s.llama_cpp_rms * 1.05 + 1e-4, "{label}: RMS error {} vs llama.cpp {}", s.ours_rms, s.llama_cpp_rms);
    assert!(s.ours_agree + 1 >= s.llama_cpp_agree, "{label}: kept {} greedy choices, llama.cpp {}", s.ours_agree, s.llama_cpp_agree);
}

#[test]
fn quantized_files_are_as_close_to_f32_as_llama_cpp() {
    for ty in TYPES {
        let path = fixtures_dir().join(format!("tinyq/tinyq-{ty}.gguf"));
        let loaded = load(&path, LoadOptions::default()).unwrap_or_else(|e| panic!("{ty}: {e}"));
        assert_no_worse_than_llama_cpp(&score(&loaded, ty, ty), ty);
    }
}

#[test]
fn f16_gguf_keeps_every_greedy_choice() {
    let loaded = load(&fixtures_dir().join("tinyq/tinyq-f16.gguf"), LoadOptions::default()).unwrap();
    let s = score(&loaded, "f16", "f16");
    assert_no_worse_than_llama_cpp(&s, "f16");
    let total: usize = reference_cases("tinyq").iter().map(|c| c.greedy_token_ids.len()).sum();
    assert_eq!(s.ours_agree, total);
}

/// The f32 file (read in place by the kernels' float tiles) gives transformers' f32 logits up to
/// rounding: every greedy choice, and an RMS logit error under 1e-4 (the f16 file's is 0.0022).
#[test]
fn f32_gguf_gives_the_f32_reference() {
    let loaded = load(&fixtures_dir().join("tinyq/tinyq-f32.gguf"), LoadOptions::default()).unwrap();
    // llama.cpp has no f32 run in the fixtures: its column in the line printed is its f16 file.
    let s = score(&loaded, "f16", "f32");
    let total: usize = reference_cases("tinyq").iter().map(|c| c.greedy_token_ids.len()).sum();
    assert_eq!(s.ours_agree, total);
    assert!(s.ours_rms < 1e-4, "RMS logit error {} against transformers' f32", s.ours_rms);
}

/// `--quantize q8_0` applied to f16 weights at load time is as good as llama.cpp's Q8_0 file.
#[test]
fn in_situ_quantization_is_as_close_as_llama_cpp_q8_0() {
    let options = LoadOptions { quantize: Some(parse_ggml_dtype("q8_0").unwrap()), ..Default::default() };
    let loaded = load(&fixtures_dir().join("tinyq/tinyq-f16.gguf"), options).unwrap();
    assert_no_worse_than_llama_cpp(&score(&loaded, "q8_0", "in-situ q8_0"), "in-situ q8_0");
}
