//! The inference function's loader when S3 fails mid-download: the client talks to the local
//! S3 server through a proxy that cuts connections and plays dead. A cut range is fetched
//! again within the load; a server that dies fails the load with 503, nothing half-loaded is
//! served, and the next request loads the model.

use llm_api::model_source::DownloadSettings;
use llm_store::S3;
use llm_tests::fault_proxy::{Fault, FaultProxy};
use llm_tests::http::{post, serve};
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::publish_model;

const REQUEST: &str = r#"{"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0}"#;

/// One proxy for this test process; every client made after this call goes through it.
fn proxied() -> &'static FaultProxy {
    static PROXY: std::sync::OnceLock<FaultProxy> = std::sync::OnceLock::new();
    PROXY.get_or_init(|| {
        let server = local_s3();
        let proxy = FaultProxy::start(server.endpoint.trim_start_matches("http://"));
        std::env::set_var("AWS_ENDPOINT_URL", &proxy.endpoint);
        proxy
    })
}

/// Tests here share the proxy's fault setting, so they run one at a time.
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Several 256 KiB ranges in flight, so a cut lands in the middle of the download.
fn settings() -> DownloadSettings {
    DownloadSettings { part_size: 256 << 10, concurrency: 4, ..Default::default() }
}

fn text(body: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(body).unwrap_or_else(|e| panic!("{e}: {body}"))["choices"][0]["text"].clone()
}

#[test]
fn a_range_cut_mid_download_is_fetched_again() {
    let _one = exclusive();
    let proxy = proxied();
    proxy.set(Fault::None);
    let s3 = S3::connect().unwrap();
    publish_model(&s3, "faults-cut", "tiny");
    let (_, reference) = post(&serve("s3://faults-cut/models/tiny/latest", settings()), "/v1/completions", REQUEST);

    let cuts = proxy.cuts();
    proxy.set(Fault::CutAfter { method: b"GET ", bytes: 600_000, then_down: false });
    let (status, body) = post(&serve("s3://faults-cut/models/tiny/latest", settings()), "/v1/completions", REQUEST);
    assert_eq!(status, 200, "{body}");
    assert_eq!(proxy.cuts(), cuts + 1, "the fault never fired");
    assert_eq!(text(&body), text(&reference));
}

#[test]
fn a_server_that_dies_mid_download_fails_the_load_and_the_next_request_loads() {
    let _one = exclusive();
    let proxy = proxied();
    proxy.set(Fault::None);
    let s3 = S3::connect().unwrap();
    publish_model(&s3, "faults-down", "tiny");
    let address = serve("s3://faults-down/models/tiny/latest", settings());

    proxy.set(Fault::CutAfter { method: b"GET ", bytes: 600_000, then_down: true });
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("could not be loaded"), "{body}");

    proxy.set(Fault::None);
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["usage"]["completion_tokens"], 6);
}
