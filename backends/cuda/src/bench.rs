//! Device-side timings for `sparkc bench --backend cuda`: neuron scans on their own, timed with
//! CUDA events over random inputs (never zeros), after a warm-up.

use crate::codegen::{self, Elem};
use crate::device::Gpu;
use crate::scan_codegen::{self, ScanIo};
use crate::scan_segmented;
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

fn random(gpu: &Gpu, n: usize, lo: f32, hi: f32, seed: u64) -> Result<CudaSlice<f32>, CudaError> {
    let mut rng = Rng::new(seed);
    let host: Vec<f32> = (0..n).map(|_| lo + (hi - lo) * rng.uniform() as f32).collect();
    Ok(drv!(gpu.stream.clone_htod(&host)))
}

fn to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// A device tensor of `n` random values in [lo, hi) stored as `e`.
fn random_dev(gpu: &Gpu, e: Elem, n: usize, lo: f32, hi: f32, seed: u64) -> Result<DevBuf, CudaError> {
    Ok(match e {
        Elem::F32 => DevBuf::F32(random(gpu, n, lo, hi, seed)?),
        Elem::Bf16 => {
            let mut rng = Rng::new(seed);
            let host: Vec<u16> = (0..n).map(|_| to_bf16_bits(lo + (hi - lo) * rng.uniform() as f32)).collect();
            DevBuf::Bf16(drv!(gpu.stream.clone_htod(&host)))
        }
    })
}

enum DevBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl DevBuf {
    fn push<'a>(&'a mut self, l: &mut cudarc::driver::LaunchArgs<'a>) {
        match self {
            DevBuf::F32(x) => l.arg(x),
            DevBuf::Bf16(x) => l.arg(x),
        };
    }
}

/// Median milliseconds of `launch` over `iters` runs after three warm-up runs, timed with
/// CUDA events.
fn median_ms(gpu: &Gpu, iters: usize, mut launch: impl FnMut() -> Result<(), CudaError>) -> Result<f64, CudaError> {
    for _ in 0..3 {
        launch()?;
    }
    drv!(gpu.stream.synchronize());
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = drv!(gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)));
        let end = drv!(gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)));
        drv!(start.record(&gpu.stream));
        launch()?;
        drv!(end.record(&gpu.stream));
        drv!(end.synchronize());
        times.push(drv!(start.elapsed_ms(&end)) as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One scan shape to time.
pub struct ScanCase<'a> {
    pub model: &'a NeuronModel,
    pub emit: &'a [String],
    pub io: ScanIo,
    /// Per-step input values are drawn from this range (modulation inputs or raw GEMM outputs).
    pub range: (f32, f32),
    pub b: usize,
    pub s: usize,
    pub k: usize,
    pub c: usize,
    /// Force the one-thread-per-column kernel (with this unroll) instead of the tiled one.
    pub simple_unroll: Option<usize>,
    /// Compile with fast math, as bf16 programs are.
    pub fast: bool,
}

/// Forward (inference: no checkpoints) and reverse scan timings of one case. The reverse scan
/// reads the checkpoints a training forward keeps.
pub fn time_scan(gpu: &Gpu, case: &ScanCase, iters: usize) -> Result<(ScanTiming, ScanTiming, Option<f64>), CudaError> {
    let (model, emit, io) = (case.model, case.emit, &case.io);
    let (b, s, k, c) = (case.b, case.s, case.k, case.c);
    let tiled = case.simple_unroll.is_none() && scan_codegen::can_tile(model, c, io, gpu.max_smem);
    let plan = scan_codegen::tile_plan(model, io, gpu.max_smem);
    let mut src = String::from(codegen::PRELUDE);
    if tiled {
        src.push_str(&scan_codegen::scan_forward_tiled("bench_fwd", model, emit, false, io, plan));
    } else {
        src.push_str(&scan_codegen::scan_forward_simple("bench_fwd", model, emit, false, io, case.simple_unroll.unwrap_or_else(|| scan_codegen::scan_unroll(model))));
    }
    // The block width the training program picks for these columns.
    let channels = if scan_codegen::prefer_narrow(b * c, gpu.sms) { scan_codegen::NARROW_CHANNELS } else { scan_codegen::TILE_THREADS };
    let wide = scan_codegen::adjoint_tile_plan(model, emit, &io.inputs, &io.outputs, c, scan_codegen::TILE_THREADS, gpu.max_smem);
    let bwd_tile = wide.and(scan_codegen::adjoint_tile_plan(model, emit, &io.inputs, &io.outputs, c, channels, gpu.max_smem)).filter(|_| case.simple_unroll.is_none());
    let bwd_src = match bwd_tile {
        Some(plan) => scan_codegen::scan_adjoint_tiled("bench_bwd", model, emit, false, &io.inputs, &io.outputs, &io.inputs, plan),
        None => scan_codegen::scan_adjoint_chunked("bench_bwd", model, emit, false, &io.inputs, &io.outputs, &io.inputs),
    };
    src.push_str(&bwd_src.map_err(CudaError::Unsupported)?);
    let segmented = scan_segmented::scan_adjoint_segmented("bench_summary", "bench_segments", model, emit, false, &io.inputs, &io.outputs, &io.inputs).ok();
    if let Some(k) = &segmented {
        src.push_str(&k.summary);
        src.push_str(&k.adjoint);
    }
    let module = gpu.load_with(&src, case.fast)?;
    let fwd = drv!(module.load_function("bench_fwd"));
    let bwd = drv!(module.load_function("bench_bwd"));
    if tiled {
        drv!(fwd.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.smem_bytes as i32));
    }
    if let Some(plan) = bwd_tile {
        drv!(bwd.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.smem_bytes as i32));
    }
    let n = b * s * c;
    let nck = scan_codegen::checkpoints(s);
    let (lo, hi) = case.range;
    let mut inputs: Vec<DevBuf> = io.inputs.iter().enumerate().map(|(i, &e)| random_dev(gpu, e, n, lo, hi, i as u64)).collect::<Result<_, _>>()?;
    let mut params: Vec<CudaSlice<f32>> = (0..model.params.len()).map(|i| random(gpu, c, -0.5, 0.5, 100 + i as u64)).collect::<Result<_, _>>()?;
    let mut init: Vec<CudaSlice<f32>> = (0..model.state.len()).map(|i| random(gpu, b * c, 0.0, 0.1, 200 + i as u64)).collect::<Result<_, _>>()?;
    let mut outs: Vec<DevBuf> = io.outputs.iter().enumerate().map(|(i, &e)| random_dev(gpu, e, n, -1.0, 1.0, 300 + i as u64)).collect::<Result<_, _>>()?;
    let mut fins: Vec<CudaSlice<f32>> = (0..model.state.len()).map(|i| random(gpu, b * c, 0.0, 1.0, 400 + i as u64)).collect::<Result<_, _>>()?;
    let mut ck: Vec<CudaSlice<f32>> = (0..model.state.len()).map(|i| random(gpu, b * c * nck, 0.0, 1.0, 500 + i as u64)).collect::<Result<_, _>>()?;
    // Reverse-scan buffers: incoming gradients of the outputs and final states, and results.
    let mut gouts: Vec<DevBuf> = io.outputs.iter().enumerate().map(|(i, &e)| random_dev(gpu, e, n, -1.0, 1.0, 600 + i as u64)).collect::<Result<_, _>>()?;
    let mut gfin: Vec<CudaSlice<f32>> = (0..model.state.len()).map(|i| random(gpu, b * c, -1.0, 1.0, 700 + i as u64)).collect::<Result<_, _>>()?;
    let mut din: Vec<DevBuf> = io.inputs.iter().enumerate().map(|(i, &e)| random_dev(gpu, e, n, -1.0, 1.0, 800 + i as u64)).collect::<Result<_, _>>()?;
    let mut dp: Vec<CudaSlice<f32>> = (0..model.params.len()).map(|i| random(gpu, b * c, 0.0, 1.0, 900 + i as u64)).collect::<Result<_, _>>()?;
    let mut dinit: Vec<CudaSlice<f32>> = (0..model.state.len()).map(|i| random(gpu, b * c, 0.0, 1.0, 1000 + i as u64)).collect::<Result<_, _>>()?;
    let (bi, si, ki, ci) = (b as i32, s as i32, k as i32, c as i32);
    let null = 0u64;
    let fwd_cfg = if tiled {
        LaunchConfig { grid_dim: ((b * c / plan.channels) as u32, 1, 1), block_dim: (plan.block_threads() as u32, 1, 1), shared_mem_bytes: plan.smem_bytes as u32 }
    } else {
        LaunchConfig { grid_dim: ((b * c).div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
    };
    let bwd_cfg = match bwd_tile {
        Some(plan) => LaunchConfig { grid_dim: ((b * c / plan.channels) as u32, 1, 1), block_dim: (plan.block_threads() as u32, 1, 1), shared_mem_bytes: plan.smem_bytes as u32 },
        None => LaunchConfig { grid_dim: ((b * c).div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 },
    };
    // The forward once with checkpoints, so that the reverse scan reads real ones; timed
    // without (as inference runs it).
    let fwd_ms = {
        let mut launch_fwd = |with_ck: bool| -> Result<(), CudaError> {
            let mut l = gpu.stream.launch_builder(&fwd);
            inputs.iter_mut().for_each(|x| x.push(&mut l));
            params.iter_mut().chain(init.iter_mut()).for_each(|x| { l.arg(x); });
            outs.iter_mut().for_each(|x| x.push(&mut l));
            fins.iter_mut().for_each(|x| { l.arg(x); });
            if with_ck {
                ck.iter_mut().for_each(|x| { l.arg(x); });
            } else {
                model.state.iter().for_each(|_| { l.arg(&null); });
            }
            l.arg(&bi).arg(&si).arg(&ki).arg(&ci);
            // SAFETY: the arguments follow the generated kernel's signature.
            unsafe { drv!(l.launch(fwd_cfg)) };
            Ok(())
        };
        launch_fwd(true)?;
        median_ms(gpu, iters, || launch_fwd(false))?
    };
    let have_ck = 1i32;
    let bwd_ms = median_ms(gpu, iters, || {
        let mut l = gpu.stream.launch_builder(&bwd);
        inputs.iter_mut().for_each(|x| x.push(&mut l));
        params.iter_mut().chain(init.iter_mut()).for_each(|x| { l.arg(x); });
        gouts.iter_mut().for_each(|x| x.push(&mut l));
        gfin.iter_mut().chain(ck.iter_mut()).for_each(|x| { l.arg(x); });
        l.arg(&have_ck);
        din.iter_mut().for_each(|x| x.push(&mut l));
        dp.iter_mut().chain(dinit.iter_mut()).for_each(|x| { l.arg(x); });
        l.arg(&bi).arg(&si).arg(&ki).arg(&ci);
        // SAFETY: the arguments follow the generated kernel's signature.
        unsafe { drv!(l.launch(bwd_cfg)) };
        Ok(())
    })?;
    // The time-parallel reverse scan, both kernels.
    let segmented_ms = match segmented {
        None => None,
        Some(_) => {
            let (summary, adjoint) = (drv!(module.load_function("bench_summary")), drv!(module.load_function("bench_segments")));
            let nseg = scan_segmented::segments(s);
            let mut seg_a = drv!(gpu.stream.alloc_zeros::<f32>(nseg * b * c));
            let mut seg_b = drv!(gpu.stream.alloc_zeros::<f32>(nseg * b * c));
            let mut dp_seg: Vec<CudaSlice<f32>> = (0..model.params.len()).map(|_| gpu.stream.alloc_zeros::<f32>(nseg * b * c)).collect::<Result<_, _>>().map_err(|e| CudaError::Driver(format!("{e:?}")))?;
            let cfg = LaunchConfig { grid_dim: ((b * c).div_ceil(128) as u32, nseg as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let nseg_i = nseg as i32;
            Some(median_ms(gpu, iters, || {
                let mut l = gpu.stream.launch_builder(&summary);
                inputs.iter_mut().for_each(|x| x.push(&mut l));
                params.iter_mut().chain(init.iter_mut()).for_each(|x| { l.arg(x); });
                gouts.iter_mut().for_each(|x| x.push(&mut l));
                gfin.iter_mut().chain(ck.iter_mut()).for_each(|x| { l.arg(x); });
                l.arg(&mut seg_a).arg(&mut seg_b).arg(&nseg_i).arg(&bi).arg(&si).arg(&ki).arg(&ci);
                // SAFETY: the arguments follow the generated kernel's signature.
                unsafe { drv!(l.launch(cfg)) };
                drop(l);
                let mut l = gpu.stream.launch_builder(&adjoint);
                inputs.iter_mut().for_each(|x| x.push(&mut l));
                params.iter_mut().chain(init.iter_mut()).for_each(|x| { l.arg(x); });
                gouts.iter_mut().for_each(|x| x.push(&mut l));
                gfin.iter_mut().chain(ck.iter_mut()).for_each(|x| { l.arg(x); });
                l.arg(&seg_a).arg(&seg_b).arg(&nseg_i);
                din.iter_mut().for_each(|x| x.push(&mut l));
                dp_seg.iter_mut().chain(dinit.iter_mut()).for_each(|x| { l.arg(x); });
                l.arg(&bi).arg(&si).arg(&ki).arg(&ci);
                // SAFETY: the arguments follow the generated kernel's signature.
                unsafe { drv!(l.launch(cfg)) };
                Ok(())
            })?)
        }
    };
    let per_step: u64 = io.inputs.iter().map(|e| e.bytes() as u64).sum();
    let per_out: u64 = io.outputs.iter().map(|e| e.bytes() as u64).sum();
    let small = 4 * (model.params.len() * c + 2 * model.state.len() * b * c) as u64;
    let ck_bytes = 4 * (model.state.len() * b * c * nck) as u64;
    let fwd_bytes = (per_step + per_out) * n as u64 + small;
    // Reads inputs, output gradients and checkpoints; writes input gradients.
    let bwd_bytes = (2 * per_step + per_out) * n as u64 + ck_bytes + small + 4 * (model.params.len() * b * c) as u64;
    Ok((ScanTiming { median_ms: fwd_ms, bytes: fwd_bytes }, ScanTiming { median_ms: bwd_ms, bytes: bwd_bytes }, segmented_ms))
}
