//! Quantization-aware training pays off: fine-tuned with `--qat q4_0`, a model loses less when
//! its projections are put on the Q4_0 grid (ggml's exact round trip) than the same run
//! without QAT loses.

use candle_core::Device;
use llm_tests::*;
use llm_train::data::{load_jsonl, Overflow};
use llm_train::finetune::{evaluate, finetune, Settings};
use llm_train::qat::QatType;
use llm_train::{TrainLlama, Trainable};

fn data(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("data.jsonl");
    let lines: Vec<String> =
        (0..16).map(|a| serde_json::json!({"prompt": format!("{a} plus {a} is"), "completion": format!(" {}", 2 * a)}).to_string()).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// Eval loss of the checkpoint in `dir`, in full precision and with Q4_0 projections.
fn losses(dir: &std::path::Path, data: &std::path::Path) -> (f64, f64) {
    let (tokenizer, template) = llm_engine::hf_tokenizer(dir).unwrap();
    let (examples, _) = load_jsonl(data, &tokenizer, template.as_ref(), 64, Overflow::Truncate).unwrap();
    let mut model = TrainLlama::load(dir, &Trainable::Frozen, &Device::Cpu).unwrap();
    let full = evaluate(&model, &examples, 8, &Device::Cpu).unwrap();
    model.set_qat(Some(QatType::Q4_0));
    (full, evaluate(&model, &examples, 8, &Device::Cpu).unwrap())
}

#[test]
fn qat_shrinks_the_quantization_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let base = fixtures_dir().join("llama2/hf");
    let mut gaps = Vec::new();
    for qat in [None, Some(QatType::Q4_0)] {
        let out = dir.path().join(format!("{qat:?}"));
        let settings = Settings { steps: Some(60), lr: 3e-3, batch_size: 8, seed: 1, qat, max_grad_norm: 1.0, ..Settings::default() };
        finetune(&base, &data, &out, &settings, |_, _| std::ops::ControlFlow::Continue(())).unwrap();
        let (full, quantized) = losses(&out, &data);
        eprintln!("qat {qat:?}: eval loss {full:.4} in f32, {quantized:.4} with Q4_0 projections");
        gaps.push((full, quantized));
    }
    // What quantizing costs each run: its loss with Q4_0 projections minus its f32 loss.
    let (plain, aware) = (gaps[0].1 - gaps[0].0, gaps[1].1 - gaps[1].0);
    assert!(aware < plain, "quantization costs {aware:.4} after QAT, {plain:.4} without");
}
