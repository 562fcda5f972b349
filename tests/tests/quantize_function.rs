//! The quantization function's handler, called with real S3 event JSON, against a real
//! S3-compatible server on 127.0.0.1 through the production aws-sdk-s3 client.

use std::time::{Duration, SystemTime};

use aws_lambda_events::s3::S3Event;
use llm_convert::{CheckpointSource, QuantType};
use llm_store::checksum::{hex, Checksummer};
use llm_store::registry::{self, Alias, Manifest, ModelKeys};
use llm_store::{Location, S3};
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::{s3_event_json, upload_checkpoint};
use llm_tests::*;
use quantize_function::{handle, Config, Outcome, Summary};
use sha2::{Digest, Sha256};

const PUT: &str = "ObjectCreated:Put";

fn client() -> S3 {
    local_s3();
    S3::connect().unwrap()
}

fn event(bucket: &str, records: &[(&str, &str)]) -> S3Event {
    serde_json::from_str(&s3_event_json(bucket, records)).unwrap()
}

fn in_15_minutes() -> Option<SystemTime> {
    Some(SystemTime::now() + Duration::from_secs(900))
}

/// Uploads the llama2 checkpoint as `model` and its job file, and returns the job file's event.
fn upload_job(s3: &S3, bucket: &str, model: &str, job: &str) -> S3Event {
    upload_checkpoint(s3, bucket, &format!("incoming/{model}/"), "llama2");
    s3.put(bucket, &format!("incoming/{model}/quantize.json"), job.as_bytes().to_vec()).unwrap();
    event(bucket, &[(PUT, &format!("incoming/{model}/quantize.json"))])
}

fn run(s3: &S3, event: &S3Event) -> Summary {
    handle(s3, &Config::default(), event, in_15_minutes()).unwrap()
}

fn keys_under(s3: &S3, bucket: &str, prefix: &str) -> Vec<String> {
    s3.list(bucket, prefix).unwrap().into_iter().map(|o| o.key).collect()
}

/// `llm quantize`'s result for the llama2 checkpoint in a directory named `model` (the name
/// goes into `general.name`).
fn local_conversion(model: &str, q: QuantType) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join(model);
    std::fs::create_dir(&checkpoint).unwrap();
    for entry in std::fs::read_dir(fixtures_dir().join("llama2/hf")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), checkpoint.join(entry.file_name())).unwrap();
    }
    let source = CheckpointSource::open(Location::Local(checkpoint)).unwrap();
    let mut out = Vec::new();
    llm_convert::convert(&source, &mut out, q, |_| {}).unwrap();
    out
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// CRC-64/NVME of `bytes` at once (the function's writer takes them in pieces).
fn crc64nvme(bytes: &[u8]) -> String {
    let mut sums = Checksummer::default();
    sums.update(bytes);
    sums.finish().crc64nvme
}

#[test]
fn a_job_file_produces_a_versioned_model_with_manifest_and_alias() {
    let s3 = client();
    let bucket = "qf-versioned";
    let summary = run(&s3, &upload_job(&s3, bucket, "tiny-llama", r#"{"types": ["q8_0", "q4_0"]}"#));
    let [Outcome::Converted { version, outputs, promoted: true, .. }] = summary.jobs.as_slice() else {
        panic!("{summary:?}");
    };
    let keys = ModelKeys::new("tiny-llama").unwrap();
    let prefix = keys.version_prefix(version);
    assert_eq!(
        keys_under(&s3, bucket, "models/"),
        vec![
            "models/tiny-llama/latest".to_string(),
            format!("{prefix}manifest.json"),
            format!("{prefix}tiny-llama-q4_0.gguf"),
            format!("{prefix}tiny-llama-q8_0.gguf")
        ]
    );

    let manifest: Manifest = serde_json::from_slice(&s3.get(bucket, &keys.manifest_key(version)).unwrap().unwrap()).unwrap();
    assert_eq!(manifest.types, ["q8_0", "q4_0"]);
    assert_eq!(&manifest.outputs, outputs);
    assert!(manifest.tool.starts_with("llm-serverless quantize "), "{}", manifest.tool);
    assert!(manifest.created.ends_with('Z'), "{}", manifest.created);
    let config = s3.head(bucket, "incoming/tiny-llama/config.json").unwrap().unwrap();
    let listed = manifest.source.objects.iter().find(|o| o.key == config.key).unwrap();
    assert_eq!((&listed.etag, listed.size), (&config.etag, config.size));
    assert_eq!(manifest.source.objects.len(), 7, "six checkpoint files and the job file");
    for (output, q) in manifest.outputs.iter().zip([QuantType::Q8_0, QuantType::Q4_0]) {
        let bytes = s3.get(bucket, &output.key).unwrap().unwrap();
        assert_eq!((output.size, &output.sha256), (bytes.len() as u64, &sha256(&bytes)), "{}", output.key);
        assert_eq!(output.crc64nvme, Some(crc64nvme(&bytes)), "{}", output.key);
        assert!(bytes == local_conversion("tiny-llama", q), "{}: differs from `llm quantize` on the same checkpoint", output.key);
    }

    let alias: Alias = serde_json::from_slice(&s3.get(bucket, "models/tiny-llama/latest").unwrap().unwrap()).unwrap();
    assert_eq!((alias.version.as_str(), alias.default_type.as_str()), (version.as_str(), "q8_0"));
    let resolved = registry::resolve(&s3, bucket, "models/tiny-llama/latest", None).unwrap();
    assert_eq!((resolved.key.as_str(), resolved.sha256.as_deref()), (outputs[0].key.as_str(), Some(outputs[0].sha256.as_str())));
    let q4 = registry::resolve(&s3, bucket, "models/tiny-llama/latest", Some("q4_0")).unwrap();
    assert_eq!(q4.key, outputs[1].key);
    assert!(registry::resolve(&s3, bucket, "models/tiny-llama/latest", Some("q6_k")).unwrap_err().to_string().contains("no `q6_k` file"));
    let direct = registry::resolve(&s3, bucket, &outputs[1].key, None).unwrap();
    assert_eq!((direct.sha256.as_ref(), direct.crc64nvme.as_ref()), (Some(&outputs[1].sha256), outputs[1].crc64nvme.as_ref()));
}

#[test]
fn repeated_and_reordered_events_make_one_version_once() {
    let s3 = client();
    let bucket = "qf-idempotent";
    let job_event = upload_job(&s3, bucket, "m", r#"{"types": ["q8_0"]}"#);
    let Outcome::Converted { version, outputs, .. } = &run(&s3, &job_event).jobs[0] else { panic!() };
    let written = s3.head(bucket, &outputs[0].key).unwrap().unwrap();

    // The same notification again, and a batch where checkpoint files, the job file (twice)
    // and this function's own output arrive in any order.
    let again = run(&s3, &job_event);
    let noisy = event(
        bucket,
        &[
            (PUT, "incoming/m/quantize.json"),
            (PUT, "incoming/m/model.safetensors"),
            (PUT, &outputs[0].key),
            (PUT, "incoming/m/quantize.json"),
            ("ObjectRemoved:Delete", "incoming/m/config.json"),
        ],
    );
    let batch = run(&s3, &noisy);
    for summary in [&again, &batch] {
        let [Outcome::AlreadyDone { version: v, .. }] = summary.jobs.as_slice() else { panic!("{summary:?}") };
        assert_eq!(v, version);
    }
    assert_eq!(batch.ignored.len(), 3, "{:?}", batch.ignored);
    assert_eq!(s3.head(bucket, &outputs[0].key).unwrap().unwrap(), written, "the output was rewritten");
    assert_eq!(keys_under(&s3, bucket, "models/m/").len(), 3);

    // A changed source is a new version, and `latest` moves to it.
    s3.put(bucket, "incoming/m/quantize.json", br#"{"types": ["q4_0"]}"#.to_vec()).unwrap();
    let Outcome::Converted { version: second, promoted: true, .. } = &run(&s3, &job_event).jobs[0] else { panic!() };
    assert_ne!(second, version);
    assert_eq!(registry::resolve(&s3, bucket, "models/m/latest", None).unwrap().version.as_ref(), Some(second));
}

#[test]
fn event_keys_are_decoded_and_validated() {
    let s3 = client();
    let bucket = "qf-keys";
    s3.create_bucket(bucket).unwrap();
    let summary = run(
        &s3,
        &event(
            bucket,
            &[
                (PUT, "incoming/..%2Fmodels/quantize.json"),
                (PUT, "incoming/my+model/quantize.json"),
                (PUT, "incoming/%E2%80%AE/quantize.json"),
                (PUT, "incoming/m/%ZZ"),
                (PUT, "models/m/v1/m-q8_0.gguf"),
            ],
        ),
    );
    assert!(summary.jobs.is_empty(), "{summary:?}");
    let reasons: Vec<&str> = summary.rejected.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].contains("invalid key"), "{reasons:?}");
    assert!(reasons[1].contains("invalid model name `my model`"), "{reasons:?}");
    assert!(reasons[3].contains("malformed escape"), "{reasons:?}");
    assert_eq!(summary.ignored[0].reason, "outside incoming/");
    // A URL-encoded name that is valid once decoded is found.
    let summary = run(&s3, &upload_job(&s3, bucket, "tiny.v1_b-2", ""));
    assert!(matches!(summary.jobs[0], Outcome::Converted { .. }), "{summary:?}");
    let summary = run(&s3, &event(bucket, &[("ObjectCreated:CompleteMultipartUpload", "incoming/tiny%2Ev1_b-2/quantize.json")]));
    assert!(matches!(summary.jobs[0], Outcome::AlreadyDone { .. }), "{summary:?}");
}

/// Each broken upload fails with a reason, is not retried, and leaves nothing under `models/`.
#[test]
fn bad_checkpoints_fail_clearly_and_write_nothing() {
    let s3 = client();
    let bucket = "qf-bad";
    let weights = std::fs::read(fixtures_dir().join("llama2/hf/model.safetensors")).unwrap();
    let config = std::fs::read_to_string(fixtures_dir().join("llama2/hf/config.json")).unwrap();
    let mut hostile = weights.clone();
    hostile[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    type Damage<'a> = Box<dyn Fn(&S3, &str) + 'a>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        ("truncated", Box::new(|s3, p| s3.put(bucket, &format!("{p}model.safetensors"), weights[..weights.len() / 3].to_vec()).unwrap()), "truncated"),
        ("hostile", Box::new(|s3, p| s3.put(bucket, &format!("{p}model.safetensors"), hostile.clone()).unwrap()), "does not fit the file"),
        ("no-tokenizer", Box::new(|s3, p| s3.delete(bucket, &format!("{p}tokenizer.json")).unwrap()), "tokenizer.json"),
        ("no-config", Box::new(|s3, p| s3.delete(bucket, &format!("{p}config.json")).unwrap()), "config.json: missing"),
        (
            "mistral",
            Box::new(|s3, p| {
                s3.put(bucket, &format!("{p}config.json"), config.replace("LlamaForCausalLM", "GPT2LMHeadModel").replace("\"llama\"", "\"gpt2\"").into_bytes())
                    .unwrap()
            }),
            "architecture",
        ),
        ("bad-job", Box::new(|s3, p| s3.put(bucket, &format!("{p}quantize.json"), br#"{"types": ["q3"]}"#.to_vec()).unwrap()), "unknown type `q3`"),
    ];
    for (model, break_it, expected) in cases {
        let job_event = upload_job(&s3, bucket, model, "");
        break_it(&s3, &format!("incoming/{model}/"));
        let summary = handle(&s3, &Config::default(), &job_event, in_15_minutes()).expect("a bad checkpoint is not a retryable fault");
        let [Outcome::Failed { reason, .. }] = summary.jobs.as_slice() else { panic!("{model}: {summary:?}") };
        assert!(reason.contains(expected), "{model}: {reason}");
        assert!(keys_under(&s3, bucket, &format!("models/{model}/")).is_empty(), "{model}");
    }
}

#[test]
fn a_job_that_cannot_finish_in_time_is_refused_up_front() {
    let s3 = client();
    let bucket = "qf-deadline";
    let job_event = upload_job(&s3, bucket, "m", "");
    let slow = Config { mib_per_second: 0.001, ..Config::default() };
    let summary = handle(&s3, &slow, &job_event, in_15_minutes()).unwrap();
    let [Outcome::Failed { reason, .. }] = summary.jobs.as_slice() else { panic!("{summary:?}") };
    assert!(reason.contains("AWS Batch") && reason.contains("s left"), "{reason}");
    assert!(keys_under(&s3, bucket, "models/").is_empty());
}
