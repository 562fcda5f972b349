//! `llm finetune` and `llm distill` on the fixture checkpoints: the loss falls, the outputs are
//! what the rest of the toolchain reads (a PEFT adapter llm-train and `llm merge` load, Hugging
//! Face directories the engine loads), runs are reproducible with a seed, and bad data is
//! reported by line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llm_tests::*;

fn llm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llm")).args(args).output().expect("run llm")
}

fn write_data(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let mut lines: Vec<String> =
        (0..8).map(|a| serde_json::json!({"prompt": format!("What is {a} plus {a}?"), "completion": format!(" {}", a + a)}).to_string()).collect();
    lines.push(serde_json::json!({"text": "plain text is learned everywhere"}).to_string());
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `llm COMMAND --FLAG <fixture model>/hf --data DATA --output OUTPUT EXTRA...`.
fn train(command: &str, flag: &str, model: &str, data: &Path, output: &Path, extra: &[&str]) -> Output {
    let source = fixtures_dir().join(model).join("hf");
    let mut args = vec![command, flag, source.to_str().unwrap(), "--data", data.to_str().unwrap(), "--output", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    llm(&args)
}

fn finetune(base: &str, data: &Path, output: &Path, extra: &[&str]) -> Output {
    train("finetune", "--base", base, data, output, extra)
}

fn distill(data: &Path, output: &Path, extra: &[&str]) -> Output {
    train("distill", "--teacher", "llama2", data, output, extra)
}

#[test]
fn lora_fine_tuning_learns_and_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let out = dir.path().join("adapter");
    let run = finetune(
        "llama2",
        &data,
        &out,
        &[
            "--method",
            "lora",
            "--steps",
            "20",
            "--lr",
            "1e-2",
            "--lora-dropout",
            "0",
            "--eval-data",
            data.to_str().unwrap(),
            "--eval-every",
            "10",
            "--seed",
            "4",
        ],
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines = metrics(&out);
    assert_eq!(lines.len(), 20);
    let (first, last) = (lines[0]["loss"].as_f64().unwrap(), lines[19]["loss"].as_f64().unwrap());
    assert!(last < first - 1.0, "loss {first} -> {last}");
    assert!(lines[9]["eval_loss"].is_number() && lines[19]["eval_loss"].is_number() && lines[0].get("eval_loss").is_none());
    assert!(lines.iter().all(|l| l["lr"].is_number() && l["grad_norm"].is_number() && l["tokens_per_s"].as_f64().unwrap() > 0.0));
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 640 * 400 * 3, "loss.png is not the 640x400 curve");

    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64(), config["task_type"].as_str()), (Some("LORA"), Some(8), Some("CAUSAL_LM")));

    // The adapter loads and changes the model; merged, the engine serves the same change.
    let mut adapted = llm_train::TrainLlama::load(&fixtures_dir().join("llama2/hf"), &llm_train::Trainable::Full, &candle_core::Device::Cpu).unwrap();
    let ids = candle_core::Tensor::new(&[1u32, 1724, 338, 29871, 29941][..], &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let before = adapted.forward(&ids, None).unwrap();
    adapted.apply_adapter(&out).unwrap();
    let after = adapted.forward(&ids, None).unwrap();
    assert!(max_abs_diff(&before, &after) > 1e-3);
    let merged = dir.path().join("merged");
    assert!(llm(&[
        "merge",
        "--base",
        fixtures_dir().join("llama2/hf").to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
        "--dtype",
        "f32"
    ])
    .status
    .success());
    let served = llm_engine::load(&merged, Default::default()).unwrap();
    let engine_logits = prompt_logits(&served.model, &[1, 1724, 338, 29871, 29941]);
    assert!(max_abs_diff(&engine_logits, &after.squeeze(0).unwrap()) < 1e-3);

    // Same seed, same adapter, to the byte (dropout included); another seed, another adapter.
    let run = |name: &str, seed: &str| {
        let dir = dir.path().join(name);
        assert!(finetune("llama2", &data, &dir, &["--method", "lora", "--steps", "5", "--lr", "1e-2", "--lora-dropout", "0.2", "--seed", seed])
            .status
            .success());
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
    };
    assert_eq!(run("a", "4"), run("b", "4"));
    assert_ne!(run("c", "4"), run("d", "5"));
}

#[test]
fn full_fine_tuning_writes_a_checkpoint_the_engine_loads() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let out = dir.path().join("full");
    let run = finetune("llama3", &data, &out, &["--method", "full", "--steps", "6", "--lr", "1e-3", "--batch-size", "2", "--grad-accum", "2", "--warmup", "2"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines = metrics(&out);
    assert_eq!(lines[0]["lr"].as_f64(), Some(0.0), "warmup starts at 0");
    assert!(lines[5]["loss"].as_f64().unwrap() < lines[0]["loss"].as_f64().unwrap());
    let tuned = llm_engine::load(&out, Default::default()).unwrap();
    let base = llm_engine::load(&fixtures_dir().join("llama3/hf"), Default::default()).unwrap();
    let ids = base.tokenizer.encode("What is 3 plus 3?", true).unwrap();
    assert!(max_abs_diff(&prompt_logits(&tuned.model, &ids), &prompt_logits(&base.model, &ids)) > 1e-3);
    assert!(tuned.chat_template.is_some(), "tokenizer files were not copied");
}

#[test]
fn bad_data_is_reported_by_line_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"prompt\": \"no completion\"}\nnot json\n").unwrap();
    let out = dir.path().join("out");
    let run = finetune("llama2", &data, &out, &["--steps", "1"]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("2 bad lines") && stderr.contains("line 2") && stderr.contains("line 3"), "{stderr}");
    assert!(!out.exists());
    let run = finetune("llama2", &write_data(dir.path()), &out, &["--lora-rank", "0"]);
    assert!(!run.status.success() && String::from_utf8_lossy(&run.stderr).contains("--lora-rank"));
}

#[test]
fn distillation_trains_a_pruned_or_fresh_student() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());

    // A student identical to the teacher (all its layers) has nothing to learn from it: with
    // alpha = 1 the first loss is the KL divergence of a model from itself.
    let same = dir.path().join("same");
    assert!(distill(&data, &same, &["--student-layers", "2", "--alpha", "1", "--steps", "1"]).status.success());
    assert!(metrics(&same)[0]["loss"].as_f64().unwrap().abs() < 1e-4);

    let pruned = dir.path().join("pruned");
    let run = distill(&data, &pruned, &["--student-layers", "1", "--steps", "15", "--lr", "1e-2", "--batch-size", "3"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines = metrics(&pruned);
    assert!(lines[14]["loss"].as_f64().unwrap() < lines[0]["loss"].as_f64().unwrap());
    let student = llm_engine::load(&pruned, Default::default()).unwrap();
    assert_eq!(student.model.config().num_layers, 1);
    assert!(!pruned.join(".student-init").exists());

    // A config that fits inside the teacher starts from it pruned (fewer layers, narrower MLP);
    // one that does not (another width) starts fresh.
    let teacher_config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("llama2/hf/config.json")).unwrap()).unwrap();
    for (name, changes) in [
        ("narrow", &[("num_hidden_layers", 1), ("intermediate_size", 16)][..]),
        ("fresh", &[("hidden_size", 16), ("num_attention_heads", 2), ("num_key_value_heads", 2)][..]),
    ] {
        let mut config = teacher_config.clone();
        for (key, value) in changes {
            config[key] = (*value).into();
        }
        let config_path = dir.path().join(format!("{name}.json"));
        std::fs::write(&config_path, config.to_string()).unwrap();
        let student = dir.path().join(name);
        let run = distill(&data, &student, &["--student-config", config_path.to_str().unwrap(), "--steps", "3"]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let loaded = llm_engine::load(&student, Default::default()).unwrap();
        assert_eq!(
            (loaded.model.config().hidden_size, loaded.model.config().intermediate_size),
            (config["hidden_size"].as_u64().unwrap() as usize, config["intermediate_size"].as_u64().unwrap() as usize)
        );
    }

    assert!(!distill(&data, &dir.path().join("bad"), &["--student-layers", "3"]).status.success(), "more layers than the teacher");
}

/// The Batch job's way: base, data and output on S3 (the local S3 server).
#[test]
fn fine_tuning_reads_and_writes_s3() {
    llm_tests::local_s3::local_s3();
    let s3 = llm_store::S3::connect().unwrap();
    llm_tests::s3_events::upload_checkpoint(&s3, "train-s3", "base/", "llama2");
    let dir = tempfile::tempdir().unwrap();
    s3.put("train-s3", "data/train.jsonl", std::fs::read(write_data(dir.path())).unwrap()).unwrap();
    let run = llm(&["finetune", "--base", "s3://train-s3/base/", "--data", "s3://train-s3/data/train.jsonl", "--output", "s3://train-s3/out/", "--steps", "3"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let mut keys: Vec<String> = s3.list("train-s3", "out/").unwrap().into_iter().map(|o| o.key).collect();
    keys.sort();
    assert_eq!(keys, ["out/adapter_config.json", "out/adapter_model.safetensors", "out/loss.png", "out/metrics.jsonl"]);
    let missing =
        llm(&["finetune", "--base", "s3://train-s3/nothing/", "--data", "s3://train-s3/data/train.jsonl", "--output", dir.path().join("x").to_str().unwrap()]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no objects under this prefix"));
}

/// AWS Batch stops a job with SIGTERM: the run checkpoints and exits non-zero, and the same
/// command with --resume finishes it.
#[test]
fn sigterm_checkpoints_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let out = dir.path().join("adapter");
    let base = fixtures_dir().join("llama2/hf");
    let args = [
        "finetune",
        "--base",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--steps",
        "150",
        "--checkpoint-every",
        "0",
        "--resume",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_llm")).args(args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success() && stderr.contains("--resume"), "{stderr}");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/trainer_state.json")).unwrap()).unwrap();
    let step = state["progress"]["step"].as_u64().unwrap();
    assert!((3..150).contains(&step), "stopped at step {step}");

    let resumed = llm(&args);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(String::from_utf8_lossy(&resumed.stderr).contains(&format!("resumed after step {step}")));
    assert_eq!(metrics(&out).len(), 150);
    assert!(out.join("adapter_model.safetensors").exists());
}

/// With the output on S3 the checkpoint is copied beside it, so a job stopped on one machine
/// (a Spot reclaim) resumes on another: nothing of the first run's local disk is needed.
#[test]
fn an_s3_run_stopped_by_sigterm_resumes_from_its_s3_checkpoint() {
    llm_tests::local_s3::local_s3();
    let s3 = llm_store::S3::connect().unwrap();
    llm_tests::s3_events::upload_checkpoint(&s3, "train-resume", "base/", "llama2");
    let dir = tempfile::tempdir().unwrap();
    s3.put("train-resume", "data/train.jsonl", std::fs::read(write_data(dir.path())).unwrap()).unwrap();
    let args = [
        "finetune",
        "--base",
        "s3://train-resume/base/",
        "--data",
        "s3://train-resume/data/train.jsonl",
        "--output",
        "s3://train-resume/out/",
        "--steps",
        "150",
        "--checkpoint-every",
        "2",
        "--resume",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_llm")).args(args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let started = std::time::Instant::now();
    while s3.size("train-resume", "out/checkpoint/trainer_state.json").unwrap().is_none() {
        assert!(started.elapsed().as_secs() < 120, "no checkpoint reached S3");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success() && stderr.contains("checkpoint in s3://train-resume/out/"), "{stderr}");
    let state: serde_json::Value = serde_json::from_slice(&s3.get("train-resume", "out/checkpoint/trainer_state.json").unwrap().unwrap()).unwrap();
    let step = state["progress"]["step"].as_u64().unwrap();
    assert!((2..150).contains(&step), "stopped at step {step}");

    let resumed = llm(&args);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from the checkpoint under s3://train-resume/out/") && stderr.contains(&format!("resumed after step {step}")), "{stderr}");
    let metrics = String::from_utf8(s3.get("train-resume", "out/metrics.jsonl").unwrap().unwrap()).unwrap();
    assert_eq!(metrics.lines().count(), 150);
    let keys: Vec<String> = s3.list("train-resume", "out/").unwrap().into_iter().map(|o| o.key).collect();
    assert!(keys.contains(&"out/adapter_model.safetensors".to_string()) && !keys.iter().any(|k| k.contains("checkpoint")), "{keys:?}");
}

/// The training job's role in template.yaml allows exactly what a job does on S3: a run from
/// training/ that writes its model to incoming/ (checkpoints pushed, then removed), and a run
/// that starts from that model and writes under training/. Calls are recorded by a proxy in
/// front of the local S3 server.
#[test]
fn the_training_job_role_allows_what_a_job_does_and_no_more() {
    use llm_tests::template::{denied, unused, Template};
    let server = llm_tests::local_s3::local_s3();
    let s3 = llm_store::S3::connect().unwrap();
    let bucket = "llm-serverless-models-123456789012";
    llm_tests::s3_events::upload_checkpoint(&s3, bucket, "training/base/", "llama2");
    let dir = tempfile::tempdir().unwrap();
    s3.put(bucket, "training/data/train.jsonl", std::fs::read(write_data(dir.path())).unwrap()).unwrap();

    let proxy = llm_tests::recording_proxy::RecordingProxy::start(&server.endpoint);
    let uri = |key: &str| format!("s3://{bucket}/{key}");
    for (base, output) in [("training/base/", "incoming/tuned/"), ("incoming/tuned/", "training/runs/second/")] {
        let args = [
            "finetune",
            "--method",
            "full",
            "--base",
            &uri(base),
            "--data",
            &uri("training/data/train.jsonl"),
            "--output",
            &uri(output),
            "--steps",
            "4",
            "--checkpoint-every",
            "2",
            "--resume",
        ];
        let run = Command::new(env!("CARGO_BIN_EXE_llm")).args(args).env("AWS_ENDPOINT_URL", &proxy.endpoint).output().unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    }
    let calls = proxy.take();
    let names = [("AWS::Partition", "aws"), ("ModelBucket", bucket)];
    let statements = Template::load().statements("TrainingJobRole", &names);
    let denied = denied(&statements, &calls);
    assert!(denied.is_empty(), "the job makes calls its role does not allow: {denied:#?}");
    // Aborting a multipart upload happens only when one fails.
    let unused = unused(&statements, &calls, &[("ReadWriteTrainingAndIncoming", "s3:AbortMultipartUpload")]);
    assert!(unused.is_empty(), "the role allows what the job never does: {unused:#?}");
}
