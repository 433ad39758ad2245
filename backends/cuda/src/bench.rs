//! Device-side timings for `sparkc bench --backend cuda`: neuron scans on their own, timed with
//! CUDA events over random inputs (never zeros), after a warm-up.

use crate::codegen;
use crate::device::Gpu;
use crate::CudaError;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use sparkc_ir::neuron::NeuronModel;
use sparkc_ir::rng::Rng;

/// Median milliseconds of one launch and the bytes one launch must move.
pub struct ScanTiming {
    pub median_ms: f64,
    pub bytes: u64,
}

impl ScanTiming {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / (self.median_ms * 1e-3) / 1e9
    }
}

macro_rules! drv {
    ($e:expr) => {
        $e.map_err(|e| CudaError::Driver(format!("{e:?}")))?
    };
}

fn random(gpu: &Gpu, n: usize, lo: f32, hi: f32, seed: u64) -> Result<CudaSlice<f32>, CudaError> {
    let mut rng = Rng::new(seed);
    let host: Vec<f32> = (0..n).map(|_| lo + (hi - lo) * rng.uniform() as f32).collect();
    Ok(drv!(gpu.stream.clone_htod(&host)))
}

/// Time the forward scan of `model` emitting `emit` over [b, s, c] (k frames per token).
pub fn time_scan_forward(gpu: &Gpu, model: &NeuronModel, emit: &[String], b: usize, s: usize, k: usize, c: usize, iters: usize, unroll: usize) -> Result<ScanTiming, CudaError> {
    let src = format!("{}{}", codegen::PRELUDE, codegen::scan_forward_kernel_unrolled("bench_scan", model, emit, false, unroll));
    let module = gpu.load(&src)?;
    let f = drv!(module.load_function("bench_scan"));
    let n = b * s * c;
    // Inputs in ranges where the neurons fire now and then (β-like in (0.8, 1), currents small).
    let inputs: Vec<CudaSlice<f32>> = (0..model.inputs.len()).map(|i| random(gpu, n, 0.05, 0.95, i as u64)).collect::<Result<_, _>>()?;
    let params: Vec<CudaSlice<f32>> = (0..model.params.len()).map(|i| random(gpu, c, -0.5, 0.5, 100 + i as u64)).collect::<Result<_, _>>()?;
    let init: Vec<CudaSlice<f32>> = (0..model.state.len()).map(|i| random(gpu, b * c, 0.0, 0.1, 200 + i as u64)).collect::<Result<_, _>>()?;
    let mut outs: Vec<CudaSlice<f32>> = (0..emit.len()).map(|_| Ok(drv!(gpu.stream.alloc_zeros::<f32>(n)))).collect::<Result<_, CudaError>>()?;
    let mut fins: Vec<CudaSlice<f32>> = (0..model.state.len()).map(|_| Ok(drv!(gpu.stream.alloc_zeros::<f32>(b * c)))).collect::<Result<_, CudaError>>()?;
    let (bi, si, ki, ci) = (b as i32, s as i32, k as i32, c as i32);
    let cfg = LaunchConfig { grid_dim: ((b * c).div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let launch = |outs: &mut Vec<CudaSlice<f32>>, fins: &mut Vec<CudaSlice<f32>>| -> Result<(), CudaError> {
        let mut l = gpu.stream.launch_builder(&f);
        for x in inputs.iter().chain(&params).chain(&init) {
            l.arg(x);
        }
        for o in outs.iter_mut() {
            l.arg(o);
        }
        for o in fins.iter_mut() {
            l.arg(o);
        }
        l.arg(&bi);
        l.arg(&si);
        l.arg(&ki);
        l.arg(&ci);
        // SAFETY: the arguments follow the generated kernel's signature.
        unsafe { drv!(l.launch(cfg)) };
        Ok(())
    };
    for _ in 0..3 {
        launch(&mut outs, &mut fins)?;
    }
    drv!(gpu.stream.synchronize());
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = drv!(gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)));
        let end = drv!(gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)));
        drv!(start.record(&gpu.stream));
        launch(&mut outs, &mut fins)?;
        drv!(end.record(&gpu.stream));
        drv!(end.synchronize());
        times.push(drv!(start.elapsed_ms(&end)) as f64);
    }
    times.sort_by(f64::total_cmp);
    let per_elem = 4 * (model.inputs.len() + emit.len()) as u64;
    let bytes = per_elem * n as u64 + 4 * (model.params.len() * c + 2 * model.state.len() * b * c) as u64;
    Ok(ScanTiming { median_ms: times[times.len() / 2], bytes })
}
