//! The training loop: micro-batches through the forward + backward graph, gradient
//! accumulation, an optional gradient hook (NeuronSpark's natural-gradient compensation), global
//! clipping, Adam/AdamW with parameter groups and the warmup + cosine schedule.

use super::checkpoint::{self, TrainerState};
use super::data::{Batch, Cursor, PackedData};
use super::optim::{clip_grad_norm, Adam, Group, OptimizerKind};
use super::schedule::Schedule;
use crate::session::{carried_values, AdamUpdate, Executor};
use crate::RuntimeError;
use sparkc_ir::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Hyper-parameters of a run (spec §14 defaults where it has them).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence (T).
    pub seq_len: usize,
    pub grad_accum: usize,
    /// Optimizer steps.
    pub steps: u64,
    pub lr: f64,
    /// Learning-rate multiplier of the neuron parameter group.
    pub neuron_lr_scale: f64,
    /// Warmup in micro-batches.
    pub warmup: u64,
    pub min_lr_ratio: f64,
    pub optimizer: OptimizerKind,
    /// Weight decay of the non-neuron group (the neuron group has none).
    pub weight_decay: f64,
    pub clip: f64,
    /// Natural-gradient compensation (spec §7).
    pub compensate: bool,
    pub c_max: f64,
    /// Weight of the ponder cost in the loss (0 disables the term).
    pub ponder_weight: f64,
    pub seed: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub eval_fraction: f64,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 8,
            seq_len: 64,
            grad_accum: 1,
            steps: 600,
            lr: 2e-3,
            neuron_lr_scale: 10.0,
            warmup: 50,
            min_lr_ratio: 0.1,
            optimizer: OptimizerKind::Adam,
            weight_decay: 0.0,
            clip: 1.0,
            compensate: true,
            c_max: 100.0,
            ponder_weight: 0.01,
            seed: 0,
            eval_every: 50,
            eval_batches: 8,
            eval_fraction: 0.05,
            checkpoint_every: 100,
            keep_checkpoints: 3,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [("batch_size", self.batch_size), ("seq_len", self.seq_len), ("grad_accum", self.grad_accum)];
        for (k, v) in positive {
            if v == 0 {
                return Err(format!("`{k}` must be positive"));
            }
        }
        if self.steps == 0 {
            return Err("`steps` must be positive".into());
        }
        for (k, v) in [("lr", self.lr), ("clip", self.clip), ("c_max", self.c_max), ("neuron_lr_scale", self.neuron_lr_scale)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("`{k}` must be a positive number, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(format!("`eval_fraction` must be in [0, 1), got {}", self.eval_fraction));
        }
        Ok(())
    }
}

/// What the loop reports.
#[derive(Clone, Debug)]
pub enum Event {
    Step { step: u64, loss: f64, lm_loss: f64, ponder_cost: f64, lr: f64, grad_norm: f64, tokens: u64 },
    Eval { step: u64, loss: f64 },
    Checkpoint { step: u64, path: PathBuf },
}

/// Rewrites gradients in place, given the parameters.
pub type GradRewrite = Box<dyn Fn(&mut BTreeMap<String, Tensor>, &BTreeMap<String, Tensor>) -> Result<(), String>>;

/// Rewrites some gradients before clipping, given the parameters.
pub struct GradHook {
    /// The gradients (and parameters) the rewrite reads and writes: when the gradients stay
    /// on the device, only these come to the host for it.
    pub keys: Vec<String>,
    pub rewrite: GradRewrite,
}

pub struct Trainer<E: Executor> {
    exec: E,
    pub cfg: TrainConfig,
    /// The parameters as of the last checkpoint when training on a device (which holds the
    /// current ones): read them through [`Trainer::parameters`].
    pub params: BTreeMap<String, Tensor>,
    groups: BTreeMap<String, Group>,
    opt: Adam,
    data: PackedData,
    pub state: TrainerState,
    hook: Option<GradHook>,
    checkpoint_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("the loss became {value} at step {step} (micro-batch {micro}); stopping. {last_good}")]
    NonFinite { step: u64, micro: u64, value: f64, last_good: String },
    #[error("{0}")]
    Config(String),
}

impl<E: Executor> Trainer<E> {
    /// `exec` runs the training graph: inputs `input_ids`, `target_ids`, `loss_mask` and the
    /// carried state; outputs `total_loss`, `lm_loss`, `ponder_cost` and `grad.<param>`.
    /// `neuron_params` are the keys of the neuron group (lr × `neuron_lr_scale`, no decay).
    pub fn new(
        exec: E,
        params: BTreeMap<String, Tensor>,
        neuron_params: &[String],
        data: PackedData,
        cfg: TrainConfig,
        model_config: String,
        hook: Option<GradHook>,
        checkpoint_dir: &Path,
    ) -> Result<Trainer<E>, TrainError> {
        cfg.validate().map_err(TrainError::Config)?;
        let groups = params
            .keys()
            .map(|k| {
                let neuron = neuron_params.contains(k);
                let g = if neuron { Group { lr_scale: cfg.neuron_lr_scale, weight_decay: 0.0 } } else { Group { lr_scale: 1.0, weight_decay: cfg.weight_decay } };
                (k.clone(), g)
            })
            .collect();
        let state = TrainerState { step: 0, micro: 0, cursor: Cursor { epoch: 0, position: 0 }, tokens_seen: 0, optimizer_t: 0, seed: cfg.seed, model_config };
        let opt = Adam::new(cfg.optimizer);
        Ok(Trainer { exec, cfg, params, groups, opt, data, state, hook, checkpoint_dir: checkpoint_dir.to_path_buf() })
    }

    /// Continue from a checkpoint directory written by [`Trainer::save`].
    pub fn resume(&mut self, dir: &Path) -> Result<(), TrainError> {
        let loaded = checkpoint::load(dir)?;
        if loaded.state.model_config != self.state.model_config {
            return Err(TrainError::Config(format!("checkpoint {} was made for another model config", dir.display())));
        }
        if loaded.state.seed != self.cfg.seed {
            return Err(TrainError::Config(format!("checkpoint {} used seed {}, this run {}", dir.display(), loaded.state.seed, self.cfg.seed)));
        }
        for (k, t) in &loaded.params {
            match self.params.get(k) {
                Some(p) if p.shape == t.shape => {}
                _ => return Err(TrainError::Config(format!("checkpoint parameter `{k}` does not fit the model"))),
            }
        }
        self.params = loaded.params;
        self.exec.params_changed();
        self.opt.load_state(loaded.state.optimizer_t, &loaded.optimizer).map_err(TrainError::Config)?;
        if let Some(dev) = self.exec.device_training() {
            dev.load_moments(&self.opt.state_tensors())?;
            self.opt.m.clear();
            self.opt.v.clear();
        }
        self.state = loaded.state;
        Ok(())
    }

    pub fn data(&self) -> &PackedData {
        &self.data
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            base: self.cfg.lr,
            warmup: self.cfg.warmup,
            total: self.cfg.steps * self.cfg.grad_accum as u64,
            min_ratio: self.cfg.min_lr_ratio,
        }
    }

    fn feed(&self, batch: &Batch) -> BTreeMap<String, Tensor> {
        let b = batch.input_ids.shape[0];
        let mut inputs: BTreeMap<String, Tensor> = carried_values(self.exec.graph())
            .into_iter()
            .map(|(name, row)| {
                let mut shape = vec![b];
                shape.extend(row);
                (name, Tensor::zeros(shape))
            })
            .collect();
        inputs.insert("input_ids".into(), batch.input_ids.clone());
        inputs.insert("target_ids".into(), batch.target_ids.clone());
        inputs.insert("loss_mask".into(), batch.loss_mask.clone());
        inputs
    }

    fn scalar(out: &BTreeMap<String, Tensor>, k: &str) -> f64 {
        out.get(k).map(|t| t.to_f32_vec()[0] as f64).unwrap_or(f64::NAN)
    }

    /// The device gradients and optimizer live on, when they do.
    pub fn device(&mut self) -> Option<&mut dyn crate::session::DeviceTraining> {
        self.exec.device_training()
    }

    /// Whether gradients, the optimizer and the current parameters live on the executor's
    /// device (the host `params` are then refreshed only for a checkpoint).
    pub fn trains_on_device(&mut self) -> bool {
        self.exec.device_training().is_some()
    }

    /// The loss output of a micro-batch, or the error that stops training when it is not finite.
    fn checked_loss(&self, out: &BTreeMap<String, Tensor>) -> Result<f64, TrainError> {
        let l = Self::scalar(out, "total_loss");
        if l.is_finite() {
            return Ok(l);
        }
        let last = checkpoint::latest(&self.checkpoint_dir)
            .map(|p| format!("The last good checkpoint is {}.", p.display()))
            .unwrap_or_else(|| "No checkpoint was written yet.".into());
        Err(TrainError::NonFinite { step: self.state.step + 1, micro: self.state.micro + 1, value: l, last_good: last })
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn step(&mut self) -> Result<Event, TrainError> {
        if self.trains_on_device() {
            return self.step_on_device();
        }
        let accum = self.cfg.grad_accum;
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let (mut loss, mut lm, mut ponder, mut tokens) = (0.0, 0.0, 0.0, 0u64);
        for _ in 0..accum {
            let batch = self.data.next_batch(self.cfg.batch_size, self.cfg.seed, &mut self.state.cursor);
            let out = self.exec.execute(&self.feed(&batch), &self.params)?;
            let l = self.checked_loss(&out)?;
            loss += l / accum as f64;
            lm += Self::scalar(&out, "lm_loss") / accum as f64;
            ponder += Self::scalar(&out, "ponder_cost") / accum as f64;
            tokens += batch.tokens as u64;
            for (k, g) in out {
                let Some(name) = k.strip_prefix("grad.") else { continue };
                let g = g.into_f32().unwrap_or_default();
                match grads.get_mut(name).and_then(|t| t.as_f32_mut()) {
                    Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b / accum as f32),
                    None => {
                        let shape = self.params.get(name).map(|p| p.shape.clone()).unwrap_or_else(|| vec![g.len()]);
                        grads.insert(name.to_string(), Tensor::f32(shape, g.iter().map(|v| v / accum as f32).collect()));
                    }
                }
            }
            self.state.micro += 1;
        }
        if let Some(hook) = &self.hook {
            (hook.rewrite)(&mut grads, &self.params).map_err(TrainError::Config)?;
        }
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.clip);
        let lr = self.schedule().lr(self.state.micro - 1);
        self.opt.step(&mut self.params, &grads, lr, &self.groups);
        self.exec.params_changed();
        self.state.step += 1;
        self.state.tokens_seen += tokens;
        self.state.optimizer_t = self.opt.t;
        Ok(Event::Step { step: self.state.step, loss, lm_loss: lm, ponder_cost: ponder, lr, grad_norm, tokens })
    }

    /// [`Trainer::step`] with the gradients left where the backward produced them: they are
    /// accumulated, clipped and applied by Adam on the device; only the loss scalars (and the
    /// few gradients a hook rewrites) come to the host.
    fn step_on_device(&mut self) -> Result<Event, TrainError> {
        let accum = self.cfg.grad_accum;
        let (mut loss, mut lm, mut ponder, mut tokens) = (0.0, 0.0, 0.0, 0u64);
        for micro in 0..accum {
            let batch = self.data.next_batch(self.cfg.batch_size, self.cfg.seed, &mut self.state.cursor);
            let feed = self.feed(&batch);
            let dev = self.exec.device_training().expect("checked by `step`");
            let out = dev.accumulate(&feed, &self.params, 1.0 / accum as f32, micro == 0)?;
            let l = self.checked_loss(&out)?;
            loss += l / accum as f64;
            lm += Self::scalar(&out, "lm_loss") / accum as f64;
            ponder += Self::scalar(&out, "ponder_cost") / accum as f64;
            tokens += batch.tokens as u64;
            self.state.micro += 1;
        }
        let lr = self.schedule().lr(self.state.micro - 1);
        let dev = self.exec.device_training().expect("checked by `step`");
        if let Some(hook) = &self.hook {
            let mut grads = dev.gradients(&hook.keys)?;
            let params = dev.parameters(&hook.keys)?;
            (hook.rewrite)(&mut grads, &params).map_err(TrainError::Config)?;
            dev.set_gradients(&grads)?;
        }
        let grad_norm = dev.gradient_norm()?;
        // torch.nn.utils.clip_grad_norm_, as `clip_grad_norm` does on the host.
        let coef = self.cfg.clip / (grad_norm + 1e-6);
        self.opt.t += 1;
        let update = AdamUpdate {
            beta1: self.opt.beta1,
            beta2: self.opt.beta2,
            eps: self.opt.eps,
            t: self.opt.t,
            decoupled: self.opt.kind == OptimizerKind::Adamw,
            grad_scale: coef.min(1.0),
        };
        let groups = &self.groups;
        let group = |name: &str| {
            let g = groups.get(name).copied().unwrap_or(Group { lr_scale: 1.0, weight_decay: 0.0 });
            (lr * g.lr_scale, g.weight_decay)
        };
        dev.adam_step(&update, &group)?;
        self.state.step += 1;
        self.state.tokens_seen += tokens;
        self.state.optimizer_t = self.opt.t;
        Ok(Event::Step { step: self.state.step, loss, lm_loss: lm, ponder_cost: ponder, lr, grad_norm, tokens })
    }

    /// Mean held-out loss (LM loss, token-weighted) over the first `eval_batches` batches.
    pub fn evaluate(&mut self) -> Result<Option<f64>, TrainError> {
        let batches = self.data.eval_batches(self.cfg.batch_size, self.cfg.eval_batches);
        if batches.is_empty() {
            return Ok(None);
        }
        let (mut sum, mut n) = (0.0, 0.0);
        for b in &batches {
            let out = self.exec.execute(&self.feed(b), &self.params)?;
            sum += Self::scalar(&out, "lm_loss") * b.tokens as f64;
            n += b.tokens as f64;
        }
        Ok(Some(sum / n))
    }

    /// Write a checkpoint (bringing parameters and moments from the device first, if there).
    pub fn save(&mut self) -> Result<PathBuf, TrainError> {
        let moments = match self.exec.device_training() {
            Some(dev) => {
                self.params = dev.all_parameters()?;
                dev.moments()?
            }
            None => self.opt.state_tensors(),
        };
        Ok(checkpoint::save(&self.checkpoint_dir, &self.params, &moments, &self.state, self.cfg.keep_checkpoints)?)
    }

    /// The current parameters (from the device when they live there).
    pub fn parameters(&mut self) -> Result<&BTreeMap<String, Tensor>, TrainError> {
        if let Some(dev) = self.exec.device_training() {
            self.params = dev.all_parameters()?;
        }
        Ok(&self.params)
    }
}
