//! The inference API serving what the quantization function published on the local S3
//! server: loaded lazily through the `latest` alias with parallel ranged GETs, verified
//! against the manifest, refused when the object does not match, cached by hash.

use llm_api::model_source::DownloadSettings;
use llm_store::S3;
use llm_tests::http::{post, serve};
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::publish_model;
use llm_tests::*;

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
    assert!(body.contains("crc64nvme"), "{body}");
    // A manifest written before CRCs were listed has the sha256 alone: that is checked then.
    let version = resolved.version.as_deref().unwrap();
    let keys = llm_store::registry::ModelKeys::new("tiny").unwrap();
    let registry = llm_store::registry::Registry { s3: &s3, bucket: "infer-corrupt" };
    let mut manifest = registry.manifest(&keys, version).unwrap().unwrap();
    manifest.outputs[0].crc64nvme = None;
    registry.put_manifest(&manifest).unwrap();
    let address = serve("s3://infer-corrupt/models/tiny/latest", DownloadSettings::default());
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert!(status == 503 && body.contains("sha256"), "{status} {body}");
    // A model too large for the memory is refused before downloading.
    let tight = DownloadSettings { memory_limit_bytes: Some(64 << 20), ..Default::default() };
    let address = serve("s3://infer-corrupt/models/tiny/latest", tight);
    let (status, body) = post(&address, "/v1/completions", REQUEST);
    assert!(status == 503 && body.contains("needs about"), "{status} {body}");
}

/// A verified download is kept in the cache directory under its sha256; a later cold start
/// reads it instead of S3, and a damaged copy is dropped and downloaded again.
#[test]
fn the_cache_serves_later_cold_starts_and_drops_damaged_copies() {
    local_s3();
    let s3 = S3::connect().unwrap();
    publish_model(&s3, "infer-cache", "tiny");
    let cache = tempfile::tempdir().unwrap();
    let settings = DownloadSettings { cache_dir: Some(cache.path().into()), ..Default::default() };
    let uri = "s3://infer-cache/models/tiny/latest";
    let (status, first) = post(&serve(uri, settings.clone()), "/v1/completions", REQUEST);
    assert_eq!(status, 200, "{first}");
    let resolved = llm_store::registry::resolve(&s3, "infer-cache", "models/tiny/latest", None).unwrap();
    let cached = cache.path().join(format!("{}.gguf", resolved.sha256.as_deref().unwrap()));
    assert_eq!(std::fs::metadata(&cached).unwrap().len(), resolved.size);

    // The S3 object is damaged now: only the cached copy can still answer.
    let mut bytes = s3.get("infer-cache", &resolved.key).unwrap().unwrap();
    bytes[1000] ^= 0xff;
    s3.put("infer-cache", &resolved.key, bytes).unwrap();
    let (status, second) = post(&serve(uri, settings.clone()), "/v1/completions", REQUEST);
    assert_eq!(status, 200, "{second}");
    let text = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["choices"][0]["text"].clone();
    assert_eq!(text(&second), text(&first));

    // A damaged cached copy is not served either: it is removed and S3 is tried again.
    let mut copy = std::fs::read(&cached).unwrap();
    copy[1000] ^= 0xff;
    std::fs::write(&cached, copy).unwrap();
    let (status, third) = post(&serve(uri, settings), "/v1/completions", REQUEST);
    assert!(status == 503 && third.contains("crc64nvme"), "{status} {third}");
    assert!(!cached.exists());
}
