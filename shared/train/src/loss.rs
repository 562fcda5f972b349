//! Training losses over right-padded batches: next-token cross-entropy on the positions the
//! mask selects, and knowledge distillation (DistilBERT / torchtune's forward KL):
//! `α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·CE(labels)`.

use candle_core::{DType, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

use crate::error::{Result, TrainError};

/// Mean cross-entropy of predicting each token from those before it, over positions whose
/// `mask` (`[b, s]`, 1 = counts) is set for the predicted token.
pub fn causal_lm_loss(logits: &Tensor, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, s, vocab) = logits.dims3()?;
    let predictions = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), vocab))?;
    let targets = tokens.narrow(1, 1, s - 1)?.flatten_all()?;
    let weights = mask.narrow(1, 1, s - 1)?.flatten_all()?.to_dtype(DType::F32)?;
    let log_probs = log_softmax(&predictions, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let total = weights.sum_all()?.to_scalar::<f32>()?;
    if total == 0.0 {
        return Err(TrainError::Invalid("a batch has no position to learn from (all masked)".into()));
    }
    Ok((picked.mul(&weights)?.sum_all()?.neg()? / total as f64)?)
}

/// The distillation loss of `student` logits against `teacher` logits (both `[b, s, vocab]`)
/// at temperature `t`, mixed with the labels' cross-entropy by `alpha`.
pub fn distillation_loss(student: &Tensor, teacher: &Tensor, tokens: &Tensor, mask: &Tensor, t: f64, alpha: f64) -> Result<Tensor> {
    let (b, s, vocab) = student.dims3()?;
    let ce = causal_lm_loss(student, tokens, mask)?;
    let flat = |x: &Tensor| -> Result<Tensor> { Ok((x.narrow(1, 0, s - 1)?.reshape((b * (s - 1), vocab))? / t)?) };
    let student_log = log_softmax(&flat(student)?, D::Minus1)?;
    let teacher_flat = flat(&teacher.detach())?;
    let teacher_p = softmax(&teacher_flat, D::Minus1)?;
    let teacher_log = log_softmax(&teacher_flat, D::Minus1)?;
    let kl = (teacher_p * (teacher_log - student_log)?)?.sum(D::Minus1)?;
    let weights = mask.narrow(1, 1, s - 1)?.flatten_all()?.to_dtype(DType::F32)?;
    let total = weights.sum_all()?.to_scalar::<f32>()? as f64;
    let kl = (kl.mul(&weights)?.sum_all()? / total.max(1.0))?;
    Ok(((kl * (alpha * t * t))? + (ce * (1.0 - alpha))?)?)
}
