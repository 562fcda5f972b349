//! A blocking S3 client: the converter and the CLI are synchronous, so each call runs on the
//! client's own small tokio runtime. Do not call it from inside an async task (use
//! `spawn_blocking`).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;

use crate::{Result, StoreError};

/// Attempts for a ranged read whose body breaks off mid-transfer (the SDK retries requests,
/// not bodies).
const BODY_ATTEMPTS: usize = 4;

/// How long a request may wait for the first byte of its answer: `S3_READ_TIMEOUT_SECS`, by
/// default 120 s (a multipart part of 64 MiB on a slow link still fits).
fn read_timeout() -> Duration {
    let seconds = std::env::var("S3_READ_TIMEOUT_SECS").ok().and_then(|s| s.parse::<f64>().ok());
    Duration::from_secs_f64(seconds.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(120.0))
}

/// How [`S3::download`] fetches an object: ranged GETs of `size` bytes, up to `concurrency` in
/// flight, none more than `lead` bytes ahead of what its consumer has taken.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    pub size: u64,
    pub concurrency: usize,
    /// A part is requested only once the consumer has taken all but `lead` bytes before its
    /// start (0: one part at a time); unbounded unless set.
    pub lead: u64,
}

impl Parts {
    pub fn new(size: u64, concurrency: usize) -> Self {
        Self { size, concurrency, lead: u64::MAX }
    }
}

#[derive(Clone)]
pub struct S3 {
    client: Client,
    runtime: Arc<tokio::runtime::Runtime>,
}

fn s3_error(bucket: &str, key: &str, e: impl std::error::Error) -> StoreError {
    StoreError::S3 { bucket: bucket.into(), key: key.into(), message: DisplayErrorContext(e).to_string() }
}

impl S3 {
    /// The default AWS configuration chain (environment, profile, Lambda role). With
    /// `AWS_ENDPOINT_URL` set (a local S3-compatible server) requests use path-style addressing.
    pub fn connect() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let shared = runtime.block_on(aws_config::load_defaults(aws_config::BehaviorVersion::latest()));
        let local_endpoint = std::env::var_os("AWS_ENDPOINT_URL").is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
        let config = aws_sdk_s3::config::Builder::from(&shared)
            // Streaming uploads fail on some S3-compatible servers with the new default checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .force_path_style(local_endpoint)
            // A request the server never answers would otherwise wait forever (the SDK sets no
            // read timeout); the attempt is then retried. A body that stalls midway is cut by
            // the SDK's stalled-stream protection (on by default).
            .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(10)).read_timeout(read_timeout()).build())
            .build();
        Ok(Self { client: Client::from_conf(config), runtime: Arc::new(runtime) })
    }

    /// Creates `bucket`; an existing bucket of ours is fine.
    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        match self.runtime.block_on(self.client.create_bucket().bucket(bucket).send()) {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_bucket_already_owned_by_you()) => Ok(()),
            Err(e) => Err(s3_error(bucket, "", e)),
        }
    }

    /// The object's size, or `None` when it does not exist.
    pub fn size(&self, bucket: &str, key: &str) -> Result<Option<u64>> {
        Ok(self.head(bucket, key)?.map(|o| o.size))
    }

    /// The object's size, ETag and modification time, or `None` when it does not exist.
    pub fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>> {
        let response = self.runtime.block_on(self.client.head_object().bucket(bucket).key(key).send());
        match response {
            Ok(head) => Ok(Some(ObjectInfo::new(key, head.content_length(), head.e_tag(), head.last_modified()))),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(s3_error(bucket, key, e)),
        }
    }

    /// Every object under `prefix`, in key order.
    pub fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut objects = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
        while let Some(page) = self.runtime.block_on(pages.next()) {
            let page = page.map_err(|e| s3_error(bucket, prefix, e))?;
            for o in page.contents() {
                objects.push(ObjectInfo::new(o.key().unwrap_or_default(), o.size(), o.e_tag(), o.last_modified()));
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// The whole object, or `None` when it does not exist.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.head(bucket, key)?.map(|info| self.read(bucket, &info)).transpose()
    }

    /// The whole object `info` describes (from [`head`](Self::head) or [`list`](Self::list)),
    /// without asking for its size again; ranged, so a body that breaks off is read again.
    pub fn read(&self, bucket: &str, info: &ObjectInfo) -> Result<Vec<u8>> {
        match info.size {
            0 => Ok(Vec::new()),
            len => self.get_range(bucket, &info.key, 0, len),
        }
    }

    /// `len` bytes from `start`, retried when the connection breaks mid-body.
    pub fn get_range(&self, bucket: &str, key: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; len as usize];
        self.runtime.block_on(self.fetch_range_into(bucket, key, start, &mut bytes))?;
        Ok(bytes)
    }

    /// The whole object of `size` bytes, fetched as `parts` says, each part retried on its own
    /// and written straight into its place in one buffer. `consume` is handed the object's bytes
    /// in order, on a thread of its own, as soon as everything before them has arrived: a hash of
    /// the object is ready moments after its last part, instead of a pass over the whole buffer
    /// later.
    pub fn download(&self, bucket: &str, key: &str, size: u64, parts: Parts, consume: impl FnMut(&[u8]) + Send) -> Result<Vec<u8>> {
        use futures_util::{StreamExt, TryStreamExt};
        let part_size = parts.size.max(1) as usize;
        let mut buffer = vec![0u8; size as usize];
        std::thread::scope(|scope| {
            let (arrived, arrivals) = std::sync::mpsc::channel::<(usize, &[u8])>();
            let (progress, consumed) = tokio::sync::watch::channel(0u64);
            let consumer = scope.spawn(move || consume_in_order(arrivals, consume, progress));
            let fetched = self.runtime.block_on(
                futures_util::stream::iter(buffer.chunks_mut(part_size).enumerate())
                    .map(|(index, part)| {
                        let (arrived, mut consumed) = (arrived.clone(), consumed.clone());
                        let start = (index * part_size) as u64;
                        async move {
                            // A consumer that panicked has dropped its end, which ends the wait;
                            // `join` reports the panic.
                            let _ = consumed.wait_for(|&taken| taken >= start.saturating_sub(parts.lead)).await;
                            self.fetch_range_into(bucket, key, start, part).await?;
                            let part: &[u8] = part;
                            // The consumer is gone only if it panicked, which `join` reports.
                            let _ = arrived.send((index, part));
                            Ok::<_, StoreError>(())
                        }
                    })
                    .buffer_unordered(parts.concurrency.max(1))
                    .try_collect::<()>(),
            );
            drop(arrived);
            consumer.join().map_err(|_| StoreError::S3 { bucket: bucket.into(), key: key.into(), message: "the consumer of the download panicked".into() })?;
            fetched
        })?;
        Ok(buffer)
    }

    /// Fills `part` with the object's bytes from `start`, reading the range again (from its
    /// start) when its body breaks off or comes out the wrong length.
    async fn fetch_range_into(&self, bucket: &str, key: &str, start: u64, part: &mut [u8]) -> Result<()> {
        if part.is_empty() {
            return Ok(());
        }
        let range = format!("bytes={}-{}", start, start + part.len() as u64 - 1);
        // On the runtime's thread for a few milliseconds (16 MiB: ~4 ms), while no other task of
        // this download has anything to do but wait for the server.
        populate(part);
        let mut last_error = None;
        for attempt in 0..BODY_ATTEMPTS {
            let result = async {
                let response = self.client.get_object().bucket(bucket).key(key).range(&range).send().await.map_err(|e| s3_error(bucket, key, e))?;
                let mut body = response.body;
                let (len, mut filled) = (part.len(), 0);
                while let Some(chunk) = body.try_next().await.map_err(|e| s3_error(bucket, key, e))? {
                    let end = filled + chunk.len();
                    let place = part.get_mut(filled..end).ok_or_else(|| StoreError::S3 {
                        bucket: bucket.into(),
                        key: key.into(),
                        message: format!("{range}: more than {len} bytes"),
                    })?;
                    place.copy_from_slice(&chunk);
                    filled = end;
                }
                match filled == len {
                    true => Ok(()),
                    false => Err(StoreError::S3 { bucket: bucket.into(), key: key.into(), message: format!("{range}: got {filled} bytes") }),
                }
            }
            .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
            tracing::warn!(bucket, key, attempt, range, "ranged read failed; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
        }
        Err(last_error.unwrap_or_else(|| StoreError::S3 { bucket: bucket.into(), key: key.into(), message: "read failed".into() }))
    }

    /// `value` as pretty-printed JSON (manifests, aliases, status objects).
    pub fn put_json(&self, bucket: &str, key: &str, value: &impl serde::Serialize) -> Result<()> {
        // Plain data with string keys: serialisation cannot fail.
        self.put(bucket, key, serde_json::to_vec_pretty(value).unwrap_or_default())
    }

    pub fn put(&self, bucket: &str, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.runtime
            .block_on(self.client.put_object().bucket(bucket).key(key).body(ByteStream::from(bytes)).send())
            .map(|_| ())
            .map_err(|e| s3_error(bucket, key, e))
    }

    /// Deletes the object; deleting an absent object is not an error.
    pub fn delete(&self, bucket: &str, key: &str) -> Result<()> {
        self.runtime.block_on(self.client.delete_object().bucket(bucket).key(key).send()).map(|_| ()).map_err(|e| s3_error(bucket, key, e))
    }

    /// A writer that uploads `part_size`-byte parts as they fill; the object appears only when
    /// [`MultipartWriter::finish`] succeeds, and an unfinished upload is aborted when dropped.
    pub fn multipart(&self, bucket: &str, key: &str, part_size: usize) -> Result<MultipartWriter> {
        let upload = self.runtime.block_on(self.client.create_multipart_upload().bucket(bucket).key(key).send()).map_err(|e| s3_error(bucket, key, e))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        Ok(MultipartWriter {
            s3: self.clone(),
            bucket: bucket.into(),
            key: key.into(),
            upload_id,
            part_size: part_size.max(5 << 20),
            buffer: Vec::new(),
            parts: Vec::new(),
            finished: false,
        })
    }
}

/// What a listing or HEAD request says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// As S3 returns it, without the surrounding quotes.
    pub etag: String,
    /// Milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

impl ObjectInfo {
    fn new(key: &str, size: Option<i64>, etag: Option<&str>, modified: Option<&aws_sdk_s3::primitives::DateTime>) -> Self {
        Self {
            key: key.to_string(),
            size: size.unwrap_or(0).max(0) as u64,
            etag: etag.unwrap_or_default().trim_matches('"').to_string(),
            modified_ms: modified.and_then(|t| t.to_millis().ok()).unwrap_or(0),
        }
    }
}

pub struct MultipartWriter {
    s3: S3,
    bucket: String,
    key: String,
    upload_id: String,
    part_size: usize,
    buffer: Vec<u8>,
    parts: Vec<CompletedPart>,
    finished: bool,
}

impl MultipartWriter {
    fn upload_part(&mut self) -> Result<()> {
        let number = self.parts.len() as i32 + 1;
        let body = std::mem::take(&mut self.buffer);
        let (s3, bucket, key) = (&self.s3, &self.bucket, &self.key);
        let part = s3
            .runtime
            .block_on(s3.client.upload_part().bucket(bucket).key(key).upload_id(&self.upload_id).part_number(number).body(ByteStream::from(body)).send())
            .map_err(|e| s3_error(bucket, key, e))?;
        self.parts.push(CompletedPart::builder().part_number(number).set_e_tag(part.e_tag().map(str::to_string)).build());
        Ok(())
    }

    /// Uploads the last part and completes the upload: only now does the object exist.
    pub fn finish(mut self) -> Result<()> {
        if !self.buffer.is_empty() || self.parts.is_empty() {
            self.upload_part()?;
        }
        let done = CompletedMultipartUpload::builder().set_parts(Some(std::mem::take(&mut self.parts))).build();
        let (s3, bucket, key) = (&self.s3, &self.bucket, &self.key);
        s3.runtime
            .block_on(s3.client.complete_multipart_upload().bucket(bucket).key(key).upload_id(&self.upload_id).multipart_upload(done).send())
            .map_err(|e| s3_error(bucket, key, e))?;
        self.finished = true;
        Ok(())
    }
}

impl Write for MultipartWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= self.part_size {
            self.upload_part().map_err(std::io::Error::other)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for MultipartWriter {
    fn drop(&mut self) {
        if !self.finished {
            let (s3, bucket, key) = (&self.s3, &self.bucket, &self.key);
            let aborted = s3.runtime.block_on(s3.client.abort_multipart_upload().bucket(bucket).key(key).upload_id(&self.upload_id).send());
            if let Err(e) = aborted {
                tracing::warn!(bucket, key, error = %DisplayErrorContext(e), "could not abort an unfinished multipart upload");
            }
        }
    }
}

/// Hands `consume` the parts that `parts` delivers in any order, in the object's order, and
/// tells `progress` how many bytes it has taken.
fn consume_in_order(parts: std::sync::mpsc::Receiver<(usize, &[u8])>, mut consume: impl FnMut(&[u8]), progress: tokio::sync::watch::Sender<u64>) {
    let mut waiting = std::collections::BTreeMap::new();
    let (mut next, mut taken) = (0, 0u64);
    for (index, part) in parts {
        waiting.insert(index, part);
        while let Some(part) = waiting.remove(&next) {
            consume(part);
            next += 1;
            taken += part.len() as u64;
            progress.send_replace(taken);
        }
    }
}

/// Backs `part` with memory in one call before its body arrives, instead of a page fault for each
/// page as it is written: Llama 3.2 1B's Q4_0 file (743 MiB) loaded from the local S3 server in
/// 0.86–1.03 s against 0.95–1.86 s, TinyLlama's Q8_0 (1,117 MiB) in 1.06–1.15 against 1.21–1.36 s
/// (paired fresh processes, eight rounds each, 2 vCPUs). Kernels before Linux 5.14 refuse the
/// advice, and the pages fault in as before.
fn populate(part: &mut [u8]) {
    // SAFETY: sysconf only reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let start = (part.as_mut_ptr() as usize).next_multiple_of(page);
    let end = (part.as_mut_ptr() as usize + part.len()) / page * page;
    if end > start {
        // SAFETY: the pages lie inside `part`, which is ours to write; populating them does not
        // change what they hold.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_WRITE) };
    }
}
