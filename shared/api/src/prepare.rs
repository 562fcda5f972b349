//! A request made ready for the engine, in two steps: [`check_chat`]/[`check_completion`]
//! validate what needs no model (so a bad request is a 400 before any load), then
//! [`Checked::prepare`] renders the chat template or encodes the prompts with the loaded model.
//! [`Prepared::response`] turns the completions into the response body. The HTTP handlers and
//! the batch-file runner share these steps, so a line of a batch file is answered exactly as the
//! same request over HTTP.

use std::sync::Arc;

use llm_engine::{ChatMessage, Completion, LoadedModel};
use serde::Serialize;

use crate::batch::{finish_reason, Echo, Meta};
use crate::error::ApiError;
use crate::logprobs;
use crate::openai::*;
use crate::params::{check_prompts, Generation, Limits};
use crate::router::AppState;
use crate::stream::ChunkKind;

/// A request whose settings passed validation.
pub(crate) enum Checked {
    Chat { generation: Generation, messages: Vec<ChatMessage> },
    Text { generation: Generation, prompt: Prompt, echo: bool },
}

/// A request ready to run: its prompts (one sequence each per choice) and settings.
pub(crate) struct Prepared {
    pub(crate) kind: ChunkKind,
    pub(crate) prompts: Vec<Vec<u32>>,
    pub(crate) generation: Generation,
    pub(crate) echo: Option<Arc<Echo>>,
}

/// A response body in OpenAI's shape.
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum Answer {
    Chat(ChatCompletion),
    Text(TextCompletion),
}

pub(crate) fn check_chat(body: ChatRequest, limits: &Limits) -> Result<Checked, ApiError> {
    let generation = Generation::from_request(&body.sampling, limits, 1)?.with_chat_logprobs(body.logprobs, body.top_logprobs)?;
    Ok(Checked::Chat { generation, messages: chat_messages(body.messages)? })
}

pub(crate) fn check_completion(body: CompletionRequest, limits: &Limits) -> Result<Checked, ApiError> {
    // With `echo`, `max_tokens: 0` only scores the prompt (as lm-evaluation-harness asks).
    let min_tokens = if body.echo { 0 } else { 1 };
    let generation = Generation::from_request(&body.sampling, limits, min_tokens)?.with_completion_logprobs(body.logprobs)?;
    Ok(Checked::Text { generation, prompt: body.prompt, echo: body.echo })
}

fn chat_messages(messages: Vec<RequestMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty."));
    }
    messages
        .into_iter()
        .map(|m| {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::invalid("messages", format!("Unknown role `{}`.", m.role)));
            }
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(text)) => Ok(text),
                        (kind, _) => Err(ApiError::invalid("messages", format!("Content parts of type `{kind}` are not supported."))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            Ok(ChatMessage::new(m.role, content))
        })
        .collect()
}

impl Checked {
    pub(crate) fn stream(&self) -> bool {
        match self {
            Checked::Chat { generation, .. } | Checked::Text { generation, .. } => generation.stream,
        }
    }

    /// The prompts, encoded by `model`, checked against the limits and its context.
    pub(crate) async fn prepare(self, state: &AppState, model: &Arc<LoadedModel>) -> Result<Prepared, ApiError> {
        let (kind, prompts, generation, echo) = match self {
            Checked::Chat { generation, messages } => {
                if model.chat_template.is_none() {
                    return Err(ApiError::invalid("messages", "This model has no chat template: use /v1/completions."));
                }
                // Rendering runs in a child process, seconds long for a hostile template: not on
                // the async workers.
                let rendering = Arc::clone(model);
                let rendered = tokio::task::spawn_blocking(move || rendering.chat_template.as_ref().expect("checked above").render(&messages, true))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let text = rendered.map_err(|e| match e {
                    llm_engine::EngineError::ChatTemplate(_) => ApiError::invalid("messages", e.to_string()),
                    other => ApiError::internal(other.to_string()),
                })?;
                // The template writes BOS as text; adding special tokens again would double it.
                let prompt = model.tokenizer.encode(&text, false).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
                (ChunkKind::Chat, vec![prompt], generation, None)
            }
            Checked::Text { generation, prompt, echo } => {
                let encode = |text: &str| model.tokenizer.encode(text, true).map_err(|e| ApiError::invalid("prompt", e.to_string()));
                let (prompts, texts): (Vec<Vec<u32>>, Option<Vec<String>>) = match prompt {
                    Prompt::Text(text) => (vec![encode(&text)?], Some(vec![text])),
                    Prompt::Texts(texts) => (texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?, Some(texts)),
                    Prompt::Tokens(ids) => (vec![ids], None),
                    Prompt::TokenLists(lists) => (lists, None),
                };
                if prompts.is_empty() {
                    return Err(ApiError::invalid("prompt", "`prompt` must not be empty."));
                }
                let vocab = model.model.config().vocab_size as u32;
                if prompts.iter().flatten().any(|&id| id >= vocab) {
                    return Err(ApiError::invalid("prompt", format!("Token ids must be below the vocabulary size {vocab}.")));
                }
                (ChunkKind::Text, prompts, generation, echo.then_some(texts))
            }
        };
        check_prompts(&prompts, &generation, &state.limits, model.model.config().max_position_embeddings)?;
        // Here, not in the engine: a streamed answer has sent its status by the time it runs.
        let vocab = model.model.config().vocab_size;
        if let Some((id, _)) = generation.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            return Err(ApiError::invalid("logit_bias", format!("`logit_bias` names token id {id}; the vocabulary has {vocab}.")));
        }
        let echo = match echo {
            Some(texts) => Some(Arc::new(echoed(state, model, &prompts, texts, generation.logprobs).await?)),
            None => None,
        };
        Ok(Prepared { kind, prompts, generation, echo })
    }
}

impl Prepared {
    pub(crate) fn response(&self, meta: Meta, model: &LoadedModel, completions: &[Completion], usage: Usage) -> Answer {
        let generation = &self.generation;
        match self.kind {
            ChunkKind::Chat => {
                let choices = completions
                    .iter()
                    .enumerate()
                    .map(|(index, c)| ChatChoice {
                        index,
                        message: ResponseMessage { role: "assistant", content: c.text.clone() },
                        finish_reason: finish_reason(c.finish_reason),
                        logprobs: generation.logprobs.map(|_| logprobs::chat(&model.tokenizer, &c.logprobs, generation.ignore_eos)),
                    })
                    .collect();
                Answer::Chat(ChatCompletion { id: meta.id, object: "chat.completion", created: meta.created, model: meta.model, choices, usage })
            }
            ChunkKind::Text => {
                let choices = completions
                    .iter()
                    .enumerate()
                    .map(|(index, c)| {
                        let echoed = self.echo.as_ref().map(|e| (&e.texts[index / generation.n], &e.logprobs[index / generation.n]));
                        let mut logprobs = generation.logprobs.map(|_| CompletionLogprobs::default());
                        if let (Some(lists), Some((_, Some(prompt_lists)))) = (&mut logprobs, echoed) {
                            lists.append(prompt_lists.clone());
                        }
                        let prefix = echoed.map_or("", |(text, _)| text.as_str());
                        if let Some(lists) = &mut logprobs {
                            lists.append(
                                logprobs::completion(&model.tokenizer, logprobs::visible(&model.tokenizer, &c.logprobs, generation.ignore_eos), prefix.len()).0,
                            );
                        }
                        CompletionChoice { index, text: format!("{prefix}{}", c.text), finish_reason: Some(finish_reason(c.finish_reason)), logprobs }
                    })
                    .collect();
                Answer::Text(TextCompletion { id: meta.id, object: "text_completion", created: meta.created, model: meta.model, choices, usage: Some(usage) })
            }
        }
    }
}

/// The prompts' texts (as given, or decoded from token ids) and, when `top_n` is set, their
/// tokens scored by the model on the engine thread.
async fn echoed(state: &AppState, model: &Arc<LoadedModel>, prompts: &[Vec<u32>], texts: Option<Vec<String>>, top_n: Option<usize>) -> Result<Echo, ApiError> {
    let texts = match texts {
        Some(texts) => texts,
        None => prompts.iter().map(|p| model.tokenizer.decode(p).map_err(|e| ApiError::invalid("prompt", e.to_string()))).collect::<Result<_, _>>()?,
    };
    let Some(top_n) = top_n else {
        return Ok(Echo { logprobs: vec![None; texts.len()], texts });
    };
    let (scoring_model, owned) = (model.clone(), prompts.to_vec());
    let scores = state
        .engine
        .run(move || owned.iter().map(|p| llm_engine::prompt_logprobs(&scoring_model.model, p, top_n)).collect::<Result<Vec<_>, _>>())
        .await?
        .map_err(ApiError::engine)?;
    let logprobs = prompts.iter().zip(&scores).map(|(p, entries)| Some(logprobs::prompt(&model.tokenizer, p, entries).0)).collect();
    Ok(Echo { texts, logprobs })
}
