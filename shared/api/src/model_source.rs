//! Where the served model comes from (`MODEL_URI`, `llm serve --model`): a local GGUF file or
//! Hugging Face directory, or an S3 object: a GGUF key, or the registry alias
//! `models/<name>/latest` that the quantization function maintains. S3 models are downloaded
//! into memory with parallel ranged GETs and checked against the manifest's checksum before
//! anything is served.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use llm_engine::adapter::PeftAdapter;
use llm_engine::{GgufHead, LoadOptions};
use llm_store::registry::{self, ResolvedModel, ALIAS_NAME, MODELS_PREFIX};
use llm_store::sync::Staging;
use llm_store::{Location, Parts, S3};

use crate::model_slot::{Loaded, Loader};

#[derive(Debug, Clone)]
pub struct DownloadSettings {
    /// Bytes per ranged GET.
    pub part_size: u64,
    /// Ranged GETs in flight.
    pub concurrency: usize,
    /// The process's memory (Lambda's `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`): a model that cannot
    /// fit is refused before the download.
    pub memory_limit_bytes: Option<u64>,
    /// With an alias, the type to serve instead of the alias's default.
    pub quant_type: Option<String>,
    /// Keep verified downloads here (Lambda's /tmp outlives a restarted runtime process), named
    /// by their sha256, so only objects with a manifest hash are cached.
    pub cache_dir: Option<PathBuf>,
    /// A PEFT LoRA adapter (a directory or an `s3://` prefix) applied to the model once loaded.
    pub adapter: Option<String>,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self { part_size: 16 << 20, concurrency: 8, memory_limit_bytes: None, quant_type: None, cache_dir: None, adapter: None }
    }
}

/// The name clients use for the model at `uri`: the alias's model name, else the file or
/// directory name without its extension.
pub fn model_id(uri: &str) -> String {
    if uri == llm_engine::DEMO_MODEL {
        return "demo".into();
    }
    let trimmed = uri.trim_end_matches('/');
    if let Some(name) = trimmed.strip_suffix(&format!("/{ALIAS_NAME}")).and_then(|p| p.rsplit('/').next()) {
        if trimmed.contains(&format!("/{MODELS_PREFIX}")) {
            return name.to_string();
        }
    }
    let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
    last.strip_suffix(".gguf").unwrap_or(last).to_string()
}

/// A loader for the model at `uri` (and its adapter); nothing is read until it runs.
pub fn loader(uri: &str, options: LoadOptions, settings: DownloadSettings) -> Result<Loader, String> {
    let location = Location::parse(uri).map_err(|e| e.to_string())?;
    let adapter = settings.adapter.as_deref().map(Location::parse).transpose().map_err(|e| e.to_string())?;
    Ok(Arc::new(move || {
        let mut loaded = match &location {
            Location::Local(path) => {
                let model = llm_engine::load(path, options).map_err(|e| e.to_string())?;
                Loaded { model, source: path.display().to_string() }
            }
            Location::S3 { bucket, key } => {
                let s3 = S3::connect().map_err(|e| e.to_string())?;
                load_from_s3(&s3, bucket, key, options, &settings)?
            }
        };
        if let Some(adapter) = &adapter {
            apply_adapter(&mut loaded, adapter)?;
        }
        Ok(loaded)
    }))
}

/// Reads the PEFT adapter at `location` (staged from S3 when it is there) onto the model.
fn apply_adapter(loaded: &mut Loaded, location: &Location) -> Result<(), String> {
    let staging = Staging::new("adapter");
    let dir = staging.input(location, "adapter").map_err(|e| format!("adapter {location}: {e}"))?;
    let adapter = PeftAdapter::read(&dir, &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
    drop(staging);
    loaded.model.model.apply_adapter(&adapter).map_err(|e| e.to_string())?;
    loaded.source = format!("{} + LoRA {location}", loaded.source);
    Ok(())
}

/// Resolves, checks the size against memory, downloads (or reads the cache), verifies and parses.
pub fn load_from_s3(s3: &S3, bucket: &str, key: &str, options: LoadOptions, settings: &DownloadSettings) -> Result<Loaded, String> {
    let resolved = registry::resolve(s3, bucket, key, settings.quant_type.as_deref()).map_err(|e| e.to_string())?;
    check_fits(&resolved, settings.memory_limit_bytes)?;
    let source = format!("s3://{bucket}/{}", resolved.key);
    let cached = settings.cache_dir.as_deref().zip(resolved.sha256.as_deref()).map(|(dir, sha256)| dir.join(format!("{sha256}.gguf")));
    let (bytes, head) = match cached.as_deref().and_then(|path| read_cache(path, &resolved)) {
        Some(bytes) => (bytes, None),
        None => {
            let (bytes, head) = download(s3, &resolved, &source, settings)?;
            if let Some(path) = &cached {
                write_cache(path, &bytes);
            }
            (bytes, head)
        }
    };
    let model = match head {
        Some(head) => head.load(bytes, options),
        None => llm_engine::load_gguf_bytes(&source, bytes, options),
    };
    Ok(Loaded { model: model.map_err(|e| e.to_string())?, source })
}

/// The object's bytes, and its GGUF head when the header came whole in the first parts.
fn download(s3: &S3, resolved: &ResolvedModel, source: &str, settings: &DownloadSettings) -> Result<(Vec<u8>, Option<GgufHead>), String> {
    let started = Instant::now();
    // Checked while later parts are still arriving, so verifying adds moments, not a pass.
    let mut verifier = resolved.verifier();
    let verified = verifier.is_some();
    let mut head = HeadReader::new(source);
    let parts = Parts { lead: head_lead(resolved.size, settings), ..Parts::new(settings.part_size, settings.concurrency) };
    let bytes = s3
        .download(&resolved.bucket, &resolved.key, resolved.size, parts, |part| {
            if let Some(verifier) = &mut verifier {
                verifier.update(part);
            }
            head.push(part);
        })
        .map_err(|e| e.to_string())?;
    if let Some(verifier) = verifier {
        verifier.finish().map_err(|e| format!("{source}: {e}"))?;
    }
    let download_s = started.elapsed().as_secs_f64();
    // The HTTP client's buffers, freed on the runtime's threads, stay in their heaps (the engine
    // keeps freed memory for its activations: `llm_engine::allocator`); given back here, a cold
    // start from S3 peaked 1–3 MiB lower (SmolLM2-360M's shape in Q4_0, a 202 MiB file).
    llm_engine::allocator::release_free_memory();
    tracing::info!(
        key = resolved.key,
        version = resolved.version,
        bytes = resolved.size,
        download_s,
        mib_per_s = resolved.size as f64 / (1 << 20) as f64 / download_s.max(1e-9),
        verified,
        "model downloaded"
    );
    Ok((bytes, head.head))
}

/// How far the download may run ahead of the head. A part is requested once all but the lead
/// of the bytes before it have been taken, and the head is built while the part that completes
/// the header is taken; so a part that starts more than a part's length into the last
/// [`WAIT_FOR_HEAD`] bytes waits for the head where the header fits in the first part (Llama 3's
/// is under 16 MiB, the default part): the last 80 MiB with the default parts. Building Llama 3's tokenizer holds about 50 MiB for a moment
/// (tokenizers' BPE builder takes the merges as pairs of strings) on a core the download
/// shares, and from the local S3 server the buffer was whole 0–240 ms after the head was built,
/// sometimes before: the 1B shape's Q4_0 peaked at 1.100 × the file, or 1.148 × when the two
/// coincided (five rounds in eight); with the lead, 1.101–1.102 × in every round. The lead never
/// narrows below the parts in flight, which a download needs at full speed.
fn head_lead(size: u64, settings: &DownloadSettings) -> u64 {
    size.saturating_sub(WAIT_FOR_HEAD).max(settings.part_size.saturating_mul(settings.concurrency as u64))
}

/// The bytes at the download's end that wait for the head: more than the tokenizer's transient.
const WAIT_FOR_HEAD: u64 = 96 << 20;

/// Reads a GGUF's header from the first parts of a download, in order as they arrive, and builds
/// what it alone determines (tokenizer, chat template) while the rest is still on its way.
struct HeadReader<'a> {
    name: &'a str,
    /// The parts so far, while the header is still being looked for.
    prefix: Option<Vec<u8>>,
    /// The prefix length at which to try again: a try that runs out of bytes reads all it has,
    /// so each waits for the prefix to double (small parts would otherwise cost quadratic time).
    next_try: usize,
    head: Option<GgufHead>,
}

/// A header longer than this is read after the download, from the whole file. Llama 3's,
/// tokenizer.json included, is under 16 MiB.
const MAX_HEAD_PREFIX: usize = 64 << 20;

impl<'a> HeadReader<'a> {
    fn new(name: &'a str) -> Self {
        Self { name, prefix: Some(Vec::new()), next_try: 0, head: None }
    }

    fn push(&mut self, part: &[u8]) {
        let Some(prefix) = &mut self.prefix else { return };
        let len = prefix.len() + part.len();
        if len < self.next_try {
            prefix.extend_from_slice(part);
            return;
        }
        let tried = if prefix.is_empty() {
            // The first part most often holds the whole header: read where it lies, not copied.
            GgufHead::from_prefix(self.name, part)
        } else {
            prefix.extend_from_slice(part);
            GgufHead::from_prefix(self.name, prefix)
        };
        self.next_try = (len * 2).min(MAX_HEAD_PREFIX);
        match tried {
            Ok(None) if len < MAX_HEAD_PREFIX => {
                // The first part was read where it lies; the next try needs it in the prefix.
                if prefix.is_empty() {
                    prefix.extend_from_slice(part);
                }
            }
            // A refused model or tokenizer is not tried again: loading the whole file says why.
            tried => {
                self.head = tried.ok().flatten();
                self.prefix = None;
            }
        }
    }
}

/// The cached copy, if there is one whose bytes still have the manifest's checksum; a damaged
/// copy is removed.
fn read_cache(path: &Path, resolved: &ResolvedModel) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let mut verifier = resolved.verifier()?;
    verifier.update(&bytes);
    if verifier.finish().is_ok() {
        tracing::info!(key = resolved.key, cache = %path.display(), "model read from the cache");
        return Some(bytes);
    }
    tracing::warn!(cache = %path.display(), "cached model is damaged; downloading it again");
    let _ = std::fs::remove_file(path);
    None
}

/// Best effort: a full disk costs the next cold start a download, nothing else. Written under
/// a temporary name and renamed, so a crash never leaves a partial file under the real name.
fn write_cache(path: &Path, bytes: &[u8]) {
    let partial = path.with_extension("partial");
    let written =
        path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&partial, bytes)).and_then(|()| std::fs::rename(&partial, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        tracing::warn!(cache = %path.display(), error = %e, "could not cache the model");
    }
}

/// The engine reads the weights in place from the download buffer: the measured peak of a cold
/// start was 1.12–1.28 × the file (Q4_K_M, 638 MiB, a 133-token prompt), so 1.3 × plus room for the
/// runtime, the KV cache and a long prompt's activations.
fn check_fits(model: &ResolvedModel, limit: Option<u64>) -> Result<(), String> {
    let Some(limit) = limit else { return Ok(()) };
    let needed = model.size * 13 / 10 + (256 << 20);
    if needed > limit {
        return Err(format!(
            "s3://{}/{} is {} MiB; loading it needs about {} MiB but the function has {} MiB: choose a smaller type or more memory",
            model.bucket,
            model.key,
            model.size >> 20,
            needed >> 20,
            limit >> 20
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_come_from_the_uri() {
        assert_eq!(model_id("s3://bucket/models/tiny-llama/latest"), "tiny-llama");
        assert_eq!(model_id("s3://bucket/models/m/v1/m-q8_0.gguf"), "m-q8_0");
        assert_eq!(model_id("/models/llama3-bf16.gguf"), "llama3-bf16");
        assert_eq!(model_id("checkpoints/llama/"), "llama");
    }

    /// The head read from a download's first parts (4 KiB ones here, so that it takes several
    /// tries) loads the model that the whole file loads: the same greedy tokens.
    #[test]
    fn a_head_read_while_downloading_loads_the_same_model() {
        let bytes = llm_engine::DEMO_GGUF;
        let mut reader = HeadReader::new("demo.gguf");
        let mut parts = bytes.chunks(4096);
        while reader.prefix.is_some() {
            reader.push(parts.next().expect("the header ends before the file"));
        }
        assert!(parts.len() > 0, "the head waited for the whole file");
        let from_head = reader.head.expect("a head").load(bytes.to_vec(), LoadOptions::default()).unwrap();
        let from_whole = llm_engine::load_gguf_bytes("demo.gguf", bytes.to_vec(), LoadOptions::default()).unwrap();
        let greedy = |loaded: &llm_engine::LoadedModel| {
            let prompt = loaded.tokenizer.encode("Once upon a time", true).unwrap();
            let request = llm_engine::GenerationRequest { prompt, max_tokens: 12, ignore_eos: true, ..Default::default() };
            let (completions, _) = llm_engine::generate(&loaded.model, &loaded.tokenizer, &[request], |_| std::ops::ControlFlow::Continue(())).unwrap();
            completions[0].token_ids.clone()
        };
        assert_eq!(greedy(&from_head), greedy(&from_whole));
    }

    /// A whole header whose model is refused is not read again as more parts arrive: the load of
    /// the whole file says why.
    #[test]
    fn a_refused_head_is_not_tried_again() {
        let mut bytes = llm_engine::DEMO_GGUF.to_vec();
        let key = b"general.architecture";
        // The key, its value's type (u32) and length (u64), then the value.
        let value = bytes.windows(key.len()).position(|w| w == key).expect("the key") + key.len() + 4 + 8;
        assert_eq!(&bytes[value..value + 5], b"llama");
        bytes[value..value + 5].copy_from_slice(b"llamb");
        let mut reader = HeadReader::new("demo.gguf");
        reader.push(&bytes[..bytes.len() / 2]);
        assert!(reader.prefix.is_none() && reader.head.is_none(), "the refused head is tried again");
        let err = llm_engine::load_gguf_bytes("demo.gguf", bytes, LoadOptions::default()).err().expect("refused");
        assert!(err.to_string().contains("llamb"), "{err}");
    }
}
