//! Training on the device: the backward's gradients are accumulated where they are produced,
//! the global gradient norm is reduced there, and Adam / AdamW update the device parameters
//! (and the bf16 copies GEMMs read) in place. Per step only a few scalars cross to the host;
//! parameters and moments come down only for a checkpoint.

use crate::program::{grid, DevTensor, Emitted, GpuProgram};
use crate::CudaError;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use sparkc_ir::Tensor;
use std::collections::BTreeMap;

/// Gradient accumulators and Adam moments, by parameter name.
#[derive(Default)]
pub struct TrainingState {
    grads: BTreeMap<String, CudaSlice<f32>>,
    moments: BTreeMap<String, (CudaSlice<f32>, CudaSlice<f32>)>,
}

/// One Adam step: hyper-parameters, the step number t (from 1, for the bias corrections) and
/// the factor clipping put on every gradient.
#[derive(Clone, Copy, Debug)]
pub struct AdamUpdate {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub t: u64,
    /// AdamW (decoupled decay) instead of Adam (decay added to the gradient).
    pub decoupled: bool,
    pub grad_scale: f64,
}

/// Learning rate and weight decay of one parameter.
pub type ParamGroup<'a> = &'a dyn Fn(&str) -> (f64, f64);

impl GpuProgram {
    /// Run a training graph and add `scale` × each `grad.<param>` output into the device
    /// accumulators (`first`: overwrite them). Returns the other outputs, on the host.
    pub fn accumulate_gradients(&mut self, inputs: &BTreeMap<String, Tensor>, scale: f32, first: bool) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let mut grads = std::mem::take(&mut self.training.grads);
        let result = self.accumulate_into(&mut grads, inputs, scale, first);
        self.training.grads = grads;
        result
    }

    fn accumulate_into(&self, grads: &mut BTreeMap<String, CudaSlice<f32>>, inputs: &BTreeMap<String, Tensor>, scale: f32, first: bool) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let (env, fed) = self.upload_inputs(inputs)?;
        let st = &self.gpu.stream;
        let mut scalars = BTreeMap::new();
        self.walk(&env, fed, &mut |name, t| {
            let Some(param) = name.strip_prefix("grad.") else {
                scalars.insert(name.to_string(), self.download(t.get())?);
                return Ok(());
            };
            let fresh = first || !grads.contains_key(param);
            // A fresh unscaled gradient the graph is done with becomes the accumulator itself.
            let t = match t {
                Emitted::Owned(DevTensor::F32 { data, .. }) if fresh && scale == 1.0 && grads.get(param).is_none_or(|acc| acc.len() == data.len()) => {
                    grads.insert(param.to_string(), data);
                    return Ok(());
                }
                t => t,
            };
            let g = t.get().f32().ok_or_else(|| CudaError::Unsupported(format!("gradient `{name}` is not stored in f32")))?;
            let n = g.len();
            if !grads.contains_key(param) {
                // SAFETY: written in full by the first accumulation below.
                grads.insert(param.to_string(), drv!(unsafe { st.alloc::<f32>(n) }));
            }
            let acc = grads.get_mut(param).expect("inserted above");
            if acc.len() != n {
                return Err(CudaError::Input(format!("gradient `{name}` changed size")));
            }
            let (count, fresh) = (n as i64, fresh as i32);
            let mut b = st.launch_builder(self.f("sp_accumulate"));
            b.arg(acc).arg(g).arg(&scale).arg(&fresh).arg(&count);
            // SAFETY: acc and g hold n floats.
            unsafe { drv!(b.launch(grid(n))) };
            Ok(())
        })?;
        drv!(st.synchronize());
        Ok(scalars)
    }

    /// The L2 norm of all accumulated gradients together (what clipping compares).
    pub fn gradient_norm(&self) -> Result<f64, CudaError> {
        let st = &self.gpu.stream;
        let mut sum = drv!(st.alloc_zeros::<f64>(1));
        for g in self.training.grads.values() {
            let n = g.len();
            // A bounded grid: one atomic per block.
            let cfg = LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 1024) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let count = n as i64;
            let mut b = st.launch_builder(self.f("sp_sum_squares"));
            b.arg(&mut sum).arg(g).arg(&count);
            // SAFETY: g holds n floats; sum one double.
            unsafe { drv!(b.launch(cfg)) };
        }
        Ok(drv!(st.clone_dtoh(&sum))[0].sqrt())
    }

    /// Update every parameter that has an accumulated gradient.
    pub fn adam_update(&mut self, step: &AdamUpdate, group: ParamGroup) -> Result<(), CudaError> {
        let st = self.gpu.stream.clone();
        let bc1 = (1.0 - step.beta1.powi(step.t as i32)) as f32;
        let bc2 = (1.0 - step.beta2.powi(step.t as i32)) as f32;
        let (b1, b2, eps, gscale, decoupled) = (step.beta1 as f32, step.beta2 as f32, step.eps as f32, step.grad_scale as f32, step.decoupled as i32);
        let kernel = self.f("sp_adam").clone();
        let names: Vec<String> = self.training.grads.keys().cloned().collect();
        for name in names {
            let g = &self.training.grads[&name];
            let n = g.len();
            let Some(p) = self.params.get(&name).and_then(|p| p.f32()) else { continue };
            if p.len() != n {
                return Err(CudaError::Input(format!("gradient of `{name}` does not match the parameter")));
            }
            if !self.training.moments.contains_key(&name) {
                let m = drv!(st.alloc_zeros::<f32>(n));
                let v = drv!(st.alloc_zeros::<f32>(n));
                self.training.moments.insert(name.clone(), (m, v));
            }
            let (lr, wd) = group(&name);
            let (lr, wd) = (lr as f32, wd as f32);
            let (m, v) = &self.training.moments[&name];
            let p_ptr = p.device_ptr(&st).0;
            let m_ptr = m.device_ptr(&st).0;
            let v_ptr = v.device_ptr(&st).0;
            let bf_ptr: u64 = self.params_bf16.get(&name).map(|b| b.device_ptr(&st).0).unwrap_or(0);
            let count = n as i64;
            let mut b = st.launch_builder(&kernel);
            b.arg(&p_ptr).arg(&m_ptr).arg(&v_ptr).arg(&bf_ptr).arg(g).arg(&count);
            b.arg(&lr).arg(&wd).arg(&b1).arg(&b2).arg(&eps).arg(&bc1).arg(&bc2).arg(&gscale).arg(&decoupled);
            // SAFETY: p, m, v, g (and the bf16 copy, when not null) hold n elements; the kernel
            // writes p, m, v and the copy, which nothing else uses during the launch.
            unsafe { drv!(b.launch(grid(n))) };
        }
        // No wait here: the next step's work queues behind the update on the same stream, and
        // the host prepares the next batch meanwhile.
        Ok(())
    }

    /// The device parameters, on the host. Later runs given these very host tensors use the
    /// device copies without uploading them again.
    pub fn download_params(&mut self) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let mut out = BTreeMap::new();
        self.params_seen.clear();
        for (name, t) in &self.params {
            let host = self.download(t)?;
            let data = host.as_f32().expect("parameters are f32");
            self.uploaded_from.insert(name.clone(), (data.as_ptr() as usize, data.len()));
            out.insert(name.clone(), host);
        }
        Ok(out)
    }

    /// Some device parameters, on the host (a copy; later runs are not affected).
    pub fn param_values(&self, names: &[String]) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let mut tensors = Vec::new();
        for name in names {
            let t = self.params.get(name).ok_or_else(|| CudaError::Input(format!("no parameter `{name}` on the device")))?;
            let data = t.f32().ok_or_else(|| CudaError::Unsupported(format!("parameter `{name}` is not f32")))?;
            tensors.push((name, t.shape().to_vec(), data));
        }
        self.download_together(tensors)
    }

    /// Some accumulated gradients, on the host.
    pub fn download_gradients(&self, names: &[String]) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let mut tensors = Vec::new();
        for name in names {
            let g = self.training.grads.get(name).ok_or_else(|| CudaError::Input(format!("no gradient for `{name}` on the device")))?;
            let shape = self.params.get(name).map(|p| p.shape().to_vec()).unwrap_or_else(|| vec![g.len()]);
            tensors.push((name, shape, g));
        }
        self.download_together(tensors)
    }

    /// Small f32 tensors to the host through one staging buffer: device-to-device copies in
    /// stream order, then one transfer and one wait (a wait per tensor cost ~50 µs each; the
    /// gradient hook reads 120 tensors per step).
    fn download_together(&self, tensors: Vec<(&String, Vec<usize>, &CudaSlice<f32>)>) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let st = &self.gpu.stream;
        let total: usize = tensors.iter().map(|(_, _, d)| d.len()).sum();
        // SAFETY: every element is written by the copies below before the transfer reads it.
        let mut staging = drv!(unsafe { st.alloc::<f32>(total.max(1)) });
        let mut at = 0;
        for (_, _, d) in &tensors {
            drv!(st.memcpy_dtod(*d, &mut staging.slice_mut(at..at + d.len())));
            at += d.len();
        }
        let host = drv!(st.clone_dtoh(&staging));
        let mut out = BTreeMap::new();
        let mut at = 0;
        for (name, shape, d) in tensors {
            out.insert(name.clone(), Tensor::f32(shape, host[at..at + d.len()].to_vec()));
            at += d.len();
        }
        Ok(out)
    }

    /// Overwrite accumulated gradients with host values (after a host-side rewrite): one
    /// transfer into a staging buffer, then device-to-device copies.
    pub fn upload_gradients(&mut self, grads: &BTreeMap<String, Tensor>) -> Result<(), CudaError> {
        let st = self.gpu.stream.clone();
        let mut joined = Vec::new();
        for (name, t) in grads {
            let acc = self.training.grads.get(name).ok_or_else(|| CudaError::Input(format!("no gradient for `{name}` on the device")))?;
            let host = t.as_f32().filter(|h| h.len() == acc.len()).ok_or_else(|| CudaError::Input(format!("gradient `{name}` does not fit")))?;
            joined.extend_from_slice(host);
        }
        let staging = drv!(st.clone_htod(&joined));
        let mut at = 0;
        for name in grads.keys() {
            let acc = self.training.grads.get_mut(name).expect("checked above");
            let n = acc.len();
            drv!(st.memcpy_dtod(&staging.slice(at..at + n), acc));
            at += n;
        }
        Ok(())
    }

    /// Adam moments as `m.<name>` / `v.<name>` tensors (the host optimizer's checkpoint form).
    pub fn download_moments(&self) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let st = &self.gpu.stream;
        let mut out = BTreeMap::new();
        for (name, (m, v)) in &self.training.moments {
            out.insert(format!("m.{name}"), Tensor::f32(vec![m.len()], drv!(st.clone_dtoh(m))));
            out.insert(format!("v.{name}"), Tensor::f32(vec![v.len()], drv!(st.clone_dtoh(v))));
        }
        Ok(out)
    }

    /// Replace the Adam moments (resuming from a checkpoint); `m.<name>` and `v.<name>` pairs.
    pub fn load_moments(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), CudaError> {
        let st = self.gpu.stream.clone();
        self.training.moments.clear();
        for (key, m) in tensors {
            let Some(name) = key.strip_prefix("m.") else { continue };
            let v = tensors.get(&format!("v.{name}")).ok_or_else(|| CudaError::Input(format!("optimizer state has `m.{name}` but no `v.{name}`")))?;
            let (Some(m), Some(v)) = (m.as_f32(), v.as_f32()) else {
                return Err(CudaError::Input(format!("optimizer state of `{name}` is not f32")));
            };
            self.training.moments.insert(name.to_string(), (drv!(st.clone_htod(m)), drv!(st.clone_htod(v))));
        }
        Ok(())
    }
}
