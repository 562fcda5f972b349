//! Bad model files give errors that say what is wrong, never panics.

use std::collections::HashMap;
use std::path::Path;

use llm_engine::{load, EngineError, LoadOptions};
use llm_tests::*;

fn load_err(path: &Path) -> String {
    match load(path, LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures_dir().join("llama2/llama2-f16.gguf")).unwrap();
    for keep in [3, 10, 100, bytes.len() / 2, bytes.len() - 1] {
        let path = tmp.path().join("cut.gguf");
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = load_err(&path);
        assert!(err.contains("cut.gguf"), "{keep} bytes: {err}");
    }
}

#[test]
fn bad_magic() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.gguf");
    std::fs::write(&path, b"GGML this is not a gguf file at all").unwrap();
    assert!(load_err(&path).contains("bad magic"));
}

#[test]
fn unknown_architecture_in_gguf_and_config() {
    use candle_core::quantized::gguf_file::{write, Value};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpt2.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    let metadata = [("general.architecture", &Value::String("gpt2".into()))];
    write(&mut file, &metadata, &[]).unwrap();
    drop(file);
    assert!(matches!(load(&path, LoadOptions::default()), Err(EngineError::UnsupportedArchitecture(a)) if a == "gpt2"));

    let dir = hf_copy("llama2", tmp.path());
    edit_config(&dir, |c| {
        c["model_type"] = "mistral".into();
        c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    });
    assert!(load_err(&dir).contains("unsupported architecture `mistral`"));
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_copy("llama2", tmp.path());
    let mut tensors: HashMap<String, candle_core::Tensor> = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"), "{err}");
}

#[test]
fn misshapen_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_copy("llama2", tmp.path());
    edit_config(&dir, |c| c["intermediate_size"] = 80.into());
    let err = load_err(&dir);
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[64, 32]"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_copy("llama2", tmp.path());
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));
}

#[test]
fn tokenizer_larger_than_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_copy("llama2", tmp.path());
    std::fs::copy(fixtures_dir().join("llama3/hf/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("tokenizer") && err.contains("32000"), "{err}");
}
