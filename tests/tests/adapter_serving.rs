//! A PEFT LoRA adapter applied by the inference engine at load time, on Hugging Face and GGUF
//! bases (llama.cpp's Q/K row order) and on a quantized base: the logits of PEFT's adapted
//! model.

use llm_engine::adapter::PeftAdapter;
use llm_engine::{load, LoadOptions};
use llm_tests::*;

/// Max |Δlogit| of `model/file` (with the fixture adapter when `adapted`) from PEFT's logits.
fn diff_from_peft(model: &str, file: &str, adapted: bool) -> f32 {
    let mut loaded = load(&fixtures_dir().join(model).join(file), LoadOptions::default()).unwrap();
    if adapted {
        let adapter = PeftAdapter::read(&fixtures_dir().join(model).join("lora"), &candle_core::Device::Cpu).unwrap();
        loaded.model.apply_adapter(&adapter).unwrap();
    }
    let reference = read_tensors(&format!("{model}/lora/reference_logits.safetensors"));
    let ids = ids(&read_json(&format!("{model}/lora/reference.json"))["prompt_token_ids"]);
    let ours = prompt_logits(&loaded.model, &ids);
    let head = &reference["logits_head"];
    let last = ours.get(ids.len() - 1).unwrap();
    max_abs_diff(&ours.narrow(1, 0, head.dim(1).unwrap()).unwrap(), head).max(max_abs_diff(&last, &reference["logits_last"]))
}

#[test]
fn adapters_on_full_precision_bases_give_pefts_logits() {
    for (model, file) in [("llama2", "hf"), ("llama2", "llama2-f16.gguf"), ("llama3", "hf"), ("llama3", "llama3-bf16.gguf")] {
        let d = diff_from_peft(model, file, true);
        assert!(d < 1e-3, "{model}/{file}: max |Δlogit| vs PEFT {d:e}");
    }
}

#[test]
fn an_adapter_on_a_quantized_base_moves_it_to_pefts_model() {
    let without = diff_from_peft("llama2", "llama2-q8_0.gguf", false);
    let with = diff_from_peft("llama2", "llama2-q8_0.gguf", true);
    assert!(with < 0.1 && with < without / 2.0, "q8_0 base: {with} with the adapter, {without} without");
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    let mut loaded = load(&fixtures_dir().join("llama3/llama3-bf16.gguf"), LoadOptions::default()).unwrap();
    let adapter = PeftAdapter::read(&fixtures_dir().join("llama2/lora"), &candle_core::Device::Cpu).unwrap();
    let error = loaded.model.apply_adapter(&adapter).unwrap_err().to_string();
    assert!(error.contains("do not fit"), "{error}");
}

/// `llm serve --adapter` / `MODEL_ADAPTER`: the API serves the adapted model, here with the
/// adapter read from the local S3 server.
#[test]
fn the_api_serves_a_base_with_its_adapter_from_s3() {
    use llm_api::model_source::DownloadSettings;
    use llm_tests::http::{post, serve};
    llm_tests::local_s3::local_s3();
    let s3 = llm_store::S3::connect().unwrap();
    s3.create_bucket("adapters").unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        s3.put("adapters", &format!("tiny/{file}"), std::fs::read(fixtures_dir().join("llama2/lora").join(file)).unwrap()).unwrap();
    }
    let base = fixtures_dir().join("llama2/llama2-f16.gguf");
    let request = r#"{"model": "llama2-f16", "prompt": "The adapter changes", "max_tokens": 8, "temperature": 0, "logprobs": 0}"#;
    let answer = |settings| serde_json::from_str::<serde_json::Value>(&post(&serve(base.to_str().unwrap(), settings), "/v1/completions", request).1).unwrap();
    let plain = answer(DownloadSettings::default());
    let adapted = answer(DownloadSettings { adapter: Some("s3://adapters/tiny/".into()), ..Default::default() });
    assert_ne!(plain["choices"][0]["logprobs"]["token_logprobs"], adapted["choices"][0]["logprobs"]["token_logprobs"]);

    // The same tokens as the engine with the adapter applied directly.
    let mut loaded = load(&base, LoadOptions::default()).unwrap();
    loaded.model.apply_adapter(&PeftAdapter::read(&fixtures_dir().join("llama2/lora"), &candle_core::Device::Cpu).unwrap()).unwrap();
    let prompt = loaded.tokenizer.encode("The adapter changes", true).unwrap();
    let request = llm_engine::GenerationRequest { prompt, max_tokens: 8, ..Default::default() };
    let (completions, _) = llm_engine::generate(&loaded.model, &loaded.tokenizer, &[request], |_| std::ops::ControlFlow::Continue(())).unwrap();
    assert_eq!(adapted["choices"][0]["text"].as_str().unwrap(), completions[0].text);
}
