//! The inference function's real binary under `cargo lambda`'s runtime emulator, serving the
//! model the quantization function published on the local S3 server, through function URL
//! requests (JSON and a streamed response).

use llm_store::S3;
use llm_tests::cargo_lambda::CargoLambdaWatch;
use llm_tests::http::post;
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::publish_model;

const REQUEST: &str = r#"{"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0}"#;

#[test]
fn the_function_binary_answers_under_cargo_lambda() {
    let server = local_s3();
    let s3 = S3::connect().unwrap();
    publish_model(&s3, "infer-lambda", "tiny");
    let watch = CargoLambdaWatch::start(env!("CARGO_BIN_EXE_infer"), &server.function_env(&[("MODEL_URI", "s3://infer-lambda/models/tiny/latest")]));
    let address = format!("127.0.0.1:{}", watch.port);
    let url = format!("{}/v1/completions", watch.url_prefix());
    let (status, body) = post(&address, &url, REQUEST);
    assert_eq!(status, 200, "{body}\n{}", watch.log());
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(answer["usage"]["completion_tokens"], 6, "{answer}");
    let stream = REQUEST.replace("\"temperature\": 0", "\"temperature\": 0, \"stream\": true");
    let (status, events) = post(&address, &url, &stream);
    assert_eq!(status, 200, "{events}");
    let text: String = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|chunk| chunk["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, answer["choices"][0]["text"].as_str().unwrap(), "{events}");
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");
    let uncached = REQUEST.replace("\"temperature\": 0", "\"temperature\": 0, \"cache_prompt\": false");
    let (status, body) = post(&address, &url, &uncached);
    assert_eq!((status, serde_json::from_str::<serde_json::Value>(&body).unwrap()["choices"][0]["text"].clone()), (200, answer["choices"][0]["text"].clone()));
    let log = watch.log();
    assert!(log.contains("model downloaded") && log.contains("\"ColdStart\":1.0"), "{log}");
    // The streamed request repeated the prompt: all but its last token came from the prompt
    // cache; the third, which asked for no prompt cache, ran its whole prompt.
    let reused = answer["usage"]["prompt_tokens"].as_u64().unwrap() - 1;
    let cached: Vec<&str> = log.split("\"CachedPromptTokens\":").skip(1).map(|rest| rest.split(',').next().unwrap()).collect();
    assert_eq!(cached, ["0.0".to_string(), format!("{reused}.0"), "0.0".to_string()], "{log}");
    // Log lines carry the invocation's request id and the served object; no text by default.
    assert!(log.contains("\"request_id\"") && !log.contains("\"request_id\":\"req-") && log.contains("\"source\":\"s3://infer-lambda/models/tiny/"), "{log}");
    assert!(!log.contains(answer["choices"][0]["text"].as_str().unwrap()), "{log}");
}
