//! The batch function on the local S3 server with the built-in demo model: a file answered in
//! chunks across invocations (each continued by its own S3 event), every request answered
//! exactly once even when an invocation dies between writing a part and recording it, a
//! duplicate event answered from the status, and the real binary under cargo lambda.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use batch_function::{handle, Config, Outcome, Status};
use llm_api::model_source::{self, DownloadSettings};
use llm_api::{AppState, Limits, ModelSlot};
use llm_store::S3;
use llm_tests::cargo_lambda::CargoLambdaWatch;
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::s3_event_json;
use serde_json::{json, Value};

const BUCKET: &str = "batch-function";

fn batch_file(requests: usize) -> Vec<u8> {
    let mut lines: Vec<String> = (0..requests)
        .map(|i| {
            let word = if i == 0 { "llama".to_string() } else { format!("w{i}") };
            let body =
                json!({"model": "demo", "messages": [{"role": "user", "content": format!("Write {word} in capitals.")}], "max_tokens": 6, "temperature": 0});
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
        })
        .collect();
    lines.insert(2, "not json".into());
    lines.push(json!({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}).to_string());
    lines.join("\n").into_bytes()
}

struct Fixture {
    s3: S3,
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
    config: Config,
}

impl Fixture {
    fn new(chunk_lines: usize) -> Self {
        local_s3();
        let s3 = S3::connect().unwrap();
        s3.create_bucket(BUCKET).unwrap();
        let loader = model_source::loader(llm_engine::DEMO_MODEL, Default::default(), DownloadSettings::default()).unwrap();
        let state = Arc::new(AppState::new(ModelSlot::new("demo", loader), Limits::default(), None));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        Self { s3, runtime, state, config: Config { chunk_lines, ..Config::default() } }
    }

    /// One invocation for `key`'s event, with so little time that it answers one chunk.
    fn invoke(&self, key: &str) -> Outcome {
        let event = serde_json::from_str(&s3_event_json(BUCKET, &[("ObjectCreated:Put", key)])).unwrap();
        let deadline = Some(SystemTime::now() + Duration::from_millis(1));
        let mut outcomes = handle(&self.s3, self.runtime.handle(), &self.state, &self.config, &event, deadline).unwrap();
        assert_eq!(outcomes.len(), 1);
        outcomes.remove(0)
    }

    /// Invokes for the input, then for each continuation, until the file is answered.
    fn run_to_the_end(&self, name: &str) -> usize {
        let mut outcome = self.invoke(&format!("batches/input/{name}.jsonl"));
        let mut invocations = 1;
        while outcome.status == Status::Continued {
            assert!(self.s3.size(BUCKET, &format!("batches/continue/{name}.json")).unwrap().is_some());
            outcome = self.invoke(&format!("batches/continue/{name}.json"));
            invocations += 1;
            assert!(invocations < 20, "no progress: {outcome:?}");
        }
        assert_eq!(outcome.status, Status::Completed);
        invocations
    }

    fn lines(&self, key: &str) -> Vec<Value> {
        let bytes = self.s3.get(BUCKET, key).unwrap().unwrap_or_else(|| panic!("no {key}"));
        String::from_utf8(bytes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The output's custom_ids, each exactly once.
    fn answered(&self, name: &str) -> HashSet<String> {
        let output = self.lines(&format!("batches/output/{name}.jsonl"));
        let ids: HashSet<String> = output.iter().map(|l| l["custom_id"].as_str().unwrap().to_string()).collect();
        assert_eq!(ids.len(), output.len(), "a request answered twice");
        ids
    }
}

#[test]
fn a_file_is_answered_in_chunks_across_invocations_and_once() {
    let f = Fixture::new(3);
    f.s3.put(BUCKET, "batches/input/chunked.jsonl", batch_file(7)).unwrap();
    let invocations = f.run_to_the_end("chunked");
    assert_eq!(invocations, 3, "9 lines in chunks of 3, one chunk per invocation");

    let expected: HashSet<String> = (0..7).map(|i| format!("r{i}")).collect();
    assert_eq!(f.answered("chunked"), expected);
    let r0 = &f.lines("batches/output/chunked.jsonl").into_iter().find(|l| l["custom_id"] == "r0").unwrap()["response"];
    assert_eq!(r0["status_code"], 200);
    assert_eq!(r0["body"]["choices"][0]["message"]["content"], "LLAMA");
    let errors = f.lines("batches/output/chunked.errors.jsonl");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e["error"]["code"] == "invalid_json" && e["error"]["line"] == 3));
    let status: Value = serde_json::from_slice(&f.s3.get(BUCKET, "batches/output/chunked.status.json").unwrap().unwrap()).unwrap();
    assert_eq!(
        (status["status"].as_str(), status["succeeded"].as_u64(), status["failed"].as_u64(), status["invocations"].as_u64()),
        (Some("completed"), Some(7), Some(2), Some(3))
    );
    assert!(status["seconds"].as_f64().is_some_and(|s| s > 0.0) && status["stats"]["generate_seconds"].as_f64().is_some_and(|s| s > 0.0), "{status}");
    assert!(f.s3.list(BUCKET, "batches/state/chunked/").unwrap().is_empty(), "parts and progress removed");
    assert!(f.s3.size(BUCKET, "batches/continue/chunked.json").unwrap().is_none());

    // The input's event delivered again: answered from the status, nothing redone.
    let again = f.invoke("batches/input/chunked.jsonl");
    assert_eq!(again.status, Status::AlreadyDone);
    assert_eq!(f.answered("chunked"), expected);
}

#[test]
fn an_invocation_that_dies_before_recording_its_part_is_redone_not_duplicated() {
    let f = Fixture::new(2);
    f.s3.put(BUCKET, "batches/input/crash.jsonl", batch_file(6)).unwrap();
    assert_eq!(f.invoke("batches/input/crash.jsonl").status, Status::Continued);
    let recorded = f.s3.get(BUCKET, "batches/state/crash/progress.json").unwrap().unwrap();
    assert_eq!(f.invoke("batches/continue/crash.json").status, Status::Continued);
    // As if that invocation died after writing its part but before recording it.
    f.s3.put(BUCKET, "batches/state/crash/progress.json", recorded).unwrap();
    let mut outcome = f.invoke("batches/continue/crash.json");
    while outcome.status == Status::Continued {
        outcome = f.invoke("batches/continue/crash.json");
    }
    assert_eq!(outcome.status, Status::Completed);
    assert_eq!(f.answered("crash"), (0..6).map(|i| format!("r{i}")).collect());
    assert_eq!(f.lines("batches/output/crash.errors.jsonl").len(), 2);
}

#[test]
fn the_function_binary_answers_an_input_event() {
    let server = local_s3();
    let s3 = S3::connect().unwrap();
    s3.create_bucket(BUCKET).unwrap();
    s3.put(BUCKET, "batches/input/lambda.jsonl", batch_file(3)).unwrap();
    let watch = CargoLambdaWatch::start(env!("CARGO_BIN_EXE_batch"), &server.function_env(&[]));
    let response =
        watch.invoke(&s3_event_json(BUCKET, &[("ObjectCreated:Put", "batches/input/lambda.jsonl")])).unwrap_or_else(|e| panic!("{e}\n{}", watch.log()));
    let outcomes: Value = serde_json::from_str(&response).unwrap();
    assert_eq!(outcomes[0]["status"], "completed", "{outcomes}");
    let output = String::from_utf8(s3.get(BUCKET, "batches/output/lambda.jsonl").unwrap().unwrap()).unwrap();
    assert_eq!(output.lines().count(), 3);
}

/// A file replaced while it was being answered: the new version starts over, and nothing of the
/// old run's parts ends up in its answers or is left behind.
#[test]
fn a_new_version_of_a_file_starts_over_without_the_old_parts() {
    let f = Fixture::new(2);
    f.s3.put(BUCKET, "batches/input/replaced.jsonl", batch_file(6)).unwrap();
    assert_eq!(f.invoke("batches/input/replaced.jsonl").status, Status::Continued);
    assert_eq!(f.invoke("batches/continue/replaced.json").status, Status::Continued);
    f.s3.put(BUCKET, "batches/input/replaced.jsonl", batch_file(2)).unwrap();
    let mut outcome = f.invoke("batches/input/replaced.jsonl");
    while outcome.status == Status::Continued {
        outcome = f.invoke("batches/continue/replaced.json");
    }
    assert_eq!(outcome.lines, 4, "r0, r1, the bad line and bad-url");
    assert_eq!(f.answered("replaced"), HashSet::from(["r0".to_string(), "r1".to_string()]));
    assert!(f.s3.list(BUCKET, "batches/state/replaced/").unwrap().is_empty());
}
