//! The differentiable Llama of llm-train against transformers and PEFT: the same logits as
//! transformers for the fixture checkpoints, the same logits as PEFT with a PEFT adapter, a
//! fresh adapter that changes nothing, and gradients that agree with finite differences.

use candle_core::{Device, Tensor};
use llm_tests::*;
use llm_train::loss::causal_lm_loss;
use llm_train::{LoraConfig, TrainLlama, Trainable};

const TOLERANCE: f32 = 1e-4;

fn model(name: &str, trainable: Trainable) -> TrainLlama {
    TrainLlama::load(&fixtures_dir().join(name).join("hf"), &trainable, &Device::Cpu).unwrap()
}

fn logits(model: &TrainLlama, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&input, None).unwrap().squeeze(0).unwrap()
}

/// Max |Δ| against recorded logits: the first columns at every position, the last in full.
fn diff(ours: &Tensor, head: &Tensor, last: &Tensor) -> f32 {
    let columns = head.dim(1).unwrap();
    let rows = ours.dim(0).unwrap();
    max_abs_diff(&ours.narrow(1, 0, columns).unwrap(), head).max(max_abs_diff(&ours.get(rows - 1).unwrap(), last))
}

#[test]
fn forward_matches_transformers() {
    for name in ["llama2", "llama3"] {
        let model = model(name, Trainable::Full);
        let reference = read_tensors(&format!("{name}/reference_logits.safetensors"));
        for (i, case) in reference_cases(name).iter().enumerate() {
            let ours = logits(&model, &case.prompt_token_ids);
            let d = diff(&ours, &reference[&format!("prompt{i}.logits_head")], &reference[&format!("prompt{i}.logits_last")]);
            assert!(d < TOLERANCE, "{name} prompt {i}: max |Δlogit| {d:e}");
        }
    }
}

#[test]
fn a_peft_adapter_gives_pefts_logits() {
    for name in ["llama2", "llama3"] {
        let mut model = model(name, Trainable::Full);
        model.apply_adapter(&fixtures_dir().join(name).join("lora")).unwrap();
        let reference = read_tensors(&format!("{name}/lora/reference_logits.safetensors"));
        let ids = ids(&read_json(&format!("{name}/lora/reference.json"))["prompt_token_ids"]);
        let d = diff(&logits(&model, &ids), &reference["logits_head"], &reference["logits_last"]);
        assert!(d < TOLERANCE, "{name}: max |Δlogit| vs PEFT {d:e}");
    }
}

#[test]
fn a_fresh_adapter_changes_nothing_and_only_it_trains() {
    let config = LoraConfig { target_modules: vec!["q_proj".into(), "v_proj".into(), "gate_proj".into()], ..Default::default() };
    let lora = model("llama2", Trainable::Lora { config, seed: 3 });
    let base = model("llama2", Trainable::Full);
    let ids = &reference_cases("llama2")[0].prompt_token_ids;
    assert_eq!(max_abs_diff(&logits(&lora, ids), &logits(&base, ids)), 0.0);
    let layers = lora.config().num_layers;
    assert_eq!(lora.trainable().len(), layers * 3 * 2);
    assert!(lora.trainable().iter().all(|(name, _)| name.starts_with("base_model.model.model.layers.") && name.contains(".lora_")));
}

/// d(loss)/d(weight) from backprop equals the finite difference for a few weights.
#[test]
fn gradients_agree_with_finite_differences() {
    let model = model("llama3", Trainable::Full);
    let ids = &reference_cases("llama3")[0].prompt_token_ids;
    let tokens = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mask = tokens.ones_like().unwrap();
    let loss = |m: &TrainLlama| causal_lm_loss(&m.forward(&tokens, None).unwrap(), &tokens, &mask).unwrap();
    let grads = loss(&model).backward().unwrap();
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "model.embed_tokens.weight"] {
        let var = &model.trainable().iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} is not trainable")).1;
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let flat_grad = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The entry with the largest gradient, so that the difference rises above f32 noise.
        let at = (0..flat_grad.len()).max_by(|&a, &b| flat_grad[a].abs().total_cmp(&flat_grad[b].abs())).unwrap();
        let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        let at_value = |delta: f32| {
            let mut values = original.clone();
            values[at] += delta;
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
            loss(&model).to_scalar::<f32>().unwrap()
        };
        let numeric = (at_value(eps) - at_value(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu).unwrap()).unwrap();
        let analytic = flat_grad[at];
        assert!((numeric - analytic).abs() <= 0.02 * analytic.abs() + 1e-4, "{name}[{at}]: backprop {analytic} vs finite difference {numeric}");
    }
}
