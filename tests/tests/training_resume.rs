//! Checkpoints: a run stopped midway and resumed ends with exactly the weights and metrics of
//! an uninterrupted run (LoRA dropout included); a loss that turns NaN stops the run with the last checkpoint intact
//! and no model written.

use std::ops::ControlFlow;

use llm_tests::*;
use llm_train::finetune::{finetune, Settings};
use llm_train::{LoraConfig, TrainError, Trainable};

fn data(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("data.jsonl");
    let lines: Vec<String> =
        (0..10).map(|a| serde_json::json!({"prompt": format!("{a} times two is"), "completion": format!(" {}", 2 * a)}).to_string()).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn settings() -> Settings {
    let lora = LoraConfig { dropout: 0.1, target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], ..Default::default() };
    Settings {
        trainable: Trainable::Lora { config: lora, seed: 5 },
        steps: Some(12),
        lr: 5e-3,
        batch_size: 3,
        warmup: 2,
        checkpoint_every: 4,
        seed: 5,
        ..Settings::default()
    }
}

fn losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn a_stopped_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let base = fixtures_dir().join("llama2/hf");

    let straight = dir.path().join("straight");
    finetune(&base, &data, &straight, &settings(), |_, _| ControlFlow::Continue(())).unwrap();

    let stopped = dir.path().join("stopped");
    let summary = finetune(&base, &data, &stopped, &settings(), |m, _| if m.step == 7 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }).unwrap();
    assert!(!summary.completed);
    assert!(stopped.join("checkpoint/trainer_state.json").exists() && !stopped.join("adapter_model.safetensors").exists());
    let summary = finetune(&base, &data, &stopped, &Settings { resume: true, ..settings() }, |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!((summary.completed, summary.resumed_from), (true, Some(7)));

    assert_eq!(losses(&stopped), losses(&straight));
    assert_eq!(std::fs::read(stopped.join("adapter_model.safetensors")).unwrap(), std::fs::read(straight.join("adapter_model.safetensors")).unwrap());
    assert!(!stopped.join("checkpoint").exists(), "the checkpoint outlived the finished run");
}

#[test]
fn a_nan_loss_stops_with_the_last_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let out = dir.path().join("out");
    let explosive = Settings { trainable: Trainable::Full, lr: 1e9, max_grad_norm: 0.0, checkpoint_every: 1, warmup: 0, ..settings() };
    let error = finetune(&fixtures_dir().join("llama2/hf"), &data, &out, &explosive, |_, _| ControlFlow::Continue(())).unwrap_err();
    let TrainError::NonFinite { step, .. } = error else { panic!("{error}") };
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["progress"]["step"].as_u64(), Some(step as u64 - 1));
    assert!(!out.join("model.safetensors").exists());
}
