//! The `llm` command's contracts, run as a process: what later checks and scripts rely on.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn llm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llm")).args(args).output().expect("run llm")
}

/// Runs `llm` expecting success; returns the JSON object on the last line of stdout.
fn llm_json(args: &[&str]) -> Value {
    let out = llm(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "llm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn generate_json_matches_transformers_greedy() {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("llama3/reference.json")).unwrap()).unwrap();
    let case = &reference["cases"][0];
    let model = fixtures().join("llama3/llama3-bf16.gguf");
    let out = llm_json(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--json",
        "--threads",
        "1",
    ]);
    assert_eq!(ids(&out["prompt_token_ids"]), ids(&case["prompt_token_ids"]));
    assert_eq!(ids(&out["token_ids"]), ids(&case["greedy_token_ids"])[..6].to_vec());
    assert_eq!(out["finish_reason"], "length");
    assert!(out["text"].is_string());
}

#[test]
fn generate_chat_adds_one_bos() {
    let model = fixtures().join("llama3/hf");
    let out = llm_json(&["generate", "--model", model.to_str().unwrap(), "--prompt", "Hi", "--chat", "--max-tokens", "2", "--json"]);
    let prompt = ids(&out["prompt_token_ids"]);
    assert_eq!(prompt[0], 128000);
    assert_ne!(prompt[1], 128000, "BOS doubled");
    assert_eq!(*prompt.last().unwrap(), 271, "ends with the assistant header's blank line");
}

#[test]
fn same_seed_same_sample() {
    let model = fixtures().join("llama2/llama2-f16.gguf");
    let run = |seed: &str| {
        llm_json(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Once",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ])["token_ids"]
            .clone()
    };
    assert_eq!(run("5"), run("5"));
    assert_ne!(run("5"), run("6"));
}

#[test]
fn inspect_lists_metadata_and_tensors() {
    let model = fixtures().join("llama2/llama2-f16.gguf");
    let out = llm_json(&["inspect", model.to_str().unwrap(), "--json"]);
    assert_eq!(out["metadata"]["general.architecture"], "llama");
    let tensors = out["tensors"].as_array().unwrap();
    let q = tensors.iter().find(|t| t["name"] == "blk.0.attn_q.weight").expect("attn_q");
    assert_eq!(q["type"], "F16");
    assert_eq!(q["shape"], serde_json::json!([32, 32]));
    let text = llm(&["inspect", fixtures().join("llama3/hf").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("model.embed_tokens.weight"));
}

#[test]
fn bench_reports_speeds_and_memory() {
    let model = fixtures().join("tinyq/tinyq-q4_k_m.gguf");
    let out = llm_json(&["bench", "--model", model.to_str().unwrap(), "--prompt-tokens", "16", "--gen-tokens", "8", "--threads", "2", "--json"]);
    for key in ["prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_bytes"] {
        assert!(out[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {}", out[key]);
    }
    assert_eq!(out["prompt_tokens"], 16);
    assert_eq!(out["threads"], 2);
    // A quantized model's cache is f16 unless asked otherwise.
    assert_eq!(out["kv_cache"], "f16");
    let out = llm_json(&["bench", "--model", model.to_str().unwrap(), "--prompt-tokens", "4", "--gen-tokens", "2", "--kv-cache", "f32", "--json"]);
    assert_eq!(out["kv_cache"], "f32");
}

/// Pinned to one CPU, the kernels' pool has one thread, whatever the machine's core count: a
/// thread more would wait a scheduler's time slice at every product.
#[test]
fn default_threads_follow_the_cpu_affinity() {
    let model = fixtures().join("tinyq/tinyq-q4_k_m.gguf");
    let out = Command::new("taskset")
        .args(["-c", "0", env!("CARGO_BIN_EXE_llm"), "bench", "--model", model.to_str().unwrap(), "--prompt-tokens", "4", "--gen-tokens", "2", "--json"])
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .expect("run taskset (util-linux)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().expect("output")).unwrap();
    assert_eq!(report["threads"], 1);
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    let out = llm(&["generate", "--model", "/nonexistent/model.gguf", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model.gguf"));
    let model = fixtures().join("llama2/llama2-f16.gguf");
    let out = llm(&["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--quantize", "q9_9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown quantization type"));
    let out = llm(&["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--kv-cache", "q8_0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("f16 or f32"));
}

#[test]
fn quantize_writes_a_loadable_file_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.gguf");
    let input = fixtures().join("llama2/hf");
    let run = llm(&["quantize", "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap(), "--type", "q4_0"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let info = llm_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(info["metadata"]["general.file_type"], 2);
    let generated = llm_json(&["generate", "--model", out.to_str().unwrap(), "--prompt", "Hello", "--max-tokens", "3", "--ignore-eos", "--json"]);
    assert_eq!(generated["token_ids"].as_array().unwrap().len(), 3);

    // A checkpoint whose weights are cut short: an error, and no output file at all.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(input.join(f), broken.join(f)).unwrap();
    }
    let weights = std::fs::read(input.join("model.safetensors")).unwrap();
    std::fs::write(broken.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let failed = tmp.path().join("failed.gguf");
    let run = llm(&["quantize", "--input", broken.to_str().unwrap(), "--output", failed.to_str().unwrap(), "--type", "q8_0"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("truncated"));
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "partial" || x == "gguf")).count(),
        1,
        "only the good output remains"
    );
    let run = llm(&["quantize", "--input", input.to_str().unwrap(), "--output", failed.to_str().unwrap(), "--type", "q9_k"]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("unknown type"));
}
