//! S3 event notifications as S3 sends them to Lambda, and checkpoint uploads to trigger them.

use llm_store::S3;

/// An `s3:ObjectCreated:*`-style notification with one record per `(eventName, key)`; `key` is
/// given as S3 puts it in events (URL-encoded).
pub fn s3_event_json(bucket: &str, records: &[(&str, &str)]) -> String {
    let records: Vec<serde_json::Value> = records
        .iter()
        .enumerate()
        .map(|(i, (event_name, key))| {
            serde_json::json!({
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2026-11-30T10:00:00.000Z",
                "eventName": event_name,
                "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
                "requestParameters": {"sourceIPAddress": "127.0.0.1"},
                "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "quantize-on-job-file",
                    "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": format!("arn:aws:s3:::{bucket}")},
                    "object": {"key": key, "size": 42, "eTag": "d41d8cd98f00b204e9800998ecf8427e", "sequencer": format!("0055AED6DCD90281E{i}")}
                }
            })
        })
        .collect();
    serde_json::json!({ "Records": records }).to_string()
}

/// Creates `bucket` and uploads every file of the fixture checkpoint `model` (e.g. `llama2`)
/// under `prefix`.
pub fn upload_checkpoint(s3: &S3, bucket: &str, prefix: &str, model: &str) {
    s3.create_bucket(bucket).expect("create bucket");
    for entry in std::fs::read_dir(crate::fixtures_dir().join(model).join("hf")).expect("fixture checkpoint") {
        let entry = entry.expect("dir entry");
        let key = format!("{prefix}{}", entry.file_name().to_string_lossy());
        s3.put(bucket, &key, std::fs::read(entry.path()).expect("read fixture")).expect("upload");
    }
}

/// Publishes the llama2 checkpoint as `models/<model>/` (q8_0, alias `latest`) in `bucket`
/// through the quantization function's handler.
pub fn publish_model(s3: &S3, bucket: &str, model: &str) {
    upload_checkpoint(s3, bucket, &format!("incoming/{model}/"), "llama2");
    s3.put(bucket, &format!("incoming/{model}/quantize.json"), br#"{"types": ["q8_0"]}"#.to_vec()).expect("upload job file");
    let event = serde_json::from_str(&s3_event_json(bucket, &[("ObjectCreated:Put", &format!("incoming/{model}/quantize.json"))])).expect("event");
    let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(900);
    quantize_function::handle(s3, &quantize_function::Config::default(), &event, Some(deadline)).expect("publish");
}
