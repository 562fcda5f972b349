//! The inference API serving what the quantization function published on the local S3
//! server: loaded lazily through the `latest` alias with parallel ranged GETs, verified
//! against the manifest, refused when the object does not match.

use llm_api::model_source::{self, DownloadSettings};
use llm_api::{AppState, Limits, ModelSlot};
use llm_engine::LoadOptions;
use llm_store::S3;
use llm_tests::http::post;
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::publish_model;
use llm_tests::*;

/// Serves `uri` with the production router on a free local port; returns `host:port`.
fn serve(uri: &str, settings: DownloadSettings) -> String {
    let loader = model_source::loader(uri, LoadOptions::default(), settings).unwrap();
    let state = std::sync::Arc::new(AppState::new(ModelSlot::new(model_source::model_id(uri), loader), Limits::default(), None));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, llm_api::router(state)).await.unwrap();
        });
    });
    address
}

const REQUEST: &str = r#"{"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0}"#;

#[test]
fn the_alias_is_loaded_lazily_verified_and_served() {
    local_s3();
    let s3 = S3::connect().unwrap();
    publish_model(&s3, "infer-alias", "tiny");
    // Small parts so that the download really runs several ranged GETs at once.
    let settings = DownloadSettings { part_size: 256 << 10, concurrency: 4, ..Default::default() };
    let address = serve("s3://infer-alias/models/tiny/latest", settings);
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert_eq!(status, 200, "{body}");
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();

    // The same weights from the local fixture (llama.cpp's q8_0 file) generate the same text.
    let local = serve(fixtures_dir().join("llama2/llama2-q8_0.gguf").to_str().unwrap(), DownloadSettings::default());
    let (_, reference) = post(&local, "/v1/completions", &REQUEST.replace("\"tiny\"", "\"llama2-q8_0\""));
    let reference: serde_json::Value = serde_json::from_str(&reference).unwrap();
    assert_eq!(served["choices"][0]["text"], reference["choices"][0]["text"]);
    assert_eq!(served["usage"]["completion_tokens"], 6);
}

#[test]
fn an_object_that_does_not_match_its_manifest_is_never_served() {
    local_s3();
    let s3 = S3::connect().unwrap();
    publish_model(&s3, "infer-corrupt", "tiny");
    let resolved = llm_store::registry::resolve(&s3, "infer-corrupt", "models/tiny/latest", None).unwrap();
    let mut bytes = s3.get("infer-corrupt", &resolved.key).unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    s3.put("infer-corrupt", &resolved.key, bytes).unwrap();
    let address = serve("s3://infer-corrupt/models/tiny/latest", DownloadSettings::default());
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("sha256"), "{body}");
    // A model too large for the memory is refused before downloading.
    let tight = DownloadSettings { memory_limit_bytes: Some(64 << 20), ..Default::default() };
    let address = serve("s3://infer-corrupt/models/tiny/latest", tight);
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert!(status == 503 && body.contains("needs about"), "{status} {body}");
}
