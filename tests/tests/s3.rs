//! The converter and `llm quantize` against a real S3-compatible server on 127.0.0.1, through the
//! production aws-sdk-s3 code: ranged reads of the checkpoint, a multipart upload of the result,
//! and nothing left behind when a conversion fails.

use llm_convert::{CheckpointSource, QuantType};
use llm_store::{Location, Parts, S3};
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::upload_checkpoint;
use llm_tests::*;

fn local_conversion(q: QuantType) -> Vec<u8> {
    let source = CheckpointSource::open(Location::Local(fixtures_dir().join("llama2/hf"))).unwrap();
    let mut out = Vec::new();
    llm_convert::convert(&source, &mut out, q, |_| {}).unwrap();
    out
}

#[test]
fn converts_from_s3_to_s3_with_the_same_bytes() {
    local_s3();
    let s3 = S3::connect().unwrap();
    upload_checkpoint(&s3, "convert-roundtrip", "incoming/hf/", "llama2");
    let source = CheckpointSource::with_s3(Location::parse("s3://convert-roundtrip/incoming/hf/").unwrap(), s3.clone());
    // A small part size so that the upload really has several parts.
    let mut upload = s3.multipart("convert-roundtrip", "models/hf-q8_0.gguf", 5 << 20).unwrap();
    llm_convert::convert(&source, &mut upload, QuantType::Q8_0, |_| {}).unwrap();
    assert_eq!(s3.size("convert-roundtrip", "models/hf-q8_0.gguf").unwrap(), None, "visible before completion");
    upload.finish().unwrap();
    let uploaded = s3.get("convert-roundtrip", "models/hf-q8_0.gguf").unwrap().unwrap();
    assert!(uploaded == local_conversion(QuantType::Q8_0), "S3 result differs from the local conversion");
}

#[test]
fn a_failed_conversion_leaves_no_object() {
    local_s3();
    let s3 = S3::connect().unwrap();
    upload_checkpoint(&s3, "convert-failure", "incoming/hf/", "llama2");
    let weights = std::fs::read(fixtures_dir().join("llama2/hf/model.safetensors")).unwrap();
    s3.put("convert-failure", "incoming/hf/model.safetensors", weights[..weights.len() / 2].to_vec()).unwrap();
    let source = CheckpointSource::with_s3(Location::parse("s3://convert-failure/incoming/hf/").unwrap(), s3.clone());
    let mut upload = s3.multipart("convert-failure", "models/out.gguf", 5 << 20).unwrap();
    let err = llm_convert::convert(&source, &mut upload, QuantType::Q8_0, |_| {}).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    drop(upload); // aborts the multipart upload
    assert_eq!(s3.size("convert-failure", "models/out.gguf").unwrap(), None);
}

#[test]
fn prefix_without_trailing_slash_reads_the_same() {
    local_s3();
    let s3 = S3::connect().unwrap();
    upload_checkpoint(&s3, "convert-prefix", "incoming/hf/", "llama2");
    let source = CheckpointSource::open(Location::parse("s3://convert-prefix/incoming/hf").unwrap()).unwrap();
    let mut out = Vec::new();
    llm_convert::convert(&source, &mut out, QuantType::F16, |_| {}).unwrap();
    assert!(out == local_conversion(QuantType::F16));
}

/// A parallel download lands every part in its place, and its consumer (the sha256 of a model
/// being loaded) sees the object's bytes in order although the parts arrive in any order.
#[test]
fn a_parallel_download_is_whole_and_consumed_in_order() {
    local_s3();
    let s3 = S3::connect().unwrap();
    s3.create_bucket("download-order").unwrap();
    let object: Vec<u8> = (0..3_000_017u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    s3.put("download-order", "object", object.clone()).unwrap();
    let mut consumed = Vec::new();
    let downloaded = s3.download("download-order", "object", object.len() as u64, Parts::new(64 << 10, 8), |part| consumed.extend_from_slice(part)).unwrap();
    assert!(downloaded == object, "the downloaded bytes differ");
    assert!(consumed == object, "the consumer saw the bytes out of order");
}

/// With a lead, no part further than that ahead of the consumer is requested: the consumer
/// replaces the object while it holds the first part, and every part that starts beyond the lead
/// comes from the new object. (A model's loader holds its download's last parts back like this
/// until the tokenizer is built.)
#[test]
fn a_download_runs_no_further_ahead_of_its_consumer_than_its_lead() {
    local_s3();
    let s3 = S3::connect().unwrap();
    s3.create_bucket("download-lead").unwrap();
    let (part, parts) = (64usize << 10, 24usize);
    let (old, new) = (vec![1u8; part * parts], vec![2u8; part * parts]);
    s3.put("download-lead", "object", old.clone()).unwrap();
    let lead = 5 * part;
    let mut first = true;
    let downloaded = s3
        .download("download-lead", "object", old.len() as u64, Parts { lead: lead as u64, ..Parts::new(part as u64, 8) }, |_| {
            if std::mem::take(&mut first) {
                S3::connect().unwrap().put("download-lead", "object", new.clone()).unwrap();
            }
        })
        .unwrap();
    // The part that starts at the lead may go out at once; the next waits for the first part.
    assert!(downloaded[lead + part..] == new[lead + part..], "a part beyond the lead was requested before the consumer took the first");
    // Without the lead the whole download runs ahead: every part is read while the consumer
    // sleeps on the first, before it puts the old object back.
    let mut first = true;
    let downloaded = s3
        .download("download-lead", "object", old.len() as u64, Parts::new(part as u64, 8), |_| {
            if std::mem::take(&mut first) {
                std::thread::sleep(std::time::Duration::from_secs(1));
                S3::connect().unwrap().put("download-lead", "object", old.clone()).unwrap();
            }
        })
        .unwrap();
    assert!(downloaded == new, "the download waited for its consumer without a lead");
}
