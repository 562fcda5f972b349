//! Exact-match evaluation: greedy answers to held-out questions in the model's chat template,
//! right when the generated text, trimmed, equals the answer.

use serde::Serialize;

use llm_engine::{ChatMessage, GenerationRequest, LoadedModel};

use crate::demo::Question;
use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Serialize)]
pub struct TaskScore {
    pub task: String,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Per task, in the order tasks first appear in the questions.
    pub tasks: Vec<TaskScore>,
}

/// Answers `questions` in batches of `batch_size` sequences.
pub fn exact_match(model: &LoadedModel, questions: &[Question], batch_size: usize) -> Result<EvalReport> {
    let template = model.chat_template.as_ref().ok_or_else(|| TrainError::Invalid("the model has no chat template to ask questions with".into()))?;
    let asked: Vec<[ChatMessage; 1]> = questions.iter().map(|q| [ChatMessage::new("user", &q.prompt)]).collect();
    let conversations: Vec<(&[ChatMessage], bool)> = asked.iter().map(|messages| (&messages[..], true)).collect();
    let mut prompts = template.render_all(&conversations)?.into_iter();
    let mut tasks: Vec<TaskScore> = Vec::new();
    for chunk in questions.chunks(batch_size.max(1)) {
        let requests = chunk
            .iter()
            .zip(prompts.by_ref())
            .map(|(q, text)| {
                let max_tokens = model.tokenizer.encode(&q.answer, false)?.len() + 8;
                Ok(GenerationRequest { prompt: model.tokenizer.encode(&text?, false)?, max_tokens, ..Default::default() })
            })
            .collect::<llm_engine::Result<Vec<_>>>()?;
        let (completions, _) = llm_engine::generate(&model.model, &model.tokenizer, &requests, |_| std::ops::ControlFlow::Continue(()))?;
        for (q, completion) in chunk.iter().zip(completions) {
            let score = match tasks.iter_mut().find(|t| t.task == q.task) {
                Some(score) => score,
                None => {
                    tasks.push(TaskScore { task: q.task.clone(), correct: 0, total: 0, accuracy: 0.0 });
                    tasks.last_mut().expect("just pushed")
                }
            };
            score.total += 1;
            score.correct += usize::from(completion.text.trim() == q.answer);
        }
    }
    let ratio = |correct: usize, total: usize| if total == 0 { 0.0 } else { correct as f64 / total as f64 };
    for t in &mut tasks {
        t.accuracy = ratio(t.correct, t.total);
    }
    let (correct, total) = tasks.iter().fold((0, 0), |(c, n), t| (c + t.correct, n + t.total));
    Ok(EvalReport { correct, total, accuracy: ratio(correct, total), tasks })
}
