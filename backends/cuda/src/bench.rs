//! Device-side timings for `sparkc bench --backend cuda`: neuron scans on their own, timed with
//! CUDA events over random inputs (never zeros), after a warm-up.

use crate::codegen::{self, Elem};
use crate::device::Gpu;
use crate::scan_codegen::{self, ScanIo};
use crate::scan_segmented;
use crate::CudaError;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
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
    fn download(&self, gpu: &Gpu) -> Result<Vec<f32>, CudaError> {
        Ok(match self {
            DevBuf::F32(x) => drv!(gpu.stream.clone_dtoh(x)),
            DevBuf::Bf16(x) => drv!(gpu.stream.clone_dtoh(x)).into_iter().map(|b| f32::from_bits((b as u32) << 16)).collect(),
        })
    }

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

/// What every reverse scan kernel reads first, in its argument order: per-step inputs,
/// parameters, initial states, output gradients, final-state gradients, checkpoints.
struct ReverseOperands {
    inputs: Vec<DevBuf>,
    params: Vec<CudaSlice<f32>>,
    init: Vec<CudaSlice<f32>>,
    gouts: Vec<DevBuf>,
    gfin: Vec<CudaSlice<f32>>,
    ck: Vec<CudaSlice<f32>>,
}

impl ReverseOperands {
    fn push<'a>(&'a mut self, l: &mut cudarc::driver::LaunchArgs<'a>) {
        self.inputs.iter_mut().for_each(|x| x.push(l));
        self.params.iter_mut().chain(self.init.iter_mut()).for_each(|x| { l.arg(x); });
        self.gouts.iter_mut().for_each(|x| x.push(l));
        self.gfin.iter_mut().chain(self.ck.iter_mut()).for_each(|x| { l.arg(x); });
    }
}

/// Every buffer of one scan case: random per-step inputs, parameters, initial states and
/// incoming gradients (never zeros), and the results of both directions.
struct ScanBuffers {
    rev: ReverseOperands,
    outs: Vec<DevBuf>,
    fins: Vec<CudaSlice<f32>>,
    din: Vec<DevBuf>,
    dp: Vec<CudaSlice<f32>>,
    dinit: Vec<CudaSlice<f32>>,
    /// B, S, K, C as the kernels take them.
    dims: [i32; 4],
}

/// The launch configuration of a tiled scan (forward or reverse) or, without a plan, of the
/// one-thread-per-column kernels.
fn scan_launch(plan: Option<scan_codegen::TilePlan>, cols: usize) -> LaunchConfig {
    match plan {
        Some(p) => LaunchConfig { grid_dim: ((cols / p.channels) as u32, 1, 1), block_dim: (p.block_threads() as u32, 1, 1), shared_mem_bytes: p.smem_bytes as u32 },
        None => LaunchConfig { grid_dim: (cols.div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 },
    }
}

impl ScanBuffers {
    fn new(gpu: &Gpu, case: &ScanCase) -> Result<ScanBuffers, CudaError> {
        let (model, io) = (case.model, &case.io);
        let (b, c) = (case.b, case.c);
        let n = b * case.s * c;
        let nck = scan_codegen::checkpoints(case.s);
        let (lo, hi) = case.range;
        let states = |seed: u64, n: usize, lo: f32, hi: f32| (0..model.state.len()).map(|i| random(gpu, n, lo, hi, seed + i as u64)).collect::<Result<Vec<_>, _>>();
        Ok(ScanBuffers {
            rev: ReverseOperands {
                inputs: io.inputs.iter().enumerate().map(|(i, &e)| random_dev(gpu, e, n, lo, hi, i as u64)).collect::<Result<_, _>>()?,
                params: (0..model.params.len()).map(|i| random(gpu, c, -0.5, 0.5, 100 + i as u64)).collect::<Result<_, _>>()?,
                init: states(200, b * c, 0.0, 0.1)?,
                gouts: io.outputs.iter().enumerate().map(|(i, &e)| random_dev(gpu, e, n, -1.0, 1.0, 600 + i as u64)).collect::<Result<_, _>>()?,
                gfin: states(700, b * c, -1.0, 1.0)?,
                ck: states(500, b * c * nck, 0.0, 1.0)?,
            },
            outs: io.outputs.iter().enumerate().map(|(i, &e)| random_dev(gpu, e, n, -1.0, 1.0, 300 + i as u64)).collect::<Result<_, _>>()?,
            fins: states(400, b * c, 0.0, 1.0)?,
            din: io.inputs.iter().enumerate().map(|(i, &e)| random_dev(gpu, e, n, -1.0, 1.0, 800 + i as u64)).collect::<Result<_, _>>()?,
            dp: (0..model.params.len()).map(|i| random(gpu, b * c, 0.0, 1.0, 900 + i as u64)).collect::<Result<_, _>>()?,
            dinit: states(1000, b * c, 0.0, 1.0)?,
            dims: [b as i32, case.s as i32, case.k as i32, c as i32],
        })
    }

    /// The forward scan; with `keep_checkpoints` it writes the checkpoints the reverse scans
    /// read (as a training forward does), without it none (as inference runs it).
    fn forward(&mut self, gpu: &Gpu, f: &CudaFunction, cfg: LaunchConfig, keep_checkpoints: bool) -> Result<(), CudaError> {
        let null = 0u64;
        let states = self.fins.len();
        let rev = &mut self.rev;
        let mut l = gpu.stream.launch_builder(f);
        rev.inputs.iter_mut().for_each(|x| x.push(&mut l));
        rev.params.iter_mut().chain(rev.init.iter_mut()).for_each(|x| { l.arg(x); });
        self.outs.iter_mut().for_each(|x| x.push(&mut l));
        self.fins.iter_mut().for_each(|x| { l.arg(x); });
        if keep_checkpoints {
            rev.ck.iter_mut().for_each(|x| { l.arg(x); });
        } else {
            (0..states).for_each(|_| { l.arg(&null); });
        }
        self.dims.iter().for_each(|d| { l.arg(d); });
        // SAFETY: the arguments follow the generated kernel's signature.
        unsafe { drv!(l.launch(cfg)) };
        Ok(())
    }

    /// A reverse scan (per-column or tiled) reading the forward's checkpoints.
    fn reverse(&mut self, gpu: &Gpu, f: &CudaFunction, cfg: LaunchConfig) -> Result<(), CudaError> {
        let have_ck = 1i32;
        let mut l = gpu.stream.launch_builder(f);
        self.rev.push(&mut l);
        l.arg(&have_ck);
        self.din.iter_mut().for_each(|x| x.push(&mut l));
        self.dp.iter_mut().chain(self.dinit.iter_mut()).for_each(|x| { l.arg(x); });
        self.dims.iter().for_each(|d| { l.arg(d); });
        // SAFETY: the arguments follow the generated kernel's signature.
        unsafe { drv!(l.launch(cfg)) };
        Ok(())
    }

    /// The time-parallel reverse scan: segment summaries, then the segments; its parameter
    /// gradients are per segment (`dp_seg`, summed by the caller).
    fn segmented_reverse(&mut self, gpu: &Gpu, (summary, adjoint): (&CudaFunction, &CudaFunction), seg: &mut SegmentBuffers) -> Result<(), CudaError> {
        let [b, _, _, c] = self.dims.map(|d| d as usize);
        let cfg = LaunchConfig { grid_dim: ((b * c).div_ceil(128) as u32, seg.nseg as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let nseg = seg.nseg as i32;
        let mut l = gpu.stream.launch_builder(summary);
        self.rev.push(&mut l);
        l.arg(&mut seg.a).arg(&mut seg.b).arg(&nseg);
        self.dims.iter().for_each(|d| { l.arg(d); });
        // SAFETY: the arguments follow the generated kernel's signature.
        unsafe { drv!(l.launch(cfg)) };
        drop(l);
        let mut l = gpu.stream.launch_builder(adjoint);
        self.rev.push(&mut l);
        l.arg(&seg.a).arg(&seg.b).arg(&nseg);
        self.din.iter_mut().for_each(|x| x.push(&mut l));
        seg.dp.iter_mut().chain(self.dinit.iter_mut()).for_each(|x| { l.arg(x); });
        self.dims.iter().for_each(|d| { l.arg(d); });
        // SAFETY: the arguments follow the generated kernel's signature.
        unsafe { drv!(l.launch(cfg)) };
        Ok(())
    }

    /// The forward scan's results on the host: emitted outputs, final states, checkpoints.
    fn forward_results(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>, CudaError> {
        let mut out = self.outs.iter().map(|x| x.download(gpu)).collect::<Result<Vec<_>, _>>()?;
        for x in self.fins.iter().chain(&self.rev.ck) {
            out.push(drv!(gpu.stream.clone_dtoh(x)));
        }
        Ok(out)
    }

    /// The reverse scan's results on the host: input gradients, parameter gradients per
    /// column, initial-state gradients.
    fn results(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>, CudaError> {
        let mut out = self.din.iter().map(|x| x.download(gpu)).collect::<Result<Vec<_>, _>>()?;
        for x in self.dp.iter().chain(&self.dinit) {
            out.push(drv!(gpu.stream.clone_dtoh(x)));
        }
        Ok(out)
    }
}

/// The time-parallel reverse scan's own buffers.
struct SegmentBuffers {
    nseg: usize,
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    dp: Vec<CudaSlice<f32>>,
}

impl SegmentBuffers {
    fn new(gpu: &Gpu, case: &ScanCase) -> Result<SegmentBuffers, CudaError> {
        let nseg = scan_segmented::segments(case.s);
        let cols = case.b * case.c;
        let zeros = |n: usize| -> Result<CudaSlice<f32>, CudaError> { Ok(drv!(gpu.stream.alloc_zeros::<f32>(n))) };
        Ok(SegmentBuffers { nseg, a: zeros(nseg * cols)?, b: zeros(nseg * cols)?, dp: (0..case.model.params.len()).map(|_| zeros(nseg * cols)).collect::<Result<_, _>>()? })
    }

    /// The parameter gradients per column: the segments' sums.
    fn summed_params(&self, gpu: &Gpu, cols: usize) -> Result<Vec<Vec<f32>>, CudaError> {
        self.dp.iter().map(|d| {
            let host = drv!(gpu.stream.clone_dtoh(d));
            Ok((0..cols).map(|col| (0..self.nseg).map(|k| host[k * cols + col] as f64).sum::<f64>() as f32).collect())
        }).collect()
    }
}

/// The reverse-scan plan the training program picks for these columns, if any.
fn reverse_plan(gpu: &Gpu, case: &ScanCase, channels: usize) -> Option<scan_codegen::TilePlan> {
    let (model, emit, io) = (case.model, case.emit, &case.io);
    let wide = scan_codegen::adjoint_tile_plan(model, emit, &io.inputs, &io.outputs, case.c, scan_codegen::TILE_THREADS, gpu.max_smem);
    wide.and(scan_codegen::adjoint_tile_plan(model, emit, &io.inputs, &io.outputs, case.c, channels, gpu.max_smem)).filter(|_| case.simple_unroll.is_none())
}

fn set_smem(f: &CudaFunction, plan: Option<scan_codegen::TilePlan>) -> Result<(), CudaError> {
    if let Some(plan) = plan {
        drv!(f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.smem_bytes as i32));
    }
    Ok(())
}

/// Forward (inference: no checkpoints) and reverse scan timings of one case. The reverse scan
/// reads the checkpoints a training forward keeps.
pub fn time_scan(gpu: &Gpu, case: &ScanCase, iters: usize) -> Result<(ScanTiming, ScanTiming, Option<f64>), CudaError> {
    let (model, emit, io) = (case.model, case.emit, &case.io);
    let (b, s, c) = (case.b, case.s, case.c);
    let tiled = case.simple_unroll.is_none() && scan_codegen::can_tile(model, c, io, gpu.max_smem);
    let plan = scan_codegen::tile_plan(model, io, gpu.max_smem);
    let mut src = String::from(codegen::PRELUDE);
    if tiled {
        src.push_str(&scan_codegen::scan_forward_tiled("bench_fwd", model, emit, false, io, plan));
    } else {
        src.push_str(&scan_codegen::scan_forward_simple("bench_fwd", model, emit, false, io, case.simple_unroll.unwrap_or_else(|| scan_codegen::scan_unroll(model))));
    }
    // The block width the training program picks for these columns.
    let channels = if scan_codegen::prefer_narrow_reverse(b * c, gpu.sms) { scan_codegen::NARROW_CHANNELS } else { scan_codegen::TILE_THREADS };
    let bwd_tile = reverse_plan(gpu, case, channels);
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
    set_smem(&fwd, tiled.then_some(plan))?;
    set_smem(&bwd, bwd_tile)?;
    let mut bufs = ScanBuffers::new(gpu, case)?;
    let fwd_cfg = scan_launch(tiled.then_some(plan), b * c);
    let bwd_cfg = scan_launch(bwd_tile, b * c);
    // The forward once with checkpoints, so that the reverse scan reads real ones.
    bufs.forward(gpu, &fwd, fwd_cfg, true)?;
    let fwd_ms = median_ms(gpu, iters, || bufs.forward(gpu, &fwd, fwd_cfg, false))?;
    let bwd_ms = median_ms(gpu, iters, || bufs.reverse(gpu, &bwd, bwd_cfg))?;
    let segmented_ms = match segmented {
        None => None,
        Some(_) => {
            let kernels = (drv!(module.load_function("bench_summary")), drv!(module.load_function("bench_segments")));
            let mut seg = SegmentBuffers::new(gpu, case)?;
            Some(median_ms(gpu, iters, || bufs.segmented_reverse(gpu, (&kernels.0, &kernels.1), &mut seg))?)
        }
    };
    let n = b * s * c;
    let nck = scan_codegen::checkpoints(s);
    let per_step: u64 = io.inputs.iter().map(|e| e.bytes() as u64).sum();
    let per_out: u64 = io.outputs.iter().map(|e| e.bytes() as u64).sum();
    let small = 4 * (model.params.len() * c + 2 * model.state.len() * b * c) as u64;
    let ck_bytes = 4 * (model.state.len() * b * c * nck) as u64;
    let fwd_bytes = (per_step + per_out) * n as u64 + small;
    // Reads inputs, output gradients and checkpoints; writes input gradients.
    let bwd_bytes = (2 * per_step + per_out) * n as u64 + ck_bytes + small + 4 * (model.params.len() * b * c) as u64;
    Ok((ScanTiming { median_ms: fwd_ms, bytes: fwd_bytes }, ScanTiming { median_ms: bwd_ms, bytes: bwd_bytes }, segmented_ms))
}

/// How far the fast scans of one case are from the one-thread-per-column kernels, on the same
/// inputs: the tiled forward at each block width that applies (outputs, final states and
/// checkpoints), then, reading the same checkpoints, the tiled reverse scan at each block width
/// and the time-parallel one (input, parameter and initial-state gradients). Each entry is the
/// largest relative L2 difference over a kernel's results, named. `token_scope` restarts the
/// state every K steps.
pub fn scan_disagreement(gpu: &Gpu, case: &ScanCase, token_scope: bool) -> Result<Vec<(String, f64)>, CudaError> {
    let (model, emit, io) = (case.model, case.emit, &case.io);
    let cols = case.b * case.c;
    let mut src = String::from(codegen::PRELUDE);
    src.push_str(&scan_codegen::scan_forward_simple("check_fwd", model, emit, token_scope, io, scan_codegen::scan_unroll(model)));
    let mut tiled_fwd = Vec::new();
    let wide = scan_codegen::can_tile(model, case.c, io, gpu.max_smem).then(|| scan_codegen::tile_plan(model, io, gpu.max_smem));
    for plan in wide.into_iter().chain(scan_codegen::narrow_tile_plan(model, case.c, io, gpu.max_smem)) {
        let name = format!("check_fwd_{}", plan.channels);
        src.push_str(&scan_codegen::scan_forward_tiled(&name, model, emit, token_scope, io, plan));
        tiled_fwd.push((name, plan));
    }
    let unsupported = |r: Result<String, String>| r.map_err(CudaError::Unsupported);
    src.push_str(&unsupported(scan_codegen::scan_adjoint_chunked("check_ref", model, emit, token_scope, &io.inputs, &io.outputs, &io.inputs))?);
    let mut tiled = Vec::new();
    for channels in [scan_codegen::TILE_THREADS, scan_codegen::NARROW_CHANNELS] {
        if let Some(plan) = scan_codegen::adjoint_tile_plan(model, emit, &io.inputs, &io.outputs, case.c, channels, gpu.max_smem) {
            let name = format!("check_tiled_{channels}");
            src.push_str(&unsupported(scan_codegen::scan_adjoint_tiled(&name, model, emit, token_scope, &io.inputs, &io.outputs, &io.inputs, plan))?);
            tiled.push((name, plan));
        }
    }
    let segmented = scan_segmented::scan_adjoint_segmented("check_summary", "check_segments", model, emit, token_scope, &io.inputs, &io.outputs, &io.inputs).ok();
    if let Some(k) = &segmented {
        src.push_str(&k.summary);
        src.push_str(&k.adjoint);
    }
    let module = gpu.load_with(&src, case.fast)?;
    let mut bufs = ScanBuffers::new(gpu, case)?;
    let mut out = Vec::new();
    // The reference forward runs last, so that the reverse scans read its checkpoints.
    let mut forwards = Vec::new();
    for (name, plan) in &tiled_fwd {
        let f = drv!(module.load_function(name));
        set_smem(&f, Some(*plan))?;
        bufs.forward(gpu, &f, scan_launch(Some(*plan), cols), true)?;
        forwards.push((format!("tiled forward, {} channels per block", plan.channels), bufs.forward_results(gpu)?));
    }
    bufs.forward(gpu, &drv!(module.load_function("check_fwd")), scan_launch(None, cols), true)?;
    let reference = bufs.forward_results(gpu)?;
    for (name, results) in forwards {
        out.push((name, worst_rel_l2(&reference, &results)));
    }
    bufs.reverse(gpu, &drv!(module.load_function("check_ref")), scan_launch(None, cols))?;
    let reference = bufs.results(gpu)?;
    let worst = |results: &[Vec<f32>]| worst_rel_l2(&reference, results);
    for (name, plan) in tiled {
        let f = drv!(module.load_function(&name));
        set_smem(&f, Some(plan))?;
        bufs.reverse(gpu, &f, scan_launch(Some(plan), cols))?;
        out.push((format!("tiled reverse, {} channels per block", plan.channels), worst(&bufs.results(gpu)?)));
    }
    if segmented.is_some() {
        let kernels = (drv!(module.load_function("check_summary")), drv!(module.load_function("check_segments")));
        let mut seg = SegmentBuffers::new(gpu, case)?;
        bufs.segmented_reverse(gpu, (&kernels.0, &kernels.1), &mut seg)?;
        // Its parameter gradients are per segment: summed here, in place of the stale ones.
        let mut results = bufs.results(gpu)?;
        let ni = io.inputs.len();
        for (k, summed) in seg.summed_params(gpu, cols)?.into_iter().enumerate() {
            results[ni + k] = summed;
        }
        out.push(("time-parallel reverse (segments)".to_string(), worst(&results)));
    }
    Ok(out)
}

/// The largest [`rel_l2`] over pairs of result tensors.
fn worst_rel_l2(reference: &[Vec<f32>], results: &[Vec<f32>]) -> f64 {
    reference.iter().zip(results).map(|(r, x)| rel_l2(x, r)).fold(0.0, f64::max)
}

/// ‖a − b‖ / ‖b‖ (absolute where b is all zeros).
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    if den > 0.0 { (num / den).sqrt() } else { num.sqrt() }
}
