//! Training data formats and their loss masks, with the fixture tokenizers and chat template.

use llm_tests::*;
use llm_train::data::{load_jsonl, Overflow};

fn write(lines: &[serde_json::Value]) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), lines.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("\n")).unwrap();
    file
}

#[test]
fn prompt_completion_learns_the_completion_and_eos_only() {
    let (tokenizer, template) = llm_engine::hf_tokenizer(&fixtures_dir().join("llama2/hf")).unwrap();
    let file = write(&[serde_json::json!({"prompt": "What is 2 plus 2?", "completion": " 4"})]);
    let (examples, report) = load_jsonl(file.path(), &tokenizer, template.as_ref(), 512, Overflow::Truncate).unwrap();
    let prompt = tokenizer.encode("What is 2 plus 2?", true).unwrap();
    let e = &examples[0];
    assert_eq!(&e.ids[..prompt.len()], &prompt[..]);
    assert!(e.mask[..prompt.len()].iter().all(|&m| m == 0));
    assert!(e.mask[prompt.len()..].iter().all(|&m| m == 1));
    assert_eq!(e.ids.last().copied(), tokenizer.eos_id());
    assert_eq!(report.loss_tokens, e.ids.len() - prompt.len());
}

#[test]
fn chat_data_learns_the_assistant_turns_only() {
    let (tokenizer, template) = llm_engine::hf_tokenizer(&fixtures_dir().join("llama3/hf")).unwrap();
    let messages = serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"}
    ]});
    let (examples, _) = load_jsonl(write(&[messages]).path(), &tokenizer, template.as_ref(), 512, Overflow::Truncate).unwrap();
    let e = &examples[0];
    let learned: Vec<u32> = e.ids.iter().zip(&e.mask).filter(|(_, &m)| m == 1).map(|(&id, _)| id).collect();
    let text = tokenizer.decode_with_special(&learned).unwrap();
    assert!(text.contains("Hello there") && text.contains("Goodbye"), "{text}");
    assert!(!text.contains("Be brief") && !text.contains("Hi") && !text.contains("Bye<"), "{text}");
    // The whole example is the rendered conversation.
    let messages: Vec<_> = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello there"), ("user", "Bye"), ("assistant", "Goodbye")]
        .iter()
        .map(|(r, c)| llm_engine::ChatMessage::new(*r, *c))
        .collect();
    let rendered = template.unwrap().render(&messages, false).unwrap();
    assert_eq!(tokenizer.decode_with_special(&e.ids).unwrap(), rendered);
}

#[test]
fn long_examples_are_truncated_or_skipped_and_counted() {
    let (tokenizer, template) = llm_engine::hf_tokenizer(&fixtures_dir().join("llama2/hf")).unwrap();
    let file = write(&[serde_json::json!({"text": "word ".repeat(100)}), serde_json::json!({"text": "short"})]);
    let (examples, report) = load_jsonl(file.path(), &tokenizer, template.as_ref(), 16, Overflow::Truncate).unwrap();
    assert_eq!((examples.len(), report.truncated, examples[0].ids.len()), (2, 1, 16));
    let (examples, report) = load_jsonl(file.path(), &tokenizer, template.as_ref(), 16, Overflow::Skip).unwrap();
    assert_eq!((examples.len(), report.skipped), (1, 1));
}

/// Conversations are rendered all at once, apart from the records they come from: a record
/// whose rendering fails is reported with its own line, and the records after it still get
/// their own renderings.
#[test]
fn chat_records_keep_their_own_renderings_and_line_numbers() {
    let (tokenizer, _) = llm_engine::hf_tokenizer(&fixtures_dir().join("llama3/hf")).unwrap();
    let template = llm_engine::ChatTemplate::new(
        "{% for m in messages %}{% if m.content == 'refused' %}{{ raise_exception('refused on purpose') }}{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        None,
        None,
    )
    .unwrap();
    let chat = |reply: &str| serde_json::json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]});
    let good = [chat("first"), serde_json::json!({"text": "plain"}), chat("second")];
    let (examples, _) = load_jsonl(write(&good).path(), &tokenizer, Some(&template), 512, Overflow::Truncate).unwrap();
    let texts: Vec<String> = examples.iter().map(|e| tokenizer.decode_with_special(&e.ids).unwrap()).collect();
    assert_eq!(texts[0], "<user>Hi<assistant>first");
    assert_eq!(texts[2], "<user>Hi<assistant>second");

    let bad = [chat("first"), chat("refused"), serde_json::json!({"nothing": 1}), chat("second")];
    let error = load_jsonl(write(&bad).path(), &tokenizer, Some(&template), 512, Overflow::Truncate).unwrap_err().to_string();
    assert!(
        error.contains("2 bad lines")
            && error.contains("line 2: chat template: invalid operation: refused on purpose")
            && error.contains("line 3: not a JSON object"),
        "{error}"
    );
}
