//! Offline soft targets for distillation: the teacher's top-k logits at every position of every
//! training example, computed once, stored as safetensors and reused by later runs (another
//! student, other hyper-parameters) without running the teacher again.
//!
//! The distillation loss then sees the teacher's distribution renormalised over its top k
//! tokens (the rest of the vocabulary gets probability 0), the usual sparse approximation.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::finetune::pad;
use crate::model::TrainLlama;

/// The logit given to tokens outside the top k: softmax sends it to exactly 0 at any
/// temperature, while staying finite so that `0 × log 0` terms of the KL vanish.
const ABSENT: f32 = -1e9;

pub struct SoftTargets {
    k: usize,
    vocab: usize,
    /// First position of each example in `indices` / `values` (rows of `k`).
    offsets: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f32>,
}

impl SoftTargets {
    /// Reads `path` when it exists (and was computed for these examples), else computes the
    /// targets with the teacher `load_teacher` gives and writes them to `path`.
    pub fn load_or_compute(path: &Path, examples: &[Example], k: usize, batch_size: usize, load_teacher: impl FnOnce() -> Result<TrainLlama>) -> Result<Self> {
        if path.exists() {
            return Self::load(path, examples);
        }
        let targets = Self::compute(&load_teacher()?, examples, k, batch_size)?;
        targets.save(path, examples)?;
        Ok(targets)
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    fn compute(teacher: &TrainLlama, examples: &[Example], k: usize, batch_size: usize) -> Result<Self> {
        let vocab = teacher.config().vocab_size;
        if k == 0 || k > vocab {
            return Err(TrainError::Invalid(format!("the soft targets' k must be between 1 and the vocabulary size {vocab}")));
        }
        let mut targets = Self { k, vocab, offsets: Vec::with_capacity(examples.len()), indices: Vec::new(), values: Vec::new() };
        for chunk in examples.chunks(batch_size.max(1)) {
            let batch: Vec<&Example> = chunk.iter().collect();
            let (ids, _) = pad(&batch, teacher.device())?;
            let logits = teacher.forward(&ids, None)?.to_device(&Device::Cpu)?.to_vec3::<f32>()?;
            for (example, rows) in chunk.iter().zip(logits) {
                targets.offsets.push(targets.indices.len() / k);
                for row in rows.into_iter().take(example.ids.len()) {
                    let mut order: Vec<u32> = (0..vocab as u32).collect();
                    order.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
                    order.truncate(k);
                    targets.values.extend(order.iter().map(|&i| row[i as usize]));
                    targets.indices.extend(order);
                }
            }
        }
        Ok(targets)
    }

    /// The tensors, with the examples' token ids so that a later run can tell whether the file
    /// belongs to its data.
    fn save(&self, path: &Path, examples: &[Example]) -> Result<()> {
        let rows = self.indices.len() / self.k;
        let (tokens, lengths) = fingerprint(examples);
        let cpu = &Device::Cpu;
        let tensors = HashMap::from([
            ("tokens".to_string(), Tensor::from_vec(tokens.clone(), tokens.len(), cpu)?),
            ("lengths".to_string(), Tensor::from_vec(lengths.clone(), lengths.len(), cpu)?),
            ("vocab".to_string(), Tensor::from_vec(vec![self.vocab as u32], 1, cpu)?),
            ("indices".to_string(), Tensor::from_vec(self.indices.clone(), (rows, self.k), cpu)?),
            ("values".to_string(), Tensor::from_vec(self.values.clone(), (rows, self.k), cpu)?),
        ]);
        // Written under a temporary name: an interrupted run never leaves a half file to reuse.
        let partial = path.with_extension("partial");
        candle_core::safetensors::save(&tensors, &partial).map_err(|e| TrainError::file(&partial, e))?;
        std::fs::rename(&partial, path).map_err(|e| TrainError::file(path, e))
    }

    fn load(path: &Path, examples: &[Example]) -> Result<Self> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| TrainError::file(path, e))?;
        let mut take = |name: &str| tensors.remove(name).ok_or_else(|| TrainError::file(path, format!("not a soft-targets file: no `{name}` tensor")));
        let (tokens, lengths, vocab, indices, values) = (take("tokens")?, take("lengths")?, take("vocab")?, take("indices")?, take("values")?);
        if (tokens.to_vec1::<u32>()?, lengths.to_vec1::<u32>()?) != fingerprint(examples) {
            return Err(TrainError::file(
                path,
                "these soft targets were computed for other data (or another tokenizer, --max-seq-len or --overflow): remove the file to compute them again",
            ));
        }
        let (rows, k) = indices.dims2()?;
        let vocab = vocab.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize;
        let indices = indices.flatten_all()?.to_vec1::<u32>()?;
        if values.dims2()? != (rows, k) || rows != examples.iter().map(|e| e.ids.len()).sum::<usize>() || indices.iter().any(|&i| i as usize >= vocab) {
            return Err(TrainError::file(path, "damaged soft-targets file: its tensors do not fit together"));
        }
        let offsets = examples.iter().scan(0, |at, e| Some(std::mem::replace(at, *at + e.ids.len()))).collect();
        Ok(Self { k, vocab, offsets, indices, values: values.flatten_all()?.to_vec1::<f32>()? })
    }

    /// Teacher logits for a batch of `examples` padded to `longest`: `[b, longest, vocab]`, the
    /// stored top k where known and [`ABSENT`] elsewhere (padding included).
    pub fn logits(&self, examples: &[usize], longest: usize, device: &Device) -> Result<Tensor> {
        let mut dense = vec![ABSENT; examples.len() * longest * self.vocab];
        for (row, &example) in examples.iter().enumerate() {
            let start = self.offsets[example];
            let len = self.offsets.get(example + 1).copied().unwrap_or(self.indices.len() / self.k) - start;
            for position in 0..len.min(longest) {
                let stored = (start + position) * self.k;
                let base = (row * longest + position) * self.vocab;
                for j in stored..stored + self.k {
                    dense[base + self.indices[j] as usize] = self.values[j];
                }
            }
        }
        Ok(Tensor::from_vec(dense, (examples.len(), longest, self.vocab), device)?)
    }
}

/// All examples' token ids, concatenated, and their lengths.
fn fingerprint(examples: &[Example]) -> (Vec<u32>, Vec<u32>) {
    (examples.iter().flat_map(|e| e.ids.iter().copied()).collect(), examples.iter().map(|e| e.ids.len() as u32).collect())
}
