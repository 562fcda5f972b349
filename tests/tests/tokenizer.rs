//! Tokenizers and chat templates against transformers, from the Hugging Face files and as
//! rebuilt from GGUF `tokenizer.ggml.*` keys written by llama.cpp's converter.

use llm_engine::{load, ChatMessage, LoadOptions};
use llm_tests::*;

fn check(model: &str, file: &str) {
    let loaded = load(&fixtures_dir().join(model).join(file), LoadOptions::default()).unwrap();
    let fixture = read_json(&format!("{model}/tokenizer_cases.json"));
    let tok = &loaded.tokenizer;
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "{model}/{file}: encode {text:?}");
        assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids_no_special"]), "{model}/{file}: encode without specials {text:?}");
        assert_eq!(tok.decode(&ids(&case["ids"])).unwrap(), case["decoded"].as_str().unwrap(), "{model}/{file}: decode {text:?}");
    }
    let chat = &fixture["chat"];
    let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
    let template = loaded.chat_template.as_ref().expect("chat template");
    let text = template.render(&messages, true).unwrap();
    assert_eq!(text, chat["text"].as_str().unwrap(), "{model}/{file}: chat template");
    assert_eq!(tok.encode(&text, false).unwrap(), ids(&chat["ids"]), "{model}/{file}: chat ids");
}

#[test]
fn llama2_sentencepiece_tokenizer_from_tokenizer_json() {
    check("llama2", "hf");
}

#[test]
fn llama2_sentencepiece_tokenizer_from_gguf_keys() {
    check("llama2", "llama2-f16.gguf");
}

#[test]
fn llama3_bpe_tokenizer_from_tokenizer_json() {
    check("llama3", "hf");
}

#[test]
fn llama3_bpe_tokenizer_from_gguf_keys() {
    check("llama3", "llama3-bf16.gguf");
}

/// The engine reads a BPE tokenizer.json's vocabulary and merges itself (tokenizers' reader held
/// Llama 3's twice over in memory): it builds what tokenizers' own reader builds, the merges
/// spelled either way, written back byte for byte the same.
#[test]
fn tokenizer_json_is_read_as_tokenizers_reads_it() {
    for model in ["llama2", "llama3"] {
        let pairs_text = std::fs::read_to_string(fixtures_dir().join(model).join("hf/tokenizer.json")).unwrap();
        let mut file: serde_json::Value = serde_json::from_str(&pairs_text).unwrap();
        let lines = file["model"]["merges"].as_array().unwrap().iter().map(|p| format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()));
        file["model"]["merges"] = std::iter::once("#version: 0.2".to_string()).chain(lines).collect();
        for text in [pairs_text, file.to_string()] {
            let ours = llm_engine::Tokenizer::from_json(&text).unwrap();
            let theirs: tokenizers::Tokenizer = text.parse().unwrap();
            assert_eq!(ours.to_string(false).unwrap(), theirs.to_string(false).unwrap(), "{model}");
        }
    }
}

/// What tokenizers refuses in a BPE tokenizer.json, the engine's reader refuses too, and what it
/// reads (a truncation shorter than the template's tokens, say), the engine reads.
#[test]
fn malformed_bpe_models_are_refused() {
    let file = |model: serde_json::Value| serde_json::json!({"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null, "model": model});
    let bpe = |merges: serde_json::Value| serde_json::json!({"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": merges});
    let good = file(bpe(serde_json::json!(["#version: 0.2", "a b"]))).to_string();
    assert_eq!(llm_engine::Tokenizer::from_json(&good).unwrap().encode("ab", false).unwrap().get_ids(), [2]);
    let mut truncated = file(bpe(serde_json::json!([["a", "b"]])));
    truncated["truncation"] = serde_json::json!({"direction": "Right", "max_length": 0, "strategy": "LongestFirst", "stride": 4});
    truncated["post_processor"] = serde_json::json!({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "a", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}], "special_tokens": {"a": {"id": "a", "ids": [0], "tokens": ["a"]}}});
    let truncated = truncated.to_string();
    assert!(truncated.parse::<tokenizers::Tokenizer>().is_ok());
    llm_engine::Tokenizer::from_json(&truncated).unwrap();
    let mut version = file(bpe(serde_json::json!([["a", "b"]])));
    version["version"] = "2.0".into();
    let mut null_version = file(bpe(serde_json::json!([["a", "b"]])));
    null_version["version"] = serde_json::Value::Null;
    let mut unknown_key = file(bpe(serde_json::json!([["a", "b"]])));
    unknown_key["extra"] = 1.into();
    let mut dropout = bpe(serde_json::json!([["a", "b"]]));
    dropout["dropout"] = 2.0.into();
    let bad = [
        file(bpe(serde_json::json!(["a b ab"]))),
        file(bpe(serde_json::json!([["a"]]))),
        file(bpe(serde_json::json!([["a", "b", "ab"]]))),
        file(bpe(serde_json::json!([["a", "x"]]))),
        file(bpe(serde_json::json!([1]))),
        file(serde_json::json!({"type": "BPE", "vocab": {"a": 0}})),
        file(bpe(serde_json::json!([["a", "b"], "a b"]))),
        file(dropout),
        version,
        null_version,
        unknown_key,
    ];
    for case in bad {
        let text = case.to_string();
        assert!(text.parse::<tokenizers::Tokenizer>().is_err(), "tokenizers read {text}");
        assert!(llm_engine::Tokenizer::from_json(&text).is_err(), "the engine read {text}");
    }
}

#[test]
fn llama3_stops_on_end_of_turn() {
    let loaded = load(&fixtures_dir().join("llama3/llama3-bf16.gguf"), LoadOptions::default()).unwrap();
    let eot = loaded.tokenizer.encode("<|eot_id|>", false).unwrap();
    assert_eq!(eot.len(), 1);
    assert!(loaded.tokenizer.is_stop(eot[0]));
}

/// Streaming pieces never split a character and add up to the whole text.
#[test]
fn incremental_decoding_is_utf8_safe() {
    let loaded = load(&fixtures_dir().join("llama3/hf"), LoadOptions::default()).unwrap();
    let text = "naïve café 🦙🚀 日本語";
    let ids = loaded.tokenizer.encode(text, false).unwrap();
    let mut decoder = llm_engine::IncrementalDecoder::new();
    let mut streamed = String::new();
    for id in ids {
        let piece = decoder.push(&loaded.tokenizer, id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} splits a character");
        streamed.push_str(&piece);
    }
    streamed.push_str(&decoder.flush(&loaded.tokenizer).unwrap());
    assert_eq!(streamed, text);
}

/// SmolLM's and SmolLM2's tokenizers split every digit alone before GPT-2's split (their
/// tokenizer.json's `Digits` pre-tokenizer; llama.cpp's `smollm`). Llama 3's vocabulary under
/// SmolLM2's pre-tokenizer, converted: the file names `smollm`, and the tokenizer rebuilt from its
/// `tokenizer.ggml.*` keys (as from llama.cpp's SmolLM2 files) tokenizes as transformers' does.
#[test]
fn smollm_digits_from_gguf_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_copy("llama3", tmp.path());
    let mut json = read_json("llama3/hf/tokenizer.json");
    json["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
    ]});
    json["model"]["ignore_merges"] = false.into();
    let text = json.to_string();
    std::fs::write(dir.join("tokenizer.json"), &text).unwrap();
    let theirs: tokenizers::Tokenizer = text.parse().unwrap();

    let mut bytes = Vec::new();
    let source = llm_convert::CheckpointSource::open(llm_store::Location::Local(dir)).unwrap();
    llm_convert::convert(&source, &mut bytes, llm_convert::QuantType::F16, |_| {}).unwrap();
    let mut gguf = llm_engine::gguf::GgufFile::from_bytes("smollm.gguf", bytes).unwrap();
    assert_eq!(gguf.get_string("tokenizer.ggml.pre"), Some("smollm"));
    gguf.take("tokenizer.huggingface.json").expect("the converter keeps tokenizer.json");
    let ours = llm_engine::gguf_tokenizer::read(&mut gguf).unwrap();

    for text in ["In 2024, 365 days.", "pi = 3.14159; x1y22z333", "  spaced   out 42\n\n7 ½ ٣"] {
        let expected = theirs.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ours.encode(text, false).unwrap(), expected, "{text:?}");
    }
    assert_eq!(ours.encode("2024", false).unwrap().len(), 4, "each digit alone");
}

/// A Llama 3 GGUF without `tokenizer.ggml.add_bos_token` adds BOS, as llama.cpp does for Llama
/// 3's split (`llama-bpe` and the names it reads as the same).
#[test]
fn llama3_split_adds_bos_without_the_key() {
    let mut gguf = llm_engine::gguf::GgufFile::open(&fixtures_dir().join("llama3/llama3-bf16.gguf")).unwrap();
    assert!(gguf.take("tokenizer.ggml.add_bos_token").is_some(), "the fixture has the key");
    let tokenizer = llm_engine::gguf_tokenizer::read(&mut gguf).unwrap();
    let fixture = read_json("llama3/tokenizer_cases.json");
    let case = &fixture["cases"][0];
    assert_eq!(tokenizer.encode(case["text"].as_str().unwrap(), true).unwrap(), ids(&case["ids"]));
    assert_eq!(ids(&case["ids"])[0], 128000, "the fixture's ids start with BOS");
}
