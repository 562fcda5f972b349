//! Server-sent events for a streamed request: the generation thread sends tokens through a
//! channel, and each becomes a chunk in OpenAI's shape (chat deltas or completion texts, with
//! log-probabilities when asked), then the closing chunks, usage and `data: [DONE]`.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use llm_engine::{Completion, GenerationRequest, LoadedModel, TokenLogprob};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::batch::{finish_reason, record, run_batch, usage, Batch, Echo, Meta};
use crate::error::ApiError;
use crate::logprobs;
use crate::openai::{ChatLogprobs, Delta, Usage};

#[derive(Clone, Copy)]
pub(crate) enum ChunkKind {
    Chat,
    Text,
}

/// What the generation thread sends to the response stream.
enum Update {
    Token { index: usize, text: String, logprob: Option<TokenLogprob> },
    Done(Result<(Vec<Completion>, Usage), ApiError>),
}

pub(crate) fn stream_response(batch: Batch, requests: Vec<GenerationRequest>, include_usage: bool, meta: Meta) -> Response {
    // Unbounded (a request's updates are bounded by its `max_tokens`): the engine thread that
    // sends them generates every request's tokens, and must never wait for one slow reader.
    let (tx, rx) = mpsc::unbounded_channel::<Update>();
    let chunks = Chunks { meta, kind: batch.request.kind, model: batch.model.clone(), text_offsets: vec![0; requests.len()], echo: batch.request.echo.clone() };
    let choices = requests.len();
    let token_tx = tx.clone();
    let model = batch.model.clone();
    let ignore_eos = batch.request.generation.ignore_eos;
    let task = async move {
        let generation = run_batch(&batch, requests, move |event| {
            let logprob = event.logprob.filter(|lp| logprobs::is_visible(&model.tokenizer, lp, ignore_eos)).cloned();
            if event.text.is_empty() && logprob.is_none() {
                return ControlFlow::Continue(());
            }
            // A closed channel means the client went away: stop generating for it.
            match token_tx.send(Update::Token { index: event.index, text: event.text.to_string(), logprob }) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        });
        // A client that goes away while its request waits: dropping the generation takes the
        // request out of the engine's queue (a running one stops at its next token anyway).
        let result = tokio::select! {
            result = generation => result,
            () = tx.closed() => return,
        };
        let done = result.map(|(completions, stats)| {
            let usage = usage(&batch.request.prompts, &completions);
            record(&batch, &stats, usage, &completions);
            (completions, usage)
        });
        let _ = tx.send(Update::Done(done));
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    Sse::new(sse_events(rx, chunks, choices, include_usage)).into_response()
}

/// Builds the streamed chunks' JSON.
struct Chunks {
    meta: Meta,
    kind: ChunkKind,
    model: Arc<LoadedModel>,
    /// Bytes of text streamed so far per choice (legacy logprobs' `text_offset`).
    text_offsets: Vec<usize>,
    echo: Option<Arc<Echo>>,
}

impl Chunks {
    fn event(&self, choices: Vec<serde_json::Value>, usage: Option<Usage>) -> Event {
        let object = match self.kind {
            ChunkKind::Chat => "chat.completion.chunk",
            ChunkKind::Text => "text_completion",
        };
        let mut body = serde_json::json!({"id": self.meta.id, "object": object, "created": self.meta.created, "model": self.meta.model, "choices": choices});
        if let Some(usage) = usage {
            body["usage"] = serde_json::json!(usage);
        }
        Event::default().data(body.to_string())
    }

    fn choice(&mut self, index: usize, text: Option<String>, role: bool, finish: Option<&'static str>, logprob: Option<&TokenLogprob>) -> serde_json::Value {
        let tokenizer = &self.model.tokenizer;
        match self.kind {
            ChunkKind::Chat => {
                let delta = Delta { role: role.then_some("assistant"), content: text };
                let logprobs = logprob.map(|lp| ChatLogprobs { content: vec![logprobs::chat_entry(tokenizer, lp)], refusal: None });
                serde_json::json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs})
            }
            ChunkKind::Text => {
                let logprobs = logprob.map(|lp| {
                    let (lists, next) = logprobs::completion(tokenizer, [lp], self.text_offsets[index]);
                    self.text_offsets[index] = next;
                    lists
                });
                serde_json::json!({"index": index, "text": text.unwrap_or_default(), "finish_reason": finish, "logprobs": logprobs})
            }
        }
    }

    /// The chunk a choice starts with: the assistant role (chat), the echoed prompt (`echo`).
    fn opening(&mut self, index: usize, choices: usize) -> Option<Event> {
        let choice = match (self.kind, &self.echo) {
            (ChunkKind::Chat, _) => self.choice(index, Some(String::new()), true, None, None),
            (ChunkKind::Text, None) => return None,
            (ChunkKind::Text, Some(echo)) => {
                let prompt = index * echo.texts.len() / choices;
                let text = echo.texts[prompt].clone();
                self.text_offsets[index] = text.len();
                serde_json::json!({"index": index, "text": text, "finish_reason": null, "logprobs": echo.logprobs[prompt]})
            }
        };
        Some(self.event(vec![choice], None))
    }

    /// The events one update becomes.
    fn events(&mut self, update: Update, include_usage: bool) -> Vec<Event> {
        match update {
            Update::Token { index, text, logprob } => {
                let choice = self.choice(index, Some(text), false, None, logprob.as_ref());
                vec![self.event(vec![choice], None)]
            }
            Update::Done(Ok((completions, usage))) => {
                let mut events = Vec::with_capacity(completions.len() + 2);
                for (i, c) in completions.iter().enumerate() {
                    let choice = self.choice(i, None, false, Some(finish_reason(c.finish_reason)), None);
                    events.push(self.event(vec![choice], None));
                }
                if include_usage {
                    events.push(self.event(Vec::new(), Some(usage)));
                }
                events.push(Event::default().data("[DONE]"));
                events
            }
            Update::Done(Err(e)) => vec![Event::default().data(e.body().to_string()), Event::default().data("[DONE]")],
        }
    }
}

/// Server-sent events: the assistant role first (chat), text as it is generated, a closing
/// chunk per choice with its finish reason, usage when asked, then `[DONE]`.
fn sse_events(rx: mpsc::UnboundedReceiver<Update>, mut chunks: Chunks, choices: usize, include_usage: bool) -> impl Stream<Item = Result<Event, Infallible>> {
    let opening: Vec<Event> = (0..choices).filter_map(|i| chunks.opening(i, choices)).collect();
    let updates = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|update| (update, rx)) });
    let body = updates.flat_map(move |update| stream::iter(chunks.events(update, include_usage).into_iter().map(Ok)));
    stream::iter(opening.into_iter().map(Ok)).chain(body)
}
