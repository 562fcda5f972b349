//! The S3 client every function uses, against S3's own failure responses (injected by the
//! fault proxy in front of the local S3 server): throttling (503 SlowDown) and server errors
//! (500 InternalError) are retried with backoff and succeed; when they persist, the call fails
//! after a bounded number of attempts with S3's status or error code in the message.

use llm_store::S3;
use llm_tests::fault_proxy::{exclusive, proxied, Fault};

fn bucket_with_object(bucket: &str) -> S3 {
    proxied().set(Fault::None);
    let s3 = S3::connect().unwrap();
    s3.create_bucket(bucket).unwrap();
    s3.put(bucket, "object", b"payload".to_vec()).unwrap();
    s3
}

#[test]
fn throttling_and_server_errors_are_retried() {
    let _one = exclusive();
    let s3 = bucket_with_object("faults-throttle");
    let proxy = proxied();
    let errors = proxy.errors();
    proxy.set(Fault::Respond { status: 503, code: "SlowDown", times: 2 });
    s3.put("faults-throttle", "second", b"more".to_vec()).unwrap();
    assert_eq!(proxy.errors(), errors + 2, "the fault did not fire");
    proxy.set(Fault::Respond { status: 500, code: "InternalError", times: 2 });
    assert_eq!(s3.get("faults-throttle", "object").unwrap().unwrap(), b"payload");
    assert_eq!(proxy.errors(), errors + 4);
    assert_eq!(s3.get("faults-throttle", "second").unwrap().unwrap(), b"more");
}

#[test]
fn persistent_errors_fail_after_bounded_attempts_with_the_code() {
    let _one = exclusive();
    let s3 = bucket_with_object("faults-persistent");
    let proxy = proxied();
    for (status, code) in [(503, "SlowDown"), (500, "InternalError")] {
        let errors = proxy.errors();
        proxy.set(Fault::Respond { status, code, times: usize::MAX });
        let error = s3.get("faults-persistent", "object").expect_err("every attempt failed").to_string();
        let attempts = proxy.errors() - errors;
        proxy.set(Fault::None);
        // A HEAD's error has no body, so the SDK knows the status but not S3's code.
        assert!(error.contains(code) || error.contains(&format!("StatusCode({status})")), "{error}");
        // The SDK's standard retry mode: three attempts, then the error.
        assert_eq!(attempts, 3, "{error}");
    }
    assert_eq!(s3.get("faults-persistent", "object").unwrap().unwrap(), b"payload");
}

/// A server that takes a request and never answers it: the attempt ends at the read timeout
/// (`S3_READ_TIMEOUT_SECS`, 120 s by default, 1 s here) and is retried, instead of waiting for
/// as long as the function may run.
#[test]
fn a_request_never_answered_times_out_and_is_retried() {
    let _one = exclusive();
    bucket_with_object("faults-unanswered");
    std::env::set_var("S3_READ_TIMEOUT_SECS", "1");
    let s3 = S3::connect().unwrap();
    std::env::remove_var("S3_READ_TIMEOUT_SECS");
    let proxy = proxied();
    let stalls = proxy.stalls();
    // Nothing of the GET reaches the server, and nothing comes back.
    proxy.set(Fault::StallAfter { method: b"GET ", bytes: 0 });
    let started = std::time::Instant::now();
    assert_eq!(s3.get("faults-unanswered", "object").unwrap().unwrap(), b"payload");
    assert_eq!(proxy.stalls(), stalls + 1, "the fault did not fire");
    // Without the read timeout the first attempt would never end.
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "{:?}", started.elapsed());
}
