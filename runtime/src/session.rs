//! A session owns a compiled program, its parameters and the state it carries between calls.
//!
//! Which values are state is read off the graph, not assumed: every graph input that has a
//! graph output of the same name is carried (the output of one call feeds the next).

use crate::RuntimeError;
use sparkc_backend_cpu::CpuProgram;
use sparkc_ir::{Graph, Tensor};
use std::collections::BTreeMap;

/// Something that runs a graph on named inputs: a CPU program or a GPU program.
pub trait Executor {
    fn graph(&self) -> &Graph;
    /// Run with `params`. A device executor keeps copies and re-uploads a parameter only when
    /// its host buffer is another one, or after [`Executor::params_changed`].
    fn execute(&mut self, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError>;

    /// The parameters were updated in place (an optimizer step): device copies are stale.
    fn params_changed(&mut self) {}

    /// Start `batch` new sequences with the carried values kept by the executor itself (on
    /// the device): `execute` then neither takes nor returns them. `false` when the executor
    /// does not keep state (the session then carries it on the host).
    fn start_sequences(&mut self, _batch: usize) -> Result<bool, RuntimeError> {
        Ok(false)
    }

    /// Gradient accumulation and the optimizer on the executor's device, when it has one.
    fn device_training(&mut self) -> Option<&mut dyn DeviceTraining> {
        None
    }
}

pub use sparkc_backend_cuda::AdamUpdate;

/// Training with the gradients left on the device that computed them. The executor then owns
/// the up-to-date parameters and the Adam moments; the host copies are refreshed on request.
pub trait DeviceTraining {
    /// Run the training graph and add `scale` × each `grad.<param>` into the accumulators
    /// (`first`: overwrite them); returns the other outputs.
    fn accumulate(&mut self, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>, scale: f32, first: bool) -> Result<BTreeMap<String, Tensor>, RuntimeError>;
    /// The global L2 norm of the accumulated gradients.
    fn gradient_norm(&mut self) -> Result<f64, RuntimeError>;
    /// One Adam step of every parameter with a gradient; `group` gives its learning rate and
    /// weight decay.
    fn adam_step(&mut self, update: &AdamUpdate, group: &dyn Fn(&str) -> (f64, f64)) -> Result<(), RuntimeError>;
    fn gradients(&mut self, names: &[String]) -> Result<BTreeMap<String, Tensor>, RuntimeError>;
    fn set_gradients(&mut self, grads: &BTreeMap<String, Tensor>) -> Result<(), RuntimeError>;
    fn parameters(&mut self, names: &[String]) -> Result<BTreeMap<String, Tensor>, RuntimeError>;
    /// Every parameter; later runs given exactly these host tensors need no upload.
    fn all_parameters(&mut self) -> Result<BTreeMap<String, Tensor>, RuntimeError>;
    /// Adam moments as `m.<name>` / `v.<name>`.
    fn moments(&mut self) -> Result<BTreeMap<String, Tensor>, RuntimeError>;
    fn load_moments(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), RuntimeError>;
    /// Time every node of later steps (`on`), or stop.
    fn set_profiling(&mut self, on: bool);
    /// Device time per kind of node since profiling started: (what, calls, milliseconds).
    fn profile(&mut self) -> Result<Vec<(String, usize, f64)>, RuntimeError>;
}

impl DeviceTraining for sparkc_backend_cuda::GpuProgram {
    fn accumulate(&mut self, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>, scale: f32, first: bool) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        self.set_params(params)?;
        Ok(self.accumulate_gradients(inputs, scale, first)?)
    }

    fn gradient_norm(&mut self) -> Result<f64, RuntimeError> {
        Ok(sparkc_backend_cuda::GpuProgram::gradient_norm(self)?)
    }

    fn adam_step(&mut self, update: &AdamUpdate, group: &dyn Fn(&str) -> (f64, f64)) -> Result<(), RuntimeError> {
        Ok(self.adam_update(update, group)?)
    }

    fn gradients(&mut self, names: &[String]) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        Ok(self.download_gradients(names)?)
    }

    fn set_gradients(&mut self, grads: &BTreeMap<String, Tensor>) -> Result<(), RuntimeError> {
        Ok(self.upload_gradients(grads)?)
    }

    fn parameters(&mut self, names: &[String]) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        Ok(self.param_values(names)?)
    }

    fn all_parameters(&mut self) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        Ok(self.download_params()?)
    }

    fn moments(&mut self) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        Ok(self.download_moments()?)
    }

    fn load_moments(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), RuntimeError> {
        Ok(sparkc_backend_cuda::GpuProgram::load_moments(self, tensors)?)
    }

    fn set_profiling(&mut self, on: bool) {
        sparkc_backend_cuda::GpuProgram::set_profiling(self, on)
    }

    fn profile(&mut self) -> Result<Vec<(String, usize, f64)>, RuntimeError> {
        Ok(sparkc_backend_cuda::GpuProgram::profile(self)?)
    }
}

impl Executor for CpuProgram {
    fn graph(&self) -> &Graph {
        CpuProgram::graph(self)
    }

    fn execute(&mut self, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        Ok(self.run(inputs, params)?)
    }
}

impl Executor for sparkc_backend_cuda::GpuProgram {
    fn graph(&self) -> &Graph {
        sparkc_backend_cuda::GpuProgram::graph(self)
    }

    fn execute(&mut self, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        self.set_params(params)?;
        if self.keeps_state() {
            Ok(self.run_resident(inputs)?)
        } else {
            Ok(self.run(inputs)?)
        }
    }

    fn params_changed(&mut self) {
        self.forget_params();
    }

    fn start_sequences(&mut self, batch: usize) -> Result<bool, RuntimeError> {
        sparkc_backend_cuda::GpuProgram::start_sequences(self, batch)?;
        Ok(true)
    }

    fn device_training(&mut self) -> Option<&mut dyn DeviceTraining> {
        Some(self)
    }
}

impl Executor for Box<dyn Executor> {
    fn graph(&self) -> &Graph {
        (**self).graph()
    }

    fn execute(&mut self, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        (**self).execute(inputs, params)
    }

    fn params_changed(&mut self) {
        (**self).params_changed()
    }

    fn start_sequences(&mut self, batch: usize) -> Result<bool, RuntimeError> {
        (**self).start_sequences(batch)
    }

    fn device_training(&mut self) -> Option<&mut dyn DeviceTraining> {
        (**self).device_training()
    }
}

/// The names and per-row shapes of the carried values of a graph.
pub fn carried_values(graph: &Graph) -> Vec<(String, Vec<usize>)> {
    graph
        .inputs()
        .into_iter()
        .filter(|(_, name, _)| graph.output(name).is_some())
        .map(|(_, name, ty)| {
            // State is [B, ...]: the per-row shape is everything after the batch dim.
            let row: Vec<usize> = ty.shape.dims()[1..].iter().map(|d| d.as_const().unwrap_or(0) as usize).collect();
            (name.to_string(), row)
        })
        .collect()
}

pub struct Session<E: Executor> {
    exec: E,
    params: BTreeMap<String, Tensor>,
    carried: Vec<(String, Vec<usize>)>,
    state: BTreeMap<String, Tensor>,
    /// New sequences asked for by `reset`, started at the next step (starting can fail).
    pending: Option<usize>,
    /// The executor keeps the carried values (on the device); `state` stays empty.
    kept_by_executor: bool,
}

impl<E: Executor> Session<E> {
    pub fn new(exec: E, params: BTreeMap<String, Tensor>) -> Session<E> {
        let carried = carried_values(exec.graph());
        Session { exec, params, carried, state: BTreeMap::new(), pending: None, kept_by_executor: false }
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    /// The executor, to tune or instrument it (e.g. profiling); the session's state stays as is.
    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.exec
    }

    pub fn params(&self) -> &BTreeMap<String, Tensor> {
        &self.params
    }

    /// Start new sequences: every carried value becomes zeros for `batch` rows. An executor
    /// that keeps state on its device is told at the next step.
    pub fn reset(&mut self, batch: usize) {
        self.pending = Some(batch);
        self.kept_by_executor = false;
        self.state = self
            .carried
            .iter()
            .map(|(name, row)| {
                let mut shape = vec![batch];
                shape.extend(row);
                (name.clone(), Tensor::zeros(shape))
            })
            .collect();
    }

    /// The carried values, when the session holds them (empty while the executor keeps them).
    pub fn state(&self) -> &BTreeMap<String, Tensor> {
        &self.state
    }

    /// Run on `inputs` continuing from the carried state, then keep the new state. The
    /// outputs include the new state values too, unless the executor keeps them (on the GPU).
    pub fn step(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        if let Some(batch) = self.pending.take() {
            if self.exec.start_sequences(batch)? {
                self.kept_by_executor = true;
                self.state.clear();
            }
        }
        if self.kept_by_executor {
            return self.exec.execute(&inputs, &self.params);
        }
        if self.state.is_empty() && !self.carried.is_empty() {
            return Err(RuntimeError::Usage("call `reset(batch)` before the first step".into()));
        }
        for (k, v) in &self.state {
            inputs.insert(k.clone(), v.clone());
        }
        let out = self.exec.execute(&inputs, &self.params)?;
        for (name, _) in &self.carried {
            if let Some(t) = out.get(name) {
                self.state.insert(name.clone(), t.clone());
            }
        }
        Ok(out)
    }
}
