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
