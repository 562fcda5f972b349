//! The converter against llama.cpp's tools: same tensors, bytes and metadata as
//! `convert_hf_to_gguf.py` (+ `llama-quantize`), the same per-tensor types for mixtures, and files
//! the engine loads with the reference's logits.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use llm_convert::QuantType;
use llm_engine::gguf::GgufFile;
use llm_engine::{load, LoadOptions};
use llm_tests::*;

fn convert_to(dir: &Path, model: &str, q: &str) -> std::path::PathBuf {
    let out = dir.join(format!("{model}-{q}.gguf"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&out).unwrap());
    let source = llm_convert::CheckpointSource::open(llm_store::Location::Local(fixtures_dir().join(model).join("hf"))).unwrap();
    llm_convert::convert(&source, &mut file, q.parse().unwrap(), |_| {}).unwrap();
    drop(file);
    out
}

/// Raw bytes of every tensor, by name.
fn tensor_bytes(path: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    content
        .tensor_infos
        .keys()
        .map(|name| {
            let t = content.tensor(&mut file, name, &candle_core::Device::Cpu).unwrap();
            (name.clone(), (format!("{:?}", t.dtype()), t.shape().dims().to_vec(), t.data().unwrap().into_owned()))
        })
        .collect()
}

/// `None` when equal, else where they first differ (arrays can hold 100k entries).
fn difference(a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) if x.len() != y.len() => Some(format!("lengths {} vs {}", x.len(), y.len())),
        (Value::Array(x), Value::Array(y)) => x.iter().zip(y).enumerate().find_map(|(i, (p, q))| difference(p, q).map(|d| format!("[{i}]: {d}"))),
        _ => (format!("{a:?}") != format!("{b:?}")).then(|| format!("{a:?} vs {b:?}")),
    }
}

/// Keys whose values must equal llama.cpp's converter output.
const SHARED_KEYS: &[&str] = &[
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.attention.key_length",
    "llama.vocab_size",
    "llama.rope.dimension_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
];

fn check_against_llama_cpp(ours: &Path, theirs: &Path) {
    let (a, b) = (GgufFile::open(ours).unwrap(), GgufFile::open(theirs).unwrap());
    for key in SHARED_KEYS {
        match (a.get(key), b.get(key)) {
            (Some(x), Some(y)) => assert_eq!(difference(x, y), None, "{key}: ours vs llama.cpp"),
            (None, None) => {}
            (x, y) => panic!("{key}: ours {:?}, llama.cpp {:?}", x.is_some(), y.is_some()),
        }
    }
    let (ta, tb) = (tensor_bytes(ours), tensor_bytes(theirs));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, (dtype, dims, bytes)) in &tb {
        let (our_dtype, our_dims, our_bytes) = &ta[name];
        assert_eq!((our_dtype, our_dims), (dtype, dims), "{name}");
        if name == "rope_freqs.weight" {
            let f = |b: &[u8]| b.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
            for (x, y) in f(our_bytes).iter().zip(f(bytes)) {
                assert!((x - y).abs() <= 1e-6 * y.abs(), "rope_freqs {x} vs {y}");
            }
        } else {
            assert!(our_bytes == bytes, "{name}: bytes differ from llama.cpp's");
        }
    }
}

#[test]
fn f16_matches_convert_hf_to_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    check_against_llama_cpp(&convert_to(tmp.path(), "llama2", "f16"), &fixtures_dir().join("llama2/llama2-f16.gguf"));
}

#[test]
fn bf16_with_llama3_rope_matches_convert_hf_to_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    check_against_llama_cpp(&convert_to(tmp.path(), "llama3", "bf16"), &fixtures_dir().join("llama3/llama3-bf16.gguf"));
}

#[test]
fn q8_0_bytes_match_llama_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    check_against_llama_cpp(&convert_to(tmp.path(), "llama2", "q8_0"), &fixtures_dir().join("llama2/llama2-q8_0.gguf"));
}

/// The mixtures give each tensor the type llama-quantize gave it in the tinyq fixtures.
#[test]
fn mixture_types_match_llama_quantize() {
    for name in ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"] {
        let path = fixtures_dir().join(format!("tinyq/tinyq-{name}.gguf"));
        let gguf = GgufFile::open(&path).unwrap();
        let config = gguf.llama_config().unwrap();
        let theirs: std::collections::HashMap<String, String> = gguf.tensor_infos().into_iter().map(|(n, t, _)| (n, t)).collect();
        let q: QuantType = name.parse().unwrap();
        for (tensor, dtype) in llm_convert::tensor_types(&config, config.tie_word_embeddings, q) {
            assert_eq!(format!("{dtype:?}"), theirs[&tensor], "{name}: {tensor}");
        }
        assert_eq!(gguf.get_usize("general.file_type").unwrap(), Some(q.file_type() as usize), "{name}");
    }
}

/// What we write, the engine reads back with transformers' logits (f16 is exact for this model).
#[test]
fn converted_files_run_in_the_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let case = &reference_cases("llama3")[0];
    let reference = read_tensors("llama3/reference_logits.safetensors");
    let f16 = load(&convert_to(tmp.path(), "llama3", "bf16"), LoadOptions::default()).unwrap();
    let logits = prompt_logits(&f16.model, &case.prompt_token_ids);
    let last = logits.get(case.prompt_token_ids.len() - 1).unwrap();
    assert!(max_abs_diff(&last, &reference["prompt0.logits_last"]) < 1e-4);
    assert_eq!(greedy(&f16, std::slice::from_ref(&case.prompt_token_ids), 20)[0], case.greedy_token_ids);
    assert_ggml_tokenizer_matches_transformers(&tmp.path().join("llama3-bf16.gguf"), "llama3");
}

/// The tokenizer rebuilt from the file's `tokenizer.ggml.*` keys alone (what llama.cpp reads,
/// ignoring `tokenizer.huggingface.json`) encodes the fixture strings like transformers.
fn assert_ggml_tokenizer_matches_transformers(path: &Path, model: &str) {
    let mut gguf = GgufFile::open(path).unwrap();
    let rebuilt = llm_engine::gguf_tokenizer::tokenizer(&mut gguf).unwrap();
    let cases = read_json(&format!("{model}/tokenizer_cases.json"));
    for c in cases["cases"].as_array().unwrap() {
        let ids: Vec<u32> = rebuilt.encode(c["text"].as_str().unwrap(), true).unwrap().get_ids().to_vec();
        assert_eq!(ids, llm_tests::ids(&c["ids"]), "{model}: {}", c["text"]);
    }
}

#[test]
fn sentencepiece_scores_reproduce_the_merge_order() {
    let tmp = tempfile::tempdir().unwrap();
    assert_ggml_tokenizer_matches_transformers(&convert_to(tmp.path(), "llama2", "q8_0"), "llama2");
}

#[test]
fn bad_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_copy("llama2", tmp.path());
    let weights = std::fs::read(fixtures_dir().join("llama2/hf/model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let mut sink = Vec::new();
    let source = llm_convert::CheckpointSource::open(llm_store::Location::Local(dir.clone())).unwrap();
    let err = llm_convert::convert(&source, &mut sink, QuantType::Q8_0, |_| {}).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    // A header that claims more bytes than its shape holds.
    let mut hostile = weights.clone();
    let header_len = u64::from_le_bytes(hostile[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(hostile[8..8 + header_len].to_vec()).unwrap().replacen("\"shape\":[32000,32]", "\"shape\":[32000,33]", 1);
    hostile[8..8 + header_len].copy_from_slice(header.as_bytes());
    std::fs::write(dir.join("model.safetensors"), &hostile).unwrap();
    let err = llm_convert::convert(&source, &mut sink, QuantType::Q8_0, |_| {}).unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
}

/// Every quantized tensor of llama-quantize's files has the bytes our quantizer makes from the
/// same f32 weights (the K-quants are our own port of ggml's reference quantizers).
#[test]
fn quantized_blocks_match_llama_quantize_bytes() {
    let source = tensor_bytes(&fixtures_dir().join("tinyq/tinyq-f32.gguf"));
    let mut checked = std::collections::BTreeSet::new();
    for name in ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"] {
        for (tensor, (dtype, dims, theirs)) in tensor_bytes(&fixtures_dir().join(format!("tinyq/tinyq-{name}.gguf"))) {
            let ggml = llm_engine::quant::parse_ggml_dtype(&dtype.replace('K', "_k")).unwrap();
            if matches!(ggml, GgmlDType::F32 | GgmlDType::F16) {
                continue;
            }
            let values: Vec<f32> = source[&tensor].2.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let ours = llm_convert::quantize_tensor(&values, &dims, ggml).unwrap();
            assert!(ours == theirs, "{name}: {tensor} ({dtype}) differs from llama-quantize");
            checked.insert(dtype);
        }
    }
    assert_eq!(checked.len(), 10, "{checked:?}");
}
