//! The engine thread: every generation of a server runs there, in one batch that requests join
//! between decode steps and leave as they end (see [`llm_engine::generate_jobs`]), and other
//! model work (`echo`'s scoring) runs there between those steps. Requests queue for it; past
//! [`Limits::max_queued`](crate::Limits) waiting, they are refused with 503.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_engine::{Generated, GenerationRequest, Job, JobHandler, LoadedModel, PromptCache, TokenEvent};
use tokio::sync::oneshot;
use tracing::Span;

use crate::error::ApiError;
use crate::Limits;

/// The engine thread's queue. The thread ends when this is dropped.
pub(crate) struct Engine {
    tasks: mpsc::Sender<Task>,
    /// Tasks sent and not started.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

enum Task {
    /// Jobs that join the batch's queue together: each one's requests, whether through the
    /// prompt cache, and its handler.
    Generate {
        model: Arc<LoadedModel>,
        jobs: Vec<(Vec<GenerationRequest>, bool, Box<dyn JobHandler + Send>)>,
    },
    Run(Box<dyn FnOnce() + Send>),
}

/// One job for [`Engine::generate_each`]: a request's sequences.
pub(crate) struct Submitted {
    pub(crate) requests: Vec<GenerationRequest>,
    /// Through the prompt cache.
    pub(crate) cache_prompt: bool,
    /// Generation stops early (`finish_reason: length`) when this passes.
    pub(crate) stop_at: Option<Instant>,
    /// Sees each token; `Break` stops the job's sequences.
    pub(crate) on_token: Box<dyn FnMut(TokenEvent<'_>) -> ControlFlow<()> + Send>,
}

impl Engine {
    /// Starts the thread: batches of up to `max_batch_sequences` (a larger request runs alone),
    /// a prompt cache of `prompt_cache_bytes`.
    pub(crate) fn new(limits: &Limits) -> Self {
        let (tasks, receiver) = mpsc::channel();
        let (max_rows, cache_bytes) = (limits.max_batch_sequences, limits.prompt_cache_bytes);
        std::thread::Builder::new().name("engine".into()).spawn(move || work(&receiver, max_rows, cache_bytes)).expect("the engine thread starts");
        Self { tasks, queued: Arc::default(), max_queued: limits.max_queued }
    }

    /// Generates `requests` in the running batch, through the prompt cache when `cache_prompt`.
    /// Generation stops early (`finish_reason: length`) when `on_token` breaks, `stop_at`
    /// passes, or this future is dropped (a client that went away before its JSON answer).
    pub(crate) async fn generate(
        &self,
        model: &Arc<LoadedModel>,
        requests: Vec<GenerationRequest>,
        cache_prompt: bool,
        stop_at: Option<Instant>,
        on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()> + Send + 'static,
    ) -> Result<Generated, ApiError> {
        let job = Submitted { requests, cache_prompt, stop_at, on_token: Box::new(on_token) };
        self.generate_each(model, vec![job]).await?.pop().expect("one job, one result")
    }

    /// Generates each job in the running batch, all queued at once (they take one place in the
    /// queue): those that fit start together, and the rest join as rows leave. Each job's
    /// result, in order; the error when the queue has no place or the engine thread stopped.
    /// Dropping this future stops them all, as [`Engine::generate`].
    pub(crate) async fn generate_each(&self, model: &Arc<LoadedModel>, jobs: Vec<Submitted>) -> Result<Vec<Result<Generated, ApiError>>, ApiError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let place = self.enter()?;
        let mut abandon_on_drop = Abandon { abandoned: Vec::new(), place: place.clone() };
        let (mut queued, mut answers) = (Vec::new(), Vec::new());
        for Submitted { requests, cache_prompt, stop_at, on_token } in jobs {
            let (reply, answer) = oneshot::channel();
            let abandoned = Arc::new(AtomicBool::new(false));
            abandon_on_drop.abandoned.push(abandoned.clone());
            let handler =
                Handler { on_token, place: place.clone(), abandoned, stop_at, span: Span::current(), reply, sent: Instant::now(), waited: Duration::ZERO };
            queued.push((requests, cache_prompt, Box::new(handler) as Box<dyn JobHandler + Send>));
            answers.push(answer);
        }
        self.send(Task::Generate { model: model.clone(), jobs: queued })?;
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            // A job whose generation panicked is dropped unanswered: it fails, the others not.
            results.push(answer.await.map_err(|_| ApiError::internal("generation stopped")).and_then(|result| result.map_err(ApiError::engine)));
        }
        Ok(results)
    }

    /// Runs `work` on the engine thread between two decode steps.
    pub(crate) async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let place = self.enter()?;
        let (reply, answer) = oneshot::channel();
        let span = Span::current();
        self.send(Task::Run(Box::new(move || {
            place.leave();
            let _ = reply.send(span.in_scope(work));
        })))?;
        answer.await.map_err(|_| ApiError::internal("the engine's work stopped"))
    }

    /// A place in the queue, or 503 when `max_queued` tasks wait already. A task that finds
    /// none waiting is never refused.
    fn enter(&self) -> Result<Place, ApiError> {
        let ahead = self.queued.fetch_add(1, Ordering::SeqCst);
        let place = Place(Arc::new(Seat { queued: self.queued.clone(), left: AtomicBool::new(false) }));
        if ahead > 0 && ahead >= self.max_queued {
            return Err(ApiError::overloaded(ahead));
        }
        Ok(place)
    }

    fn send(&self, task: Task) -> Result<(), ApiError> {
        self.tasks.send(task).map_err(|_| ApiError::internal("the engine thread stopped"))
    }
}

/// The engine thread's life: generations of the first request's model (a server serves one
/// model), other tasks between their steps; a generation that panics fails the jobs of its
/// batch and those waiting to join it (their answers are dropped), and the thread goes on.
fn work(tasks: &mpsc::Receiver<Task>, max_rows: usize, cache_bytes: usize) {
    let next = |idle: bool| -> Option<(Arc<LoadedModel>, Vec<Job<'static>>)> {
        loop {
            let task = if idle { tasks.recv().ok()? } else { tasks.try_recv().ok()? };
            match task {
                Task::Generate { model, jobs } => {
                    let jobs =
                        jobs.into_iter().map(|(requests, cache_prompt, handler)| Job { requests, cache_prompt, handler: handler as Box<dyn JobHandler> });
                    return Some((model, jobs.collect()));
                }
                Task::Run(work) => {
                    let _ = catch_unwind(AssertUnwindSafe(work));
                    // One between two steps: scoring a prompt takes as long as a prefill.
                    if !idle {
                        return None;
                    }
                }
            }
        }
    };
    let mut prompt_cache = PromptCache::with_budget(cache_bytes);
    while let Some((model, first)) = next(true) {
        let mut queued = VecDeque::from(first);
        let jobs = |idle| {
            while queued.is_empty() {
                let (same, jobs) = next(idle)?;
                debug_assert!(Arc::ptr_eq(&same, &model), "one server, one model");
                queued.extend(jobs);
            }
            queued.pop_front()
        };
        let generation = AssertUnwindSafe(|| llm_engine::generate_jobs(&model.model, &model.tokenizer, &mut prompt_cache, max_rows, jobs));
        if catch_unwind(generation).is_ok() {
            // It returns when it waited for a job and the queue had closed.
            return;
        }
        tracing::error!("generation panicked: the requests in its batch failed");
        prompt_cache = PromptCache::with_budget(cache_bytes);
    }
}

/// A task's place in the queue, left once: when it starts, when its request goes away (while
/// its job may still sit in the engine's queue), or when the last of its holders is dropped.
#[derive(Clone)]
struct Place(Arc<Seat>);

struct Seat {
    queued: Arc<AtomicUsize>,
    left: AtomicBool,
}

impl Place {
    fn leave(&self) {
        self.0.leave();
    }
}

impl Seat {
    fn leave(&self) {
        if !self.left.swap(true, Ordering::SeqCst) {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A request's side of its job.
struct Handler<F> {
    on_token: F,
    place: Place,
    /// Set when the request's future is dropped.
    abandoned: Arc<AtomicBool>,
    stop_at: Option<Instant>,
    /// The request's span, for the lines logged on the engine thread.
    span: Span,
    reply: oneshot::Sender<llm_engine::Result<Generated>>,
    sent: Instant,
    /// From `sent` to the job's start: its wait for room in the batch.
    waited: Duration,
}

impl<F: FnMut(TokenEvent<'_>) -> ControlFlow<()> + Send> JobHandler for Handler<F> {
    fn start(&mut self) -> bool {
        self.waited = self.sent.elapsed();
        self.place.leave();
        !self.cancelled()
    }

    fn cancelled(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    fn token(&mut self, event: TokenEvent<'_>) -> ControlFlow<()> {
        let _entered = self.span.enter();
        let flow = (self.on_token)(event);
        // Once: the engine ends the job's sequences after a break.
        if flow.is_continue() && self.abandoned.swap(false, Ordering::Relaxed) {
            tracing::warn!("stopping generation: the request was abandoned");
            return ControlFlow::Break(());
        }
        if flow.is_continue() && self.stop_at.is_some_and(|at| Instant::now() >= at) {
            tracing::warn!("stopping generation before the invocation's deadline");
            return ControlFlow::Break(());
        }
        flow
    }

    /// The time to the first token counts the wait for room, as the caller saw it.
    fn done(self: Box<Self>, result: llm_engine::Result<Generated>) {
        let waited = self.waited;
        let _ = self.reply.send(result.map(|(completions, mut stats)| {
            stats.first_token += waited;
            (completions, stats)
        }));
    }
}

/// Held by the request's future: when it is dropped (answered, or its client gone), its jobs
/// stop at their next token or never start, and its place in the queue is free.
struct Abandon {
    /// Each job's flag.
    abandoned: Vec<Arc<AtomicBool>>,
    place: Place,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        for abandoned in &self.abandoned {
            abandoned.store(true, Ordering::Relaxed);
        }
        self.place.leave();
    }
}
