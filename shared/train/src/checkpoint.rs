//! Checkpoints that resume a run exactly: the trainable weights, AdamW's moments and step
//! count, and where the run was in its data, in `<output>/checkpoint/`. A checkpoint is
//! written under a temporary name and renamed, so the last complete one survives a crash (or
//! a NaN loss) mid-write.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::AdamW;

/// Where a run stands after `step` optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub step: usize,
    /// Data position: the pass over the data and the next example in its order.
    pub epoch: u64,
    pub at: usize,
}

pub fn dir(output: &Path) -> PathBuf {
    output.join("checkpoint")
}

pub fn save(output: &Path, params: &[(String, Var)], optimizer: &AdamW, progress: Progress) -> Result<()> {
    let partial = output.join("checkpoint.partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| TrainError::file(&partial, e))?;
    let (m, v, steps) = optimizer.state();
    let mut tensors = HashMap::new();
    for (i, (name, var)) in params.iter().enumerate() {
        tensors.insert(format!("param.{name}"), var.as_tensor().clone());
        tensors.insert(format!("adam_m.{name}"), m[i].clone());
        tensors.insert(format!("adam_v.{name}"), v[i].clone());
    }
    let path = partial.join("state.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| TrainError::file(&path, e))?;
    let state = serde_json::json!({"progress": progress, "optimizer_steps": steps});
    std::fs::write(partial.join("trainer_state.json"), state.to_string()).map_err(|e| TrainError::file(&partial, e))?;
    let _ = std::fs::remove_dir_all(dir(output));
    std::fs::rename(&partial, dir(output)).map_err(|e| TrainError::file(dir(output), e))
}

/// Restores `params` and `optimizer` from `output`'s checkpoint; `None` when there is none.
pub fn load(output: &Path, params: &[(String, Var)], optimizer: &mut AdamW) -> Result<Option<Progress>> {
    let dir = dir(output);
    let state_path = dir.join("trainer_state.json");
    if !state_path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::file(&state_path, e))?;
    let state: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::file(&state_path, e))?;
    let progress: Progress = serde_json::from_value(state["progress"].clone()).map_err(|e| TrainError::file(&state_path, e))?;
    let steps = state["optimizer_steps"].as_u64().ok_or_else(|| TrainError::file(&state_path, "no optimizer_steps"))? as usize;
    let path = dir.join("state.safetensors");
    let device = params.first().map_or(Device::Cpu, |(_, var)| var.device().clone());
    let mut tensors = candle_core::safetensors::load(&path, &device).map_err(|e| TrainError::file(&path, e))?;
    let mut take =
        |key: String| tensors.remove(&key).ok_or_else(|| TrainError::file(&path, format!("no {key}: the checkpoint is from another model or method")));
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (name, var) in params {
        let value: Tensor = take(format!("param.{name}"))?;
        var.set(&value).map_err(|e| TrainError::file(&path, format!("{name}: {e}")))?;
        m.push(take(format!("adam_m.{name}"))?);
        v.push(take(format!("adam_v.{name}"))?);
    }
    optimizer.restore(m, v, steps)?;
    Ok(Some(progress))
}

/// Drops the checkpoint once the run's result is written.
pub fn remove(output: &Path) {
    let _ = std::fs::remove_dir_all(dir(output));
}
