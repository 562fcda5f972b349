//! The quantization function when S3 fails mid-transfer: the client talks to the local S3
//! server through a proxy that cuts connections and plays dead. A fault either heals within
//! the invocation (retries) or fails it with nothing published, and the retried event completes.

use std::time::{Duration, SystemTime};

use aws_lambda_events::s3::S3Event;
use llm_store::checksum::hex;
use llm_store::registry::{self, ModelKeys};
use llm_store::S3;
use llm_tests::fault_proxy::{exclusive, proxied, Fault, FaultCount, FaultProxy};
use llm_tests::s3_events::{s3_event_json, upload_checkpoint};
use quantize_function::{handle, Config, Outcome};
use sha2::{Digest, Sha256};

fn prepare(bucket: &str) -> (S3, S3Event) {
    let proxy = proxied();
    proxy.set(Fault::None);
    let s3 = S3::connect().unwrap();
    upload_checkpoint(&s3, bucket, "incoming/m/", "llama2");
    s3.put(bucket, "incoming/m/quantize.json", br#"{"types": ["q8_0"]}"#.to_vec()).unwrap();
    let event = serde_json::from_str(&s3_event_json(bucket, &[("ObjectCreated:Put", "incoming/m/quantize.json")])).unwrap();
    (s3, event)
}

fn invoke(s3: &S3, event: &S3Event) -> Result<quantize_function::Summary, quantize_function::TransientError> {
    handle(s3, &Config::default(), event, Some(SystemTime::now() + Duration::from_secs(900)))
}

/// The published file is complete: its bytes have the checksums the manifest lists.
fn assert_published(s3: &S3, bucket: &str) {
    let resolved = registry::resolve(s3, bucket, "models/m/latest", None).unwrap();
    let bytes = s3.get(bucket, &resolved.key).unwrap().unwrap();
    assert_eq!(Some(hex(&Sha256::digest(&bytes))), resolved.sha256);
    let mut verifier = resolved.verifier().unwrap();
    verifier.update(&bytes);
    verifier.finish().unwrap();
    assert_eq!(bytes.len() as u64, resolved.size);
}

fn models(s3: &S3, bucket: &str) -> Vec<String> {
    s3.list(bucket, "models/").unwrap().into_iter().map(|o| o.key).collect()
}

/// A connection cut once, 100 kB into the first ranged read of the weights, or two throttled
/// requests in a row (the SDK's third attempt gets through): healed within the invocation.
#[test]
fn a_cut_connection_or_throttling_is_retried_within_the_invocation() {
    let _one = exclusive();
    let faults: [(&str, Fault, FaultCount, usize); 2] = [
        ("faults-download-cut", Fault::CutAfter { method: b"GET ", bytes: 100_000, then_down: false }, FaultProxy::cuts, 1),
        ("faults-throttled", Fault::Respond { status: 503, code: "SlowDown", times: 2 }, FaultProxy::errors, 2),
    ];
    for (bucket, fault, fired, times) in faults {
        let (s3, event) = prepare(bucket);
        let proxy = proxied();
        let before = fired(proxy);
        proxy.set(fault);
        let summary = invoke(&s3, &event).unwrap();
        assert!(matches!(summary.jobs[0], Outcome::Converted { .. }), "{fault:?}: {summary:?}");
        assert_eq!(fired(proxy), before + times, "{fault:?} did not fire");
        assert_published(&s3, bucket);
    }
}

#[test]
fn the_server_dying_mid_download_fails_the_invocation_and_the_retry_completes() {
    let _one = exclusive();
    let (s3, event) = prepare("faults-download-down");
    let proxy = proxied();
    proxy.set(Fault::CutAfter { method: b"GET ", bytes: 100_000, then_down: true });
    let fault = invoke(&s3, &event).expect_err("a dead server must fail the invocation so that Lambda retries it");
    assert!(fault.to_string().starts_with("m: "), "{fault}");
    proxy.set(Fault::None);
    assert!(models(&s3, "faults-download-down").is_empty());
    let summary = invoke(&s3, &event).unwrap();
    assert!(matches!(summary.jobs[0], Outcome::Converted { .. }), "{summary:?}");
    assert_published(&s3, "faults-download-down");
}

#[test]
fn the_server_dying_mid_upload_publishes_nothing_and_the_retry_completes() {
    let _one = exclusive();
    let (s3, event) = prepare("faults-upload-down");
    let proxy = proxied();
    // The GGUF goes up as one part when the conversion finishes: die 1 MB into it.
    proxy.set(Fault::CutAfter { method: b"PUT ", bytes: 1_000_000, then_down: true });
    invoke(&s3, &event).expect_err("a dead server must fail the invocation");
    proxy.set(Fault::None);
    assert!(models(&s3, "faults-upload-down").is_empty(), "{:?}", models(&s3, "faults-upload-down"));
    let summary = invoke(&s3, &event).unwrap();
    let [Outcome::Converted { version, .. }] = summary.jobs.as_slice() else { panic!("{summary:?}") };
    assert_published(&s3, "faults-upload-down");
    let keys = ModelKeys::new("m").unwrap();
    assert_eq!(models(&s3, "faults-upload-down").len(), 3, "{version}: gguf, manifest, alias");
    assert!(s3.head("faults-upload-down", &keys.manifest_key(version)).unwrap().is_some());
}
