//! One job: the checkpoint under `incoming/<model>/` becomes a version under
//! `models/<model>/<version>/` (every GGUF, then the manifest), then `latest` names it.
//!
//! Every step can be repeated: the version is a hash of the source, a version with a manifest
//! is complete and never redone, and an unfinished GGUF upload is aborted, never completed.

use std::io::{BufWriter, Write};
use std::time::{Instant, SystemTime};

use llm_convert::{CheckpointSource, CheckpointSurvey, ConvertError, QuantType};
use llm_observe::{Metrics, Unit};
use llm_store::checksum::{Checksummer, FileChecksums};
use llm_store::registry::{self, Manifest, ModelKeys, OutputFile, Registry, Source, SourceObject};
use llm_store::{Location, StoreError, S3};
use serde::Serialize;

use crate::config::{parse_types, Config};

const TOOL: &str = concat!("llm-serverless quantize ", env!("CARGO_PKG_VERSION"));

/// Time kept back from the deadline for the manifest, the alias and the response.
const DEADLINE_MARGIN_S: f64 = 30.0;

/// How a job ended, as the function reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Converted {
        model: String,
        version: String,
        outputs: Vec<OutputFile>,
        seconds: f64,
        promoted: bool,
    },
    /// A repeated event: this source already has a complete version.
    AlreadyDone {
        model: String,
        version: String,
    },
    /// The input can never convert (or not within this function's limits); retrying is useless.
    Failed {
        model: String,
        reason: String,
    },
}

/// A storage fault: the event should be retried.
#[derive(Debug, thiserror::Error)]
#[error("{model}: {message}")]
pub struct TransientError {
    pub model: String,
    pub message: String,
}

enum Failure {
    Permanent(String),
    Transient(String),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Transient(e.to_string())
    }
}

impl From<ConvertError> for Failure {
    fn from(e: ConvertError) -> Self {
        if e.is_transient() {
            Failure::Transient(e.to_string())
        } else {
            Failure::Permanent(e.to_string())
        }
    }
}

/// Runs the job for `model` in `bucket`.
pub fn run(s3: &S3, config: &Config, bucket: &str, model: &ModelKeys, deadline: Option<SystemTime>) -> Result<Outcome, TransientError> {
    let started = Instant::now();
    let name = model.model.clone();
    let result = convert_model(s3, config, bucket, model, deadline);
    let metrics = Metrics::new("llm-serverless").dimension("Function", "quantize").property("model", name.as_str());
    match result {
        Ok(outcome) => {
            match &outcome {
                Outcome::Converted { version, outputs, seconds, .. } => {
                    let written: u64 = outputs.iter().map(|o| o.size).sum();
                    tracing::info!(model = %name, version, seconds, outputs = outputs.len(), "version complete");
                    metrics.metric("QuantizeSeconds", *seconds, Unit::Seconds).metric("OutputBytes", written as f64, Unit::Bytes).emit();
                }
                Outcome::AlreadyDone { version, .. } => {
                    tracing::info!(model = %name, version, "already converted: nothing to do");
                    metrics.metric("DuplicateJobs", 1.0, Unit::Count).emit();
                }
                Outcome::Failed { reason, .. } => {
                    tracing::error!(model = %name, reason, "job failed; it will not be retried");
                    metrics.metric("Errors", 1.0, Unit::Count).emit();
                }
            }
            Ok(outcome)
        }
        Err(message) => {
            tracing::error!(model = %name, message, seconds = started.elapsed().as_secs_f64(), "storage fault; the event will be retried");
            metrics.metric("Errors", 1.0, Unit::Count).emit();
            Err(TransientError { model: name, message })
        }
    }
}

fn convert_model(s3: &S3, config: &Config, bucket: &str, model: &ModelKeys, deadline: Option<SystemTime>) -> Result<Outcome, String> {
    let failed = |reason: String| Outcome::Failed { model: model.model.clone(), reason };
    let registry = Registry { s3, bucket };
    let Some(job_file) = s3.get(bucket, &model.job_key()).map_err(|e| e.to_string())? else {
        return Ok(failed(format!("{} no longer exists", model.job_key())));
    };
    let types = match job_types(&job_file, config) {
        Ok(types) => types,
        Err(reason) => return Ok(failed(format!("{}: {reason}", model.job_key()))),
    };
    let type_names: Vec<String> = types.iter().map(|t| t.name().to_string()).collect();
    let prefix = model.incoming_prefix();
    let objects: Vec<SourceObject> = s3
        .list(bucket, &prefix)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|o| SourceObject { key: o.key, etag: o.etag, size: o.size, modified_ms: o.modified_ms })
        .collect();
    let version = registry::version_id(&objects, &type_names);
    let span = tracing::info_span!("job", model = %model.model, version);
    let _entered = span.enter();

    if let Some(manifest) = registry.manifest(model, &version).map_err(|e| e.to_string())? {
        // The previous run may have stopped between the manifest and the alias.
        registry.promote(&manifest).map_err(|e| e.to_string())?;
        return Ok(Outcome::AlreadyDone { model: model.model.clone(), version });
    }

    let started = Instant::now();
    let source = CheckpointSource::with_s3(Location::S3 { bucket: bucket.into(), key: prefix.clone() }, s3.clone());
    let outputs = match write_version(&registry, config, &source, model, &version, &types, deadline) {
        Ok(outputs) => outputs,
        Err(Failure::Permanent(reason)) => return Ok(failed(reason)),
        Err(Failure::Transient(message)) => return Err(message),
    };
    let manifest = Manifest {
        model: model.model.clone(),
        version: version.clone(),
        created: registry::now_rfc3339(),
        tool: TOOL.into(),
        source: Source { bucket: bucket.into(), prefix, objects },
        types: type_names,
        outputs,
    };
    registry.put_manifest(&manifest).map_err(|e| e.to_string())?;
    let promoted = registry.promote(&manifest).map_err(|e| e.to_string())?;
    Ok(Outcome::Converted { model: manifest.model, version, outputs: manifest.outputs, seconds: started.elapsed().as_secs_f64(), promoted })
}

/// The job file: `{"types": ["q4_k_m", "q8_0"]}`; empty, `{}` or no `types` means the defaults.
fn job_types(bytes: &[u8], config: &Config) -> Result<Vec<QuantType>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct JobFile {
        types: Option<Vec<String>>,
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(config.default_types.clone());
    }
    let job: JobFile = serde_json::from_slice(bytes).map_err(|e| format!("invalid job file: {e}"))?;
    match job.types {
        Some(types) => parse_types(&types.join(",")),
        None => Ok(config.default_types.clone()),
    }
}

/// Checks the checkpoint and the limits, then writes one GGUF per type into the registry's bucket.
fn write_version(
    registry: &Registry,
    config: &Config,
    source: &CheckpointSource,
    model: &ModelKeys,
    version: &str,
    types: &[QuantType],
    deadline: Option<SystemTime>,
) -> Result<Vec<OutputFile>, Failure> {
    let survey = llm_convert::survey(source)?;
    check_limits(&survey, types.len(), config, deadline).map_err(Failure::Permanent)?;
    let mut outputs = Vec::new();
    for &t in types {
        let key = model.output_key(version, t.name());
        let mut out = HashingWriter::new(BufWriter::with_capacity(1 << 20, registry.s3.multipart(registry.bucket, &key, config.part_size)?));
        let mut logged_decile = 0;
        let report = llm_convert::convert(source, &mut out, t, |p| {
            let decile = p.bytes_written * 10 / p.total_bytes.max(1);
            if decile > logged_decile {
                logged_decile = decile;
                tracing::info!(quant_type = t.name(), percent = decile * 10, tensor = p.tensor, "converting");
            }
        })?;
        let (buffered, size, checksums) = out.finish();
        // Only a complete, flushed file completes the upload; anything else drops it (abort).
        buffered.into_inner().map_err(|e| Failure::Transient(e.error().to_string()))?.finish()?;
        tracing::info!(quant_type = t.name(), key, size, seconds = report.seconds, "uploaded");
        outputs.push(OutputFile { quant_type: t.name().into(), key, size, sha256: checksums.sha256, crc64nvme: Some(checksums.crc64nvme) });
    }
    Ok(outputs)
}

/// Refuses up front a job that cannot finish before the deadline or does not fit in memory.
fn check_limits(survey: &CheckpointSurvey, types: usize, config: &Config, deadline: Option<SystemTime>) -> Result<(), String> {
    let mib = survey.tensor_bytes as f64 / (1 << 20) as f64;
    if let Some(deadline) = deadline {
        let left = deadline.duration_since(SystemTime::now()).unwrap_or_default().as_secs_f64();
        let needed = mib * types as f64 / config.mib_per_second + DEADLINE_MARGIN_S;
        if needed > left {
            return Err(format!(
                "{mib:.0} MiB of weights to {types} type(s) takes about {needed:.0} s at {:.0} MiB/s, but the invocation has {left:.0} s left; \
                 list fewer types in the job file or run `llm quantize` on AWS Batch",
                config.mib_per_second
            ));
        }
    }
    if let Some(memory_mb) = config.memory_mb {
        // The largest tensor as read, as f32, permuted and quantized, plus two upload parts.
        let needed_mb = (survey.largest_tensor_elements as u64 * 12 + 2 * config.part_size as u64) / 1_000_000 + 150;
        if needed_mb > memory_mb {
            return Err(format!(
                "the largest tensor ({} elements) needs about {needed_mb} MB while converting; the function has {memory_mb} MB",
                survey.largest_tensor_elements
            ));
        }
    }
    Ok(())
}

/// Counts and checksums what passes through, so the manifest can list each file's size and
/// checksums without reading it back.
struct HashingWriter<W> {
    inner: W,
    checksums: Checksummer,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self { inner, checksums: Checksummer::default(), bytes: 0 }
    }

    fn finish(self) -> (W, u64, FileChecksums) {
        (self.inner, self.bytes, self.checksums.finish())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.checksums.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_file_types_default_and_validate() {
        let config = Config::default();
        assert_eq!(job_types(b"", &config).unwrap(), config.default_types);
        assert_eq!(job_types(b"{}", &config).unwrap(), config.default_types);
        assert_eq!(job_types(br#"{"types": ["q8_0", "Q4_K", "q8_0"]}"#, &config).unwrap(), vec![QuantType::Q8_0, QuantType::Q4KM]);
        assert!(job_types(br#"{"types": ["q9"]}"#, &config).unwrap_err().contains("q9"));
        assert!(job_types(br#"{"types": []}"#, &config).is_err());
        assert!(job_types(br#"{"tpyes": ["q8_0"]}"#, &config).is_err());
        assert!(job_types(b"not json", &config).is_err());
    }

    fn llm_engine_config() -> llm_convert::LlamaConfig {
        llm_convert::LlamaConfig::from_hf_json(include_str!("../../../tests/fixtures/llama2/hf/config.json")).unwrap()
    }

    #[test]
    fn refuses_jobs_beyond_the_limits() {
        let survey = CheckpointSurvey { config: llm_engine_config(), tensor_bytes: 32 << 30, largest_tensor_elements: 128_256 * 4096 };
        let config = Config { memory_mb: Some(10_240), ..Config::default() };
        let soon = SystemTime::now() + std::time::Duration::from_secs(900);
        let err = check_limits(&survey, 2, &config, Some(soon)).unwrap_err();
        assert!(err.contains("AWS Batch"), "{err}");
        let small = CheckpointSurvey { tensor_bytes: 1 << 30, ..survey.clone() };
        assert!(check_limits(&small, 1, &config, Some(soon)).is_ok());
        let tight = Config { memory_mb: Some(1024), ..config };
        assert!(check_limits(&small, 1, &tight, None).unwrap_err().contains("MB"));
    }
}
