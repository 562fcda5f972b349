//! One entry point that loads a model, its tokenizer and chat template from a GGUF file or a
//! Hugging Face directory.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::Value as Json;

use crate::chat::ChatTemplate;
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, GgufSource};
use crate::hf::{self, SafetensorsSource};
use crate::model::{Llama, LoadOptions};
use crate::rope::RopeLayout;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    HuggingFace,
}

/// Everything needed to turn text into text.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub format: ModelFormat,
    pub path: PathBuf,
}

/// What `path` holds: a directory is a Hugging Face checkpoint, a file must start with `GGUF`.
pub fn detect_format(path: &Path) -> Result<ModelFormat> {
    let meta = std::fs::metadata(path).map_err(|e| EngineError::io(path, e))?;
    if meta.is_dir() {
        return Ok(ModelFormat::HuggingFace);
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| EngineError::invalid_file(path, format!("cannot read the file header: {e}")))?;
    if &magic != b"GGUF" {
        return Err(EngineError::invalid_file(path, "not a GGUF file (bad magic) and not a Hugging Face model directory"));
    }
    Ok(ModelFormat::Gguf)
}

/// The name that stands for the demo model built into the engine: what `llm` and the inference
/// function serve when no model is named, so that a first run needs no download.
pub const DEMO_MODEL: &str = "builtin:demo";

/// The demo model (`models/demo/`, made by `infra/demo/pipeline.sh`): a 3 M-parameter Llama,
/// SFT-trained on the demo task, at Q8_0.
pub const DEMO_GGUF: &[u8] = include_bytes!("../../../models/demo/demo-q8_0.gguf");

/// Loads the GGUF file or Hugging Face directory at `path`, or the built-in [`DEMO_MODEL`].
pub fn load(path: &Path, options: LoadOptions) -> Result<LoadedModel> {
    if path == Path::new(DEMO_MODEL) {
        return load_gguf_bytes(DEMO_MODEL, DEMO_GGUF.to_vec(), options);
    }
    let device = Device::Cpu;
    let format = detect_format(path)?;
    let parts = match format {
        ModelFormat::Gguf => GgufHead::new(GgufFile::open_for_kernels(path)?)?.load_weights(options)?,
        ModelFormat::HuggingFace => load_hf(path, options, &device)?,
    };
    assemble(parts, format, path.to_path_buf())
}

/// A GGUF model from bytes in memory (downloaded, not on disk); `name` appears in errors.
pub fn load_gguf_bytes(name: &str, bytes: Vec<u8>, options: LoadOptions) -> Result<LoadedModel> {
    GgufHead::new(GgufFile::from_bytes(name, bytes)?)?.finish(options)
}

type Parts = (Llama, Tokenizer, Option<ChatTemplate>);

/// The loaded model, once its tokenizer is known to fit the model's vocabulary.
fn assemble((model, tokenizer, chat_template): Parts, format: ModelFormat, path: PathBuf) -> Result<LoadedModel> {
    tokenizer.check_fits(model.config().vocab_size)?;
    Ok(LoadedModel { model, tokenizer, chat_template, format, path })
}

/// A GGUF model's header and what it alone determines: the hyper-parameters, tokenizer and chat
/// template. Read from the first bytes of a file still downloading, it is built while the
/// weights are on their way ([`GgufHead::load`] adds them).
pub struct GgufHead {
    gguf: GgufFile,
    config: LlamaConfig,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
}

impl GgufHead {
    /// The head of a GGUF whose first bytes are `prefix`; `Ok(None)` while its header runs past
    /// them (or is malformed: the whole file then says how), an error when the header is whole
    /// but its model or tokenizer is refused.
    pub fn from_prefix(name: &str, prefix: &[u8]) -> Result<Option<Self>> {
        GgufFile::header_from_prefix(name, prefix).map(Self::new).transpose()
    }

    fn new(mut gguf: GgufFile) -> Result<Self> {
        let config = gguf.llama_config()?;
        let chat_template = gguf.get_string("tokenizer.chat_template").map(str::to_string);
        let tokenizer = crate::gguf_tokenizer::read(&mut gguf)?;
        let chat_template = chat_template.map(|t| ChatTemplate::new(&t, tokenizer.bos_token(), tokenizer.eos_token())).transpose()?;
        crate::allocator::release_free_memory();
        Ok(Self { gguf, config, tokenizer, chat_template })
    }

    /// The model, its weights read in place from `bytes`: the whole file whose first bytes the
    /// head was read from.
    pub fn load(self, bytes: Vec<u8>, options: LoadOptions) -> Result<LoadedModel> {
        Self { gguf: self.gguf.complete(bytes)?, ..self }.finish(options)
    }

    fn finish(self, options: LoadOptions) -> Result<LoadedModel> {
        let path = self.gguf.path().to_path_buf();
        assemble(self.load_weights(options)?, ModelFormat::Gguf, path)
    }

    /// A GGUF's model runs on the CPU, where the kernels read its matrices in place.
    fn load_weights(mut self, options: LoadOptions) -> Result<Parts> {
        let mut source = GgufSource { file: &mut self.gguf };
        let model = Llama::load(self.config, &mut source, RopeLayout::Interleaved, options, &Device::Cpu)?;
        Ok((model, self.tokenizer, self.chat_template))
    }
}

fn load_hf(dir: &Path, options: LoadOptions, device: &Device) -> Result<Parts> {
    let config = hf::read_config(dir)?;
    let files = hf::safetensors_files(dir)?;
    let mut source = SafetensorsSource::open(&files, device)?;
    let model = Llama::load(config, &mut source, RopeLayout::Halves, options, device)?;

    let (tokenizer, chat_template) = hf_tokenizer(dir)?;
    Ok((model, tokenizer, chat_template))
}

/// The tokenizer and chat template of a Hugging Face directory (`tokenizer.json`,
/// `tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`).
pub fn hf_tokenizer(dir: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tokenizer_path = dir.join("tokenizer.json");
    let json = std::fs::read_to_string(&tokenizer_path).map_err(|e| EngineError::io(&tokenizer_path, e))?;
    let inner = Tokenizer::from_json(&json)?;
    let tokenizer_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
    let generation_config = read_json_if_present(&dir.join("generation_config.json"))?;
    let special = |key: &str| -> Option<String> {
        let v = tokenizer_config.as_ref()?.get(key)?;
        v.as_str().or_else(|| v.get("content")?.as_str()).map(str::to_string)
    };
    let stop_ids = generation_config
        .as_ref()
        .and_then(|g| g.get("eos_token_id"))
        .map(|v| match v {
            Json::Array(ids) => ids.iter().filter_map(Json::as_u64).map(|id| id as u32).collect(),
            other => other.as_u64().map(|id| id as u32).into_iter().collect(),
        })
        .unwrap_or_else(Vec::new);
    let tokenizer = Tokenizer::new(inner, special("bos_token"), special("eos_token"), stop_ids);

    let template_source = hf::chat_template(dir, tokenizer_config.as_ref())?;
    let chat_template = template_source.map(|t| ChatTemplate::new(&t, tokenizer.bos_token(), tokenizer.eos_token())).transpose()?;
    Ok((tokenizer, chat_template))
}

fn read_json_if_present(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| EngineError::invalid_file(path, e))
}
