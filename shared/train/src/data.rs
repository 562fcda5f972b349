//! Training data: JSONL in the formats TRL and the Hugging Face ecosystem use, turned into
//! token ids with a loss mask.
//!
//! - `{"prompt": ..., "completion": ...}`: loss on the completion (and the EOS after it) only;
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the model's chat template, loss on
//!   the assistant turns only;
//! - `{"text": ...}`: plain language modelling, loss everywhere.

use std::path::Path;

use llm_engine::{ChatMessage, ChatTemplate, Tokenizer};
use serde::Deserialize;

use crate::error::{Result, TrainError};

/// One tokenized example; `mask[i]` says whether predicting `ids[i]` counts towards the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Truncate,
    Skip,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataReport {
    pub examples: usize,
    pub truncated: usize,
    pub skipped: usize,
    /// Positions that count towards the loss, over all examples.
    pub loss_tokens: usize,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Record {
    PromptCompletion { prompt: String, completion: String },
    Messages { messages: Vec<Message> },
    Text { text: String },
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// Reads and tokenizes `path`. Lines that are not one of the formats are all reported, with
/// their line numbers, and nothing is returned.
pub fn load_jsonl(
    path: &Path,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    max_seq_len: usize,
    overflow: Overflow,
) -> Result<(Vec<Example>, DataReport)> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::file(path, e))?;
    let records: Vec<(usize, std::result::Result<Record, String>)> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            let record = serde_json::from_str::<Record>(line).map_err(|_| "not a JSON object with `prompt` + `completion`, `messages` or `text`".to_string());
            (index + 1, record)
        })
        .collect();
    let rendered = render_conversations(&records, template)?;
    let mut examples = Vec::new();
    let mut errors = Vec::new();
    let mut report = DataReport::default();
    for ((line, record), renderings) in records.into_iter().zip(rendered) {
        let example = record.and_then(|record| tokenize(&record, tokenizer, template.is_some(), &renderings));
        match example {
            Ok(mut example) if example.ids.len() > max_seq_len => match overflow {
                Overflow::Skip => report.skipped += 1,
                Overflow::Truncate => {
                    example.ids.truncate(max_seq_len);
                    example.mask.truncate(max_seq_len);
                    report.truncated += 1;
                    examples.push(example);
                }
            },
            Ok(example) => examples.push(example),
            Err(message) => errors.push(format!("line {line}: {message}")),
        }
    }
    if !errors.is_empty() {
        let shown = errors.iter().take(10).cloned().collect::<Vec<_>>().join("; ");
        return Err(TrainError::file(path, format!("{} bad lines: {shown}", errors.len())));
    }
    examples.retain(|e| e.mask.iter().skip(1).any(|&m| m == 1));
    if examples.is_empty() {
        return Err(TrainError::file(path, "no example with anything to learn"));
    }
    report.examples = examples.len();
    report.loss_tokens = examples.iter().map(|e| e.mask.iter().skip(1).filter(|&&m| m == 1).count()).sum();
    Ok((examples, report))
}

/// Each record's renderings, as `tokenize` takes them: for a `messages` record, before each
/// assistant reply, the text up to it (with the generation prompt) and the text including it;
/// nothing for the others. All are rendered by one bounded renderer
/// ([`ChatTemplate::render_all`]).
fn render_conversations(
    records: &[(usize, std::result::Result<Record, String>)],
    template: Option<&ChatTemplate>,
) -> Result<Vec<Vec<llm_engine::Result<String>>>> {
    let Some(template) = template else {
        return Ok(records.iter().map(|_| Vec::new()).collect());
    };
    let chats: Vec<Vec<ChatMessage>> = records
        .iter()
        .map(|(_, record)| match record {
            Ok(Record::Messages { messages }) => messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect(),
            _ => Vec::new(),
        })
        .collect();
    let mut conversations = Vec::new();
    let mut counts = Vec::with_capacity(chats.len());
    for messages in &chats {
        let before = conversations.len();
        for (k, message) in messages.iter().enumerate() {
            if message.role == "assistant" {
                conversations.push((&messages[..k], true));
                conversations.push((&messages[..=k], false));
            }
        }
        counts.push(conversations.len() - before);
    }
    let mut rendered = template.render_all(&conversations).map_err(|e| TrainError::Invalid(e.to_string()))?.into_iter();
    Ok(counts.into_iter().map(|n| rendered.by_ref().take(n).collect()).collect())
}

fn tokenize(record: &Record, tokenizer: &Tokenizer, has_template: bool, renderings: &[llm_engine::Result<String>]) -> std::result::Result<Example, String> {
    let encode = |text: &str, special: bool| tokenizer.encode(text, special).map_err(|e| e.to_string());
    let mut example = Example { ids: Vec::new(), mask: Vec::new() };
    let mut push = |ids: Vec<u32>, learn: bool| {
        example.mask.extend(std::iter::repeat_n(u8::from(learn), ids.len()));
        example.ids.extend(ids);
    };
    match record {
        Record::PromptCompletion { prompt, completion } => {
            push(encode(prompt, true)?, false);
            push(encode(completion, false)?, true);
            push(tokenizer.eos_id().into_iter().collect(), true);
        }
        Record::Text { text } => {
            push(encode(text, true)?, true);
            push(tokenizer.eos_id().into_iter().collect(), true);
        }
        Record::Messages { .. } => {
            if !has_template {
                return Err("`messages` needs a model with a chat template".into());
            }
            if renderings.is_empty() {
                return Err("no assistant message to learn from".into());
            }
            // The text before each assistant reply (with the generation prompt) is context; the
            // reply's rendering, up to the next turn, is what the model learns to write.
            let mut done = "";
            for pair in renderings.chunks(2) {
                let [prompt, full] = pair else { unreachable!("renderings come in pairs") };
                let (prompt, full) = (prompt.as_ref().map_err(|e| e.to_string())?, full.as_ref().map_err(|e| e.to_string())?);
                let (Some(context), Some(reply)) = (prompt.strip_prefix(done), full.strip_prefix(prompt.as_str())) else {
                    return Err("the chat template does not render conversations prefix by prefix".into());
                };
                // The template writes BOS as text: no special tokens are added.
                push(encode(context, false)?, false);
                push(encode(reply, false)?, true);
                done = full;
            }
        }
    }
    Ok(example)
}
