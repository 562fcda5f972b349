//! The demo task (`llm demo-data`, `llm eval`), offline soft targets for distillation
//! (`llm distill --soft-targets`), and the committed demo model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn llm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llm")).args(args).output().expect("run llm")
}

fn ok(output: Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What `infra/demo/pipeline.sh` measured for the committed model on `models/demo/eval.jsonl`,
/// less a margin for other CPUs' rounding.
const DEMO_ACCURACY: f64 = 0.55;

/// A small demo task with a 2-layer untrained teacher.
fn demo(dir: &Path) -> PathBuf {
    let out = dir.join("demo");
    ok(llm(&["demo-data", "--output", out.to_str().unwrap(), "--pretrain", "40", "--sft", "24", "--eval-per-task", "3", "--layers", "2", "--seed", "5"]));
    out
}

fn first_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn demo_data_is_a_task_the_engine_and_trainers_read() {
    let dir = tempfile::tempdir().unwrap();
    let demo = demo(dir.path());
    let questions: Vec<serde_json::Value> =
        std::fs::read_to_string(demo.join("eval.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(questions.len(), 12);
    let sft = std::fs::read_to_string(demo.join("sft.jsonl")).unwrap();
    assert!(questions.iter().all(|q| !sft.contains(&format!("\"{}\"", q["prompt"].as_str().unwrap()))), "a held-out question is in the SFT data");

    // Byte-level: one token per byte after BOS, and the chat template the trainers render.
    let loaded = llm_engine::load(&demo.join("teacher-init"), Default::default()).unwrap();
    let text = "What is 12 + 30?";
    assert_eq!(loaded.tokenizer.encode(text, true).unwrap(), [256].into_iter().chain(text.bytes().map(u32::from)).collect::<Vec<_>>());
    let chat = loaded.chat_template.as_ref().unwrap().render(&[llm_engine::ChatMessage::new("user", text)], true).unwrap();
    assert_eq!(chat, "<|begin_of_text|><|user|>What is 12 + 30?<|end|><|assistant|>");

    // An untrained model answers (almost) nothing right, and the report says so per task.
    let report: serde_json::Value = serde_json::from_str(&ok(llm(&[
        "eval",
        "--model",
        demo.join("teacher-init").to_str().unwrap(),
        "--data",
        demo.join("eval.jsonl").to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(report["total"], 12);
    assert_eq!(report["tasks"].as_array().unwrap().iter().map(|t| t["task"].as_str().unwrap()).collect::<Vec<_>>(), ["add", "reverse", "upper", "capital"]);
    assert!(report["accuracy"].as_f64().unwrap() < 0.5);

    // It trains: a few pretraining steps lower the loss.
    let pretrained = dir.path().join("pretrained");
    ok(llm(&[
        "finetune",
        "--method",
        "full",
        "--base",
        demo.join("teacher-init").to_str().unwrap(),
        "--data",
        demo.join("pretrain.jsonl").to_str().unwrap(),
        "--output",
        pretrained.to_str().unwrap(),
        "--steps",
        "12",
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
    ]));
    let losses = first_losses(&pretrained);
    assert!(losses[11] < losses[0] - 0.5, "{losses:?}");

    // SFT on top: its output holds its own metrics, not the base run's.
    let tuned = dir.path().join("tuned");
    ok(llm(&[
        "finetune",
        "--method",
        "full",
        "--base",
        pretrained.to_str().unwrap(),
        "--data",
        demo.join("sft.jsonl").to_str().unwrap(),
        "--output",
        tuned.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "8",
    ]));
    assert_eq!(first_losses(&tuned).len(), 3);
}

#[test]
fn stored_soft_targets_reproduce_the_live_teacher_and_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let demo = demo(dir.path());
    let (teacher, data) = (demo.join("teacher-init"), demo.join("sft.jsonl"));
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "distill",
            "--teacher",
            teacher.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--student-layers",
            "1",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--temperature",
            "2",
            "--alpha",
            "0.8",
        ];
        args.extend_from_slice(extra);
        (llm(&args), out)
    };
    let (live, live_out) = run("live", &[]);
    ok(live);
    // With k = the whole vocabulary (261), the stored targets are the teacher's logits.
    let targets = dir.path().join("targets.safetensors");
    let (stored, stored_out) = run("stored", &["--soft-targets", targets.to_str().unwrap(), "--soft-top-k", "261"]);
    ok(stored);
    for (a, b) in first_losses(&live_out).iter().zip(first_losses(&stored_out)) {
        assert!((a - b).abs() < 1e-4, "live {a} vs stored {b}");
    }
    // Reused, not recomputed: the file is untouched and the run is the same.
    let written = std::fs::metadata(&targets).unwrap().modified().unwrap();
    let (again, again_out) = run("again", &["--soft-targets", targets.to_str().unwrap(), "--soft-top-k", "261"]);
    ok(again);
    assert_eq!(std::fs::metadata(&targets).unwrap().modified().unwrap(), written);
    assert_eq!(first_losses(&again_out), first_losses(&stored_out));
    // A top-8 approximation is a different, finite loss.
    let (top8, top8_out) = run("top8", &["--soft-targets", dir.path().join("top8.safetensors").to_str().unwrap(), "--soft-top-k", "8"]);
    ok(top8);
    assert!(first_losses(&top8_out).iter().all(|l| l.is_finite()));

    // Targets computed for other data are refused, not silently misapplied.
    let other = dir.path().join("other.jsonl");
    std::fs::write(&other, std::fs::read_to_string(&data).unwrap().lines().skip(1).collect::<Vec<_>>().join("\n")).unwrap();
    let out = dir.path().join("mismatch");
    let refused = llm(&[
        "distill",
        "--teacher",
        teacher.to_str().unwrap(),
        "--data",
        other.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--student-layers",
        "1",
        "--steps",
        "1",
        "--soft-targets",
        targets.to_str().unwrap(),
    ]);
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("computed for other data"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// The demo model built into the engine is the committed file, and it answers held-out
/// questions (`models/demo/eval.jsonl`, never trained on) as well as the pipeline measured.
#[test]
fn the_built_in_demo_model_answers_held_out_questions() {
    assert!(llm_engine::DEMO_GGUF == std::fs::read(repo().join("models/demo/demo-q8_0.gguf")).unwrap(), "the built-in model is not models/demo/demo-q8_0.gguf");
    let questions = repo().join("models/demo/eval.jsonl");
    let report: serde_json::Value =
        serde_json::from_str(&ok(llm(&["eval", "--model", llm_engine::DEMO_MODEL, "--data", questions.to_str().unwrap(), "--json"]))).unwrap();
    assert!(report["accuracy"].as_f64().unwrap() >= DEMO_ACCURACY, "{report}");

    // `llm generate` without --model uses it.
    let answer: serde_json::Value = serde_json::from_str(&ok(llm(&["generate", "--chat", "--prompt", "Write llama in capitals.", "--json"]))).unwrap();
    assert_eq!(answer["text"], "LLAMA");
}
