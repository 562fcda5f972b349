//! `llm merge` against PEFT: merging a PEFT-made adapter into the fixture checkpoints gives a
//! Hugging Face directory whose logits (through the inference engine) equal PEFT's adapted
//! model's; a mismatched adapter is refused with a message.

use std::process::Command;

use llm_tests::*;

fn merge(model: &str, adapter_model: &str, output: &std::path::Path, dtype: Option<&str>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llm"));
    command.args(["merge", "--base"]).arg(fixtures_dir().join(model).join("hf"));
    command.arg("--adapter").arg(fixtures_dir().join(adapter_model).join("lora")).arg("--output").arg(output);
    if let Some(dtype) = dtype {
        command.args(["--dtype", dtype]);
    }
    command.output().expect("run llm")
}

/// Max |Δlogit| between the merged model (loaded by the engine) and PEFT's adapted model.
fn diff_from_peft(model: &str, merged: &std::path::Path) -> f32 {
    let loaded = llm_engine::load(merged, Default::default()).unwrap();
    let reference = read_tensors(&format!("{model}/lora/reference_logits.safetensors"));
    let ids = ids(&read_json(&format!("{model}/lora/reference.json"))["prompt_token_ids"]);
    let ours = prompt_logits(&loaded.model, &ids);
    let head = &reference["logits_head"];
    let columns = head.dim(1).unwrap();
    let last = ours.get(ids.len() - 1).unwrap();
    max_abs_diff(&ours.narrow(1, 0, columns).unwrap(), head).max(max_abs_diff(&last, &reference["logits_last"]))
}

#[test]
fn merged_models_give_pefts_logits() {
    for model in ["llama2", "llama3"] {
        let dir = tempfile::tempdir().unwrap();
        let exact = dir.path().join("f32");
        let out = merge(model, model, &exact, Some("f32"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let d = diff_from_peft(model, &exact);
        assert!(d < 1e-4, "{model} merged in f32: max |Δlogit| vs PEFT {d:e}");
        for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert!(exact.join(file).exists(), "{model}: {file} not copied");
        }

        // In the base's own dtype (f16 / bf16) the merged weights are rounded once.
        let native = dir.path().join("native");
        assert!(merge(model, model, &native, None).status.success());
        let d = diff_from_peft(model, &native);
        assert!(d < 0.05, "{model} merged in its dtype: max |Δlogit| vs PEFT {d:e}");
        let base_size = std::fs::metadata(fixtures_dir().join(model).join("hf/model.safetensors")).unwrap().len();
        assert_eq!(std::fs::metadata(native.join("model.safetensors")).unwrap().len() / 1000, base_size / 1000, "{model}: dtype changed");
    }
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    let out = merge("llama3", "llama2", &target, None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot merge") && stderr.contains("the adapter's update is"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a failed merge left files behind");

    // An existing model directory is never overwritten.
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("model.safetensors"), b"keep me").unwrap();
    assert!(!merge("llama2", "llama2", &existing, None).status.success());
    assert_eq!(std::fs::read(existing.join("model.safetensors")).unwrap(), b"keep me");
}
