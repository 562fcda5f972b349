//! The inference function's loader when S3 fails mid-download: the client talks to the local
//! S3 server through a proxy that cuts or stalls connections and plays dead. A cut or stalled
//! range is fetched again within the load; a server that dies fails the load with 503, nothing
//! half-loaded is served, and the next request loads the model.

use llm_api::model_source::DownloadSettings;
use llm_store::S3;
use llm_tests::fault_proxy::{exclusive, proxied, Fault, FaultCount, FaultProxy};
use llm_tests::http::{post, serve};
use llm_tests::s3_events::publish_model;

const REQUEST: &str = r#"{"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0}"#;

/// Several 256 KiB ranges in flight, so a cut lands in the middle of the download.
fn settings() -> DownloadSettings {
    DownloadSettings { part_size: 256 << 10, concurrency: 4, ..Default::default() }
}

/// Publishes the test model in `bucket` with the proxy healthy; returns the model's URI.
fn publish(bucket: &str) -> String {
    proxied().set(Fault::None);
    publish_model(&S3::connect().unwrap(), bucket, "tiny");
    format!("s3://{bucket}/models/tiny/latest")
}

fn text(body: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(body).unwrap_or_else(|e| panic!("{e}: {body}"))["choices"][0]["text"].clone()
}

/// A cut connection fails the range at once; a stalled one is ended by the SDK's stalled-stream
/// protection after its grace period (seconds). Either way the range is read again.
///
/// The proxy counts the bytes of all connections together, so the stall can also land in a
/// request that is still being sent: its answer then never starts, and only the read timeout
/// ends the attempt. That timeout is 10 s here: its default (120 s) is also how long the test's
/// own HTTP client waits for the answer.
#[test]
fn a_range_cut_or_stalled_mid_download_is_fetched_again() {
    let _one = exclusive();
    std::env::set_var("S3_READ_TIMEOUT_SECS", "10");
    let uri = publish("faults-cut");
    let (_, reference) = post(&serve(&uri, settings()), "/v1/completions", REQUEST);

    let proxy = proxied();
    let faults: [(Fault, FaultCount); 2] = [
        (Fault::CutAfter { method: b"GET ", bytes: 600_000, then_down: false }, FaultProxy::cuts),
        (Fault::StallAfter { method: b"GET ", bytes: 600_000 }, FaultProxy::stalls),
    ];
    for (fault, fired) in faults {
        let before = fired(proxy);
        proxy.set(fault);
        let (status, body) = post(&serve(&uri, settings()), "/v1/completions", REQUEST);
        assert_eq!(status, 200, "{fault:?}: {body}");
        assert_eq!(fired(proxy), before + 1, "{fault:?} never fired");
        assert_eq!(text(&body), text(&reference));
    }
    std::env::remove_var("S3_READ_TIMEOUT_SECS");
}

#[test]
fn a_server_that_dies_mid_download_fails_the_load_and_the_next_request_loads() {
    let _one = exclusive();
    let address = serve(&publish("faults-down"), settings());

    let proxy = proxied();
    proxy.set(Fault::CutAfter { method: b"GET ", bytes: 600_000, then_down: true });
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("could not be loaded"), "{body}");

    proxy.set(Fault::None);
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["usage"]["completion_tokens"], 6);
}
