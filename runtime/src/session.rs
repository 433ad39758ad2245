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
        Ok(self.run(inputs)?)
    }

    fn params_changed(&mut self) {
        self.forget_params();
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
}

impl<E: Executor> Session<E> {
    pub fn new(exec: E, params: BTreeMap<String, Tensor>) -> Session<E> {
        let carried = carried_values(exec.graph());
        Session { exec, params, carried, state: BTreeMap::new() }
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    pub fn params(&self) -> &BTreeMap<String, Tensor> {
        &self.params
    }

    /// Start new sequences: every carried value becomes zeros for `batch` rows.
    pub fn reset(&mut self, batch: usize) {
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

    pub fn state(&self) -> &BTreeMap<String, Tensor> {
        &self.state
    }

    /// Run on `inputs` continuing from the carried state, then keep the new state.
    /// The outputs include the new state values too.
    pub fn step(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
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
