//! Fuzz targets: each takes arbitrary bytes and sends them where input from outside goes — a
//! model file uploaded by a user, a checkpoint's JSON, a chat template carried in a model, an
//! HTTP request body, an S3 event, a batch file. A target may reject its input with an error;
//! it must never panic, hang or allocate without bound. Each returns whether the input was
//! accepted all the way through, so the replay can check that the seeds reach the deep code.
//!
//! `cargo +nightly fuzz run TARGET` runs one under libFuzzer (`fuzz_targets/`, see
//! `infra/fuzz/run.sh`); `cargo test -p llm-fuzz` replays every committed input in
//! `fuzz/corpus/TARGET/` and `fuzz/regressions/TARGET/` through the same functions.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use llm_api::{model_source, AppState, Limits, ModelSlot};
use llm_engine::{ChatMessage, ChatTemplate, LoadOptions};

/// A target: whether it accepted the fuzzed bytes; a panic is what fuzzing looks for.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name: the names of `fuzz_targets/*.rs` and of the corpus folders.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("config_json", config_json),
    ("tokenizer_json", tokenizer_json),
    ("chat_template", chat_template),
    ("http_request", http_request),
    ("s3_event", s3_event),
    ("batch_file", batch_file),
];

/// A GGUF file as the inference function loads one from S3: header, metadata, tokenizer,
/// tensor directory and tensors.
pub fn gguf(data: &[u8]) -> bool {
    llm_engine::load_gguf_bytes("fuzz.gguf", data.to_vec(), LoadOptions::default())
        .is_ok_and(|loaded| loaded.tokenizer.encode("Hello, world 123", true).is_ok())
}

/// The tiny checkpoint the safetensors target completes with the fuzzed weights file.
const TINY_CONFIG: &str = include_str!("../tiny/config.json");
const TINY_TOKENIZER: &str = include_str!("../tiny/tokenizer.json");

/// `model.safetensors` of a checkpoint (beside a fixed `config.json` and `tokenizer.json`),
/// read as the quantization function reads it (headers, then each tensor by range, quantized)
/// and as the engine and training load it (memory-mapped).
pub fn safetensors(data: &[u8]) -> bool {
    let dir = tiny_checkpoint(TINY_CONFIG, data);
    let source = llm_convert::CheckpointSource::open(llm_store::Location::Local(dir.path().to_path_buf())).expect("local source");
    let converted = llm_convert::convert(&source, &mut std::io::sink(), llm_convert::QuantType::Q8_0, |_| {}).is_ok();
    let loaded = llm_engine::load(dir.path(), LoadOptions::default()).is_ok();
    converted && loaded
}

/// A temporary checkpoint folder: `config`, the tiny tokenizer and `weights` as `model.safetensors`.
fn tiny_checkpoint(config: &str, weights: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    for (name, contents) in [("config.json", config.as_bytes()), ("tokenizer.json", TINY_TOKENIZER.as_bytes()), ("model.safetensors", weights)] {
        std::fs::write(dir.path().join(name), contents).expect("write the checkpoint");
    }
    dir
}

/// A checkpoint's JSON documents: `config.json` and `model.safetensors.index.json`.
pub fn config_json(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let config =
        llm_engine::LlamaConfig::from_hf_json(text).map(|config| llm_convert::tensor_types(&config, config.tie_word_embeddings, llm_convert::QuantType::Q4KM));
    let index = llm_engine::hf::shard_names(text);
    config.is_ok() || index.is_ok()
}

/// A `tokenizer.json`, loaded and used both ways.
pub fn tokenizer_json(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(inner) = llm_engine::Tokenizer::from_json(text) else { return false };
    let tokenizer = llm_engine::Tokenizer::new(inner, None, None, []);
    tokenizer.encode("Hello, world 123 ünïcødé", true).is_ok_and(|ids| tokenizer.decode(&ids).is_ok())
}

/// A chat template from a model file, rendered for a short conversation.
pub fn chat_template(data: &[u8]) -> bool {
    let Ok(source) = std::str::from_utf8(data) else { return false };
    let Ok(template) = ChatTemplate::new(source, Some("<s>"), Some("</s>")) else { return false };
    let messages =
        [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi"), ChatMessage::new("assistant", "Hello."), ChatMessage::new("user", "2+2?")];
    template.render_in_this_process(&messages, true).is_ok()
}

/// The API over the tiny served model, one request per input: the first byte picks the
/// endpoint, the rest is the body. Any answer but a server error is fine.
pub fn http_request(data: &[u8]) -> bool {
    const ENDPOINTS: [(&str, &str); 3] = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")];
    let Some((&selector, body)) = data.split_first() else { return false };
    let (method, path) = ENDPOINTS[selector as usize % ENDPOINTS.len()];
    let request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .expect("request");
    let status = served().runtime.block_on(async {
        use tower::ServiceExt;
        let response = llm_api::router(served().state.clone()).oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("the body");
        status
    });
    assert!(!status.is_server_error(), "{path}: {status} for {:?}", String::from_utf8_lossy(body));
    status.is_success()
}

/// An S3 event notification as the functions receive it, and each record's key.
pub fn s3_event(data: &[u8]) -> bool {
    let Ok(event) = serde_json::from_slice::<aws_lambda_events::s3::S3Event>(data) else { return false };
    let keys: Vec<_> = event.records.iter().map(|record| llm_store::event_key(record.s3.object.key.as_deref().unwrap_or_default())).collect();
    for decoded in keys.iter().flatten() {
        assert!(!decoded.split('/').any(|segment| segment == ".." || segment.is_empty()), "{decoded}");
    }
    !keys.is_empty() && keys.iter().all(Result::is_ok)
}

/// A batch file, parsed and answered by the tiny served model (as `llm batch` and the batch
/// function do): one output line per request line.
pub fn batch_file(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let parsed = llm_api::batch_file::parse(&text);
    let (lines, errors): (Vec<_>, Vec<_>) = parsed.into_iter().partition(Result::is_ok);
    let lines: Vec<_> = lines.into_iter().map(Result::unwrap).collect();
    let requests = lines.len();
    let (answers, _) = served().runtime.block_on(llm_api::batch_file::answer(&served().state, lines)).expect("the tiny model loads");
    assert_eq!(answers.len(), requests);
    assert!(errors.iter().all(|e| e.as_ref().is_err_and(|line| !line.succeeded())));
    answers.iter().any(|line| line.succeeded())
}

/// The tiny checkpoint with a chat template behind the production router, with small limits so
/// that a fuzzed request that passes validation generates only a few tokens. Its compute takes
/// microseconds, so the fuzzer's time goes to the parsing and validation under test (behind the
/// demo model these targets ran under 20 inputs a second).
struct Served {
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
    /// The checkpoint's folder, kept as long as the model may still be loaded from it (lazily).
    _dir: tempfile::TempDir,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let mut config: serde_json::Value = serde_json::from_str(TINY_CONFIG).expect("the tiny config");
        // Room for the longest prompt the limits let through, so that long prompts reach generation.
        config["max_position_embeddings"] = 1024.into();
        // The safetensors target's F32 seed (infra/fuzz/seeds.sh): fixed weights of the tiny shape.
        let dir = tiny_checkpoint(&config.to_string(), include_bytes!("../corpus/safetensors/seed-f32"));
        std::fs::write(dir.path().join("tokenizer_config.json"), include_str!("../tiny/tokenizer_config.json")).expect("write the checkpoint");
        let loader = model_source::loader(&dir.path().display().to_string(), LoadOptions::default(), Default::default()).expect("the loader");
        let limits = Limits { max_tokens: 4, max_prompt_tokens: 512, max_sequences: 4, max_batch_sequences: 4, ..Limits::default() };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Served { runtime, state: Arc::new(AppState::new(ModelSlot::new("demo", loader), limits, None)), _dir: dir }
    })
}

/// The files of `dir` (none when it does not exist), sorted, for the replay.
pub fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}
