//! The optimiser side of a training step: AdamW with decoupled weight decay (PyTorch's
//! `torch.optim.AdamW`), the warmup + cosine learning-rate schedule of transformers'
//! `get_cosine_schedule_with_warmup`, and clipping by the global gradient norm.

use candle_core::{Tensor, Var};

use crate::error::Result;

pub struct AdamW {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(params: Vec<Var>, weight_decay: f64) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        let m = params.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self { params, m, v, steps: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay })
    }

    /// The moment estimates and the number of steps taken, for checkpoints.
    pub fn state(&self) -> (&[Tensor], &[Tensor], usize) {
        (&self.m, &self.v, self.steps)
    }

    /// Continues from a checkpoint's [`AdamW::state`].
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, steps: usize) -> Result<()> {
        if m.len() != self.params.len() || v.len() != self.params.len() {
            return Err(crate::error::TrainError::Invalid("the checkpoint's optimizer state does not fit the model".into()));
        }
        (self.m, self.v, self.steps) = (m, v, steps);
        Ok(())
    }

    /// One update with `grads[i]` for parameter `i`. Weight decay applies to matrices only
    /// (not to norms), as transformers' Trainer groups parameters.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, (param, grad)) in self.params.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * self.beta1)? + (grad * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + self.eps)?)?;
            let decay = if param.rank() >= 2 { 1.0 - lr * self.weight_decay } else { 1.0 };
            param.set(&((param.as_tensor() * decay)? - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at `total`.
pub fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        assert_eq!(learning_rate(1.0, 0, 10, 110), 0.0);
        assert!((learning_rate(1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, 110, 10, 110).abs() < 1e-12);
    }

    /// One AdamW step moves each weight by about lr (Adam's normalised first step) and
    /// decays matrices only.
    #[test]
    fn adamw_first_step() {
        let device = candle_core::Device::Cpu;
        let matrix = Var::from_tensor(&Tensor::new(&[[1.0f32, -1.0]], &device).unwrap()).unwrap();
        let vector = Var::from_tensor(&Tensor::new(&[1.0f32], &device).unwrap()).unwrap();
        let mut adam = AdamW::new(vec![matrix.clone(), vector.clone()], 0.1).unwrap();
        let grads = [Tensor::new(&[[0.5f32, -2.0]], &device).unwrap(), Tensor::new(&[3.0f32], &device).unwrap()];
        adam.step(&grads, 0.01).unwrap();
        let m = matrix.as_tensor().to_vec2::<f32>().unwrap();
        assert!((m[0][0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-5, "{m:?}");
        assert!((m[0][1] - (-(1.0 - 0.001) + 0.01)).abs() < 1e-5, "{m:?}");
        assert!((vector.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.99).abs() < 1e-5);
    }
}
