//! `llm batch` on an OpenAI Batch API file with the built-in demo model: every request answered
//! once under its `custom_id`, bad lines answered with their reasons without stopping the rest,
//! and the same answers whether the requests share engine batches or run one at a time.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

fn request(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

fn chat(custom_id: &str, word: &str) -> String {
    let body = json!({"model": "demo", "messages": [{"role": "user", "content": format!("Write {word} in capitals.")}], "max_tokens": 8, "temperature": 0});
    request(custom_id, "/v1/chat/completions", body)
}

fn input_file() -> String {
    let mut lines: Vec<String> =
        ["llama", "alpaca", "vicuna", "bison", "zebra", "koala"].iter().enumerate().map(|(i, w)| chat(&format!("chat-{i}"), w)).collect();
    lines.push(request(
        "text-0",
        "/v1/completions",
        json!({"model": "demo", "prompt": ["The capital of", "Two plus two"], "n": 2, "max_tokens": 4, "temperature": 0}),
    ));
    lines.push(String::new());
    lines.push("{not json".into());
    lines.push(json!({"method": "POST", "url": "/v1/completions", "body": {}}).to_string());
    lines.push(request("embed", "/v1/embeddings", json!({"model": "demo", "input": "x"})));
    lines.push(request("hot", "/v1/chat/completions", json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": 5})));
    lines.push(request("other-model", "/v1/chat/completions", json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})));
    lines.push(request("streamed", "/v1/completions", json!({"model": "demo", "prompt": "hi", "stream": true})));
    lines.push(chat("chat-0", "again"));
    lines.join("\n")
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Runs `llm batch`; returns the answers by custom_id, the error lines and the status.
fn run(dir: &Path, name: &str, extra: &[&str]) -> (HashMap<String, Value>, Vec<Value>, Value) {
    let (input, output) = (dir.join("input.jsonl"), dir.join(format!("{name}.jsonl")));
    let out = Command::new(env!("CARGO_BIN_EXE_llm"))
        .args(["batch", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--threads", "2"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answers: Vec<Value> = read_lines(&output);
    // In the file's order, whatever order the engine batches ran the requests in.
    let file = std::fs::read_to_string(&input).unwrap();
    let at = |a: &Value| file.find(&format!("\"custom_id\":\"{}\"", a["custom_id"].as_str().unwrap())).unwrap();
    assert!(answers.windows(2).all(|pair| at(&pair[0]) < at(&pair[1])), "{answers:?}");
    let by_id: HashMap<String, Value> = answers.iter().map(|a| (a["custom_id"].as_str().unwrap().to_string(), a.clone())).collect();
    assert_eq!(by_id.len(), answers.len(), "each custom_id answered once");
    let status: Value = serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.status.json"))).unwrap()).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), status);
    (by_id, read_lines(&dir.join(format!("{name}.errors.jsonl"))), status)
}

#[test]
fn a_batch_file_is_answered_line_by_line_in_shared_engine_batches() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("input.jsonl"), input_file()).unwrap();
    let (answers, errors, status) = run(dir.path(), "batched", &[]);

    assert_eq!(answers.len(), 7, "{answers:?}");
    let llama = &answers["chat-0"]["response"];
    assert_eq!(llama["status_code"], 200);
    assert_eq!(llama["body"]["object"], "chat.completion");
    assert_eq!(llama["body"]["choices"][0]["message"]["content"], "LLAMA");
    assert!(llama["body"]["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 0));
    assert!(answers["chat-0"]["id"].as_str().is_some_and(|id| id.starts_with("batch_req_")));
    let text = &answers["text-0"]["response"]["body"];
    assert_eq!(text["object"], "text_completion");
    assert_eq!(text["choices"].as_array().map(Vec::len), Some(4), "two prompts × n=2");

    // Every bad line has an answer that says why, by line number when it has no custom_id.
    let reason = |custom_id: Option<&str>| -> &Value {
        errors.iter().find(|e| e["custom_id"].as_str() == custom_id).unwrap_or_else(|| panic!("no error line for {custom_id:?}: {errors:#?}"))
    };
    assert_eq!(errors.len(), 7, "{errors:#?}");
    assert!(errors.iter().any(|e| e["error"]["code"] == "invalid_json" && e["error"]["line"] == 9));
    assert!(errors.iter().any(|e| e["error"]["code"] == "missing_custom_id" && e["error"]["line"] == 10));
    assert_eq!(reason(Some("embed"))["error"]["code"], "invalid_url");
    assert_eq!(reason(Some("hot"))["response"]["status_code"], 400);
    assert_eq!(reason(Some("hot"))["response"]["body"]["error"]["param"], "temperature");
    assert_eq!(reason(Some("other-model"))["response"]["status_code"], 404);
    assert_eq!(reason(Some("streamed"))["response"]["body"]["error"]["param"], "stream");
    assert_eq!(reason(Some("chat-0"))["error"]["code"], "duplicate_custom_id");

    assert_eq!((status["requests"].as_u64(), status["succeeded"].as_u64(), status["failed"].as_u64()), (Some(14), Some(7), Some(7)));
    assert_eq!(status["stats"]["largest_batch"], 10, "10 sequences generate together, in a batch of up to 32");
    assert_eq!(status["stats"]["sequences"], 10);

    // One request at a time (the one of four sequences runs alone): the same answers (greedy).
    let (alone, _, alone_status) = run(dir.path(), "alone", &["--max-batch-sequences", "1"]);
    assert_eq!(alone_status["stats"]["largest_batch"], 4);
    for (id, answer) in &answers {
        let choices = |a: &Value| {
            a["response"]["body"]["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["message"]["content"].as_str().or(c["text"].as_str()).unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(choices(answer), choices(&alone[id]), "{id}");
    }
}

/// The batch function's way: the file and the answers on S3 (the local S3 server).
#[test]
fn a_batch_file_on_s3_is_answered_on_s3() {
    llm_tests::local_s3::local_s3();
    let s3 = llm_store::S3::connect().unwrap();
    s3.create_bucket("batch-cli").unwrap();
    s3.put("batch-cli", "batches/input/small.jsonl", [chat("a", "llama"), chat("b", "koala"), "oops".into()].join("\n").into_bytes()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llm"))
        .args(["batch", "--input", "s3://batch-cli/batches/input/small.jsonl", "--output", "s3://batch-cli/batches/output/small.jsonl"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = |key: &str| String::from_utf8(s3.get("batch-cli", key).unwrap().unwrap()).unwrap().lines().count();
    assert_eq!(lines("batches/output/small.jsonl"), 2);
    assert_eq!(lines("batches/output/small.errors.jsonl"), 1);
    assert!(s3.get("batch-cli", "batches/output/small.status.json").unwrap().is_some());
}
