//! The S3 server itself (SeaweedFS, not the fault proxy) killed and started again over the same
//! data in the middle of a multipart upload, as a crash or a redeployment would do it. What
//! must hold: the object appears whole or not at all, never as the parts sent before the
//! restart, and the upload can be done again once the server is back.

use std::io::Write;
use std::time::{Duration, Instant};

use llm_store::S3;
use llm_tests::local_s3::RestartableS3;

const BUCKET: &str = "restarts";
const PART: usize = 5 << 20;

/// Bytes that differ from part to part, so that a misplaced part cannot pass for the object.
fn object(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 4099 + i % 251) as u8).collect()
}

/// After a restart the S3 port opens before the server can store anything again.
fn wait_until_serving(s3: &S3) {
    let started = Instant::now();
    while s3.put(BUCKET, "probe", b"ok".to_vec()).is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "SeaweedFS did not come back");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Uploads `data` in parts, calling `between` after the first part is stored.
fn upload(s3: &S3, key: &str, data: &[u8], between: impl FnOnce()) -> llm_store::Result<()> {
    let mut writer = s3.multipart(BUCKET, key, PART)?;
    writer.write_all(&data[..PART])?;
    between();
    writer.write_all(&data[PART..])?;
    writer.finish()
}

#[test]
fn a_multipart_upload_across_a_server_restart_completes_whole_or_leaves_nothing() {
    let mut server = RestartableS3::start();
    let s3 = S3::connect().unwrap();
    s3.create_bucket(BUCKET).unwrap();
    let data = object(2 * PART + 12_345);

    // Restarted between two parts: the upload goes on against the new process.
    let across = upload(&s3, "across-restart", &data, || {
        server.start_again();
        wait_until_serving(&s3);
    });
    match across {
        Ok(()) => assert_eq!(s3.get(BUCKET, "across-restart").unwrap().as_deref(), Some(&data[..]), "completed, but not with the bytes sent"),
        Err(e) => {
            eprintln!("upload across a restart failed: {e}");
            assert_eq!(s3.size(BUCKET, "across-restart").unwrap(), None, "a failed upload left an object");
        }
    }

    // Down while the second part is sent: its attempts fail (bounded, with backoff), the
    // upload fails, and nothing appears, not even once the server is back.
    let started = Instant::now();
    let error = upload(&s3, "while-down", &data, || server.kill()).expect_err("the server was down");
    let failed_after = started.elapsed();
    server.start_again();
    wait_until_serving(&s3);
    assert_eq!(s3.size(BUCKET, "while-down").unwrap(), None, "a failed upload left an object: {error}");
    assert!(failed_after < Duration::from_secs(60), "the retries were not bounded: {failed_after:?}");

    // Done again, it completes, whole.
    upload(&s3, "while-down", &data, || {}).unwrap();
    assert_eq!(s3.get(BUCKET, "while-down").unwrap().as_deref(), Some(&data[..]));
}
