//! The quantization function's real binary under `cargo lambda`'s runtime emulator: the Lambda runtime
//! delivers an S3 event, the function converts the checkpoint on the local S3 server, and its
//! logs are JSON lines with CloudWatch EMF metrics.

use llm_store::S3;
use llm_tests::cargo_lambda::CargoLambdaWatch;
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::{s3_event_json, upload_checkpoint};

#[test]
fn the_function_binary_answers_an_s3_event() {
    let server = local_s3();
    let s3 = S3::connect().unwrap();
    let bucket = "cargo-lambda-quantize";
    upload_checkpoint(&s3, bucket, "incoming/tiny/", "llama2");
    s3.put(bucket, "incoming/tiny/quantize.json", br#"{"types": ["q4_0"]}"#.to_vec()).unwrap();

    let watch = CargoLambdaWatch::start(env!("CARGO_BIN_EXE_quantize"), &server.function_env(&[("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3008")]));
    let event = s3_event_json(bucket, &[("ObjectCreated:Put", "incoming/tiny/quantize.json"), ("ObjectCreated:Put", "incoming/tiny/config.json")]);
    let response = watch.invoke(&event).unwrap_or_else(|e| panic!("{e}\n{}", watch.log()));
    let summary: serde_json::Value = serde_json::from_str(&response).unwrap_or_else(|e| panic!("{e}: {response}"));
    assert_eq!(summary["jobs"][0]["status"], "converted", "{summary}");
    assert_eq!(summary["ignored"].as_array().map(Vec::len), Some(1), "{summary}");
    let key = summary["jobs"][0]["outputs"][0]["key"].as_str().unwrap();
    assert!(key.starts_with("models/tiny/v") && key.ends_with("/tiny-q4_0.gguf"), "{key}");
    assert!(s3.size(bucket, key).unwrap().is_some_and(|n| n > 0));

    // A second delivery of the same event is answered from the manifest.
    let again: serde_json::Value = serde_json::from_str(&watch.invoke(&event).unwrap()).unwrap();
    assert_eq!(again["jobs"][0]["status"], "already_done", "{again}");

    let log = watch.log();
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(lines.iter().any(|l| l["message"] == "version complete" && l["model"] == "tiny"), "no JSON log line:\n{log}");
    let emf = lines.iter().find(|l| l["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "llm-serverless").unwrap_or_else(|| panic!("no EMF line:\n{log}"));
    assert!(emf["QuantizeSeconds"].as_f64().is_some_and(|s| s > 0.0), "{emf}");
}
