//! Neuron scan kernels generated from the model's IR description: the forward scan (a simple
//! one-thread-per-column form for any width, and a tiled form whose per-step inputs stream
//! through shared memory with `cp.async`), and the reverse scan from `sparkc_ir::adjoint`.
//!
//! Storage is per tensor (`Elem`): per-step inputs, emitted outputs and gradients may be bf16;
//! the state, the arithmetic, checkpoints and parameter gradients are f32.
//!
//! For the backward, the forward writes the state every `CHECKPOINT_EVERY` steps (1/16 of one
//! f32 tensor, the size a bit-packed spike tensor would take). The reverse scan re-runs each
//! 16-step chunk from its checkpoint in registers and walks it backwards, so it reads every
//! per-step input once, writes every input gradient once, and no per-step state, spike or
//! modulation tensor is ever stored.

use crate::codegen::{constant, expr, forward_step, forward_step_given, forward_step_named, ident, Elem};
use sparkc_ir::adjoint::{derive, output_grad_name, state_grad_name};
use sparkc_ir::expr::Expr;
use sparkc_ir::neuron::NeuronModel;
use std::fmt::Write;

/// Steps between forward checkpoints = steps per chunk of the reverse scan.
pub const CHECKPOINT_EVERY: usize = 16;
/// Threads (= channels) per block of the tiled forward scan.
pub const TILE_THREADS: usize = 128;

/// Storage of the per-step tensors of one scan.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScanIo {
    /// One per model input (forward) — also the storage of its gradient (reverse).
    pub inputs: Vec<Elem>,
    /// One per emitted output (forward) — also the storage of its incoming gradient (reverse).
    pub outputs: Vec<Elem>,
}

impl ScanIo {
    pub fn f32(model: &NeuronModel, emit: &[String]) -> ScanIo {
        ScanIo { inputs: vec![Elem::F32; model.inputs.len()], outputs: vec![Elem::F32; emit.len()] }
    }
}

/// Number of checkpoints per column for `s` steps.
pub fn checkpoints(s: usize) -> usize {
    s.div_ceil(CHECKPOINT_EVERY)
}

/// Steps per tile of the tiled forward, and of the reverse scan (one checkpoint chunk).
const TILE_STEPS: usize = 16;
/// Steps per tile of a forward scan whose chain reads the raw tiles (see [`tile_plan`]).
const DIRECT_TILE_STEPS: usize = 64;
/// Steps per tile of a forward scan with a prologue (measured on the H100 at the 0.9B shapes:
/// 16 → 0.84 ms, 32 → 0.73 ms, 128 → 1.75 ms for the fused selective PLIF).
const PROLOGUE_TILE_STEPS: usize = 32;
/// Raw-input tiles in flight per block: at least three, more when tiles are small (one bf16
/// input is 4 KB a tile), so that some 48 KB per SM are always on their way.
fn raw_stages(raw_tile_bytes: usize) -> usize {
    (48 * 1024 / raw_tile_bytes.max(1)).clamp(3, 12)
}

/// A neuron step split for the tiled forward: lets of parameters only (β = σ(w)) are
/// computed once per channel; the lets that do not depend on the state (the modulation
/// prologue — σ, softplus, |·| of the inputs) are computed for a whole tile by the prologue
/// warps in parallel; the chain warps run only what depends on the state, reading the `staged`
/// values (inputs and prologue lets) from shared memory.
#[derive(Clone, Debug)]
pub struct StepSplit {
    pub constant: Vec<sparkc_ir::neuron::Binding>,
    pub prologue: Vec<sparkc_ir::neuron::Binding>,
    pub staged: Vec<String>,
}

pub fn split_step(model: &NeuronModel) -> StepSplit {
    let mut dependent: std::collections::BTreeSet<String> = model.state.iter().map(|s| s.name.clone()).collect();
    let mut per_step: std::collections::BTreeSet<String> = model.inputs.iter().cloned().collect();
    let (mut constant, mut prologue) = (Vec::new(), Vec::new());
    let mut chain_exprs = Vec::new();
    for b in &model.lets {
        let vars = b.expr.vars();
        if vars.iter().any(|v| dependent.contains(v)) {
            dependent.insert(b.name.clone());
            chain_exprs.push(&b.expr);
        } else if vars.iter().any(|v| per_step.contains(v)) {
            per_step.insert(b.name.clone());
            prologue.push(b.clone());
        } else {
            constant.push(b.clone());
        }
    }
    chain_exprs.extend(model.charge.iter().map(|b| &b.expr));
    chain_exprs.push(&model.threshold);
    chain_exprs.extend(model.outputs.iter().map(|b| &b.expr));
    let needed: std::collections::BTreeSet<String> = chain_exprs.iter().flat_map(|e| e.vars()).collect();
    let staged = model.inputs.iter().chain(prologue.iter().map(|b| &b.name)).filter(|n| needed.contains(*n)).cloned().collect();
    StepSplit { constant, prologue, staged }
}

/// Steps per tile, raw-input stages and shared memory of the tiled forward scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TilePlan {
    pub steps: usize,
    pub stages: usize,
    pub smem_bytes: usize,
    /// Channels per block (one chain thread each); the block has 8× as many threads.
    pub channels: usize,
}

impl TilePlan {
    pub fn block_threads(&self) -> usize {
        8 * self.channels
    }
}

/// Without prologue math the chain reads the copied tiles directly and a block synchronises
/// once per tile, so longer tiles mean fewer barriers on the sequential path.
/// `SPARKC_SCAN_TILE_STEPS` overrides the length (a multiple of 16), for tuning.
pub fn tile_plan(model: &NeuronModel, io: &ScanIo, max_smem: usize) -> TilePlan {
    tile_plan_for(model, io, max_smem, TILE_THREADS)
}

/// Channels per block of the narrow tiled scans, for batches too small to give every SM a
/// 128-channel block.
pub const NARROW_CHANNELS: usize = TILE_THREADS / 2;

/// Whether `cols` columns run the narrow kernel: when even 64-channel blocks make no more
/// than one block per SM.
pub fn prefer_narrow(cols: usize, sms: usize) -> bool {
    cols.div_ceil(NARROW_CHANNELS) <= sms
}

/// Whether a reverse scan over `cols` columns runs in 64-channel blocks: by the forward's rule
/// unless `SPARKC_REVERSE_CHANNELS` (64 or 128, read once) says otherwise, for tuning.
pub fn prefer_narrow_reverse(cols: usize, sms: usize) -> bool {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    match FORCED.get_or_init(|| std::env::var("SPARKC_REVERSE_CHANNELS").ok().and_then(|v| v.parse().ok())) {
        Some(64) => true,
        Some(128) => false,
        _ => prefer_narrow(cols, sms),
    }
}

/// A plan with 64-channel blocks (512 threads) for a forward scan with prologue math, when
/// the channels allow it: a batch too small to give every SM a 128-channel block (prefill at
/// B=1 has 56 blocks for 132 SMs) spreads the prologue over twice as many SMs.
pub fn narrow_tile_plan(model: &NeuronModel, c: usize, io: &ScanIo, max_smem: usize) -> Option<TilePlan> {
    let narrow = NARROW_CHANNELS;
    let plan = tile_plan_for(model, io, max_smem, narrow);
    (c.is_multiple_of(narrow) && !io.inputs.is_empty() && !split_step(model).prologue.is_empty() && plan.smem_bytes <= max_smem).then_some(plan)
}

fn tile_plan_for(model: &NeuronModel, io: &ScanIo, max_smem: usize, channels: usize) -> TilePlan {
    let raw_row: usize = io.inputs.iter().map(|e| e.bytes() * channels).sum();
    let split = split_step(model);
    let direct = split.prologue.is_empty();
    let plan = |steps: usize| {
        let stages = raw_stages(steps * raw_row);
        let pro = if direct { 0 } else { 2 * split.staged.len() * steps * channels * 4 };
        TilePlan { steps, stages, smem_bytes: stages * steps * raw_row + pro, channels }
    };
    if let Some(steps) = std::env::var("SPARKC_SCAN_TILE_STEPS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|s| *s >= 16 && s % 16 == 0) {
        return plan(steps);
    }
    // Long tiles where they fit (wide f32 inputs fall back to 16 steps).
    let long = plan(if direct { DIRECT_TILE_STEPS } else { PROLOGUE_TILE_STEPS });
    if long.smem_bytes <= max_smem {
        long
    } else {
        plan(TILE_STEPS)
    }
}

/// Whether the tiled kernel applies: every block's 128 channels lie in one batch row (each row
/// of a tile is whole 16-byte chunks) and its shared memory fits.
pub fn can_tile(model: &NeuronModel, c: usize, io: &ScanIo, max_smem: usize) -> bool {
    c.is_multiple_of(TILE_THREADS) && !io.inputs.is_empty() && tile_plan(model, io, max_smem).smem_bytes <= max_smem
}

fn signature(name: &str, model: &NeuronModel, io: &ScanIo, launch_bounds: bool) -> String {
    let mut p = Vec::new();
    for (n, t) in model.inputs.iter().zip(&io.inputs) {
        p.push(format!("const {}* __restrict__ in_{}", t.c_type(), ident(n)));
    }
    for n in &model.params {
        p.push(format!("const float* __restrict__ p_{}", ident(n)));
    }
    // Not restrict: a decode step's short scan writes its final state over its initial one.
    for st in &model.state {
        p.push(format!("const float* init_{}", ident(&st.name)));
    }
    for (k, t) in io.outputs.iter().enumerate() {
        p.push(format!("{}* __restrict__ o_{k}", t.c_type()));
    }
    for st in &model.state {
        p.push(format!("float* fin_{}", ident(&st.name)));
    }
    for st in &model.state {
        p.push(format!("float* __restrict__ ck_{}", ident(&st.name)));
    }
    p.extend(["int B", "int S", "int K", "int C"].map(String::from));
    let bounds = if launch_bounds { format!("__launch_bounds__({TILE_THREADS}) ") } else { String::new() };
    format!("extern \"C\" __global__ void {bounds}{name}({})", p.join(", "))
}

/// Per-step statements shared by both forward kernels: checkpoint, token reset, the model's
/// step, the stores. Expects `step`, the input variables and the state variables in scope.
/// Where the forward writes checkpoints: tested per step at run time, or known for a step of
/// straight-line code (a literal position in a tile that starts at a multiple of 16).
#[derive(Clone, Copy)]
enum Checkpoint {
    RunTime,
    Here(bool),
}

fn forward_body(model: &NeuronModel, emit: &[String], token_scope: bool, given: &std::collections::BTreeSet<String>) -> String {
    forward_body_at(model, emit, token_scope, given, Checkpoint::RunTime)
}

fn forward_body_at(model: &NeuronModel, emit: &[String], token_scope: bool, given: &std::collections::BTreeSet<String>, ck: Checkpoint) -> String {
    let mut s = String::new();
    let ck_test = match ck {
        Checkpoint::RunTime => Some(format!("step % {CHECKPOINT_EVERY} == 0 && ")),
        Checkpoint::Here(true) => Some(String::new()),
        Checkpoint::Here(false) => None,
    };
    if let (false, Some(test)) = (model.state.is_empty(), ck_test) {
        let _ = writeln!(s, "      if ({test}ck_{} != nullptr) {{", ident(&model.state[0].name));
        let _ = writeln!(s, "        const long long ck_at = ((long long)b * nck + step / {CHECKPOINT_EVERY}) * C + c;");
        for st in &model.state {
            let _ = writeln!(s, "        ck_{0}[ck_at] = {0};", ident(&st.name));
        }
        let _ = writeln!(s, "      }}");
    }
    if token_scope {
        // A select, not a branch: straight-line steps stay one basic block.
        for st in &model.state {
            let _ = writeln!(s, "      {0} = (step % K == 0) ? {1} : {0};", ident(&st.name), constant(st.init));
        }
    }
    s.push_str(&forward_step_given(model, emit, given));
    for k in 0..emit.len() {
        let _ = writeln!(s, "      sp_st(o_{k}, base + (long long)step * C, out_{k});");
    }
    s
}

fn prologue(model: &NeuronModel) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "  const int b = (int)(col / C), c = (int)(col % C);");
    let _ = writeln!(s, "  const int nck = (S + {CHECKPOINT_EVERY} - 1) / {CHECKPOINT_EVERY};");
    let _ = writeln!(s, "  (void)nck;");
    for n in &model.params {
        let _ = writeln!(s, "  const float {} = p_{}[c];", ident(n), ident(n));
    }
    for st in &model.state {
        let _ = writeln!(s, "  float {} = init_{}[col];", ident(&st.name), ident(&st.name));
    }
    let _ = writeln!(s, "  const long long base = (long long)b * S * C + c;");
    s
}

fn epilogue(model: &NeuronModel) -> String {
    let mut s = String::new();
    for st in &model.state {
        let _ = writeln!(s, "  fin_{0}[col] = {0};", ident(&st.name));
    }
    s.push_str("}\n");
    s
}

/// Statements that restart the state at a token boundary (state scope `token`).
fn token_reset(model: &NeuronModel, token_scope: bool, indent: &str) -> String {
    let mut s = String::new();
    if token_scope {
        for st in &model.state {
            let _ = writeln!(s, "{indent}{0} = (step % K == 0) ? {1} : {0};", ident(&st.name), constant(st.init));
        }
    }
    s
}

/// The forward over every step, writing only the checkpoints (for a reverse scan whose forward
/// did not keep them). Expects `col`, `c`, `b`, `base`, `nck` and the params in scope.
fn checkpoint_pass(model: &NeuronModel, token_scope: bool) -> String {
    let ck = CHECKPOINT_EVERY;
    let mut s = String::new();
    for st in &model.state {
        let _ = writeln!(s, "    float {} = init_{}[col];", ident(&st.name), ident(&st.name));
    }
    let _ = writeln!(s, "    for (int step = 0; step < S; ++step) {{");
    let _ = writeln!(s, "      if (step % {ck} == 0) {{");
    for st in &model.state {
        let _ = writeln!(s, "        ck_{0}[((long long)b * nck + step / {ck}) * C + c] = {0};", ident(&st.name));
    }
    let _ = writeln!(s, "      }}");
    s.push_str(&token_reset(model, token_scope, "      "));
    for n in &model.inputs {
        let _ = writeln!(s, "      const float {0} = sp_ld(in_{0}, base + (long long)step * C);", ident(n));
    }
    s.push_str(&forward_step(model, &[]));
    let _ = writeln!(s, "    }}");
    s
}

/// A tensor streamed into shared memory by the tiled kernels: its pointer parameter, its
/// row bytes (128 channels) and its offset inside a stage.
struct Streamed {
    ptr: String,
    row_bytes: usize,
    offset: usize,
}

/// Lay out per-step tensors of the given storage (and pointer names) in one stage of `l` rows.
fn stream_layout(tensors: &[(String, Elem)], l: usize, channels: usize) -> (Vec<Streamed>, usize) {
    let mut off = 0;
    let mut out = Vec::new();
    for (ptr, e) in tensors {
        let row_bytes = e.bytes() * channels;
        out.push(Streamed { ptr: ptr.clone(), row_bytes, offset: off });
        off += row_bytes * l;
    }
    (out, off)
}

/// How the worker threads of a tiled scan copy a tile's 16-byte chunks into its stage with
/// `cp.async`: a thread owns the same chunks of every tile, so their sources, stage offsets and
/// rows are worked out once (`setup`, at the kernel's start). Tiles are copied in order (from
/// the first, or from the last when `reverse`), so each copy of a tile costs the copy and a
/// pointer step (`issue`), and the stage to fill turns round with them. Chunks are the rows of
/// the per-step tensors, then one row of checkpoints per state (reverse scans).
struct TileCopies {
    setup: String,
    slots: usize,
    l: usize,
    stage_bytes: usize,
    reverse: bool,
}

impl TileCopies {
    /// `t` channels per block, `l` steps per tile, `pt` copying threads (those from
    /// `first_thread` on), stages of `stage_bytes`, `ns` of them.
    #[allow(clippy::too_many_arguments)]
    fn new(streamed: &[Streamed], ck_rows: &[(String, usize)], t: usize, l: usize, first_thread: usize, pt: usize, ns: usize, stage_bytes: usize, reverse: bool) -> TileCopies {
        // (first chunk, chunks, the slot's source at tile 0, its step per tile, stage offset, row)
        let mut arms: Vec<(usize, usize, String)> = Vec::new();
        let mut first = 0;
        for x in streamed {
            let per_row = x.row_bytes / 16;
            let arm = format!(
                "const int r = q / {per_row}, k = q % {per_row}; src = (const unsigned char*)({ptr} + tile_base + (long long)r * C) + k * 16; step = {l} * C * {elem}; off = {} + r * {} + k * 16; row = r;",
                x.offset,
                x.row_bytes,
                ptr = x.ptr,
                elem = x.row_bytes / t
            );
            arms.push((first, l * per_row, arm));
            first += l * per_row;
        }
        for (ptr, offset) in ck_rows {
            let arm = format!("src = (const unsigned char*)({ptr} + (long long)b * nck * C + c0) + q * 16; step = C * 4; off = {offset} + q * 16; row = 0;");
            arms.push((first, t * 4 / 16, arm));
            first += t * 4 / 16;
        }
        let slots = first.div_ceil(pt);
        let mut setup = String::new();
        for m in 0..slots {
            let _ = writeln!(setup, "  const unsigned char* cp_src_{m}; int cp_step_{m}, cp_off_{m}, cp_row_{m};");
            let _ = writeln!(setup, "  {{
    const unsigned char* src = nullptr; int step = 0, off = 0, row = 1 << 30;");
            let _ = writeln!(setup, "    const int i = (tid < {first_thread} ? 0 : tid - {first_thread}) + {};", m * pt);
            for (k, (start, count, arm)) in arms.iter().enumerate() {
                let els = if k == 0 { "" } else { "else " };
                let _ = writeln!(setup, "    {els}if (i < {}) {{ const int q = i - {start}; {arm} }}", start + count);
            }
            let at = if reverse { "src + (long long)(ntiles - 1) * step" } else { "src" };
            let _ = writeln!(setup, "    cp_src_{m} = {at}; cp_step_{m} = step; cp_off_{m} = off; cp_row_{m} = row;\n  }}");
        }
        // The shared address of the next stage to fill, and the end of the stages.
        let _ = writeln!(setup, "  unsigned int cp_at = (unsigned int)__cvta_generic_to_shared(sp_smem);");
        let _ = writeln!(setup, "  const unsigned int cp_first = cp_at, cp_end = cp_at + {};", ns * stage_bytes);
        TileCopies { setup, slots, l, stage_bytes, reverse }
    }

    /// The copies of the tile at time index `tile`, consumed as the `iter`-th (its stage is
    /// `iter % ns`), then the commit. An empty group past the end keeps the wait counts uniform.
    /// Issues run for `iter` = 0, 1, … in turn: each steps the sources and the stage on.
    fn issue(&self, iter: &str, tile: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "      if ({iter} < ntiles) {{");
        let _ = writeln!(s, "        const int tile_at = {tile};");
        let dir = if self.reverse { "-" } else { "+" };
        for m in 0..self.slots {
            let _ = writeln!(s, "        if (tile_at * {} + cp_row_{m} < S) sp_cp16_at(cp_at + cp_off_{m}, cp_src_{m});", self.l);
            let _ = writeln!(s, "        cp_src_{m} {dir}= cp_step_{m};");
        }
        let _ = writeln!(s, "        cp_at = cp_at + {0} == cp_end ? cp_first : cp_at + {0};", self.stage_bytes);
        let _ = writeln!(s, "      }}\n      sp_cp_commit();");
        s
    }
}

/// Steps per unrolled group of the simple kernel: the loads of a group are issued before its
/// sequential math. Measured on an H100 (docs/cuda-notes.md): 16 is best with three per-step
/// inputs, 32 with one.
pub fn scan_unroll(model: &NeuronModel) -> usize {
    if model.inputs.len() <= 1 {
        32
    } else {
        16
    }
}

/// The forward scan, one thread per (batch row, channel), any width; per-step inputs are
/// [B,S,C]. Signature: (inputs..., params..., init states..., outputs..., final states...,
/// checkpoints per state (nullable, [B, ⌈S/16⌉, C])..., B, S, K, C).
pub fn scan_forward_simple(name: &str, model: &NeuronModel, emit: &[String], token_scope: bool, io: &ScanIo, u: usize) -> String {
    let mut s = signature(name, model, io, false);
    s.push_str(" {\n");
    let _ = writeln!(s, "  const long long col = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
    let _ = writeln!(s, "  if (col >= (long long)B * C) return;");
    s.push_str(&prologue(model));
    let _ = writeln!(s, "  for (int s0 = 0; s0 < S; s0 += {u}) {{");
    for n in &model.inputs {
        let _ = writeln!(s, "    float buf_{}[{u}];", ident(n));
    }
    let _ = writeln!(s, "    #pragma unroll\n    for (int j = 0; j < {u}; ++j) {{\n      if (s0 + j < S) {{");
    for n in &model.inputs {
        let _ = writeln!(s, "        buf_{0}[j] = sp_ld(in_{0}, base + (long long)(s0 + j) * C);", ident(n));
    }
    let _ = writeln!(s, "      }}\n    }}");
    let _ = writeln!(s, "    #pragma unroll\n    for (int j = 0; j < {u}; ++j) {{\n      if (s0 + j >= S) break;");
    let _ = writeln!(s, "      const int step = s0 + j;");
    for n in &model.inputs {
        let _ = writeln!(s, "      const float {0} = buf_{0}[j];", ident(n));
    }
    s.push_str(&forward_body(model, emit, token_scope, &Default::default()));
    let _ = writeln!(s, "    }}\n  }}");
    s.push_str(&epilogue(model));
    s
}

/// The forward scan for widths that are multiples of 128, warp-specialised: a block owns 128
/// adjacent channels of one batch row. Its 28 prologue warps bring tiles of 16 steps × 128
/// channels in by 16-byte `cp.async` copies (three tiles in flight) and compute the
/// state-independent part of the step for the next tile, while its 4 chain warps (one thread
/// per channel) run the sequential part of the current one from shared memory. With only B·C
/// threads in the whole scan, this is what keeps the memory system and the SMs busy.
/// Same signature as [`scan_forward_simple`]; needs `plan.smem_bytes` of dynamic shared memory.
pub fn scan_forward_tiled(name: &str, model: &NeuronModel, emit: &[String], token_scope: bool, io: &ScanIo, plan: TilePlan) -> String {
    let (l, ns, t) = (plan.steps, plan.stages, plan.channels);
    let (block, pt) = (plan.block_threads(), plan.block_threads() - plan.channels);
    let split = split_step(model);
    let given: std::collections::BTreeSet<String> = split.constant.iter().chain(&split.prologue).map(|b| b.name.clone()).collect();
    let inputs: Vec<(String, Elem)> = model.inputs.iter().map(|n| format!("in_{}", ident(n))).zip(io.inputs.iter().copied()).collect();
    let (streamed, raw_stage) = stream_layout(&inputs, l, t);
    let pro_base = ns * raw_stage;
    let pro_stage = split.staged.len() * l * t * 4;
    let mut s = signature(name, model, io, false).replacen("__global__ void ", &format!("__global__ void __launch_bounds__({block}) "), 1);
    s.push_str(" {\n");
    let _ = writeln!(s, "  extern __shared__ __align__(16) unsigned char sp_smem[];");
    let _ = writeln!(s, "  const int tid = threadIdx.x;");
    let _ = writeln!(s, "  const bool chain = tid < {t};");
    let _ = writeln!(s, "  const int pt = tid - {t};");
    let _ = writeln!(s, "  const long long col0 = blockIdx.x * {t}LL;");
    let _ = writeln!(s, "  const int b = (int)(col0 / C), c0 = (int)(col0 % C);");
    let _ = writeln!(s, "  const long long tile_base = (long long)b * S * C + c0;");
    let _ = writeln!(s, "  const int ntiles = (S + {l} - 1) / {l};");
    let copies = TileCopies::new(&streamed, &[], t, l, t, pt, ns, raw_stage, false);
    let issue = copies.issue("tt", "tt");
    s.push_str(&copies.setup);
    // The prologue of tile `tt`: each worker thread owns two adjacent channels (one load of a
    // pair per input, one 64-bit store per staged value) and every `rows`-th step of the tile;
    // its parameters and the lets of parameters alone sit in registers (`w0_*`, `w1_*`).
    let (pairs, rows) = (t / 2, pt / (t / 2));
    let pro_vars: std::collections::BTreeSet<String> = split.prologue.iter().chain(&split.constant).flat_map(|b| b.expr.vars()).collect();
    let pro_params: Vec<&String> = model.params.iter().filter(|p| pro_vars.contains(*p)).collect();
    let mut worker_regs = String::new();
    let _ = writeln!(worker_regs, "  const int wt = tid < {t} ? 0 : tid - {t};");
    let _ = writeln!(worker_regs, "  const int pc = 2 * (wt % {pairs}), pj = wt / {pairs};");
    for h in 0..2 {
        for n in &pro_params {
            let _ = writeln!(worker_regs, "  const float w{h}_{0} = p_{0}[c0 + pc + {h}];", ident(n));
        }
        for b in &split.constant {
            let _ = writeln!(worker_regs, "  const float w{h}_{} = {};", ident(&b.name), expr(&b.expr, &|v| format!("w{h}_{}", ident(v))));
        }
    }
    let mut pro = String::new();
    let _ = writeln!(pro, "      {{");
    let _ = writeln!(pro, "        const unsigned char* stg = sp_smem + (tt % {ns}) * {raw_stage};");
    let _ = writeln!(pro, "        float* pro = (float*)(sp_smem + {pro_base} + (tt & 1) * {pro_stage});");
    let _ = writeln!(pro, "        const int steps_here = min({l}, S - tt * {l});");
    let _ = writeln!(pro, "        for (int j = pj; j < steps_here; j += {rows}) {{");
    for ((n, e), x) in model.inputs.iter().zip(&io.inputs).zip(&streamed) {
        let _ = writeln!(pro, "          const float2 in2_{0} = sp_ld2((const {1}*)(stg + {2} + j * {3}), pc);", ident(n), e.c_type(), x.offset, x.row_bytes);
    }
    for k in 0..split.staged.len() {
        let _ = writeln!(pro, "          float2 st_{k};");
    }
    for (h, lane) in ["x", "y"].iter().enumerate() {
        let _ = writeln!(pro, "          {{");
        for n in &model.inputs {
            let _ = writeln!(pro, "            const float {0} = in2_{0}.{lane};", ident(n));
        }
        for n in pro_params.iter().copied().chain(split.constant.iter().map(|b| &b.name)) {
            let _ = writeln!(pro, "            const float {0} = w{h}_{0};", ident(n));
        }
        for b in &split.prologue {
            let _ = writeln!(pro, "            const float {} = {};", ident(&b.name), expr(&b.expr, &|v| ident(v)));
        }
        for (k, n) in split.staged.iter().enumerate() {
            let _ = writeln!(pro, "            st_{k}.{lane} = {};", ident(n));
        }
        let _ = writeln!(pro, "          }}");
    }
    for k in 0..split.staged.len() {
        let _ = writeln!(pro, "          *(float2*)(pro + {} + j * {t} + pc) = st_{k};", k * l * t);
    }
    let _ = writeln!(pro, "        }}\n      }}");
    let wait_and_sync = format!("      sp_cp_wait<{}>();\n      asm volatile(\"bar.sync 1, {pt};\" ::: \"memory\");\n", ns - 1);
    // Without prologue math (a plain PLIF) the chain reads the raw tiles the copies land in,
    // and the worker warps only keep copies in flight: no staging pass, no worker barrier.
    let direct = split.prologue.is_empty();
    if direct {
        // Start: tiles 0..ns-1 in flight (stage ns-1 is filled in the first iteration).
        let _ = writeln!(s, "  if (!chain) {{");
        let _ = writeln!(s, "    for (int tt = 0; tt < {}; ++tt) {{\n{issue}    }}", ns - 1);
        let _ = writeln!(s, "    sp_cp_wait<{}>();\n  }}", ns - 2);
    } else {
        // Start: tiles 0..ns in flight, the prologue of tile 0.
        s.push_str(&worker_regs);
        let _ = writeln!(s, "  if (!chain) {{");
        let _ = writeln!(s, "    for (int tt = 0; tt < {ns}; ++tt) {{\n{issue}    }}");
        let _ = writeln!(s, "{wait_and_sync}    {{\n      const int tt = 0;\n{pro}    }}");
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "  __syncthreads();");
    // Chain threads' registers.
    let _ = writeln!(s, "  const long long col = col0 + (chain ? tid : 0);");
    let _ = writeln!(s, "  const int c = c0 + (chain ? tid : 0);");
    let _ = writeln!(s, "  const int nck = (S + {CHECKPOINT_EVERY} - 1) / {CHECKPOINT_EVERY};\n  (void)nck;");
    for n in &model.params {
        let _ = writeln!(s, "  const float {} = p_{}[c];", ident(n), ident(n));
    }
    for b in &split.constant {
        let _ = writeln!(s, "  const float {} = {};", ident(&b.name), expr(&b.expr, &|v| ident(v)));
    }
    for st in &model.state {
        let _ = writeln!(s, "  float {} = init_{}[col];", ident(&st.name), ident(&st.name));
    }
    let _ = writeln!(s, "  const long long base = (long long)b * S * C + c;");
    let _ = writeln!(s, "  for (int tile = 0; tile < ntiles; ++tile) {{");
    let _ = writeln!(s, "    if (chain) {{");
    if direct {
        let _ = writeln!(s, "      const unsigned char* stg = sp_smem + (tile % {ns}) * {raw_stage};");
    } else {
        let _ = writeln!(s, "      const float* pro = (const float*)(sp_smem + {pro_base} + (tile & 1) * {pro_stage});");
    }
    // The staged values of step `j` (a literal or the loop variable).
    let loads = |s: &mut String, j: &str| {
        for (k, n) in split.staged.iter().enumerate() {
            match model.inputs.iter().position(|i| i == n).filter(|_| direct) {
                Some(i) => {
                    let (e, x) = (io.inputs[i], &streamed[i]);
                    let _ = writeln!(s, "      const float {} = sp_ld((const {}*)(stg + {} + ({j}) * {}), tid);", ident(n), e.c_type(), x.offset, x.row_bytes);
                }
                None => {
                    let _ = writeln!(s, "      const float {} = pro[{} + ({j}) * {t} + tid];", ident(n), k * l * t);
                }
            }
        }
    };
    // A whole tile is straight-line code: no per-step guard or checkpoint test, so the
    // compiler interleaves each step's loads, output conversion and store with the next
    // steps' chain (a warp issues in order; a branch per step would serialise them).
    let _ = writeln!(s, "      if (tile * {l} + {l} <= S) {{");
    for j in 0..l {
        let _ = writeln!(s, "      {{\n      const int step = tile * {l} + {j};");
        loads(&mut s, &j.to_string());
        s.push_str(&forward_body_at(model, emit, token_scope, &given, Checkpoint::Here(j % CHECKPOINT_EVERY == 0)));
        let _ = writeln!(s, "      }}");
    }
    // The last, partial tile.
    let _ = writeln!(s, "      }} else {{");
    let _ = writeln!(s, "      for (int j = 0; j < {l}; ++j) {{");
    let _ = writeln!(s, "      const int step = tile * {l} + j;\n      if (step >= S) break;");
    loads(&mut s, "j");
    s.push_str(&forward_body(model, emit, token_scope, &given));
    let _ = writeln!(s, "      }}\n      }}");
    let _ = writeln!(s, "    }} else {{");
    if direct {
        // Stage (tile-1) % ns was read by the chain in the last iteration; tile+1 must land.
        let _ = writeln!(s, "      {{\n      const int tt = tile + {};\n{issue}      }}", ns - 1);
        let _ = writeln!(s, "      sp_cp_wait<{}>();", ns - 2);
    } else {
        let _ = writeln!(s, "      {{\n      const int tt = tile + {ns};\n{issue}      }}");
        let _ = writeln!(s, "{wait_and_sync}      {{\n      const int tt = tile + 1;\n      if (tt < ntiles) {{\n{pro}      }}\n      }}");
    }
    let _ = writeln!(s, "    }}\n    __syncthreads();\n  }}");
    let _ = writeln!(s, "  if (chain) {{");
    for st in &model.state {
        let _ = writeln!(s, "    fin_{0}[col] = {0};", ident(&st.name));
    }
    let _ = writeln!(s, "  }}\n}}");
    s
}

/// The reverse scan from the model's adjoint step, one thread per (batch row, channel).
/// Without checkpoints from the forward (`have_ck == 0`) it first runs the forward writing
/// them into `ck_*`. Then, chunk by chunk from the end, it re-runs 16 steps from the chunk's
/// checkpoint keeping inputs and states in registers, and walks them backwards.
/// Signature: (inputs..., params..., init states..., grads of emitted outputs..., grads of
/// final states..., checkpoints per state..., int have_ck, input grads..., param grads per
/// row [B,C]..., init-state grads..., B, S, K, C). `inputs`, `out_grads` and `in_grads` give
/// the storage of the per-step inputs, of the incoming gradients of the emitted outputs and of
/// the input gradients written.
pub fn scan_adjoint_chunked(name: &str, model: &NeuronModel, emit: &[String], token_scope: bool, inputs: &[Elem], out_grads: &[Elem], in_grads: &[Elem]) -> Result<String, String> {
    let step = derive(model, emit)?;
    let id = |n: &str| ident(n);
    let mut p = adjoint_params(model, emit, inputs, out_grads)?;
    p.push("int have_ck".into());
    p.extend(adjoint_result_params(model, in_grads)?);
    p.extend(["int B", "int S", "int K", "int C"].map(String::from));
    let mut s = format!("extern \"C\" __global__ void {name}({}) {{\n", p.join(", "));
    let _ = writeln!(s, "  const long long col = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
    let _ = writeln!(s, "  if (col >= (long long)B * C) return;");
    s.push_str(&column_setup(model));
    // 1. Checkpoints, when the forward did not keep them.
    let _ = writeln!(s, "  if (!have_ck) {{");
    s.push_str(&checkpoint_pass(model, token_scope));
    let _ = writeln!(s, "  }}");
    // 2. Reverse, chunk by chunk.
    for st in &model.state {
        let _ = writeln!(s, "  float carry_{0} = gf_{0}[col];", id(&st.name));
    }
    for n in &model.params {
        let _ = writeln!(s, "  double acc_{} = 0.0;", id(n));
    }
    s.push_str(&reverse_chunks(model, emit, token_scope, "nck - 1", "0", &adjoint_step_body(model, &step, token_scope)));
    for st in &model.state {
        let _ = writeln!(s, "  dinit_{0}[col] = carry_{0};", id(&st.name));
    }
    for n in &model.params {
        let _ = writeln!(s, "  dp_{0}[col] = (float)acc_{0};", id(n));
    }
    s.push_str("}\n");
    Ok(s)
}

/// The reverse scans' leading parameters: per-step inputs, parameters, initial states, output
/// gradients, final-state gradients, checkpoints.
pub(crate) fn adjoint_params(model: &NeuronModel, emit: &[String], inputs: &[Elem], out_grads: &[Elem]) -> Result<Vec<String>, String> {
    if inputs.len() != model.inputs.len() || out_grads.len() != emit.len() {
        return Err(format!("reverse scan of `{}`: storage given for the wrong number of tensors", model.name));
    }
    let id = |n: &str| ident(n);
    let mut p = Vec::new();
    for (n, t) in model.inputs.iter().zip(inputs) {
        p.push(format!("const {}* __restrict__ in_{}", t.c_type(), id(n)));
    }
    for n in &model.params {
        p.push(format!("const float* __restrict__ p_{}", id(n)));
    }
    for st in &model.state {
        p.push(format!("const float* __restrict__ init_{}", id(&st.name)));
    }
    for (k, t) in out_grads.iter().enumerate() {
        p.push(format!("const {}* __restrict__ g_{k}", t.c_type()));
    }
    for st in &model.state {
        p.push(format!("const float* __restrict__ gf_{}", id(&st.name)));
    }
    for st in &model.state {
        p.push(format!("float* __restrict__ ck_{}", id(&st.name)));
    }
    Ok(p)
}

/// The reverse scans' results: input gradients, per-column parameter gradients, initial-state
/// gradients.
pub(crate) fn adjoint_result_params(model: &NeuronModel, in_grads: &[Elem]) -> Result<Vec<String>, String> {
    if in_grads.len() != model.inputs.len() {
        return Err(format!("reverse scan of `{}`: storage given for the wrong number of input gradients", model.name));
    }
    let id = |n: &str| ident(n);
    let mut p = Vec::new();
    for (n, t) in model.inputs.iter().zip(in_grads) {
        p.push(format!("{}* __restrict__ din_{}", t.c_type(), id(n)));
    }
    for n in &model.params {
        p.push(format!("float* __restrict__ dp_{}", id(n)));
    }
    for st in &model.state {
        p.push(format!("float* __restrict__ dinit_{}", id(&st.name)));
    }
    Ok(p)
}

/// Per-column names of the one-thread-per-column reverse scans: `b`, `c`, `nck`, `base` and
/// the parameters (expects `col`).
pub(crate) fn column_setup(model: &NeuronModel) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "  const int b = (int)(col / C), c = (int)(col % C);");
    let _ = writeln!(s, "  const int nck = (S + {CHECKPOINT_EVERY} - 1) / {CHECKPOINT_EVERY};");
    let _ = writeln!(s, "  const long long base = (long long)b * S * C + c;");
    for n in &model.params {
        let _ = writeln!(s, "  const float {} = p_{}[c];", ident(n), ident(n));
    }
    s
}

/// One reverse step of the full adjoint: every binding, the input-gradient stores, the
/// parameter-gradient sums (`acc_*`) and the carried state adjoint (`carry_*`).
pub(crate) fn adjoint_step_body(model: &NeuronModel, step: &sparkc_ir::adjoint::AdjointStep, token_scope: bool) -> String {
    let id = |n: &str| ident(n);
    let mut s = String::new();
    for st in &model.state {
        let _ = writeln!(s, "      const float {} = carry_{};", id(&state_grad_name(&st.name)), id(&st.name));
    }
    for (n, e) in &step.bindings {
        let _ = writeln!(s, "      const float {} = {};", id(n), crate::codegen::expr(e, &|v| id(v)));
    }
    for (n, g) in model.inputs.iter().zip(&step.input_grads) {
        let _ = writeln!(s, "      sp_st(din_{}, at, {});", id(n), id(g));
    }
    for (n, g) in model.params.iter().zip(&step.param_grads) {
        let _ = writeln!(s, "      acc_{} += (double){};", id(n), id(g));
    }
    for (st, g) in model.state.iter().zip(&step.state_grads) {
        let cut = if token_scope { "(step % K == 0) ? 0.0f : " } else { "" };
        let _ = writeln!(s, "      carry_{} = {cut}{};", id(&st.name), id(g));
    }
    s
}

/// The chunks `from` down to `to` (C expressions, inclusive) of one column, walked backwards:
/// each chunk's inputs and output gradients are loaded at once, the forward is re-run from the
/// chunk's checkpoint in registers, and `body` runs for each step from the last, with the
/// inputs, the state before the step, the output gradients, `step` and `at` in scope.
pub(crate) fn reverse_chunks(model: &NeuronModel, emit: &[String], token_scope: bool, from: &str, to: &str, body: &str) -> String {
    let ck = CHECKPOINT_EVERY;
    let id = |n: &str| ident(n);
    let mut s = String::new();
    let _ = writeln!(s, "  for (int chunk = {from}; chunk >= {to}; --chunk) {{");
    let _ = writeln!(s, "    const int s0 = chunk * {ck};");
    for n in &model.inputs {
        let _ = writeln!(s, "    float xs_{}[{ck}];", id(n));
    }
    for (k, _) in emit.iter().enumerate() {
        let _ = writeln!(s, "    float gs_{k}[{ck}];");
    }
    for st in &model.state {
        let _ = writeln!(s, "    float ss_{}[{ck}];", id(&st.name));
    }
    // All loads of the chunk first, so that they are in flight together.
    let _ = writeln!(s, "    #pragma unroll\n    for (int j = 0; j < {ck}; ++j) {{\n      if (s0 + j < S) {{");
    let _ = writeln!(s, "        const long long at = base + (long long)(s0 + j) * C;");
    for n in &model.inputs {
        let _ = writeln!(s, "        xs_{0}[j] = sp_ld(in_{0}, at);", id(n));
    }
    for k in 0..emit.len() {
        let _ = writeln!(s, "        gs_{k}[j] = sp_ld(g_{k}, at);");
    }
    let _ = writeln!(s, "      }}\n    }}");
    // Forward over the chunk from its checkpoint, keeping the state before each step.
    let _ = writeln!(s, "    {{");
    for st in &model.state {
        let _ = writeln!(s, "    float {0} = ck_{0}[((long long)b * nck + chunk) * C + c];", id(&st.name));
    }
    let _ = writeln!(s, "    #pragma unroll\n    for (int j = 0; j < {ck}; ++j) {{\n      if (s0 + j < S) {{");
    let _ = writeln!(s, "      const int step = s0 + j;");
    s.push_str(&token_reset(model, token_scope, "      "));
    for st in &model.state {
        let _ = writeln!(s, "      ss_{0}[j] = {0};", id(&st.name));
    }
    for n in &model.inputs {
        let _ = writeln!(s, "      const float {0} = xs_{0}[j];", id(n));
    }
    s.push_str(&forward_step(model, &[]));
    let _ = writeln!(s, "      }}\n    }}\n    }}");
    // Backwards through the chunk.
    let _ = writeln!(s, "    #pragma unroll\n    for (int j = {} ; j >= 0; --j) {{\n      if (s0 + j < S) {{", ck - 1);
    let _ = writeln!(s, "      const int step = s0 + j;");
    let _ = writeln!(s, "      const long long at = base + (long long)step * C;");
    for n in &model.inputs {
        let _ = writeln!(s, "      const float {0} = xs_{0}[j];", id(n));
    }
    for st in &model.state {
        let _ = writeln!(s, "      const float {0} = ss_{0}[j];", id(&st.name));
    }
    for (k, o) in emit.iter().enumerate() {
        let _ = writeln!(s, "      const float {} = gs_{k}[j];", id(&output_grad_name(o)));
    }
    s.push_str(body);
    let _ = writeln!(s, "      }}\n    }}\n  }}");
    s
}

/// The reverse-scan step split like [`split_step`]: `chain` is only what carries the state
/// adjoint (`a_*`) back, a multiply-add or two per step, with its carry-independent
/// subexpressions moved to `parallel` (the recomputed forward step, σ(·), the terms of the
/// output gradients). The input and parameter gradients need the carried adjoint but not each
/// other, so the tiled kernel evaluates them for a whole tile in parallel once the chain has
/// passed it ([`epilogue_bindings`]); the time-parallel kernel composes `chain` as an affine map.
#[derive(Clone, Debug)]
pub struct AdjointSplit {
    pub step: sparkc_ir::adjoint::AdjointStep,
    pub parallel: Vec<(String, Expr)>,
    pub chain: Vec<(String, Expr)>,
    /// What the chain reads that does not depend on the carried adjoint (parallel bindings,
    /// inputs, state, output gradients).
    pub staged: Vec<String>,
}

pub fn split_adjoint(model: &NeuronModel, emit: &[String]) -> Result<AdjointSplit, String> {
    let step = derive(model, emit)?;
    let mut dependent: std::collections::BTreeSet<String> = model.state.iter().map(|s| state_grad_name(&s.name)).collect();
    let (mut parallel, mut chain) = (Vec::new(), Vec::new());
    for (n, e) in &step.bindings {
        if e.vars().iter().any(|v| dependent.contains(v)) {
            dependent.insert(n.clone());
            chain.push((n.clone(), e.clone()));
        } else {
            parallel.push((n.clone(), e.clone()));
        }
    }
    // The chain's carry-independent subexpressions (σ'(x), softplus(x)·u, sign(x), …) become
    // parallel bindings too: a tile's chain runs on one warp per scheduler, so every
    // instruction left in it is paid for once per step and channel group.
    let taken: std::collections::BTreeSet<String> = step.bindings.iter().map(|(n, _)| n.clone()).chain(model.inputs.iter().cloned()).chain(model.params.iter().cloned()).collect();
    let mut hoisted: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (_, e) in chain.iter_mut() {
        *e = hoist(e, &dependent, &taken, &mut parallel, &mut hoisted);
    }
    // The chain carries only the state adjoint; the input and parameter gradients are
    // computed afterwards for a whole tile in parallel (`epilogue_bindings`).
    let chain = closure(&chain, &step.state_grads);
    let mut needed: std::collections::BTreeSet<String> = chain.iter().flat_map(|(_, e)| e.vars()).collect();
    needed.extend(step.state_grads.iter().cloned());
    let known: std::collections::BTreeSet<&String> = parallel.iter().map(|(n, _)| n).collect();
    let mut staged: Vec<String> = Vec::new();
    let candidates = model.inputs.iter().cloned()
        .chain(model.state.iter().map(|s| s.name.clone()))
        .chain(emit.iter().map(|o| output_grad_name(o)))
        .chain(parallel.iter().map(|(n, _)| n.clone()));
    for n in candidates {
        if needed.contains(&n) && !staged.contains(&n) && (known.contains(&n) || !dependent.contains(&n)) {
            staged.push(n);
        }
    }
    Ok(AdjointSplit { step, parallel, chain, staged })
}

/// The bindings of `bindings` (in order) that `roots` need, directly or through one another.
fn closure(bindings: &[(String, Expr)], roots: &[String]) -> Vec<(String, Expr)> {
    let mut needed: std::collections::BTreeSet<String> = roots.iter().cloned().collect();
    let mut kept = Vec::new();
    for (n, e) in bindings.iter().rev() {
        if needed.contains(n) {
            needed.extend(e.vars());
            kept.push((n.clone(), e.clone()));
        }
    }
    kept.reverse();
    kept
}

/// What the reverse scan's epilogue evaluates for each element once the carried state adjoint
/// of its step is known: the bindings the input and parameter gradients need.
pub fn epilogue_bindings(step: &sparkc_ir::adjoint::AdjointStep) -> Vec<(String, Expr)> {
    let roots: Vec<String> = step.input_grads.iter().chain(&step.param_grads).cloned().collect();
    closure(&step.bindings, &roots)
}

/// `e` with each largest subexpression that reads none of `dependent` (and is more than a
/// variable or a constant) replaced by a fresh parallel binding; equal subexpressions share one.
fn hoist(e: &Expr, dependent: &std::collections::BTreeSet<String>, taken: &std::collections::BTreeSet<String>, parallel: &mut Vec<(String, Expr)>, hoisted: &mut std::collections::HashMap<String, String>) -> Expr {
    match e {
        Expr::Var(_) | Expr::Const(_) => e.clone(),
        _ if e.vars().iter().all(|v| !dependent.contains(v)) => {
            let name = hoisted.entry(e.to_string()).or_insert_with(|| {
                let name = (parallel.len()..).map(|k| format!("hoist_{k}")).find(|n| !taken.contains(n)).unwrap_or_default();
                parallel.push((name.clone(), e.clone()));
                name
            });
            Expr::Var(name.clone())
        }
        Expr::Un(op, a) => Expr::Un(*op, Box::new(hoist(a, dependent, taken, parallel, hoisted))),
        Expr::Bin(op, a, b) => Expr::Bin(*op, Box::new(hoist(a, dependent, taken, parallel, hoisted)), Box::new(hoist(b, dependent, taken, parallel, hoisted))),
    }
}

/// A whole tile of straight-line steps (`step(s, j)` writes step j's block, in `order`) whose
/// per-step stores to shared memory (`nst` a step) go to registers `{keep}{k}_{j}` and to
/// `dest(k, j)` after the last step: a store between the steps would keep the compiler from
/// issuing later steps' loads early, and each step would wait on its own.
fn kept_tile(s: &mut String, indent: &str, keep: &str, nst: usize, order: &[usize], step: &mut dyn FnMut(&mut String, usize), dest: &dyn Fn(usize, usize) -> String) {
    let l = order.len();
    for k in 0..nst {
        let _ = writeln!(s, "{indent}float {};", (0..l).map(|j| format!("{keep}{k}_{j}")).collect::<Vec<_>>().join(", "));
    }
    for &j in order {
        step(s, j);
    }
    for k in 0..nst {
        for j in 0..l {
            let _ = writeln!(s, "{indent}{} = {keep}{k}_{j};", dest(k, j));
        }
    }
}

/// Bindings of parameters only (β = σ(w)) are per-channel constants of a reverse scan:
/// computed once per thread, not per element.
fn per_channel_names(model: &NeuronModel, split: &AdjointSplit) -> std::collections::BTreeSet<String> {
    let mut per_channel: std::collections::BTreeSet<String> = model.params.iter().cloned().collect();
    for (n, e) in split.parallel.iter().chain(&epilogue_bindings(&split.step)) {
        if e.vars().iter().all(|v| per_channel.contains(v)) {
            per_channel.insert(n.clone());
        }
    }
    per_channel
}

/// The values the tiled reverse scan's chain reads that are the forward's own lets (σ(·) of
/// an input, say): the recompute computes them anyway, one tile ahead, so it keeps them in
/// shared memory and the chain and the epilogue read them, neither evaluating them nor
/// loading their inputs. Each is (the adjoint's name, the model's let).
fn recompute_stash(model: &NeuronModel, split: &AdjointSplit) -> Vec<(String, String)> {
    let per_channel = per_channel_names(model, split);
    let staged: Vec<String> = split.staged.iter().filter(|n| !per_channel.contains(*n)).cloned().collect();
    closure(&split.parallel, &staged)
        .into_iter()
        .filter(|(n, e)| !per_channel.contains(n) && !matches!(e, Expr::Var(_) | Expr::Const(_)))
        .filter_map(|(n, e)| model.lets.iter().find(|b| b.expr == e).map(|b| (n, b.name.clone())))
        .collect()
}

/// `e` with every subexpression equal to the expression of a stashed name replaced by the name.
fn with_stashed(e: &Expr, stashed: &[(String, Expr)]) -> Expr {
    if let Some((n, _)) = stashed.iter().find(|(_, x)| x == e) {
        return Expr::Var(n.clone());
    }
    match e {
        Expr::Un(op, a) => Expr::Un(*op, Box::new(with_stashed(a, stashed))),
        Expr::Bin(op, a, b) => Expr::Bin(*op, Box::new(with_stashed(a, stashed)), Box::new(with_stashed(b, stashed))),
        _ => e.clone(),
    }
}

/// Tiles whose parameter-gradient terms an epilogue thread sums in float before adding them
/// to its double total (a power of two).
const TACC_TILES: usize = 4;

/// Raw-input stages of the reverse scan. A tile's raw stage lives from its copy to its
/// epilogue, three iterations (recompute, chain, epilogue) plus the copies in flight, so
/// `stages - 3` tiles are in flight; more hide more of the memory latency.
fn adjoint_stages(raw_tile_bytes: usize) -> usize {
    (96 * 1024 / raw_tile_bytes.max(1)).clamp(5, 12)
}

/// Shared memory of the tiled reverse scan besides its raw stages: the recomputed states and
/// the recompute's stashed values (three tiles live each: recompute, chain, epilogue), the
/// carried adjoints (two), and each epilogue thread's f64 parameter-gradient sums for its two
/// channels (there, not in registers, which a 1,024-thread block has 64 of).
fn adjoint_work_bytes(states: usize, stashed: usize, params: usize, channels: usize) -> usize {
    (5 * states + 3 * stashed) * TILE_STEPS * channels * 4 + params * 2 * epilogue_threads(channels) * 8
}

/// Epilogue threads of a tiled reverse-scan block: all but the chain and recompute threads.
fn epilogue_threads(channels: usize) -> usize {
    TilePlan { steps: TILE_STEPS, stages: 0, smem_bytes: 0, channels }.block_threads() - 2 * channels
}

/// The tiled reverse scan's plan with blocks of `channels` channels (one chain thread each;
/// [`TILE_THREADS`] or [`NARROW_CHANNELS`]) for `c` channels, or None when it does not apply
/// (the per-column kernel runs instead). Tiles are one checkpoint chunk; each raw stage also
/// holds the tile's checkpoints. Stages are cut to what fits, down to four (one tile in
/// flight). `SPARKC_ADJOINT_STAGES` overrides them, for tuning.
pub fn adjoint_tile_plan(model: &NeuronModel, emit: &[String], inputs: &[Elem], out_grads: &[Elem], c: usize, channels: usize, max_smem: usize) -> Option<TilePlan> {
    let split = split_adjoint(model, emit).ok()?;
    let raw_row: usize = inputs.iter().chain(out_grads).map(|e| e.bytes() * channels).sum();
    let raw_stage = TILE_STEPS * raw_row + model.state.len() * channels * 4;
    let work = adjoint_work_bytes(model.state.len(), recompute_stash(model, &split).len(), model.params.len(), channels);
    let forced = std::env::var("SPARKC_ADJOINT_STAGES").ok().and_then(|v| v.parse::<usize>().ok()).filter(|s| (4..=16).contains(s));
    let wanted = forced.unwrap_or_else(|| adjoint_stages(TILE_STEPS * raw_row));
    let stages = (4..=wanted).rev().find(|s| s * raw_stage + work <= max_smem)?;
    let bytes = stages * raw_stage + work;
    c.is_multiple_of(channels).then_some(TilePlan { steps: TILE_STEPS, stages, smem_bytes: bytes, channels })
}

/// The reverse scan for widths that are multiples of `plan.channels`, warp-specialised like
/// [`scan_forward_tiled`] and walking the tiles from the last. Each iteration runs four
/// pieces on four tiles at once, one barrier apart, each role in a loop of its own (so that
/// the registers of one role are not held in another's):
/// - copies (`cp.async`, by the epilogue threads) of the inputs, output gradients and
///   checkpoints of a tile ahead;
/// - the forward recompute of tile it+1 from its checkpoint (one worker thread per channel),
///   which also keeps the forward's lets that the chain reads (see [`recompute_stash`]);
/// - the chain on tile it: only the state adjoint (a multiply-add or two per step, and the
///   state-adjoint-independent values it reads), each step's incoming adjoint kept in shared
///   memory;
/// - the epilogue of tile it-1 (the other workers): every input and parameter gradient, all
///   elements in parallel, now that their adjoints are known.
///
/// The chain is the only sequential part and carries no more than it must: the kernel is
/// bound by instruction issue, and a chain instruction is paid once per step by a single warp
/// per scheduler. Same signature as [`scan_adjoint_chunked`]; tiles are the 16-step checkpoint
/// chunks, so it needs the forward's checkpoints (without them the chain threads first run the
/// forward to make them).
#[allow(clippy::too_many_arguments)]
pub fn scan_adjoint_tiled(name: &str, model: &NeuronModel, emit: &[String], token_scope: bool, inputs: &[Elem], out_grads: &[Elem], in_grads: &[Elem], plan: TilePlan) -> Result<String, String> {
    let per_column = scan_adjoint_chunked(name, model, emit, token_scope, inputs, out_grads, in_grads)?;
    let split = split_adjoint(model, emit)?;
    let epilogue = epilogue_bindings(&split.step);
    let (l, ns, t) = (plan.steps, plan.stages, plan.channels);
    let (block, pt) = (plan.block_threads(), plan.block_threads() - plan.channels);
    if l != TILE_STEPS {
        return Err(format!("the reverse scan's tiles are one checkpoint chunk ({TILE_STEPS} steps), not {l}"));
    }
    if ns < 4 {
        return Err(format!("the tiled reverse scan needs at least 4 raw stages, not {ns}"));
    }
    // Tiles whose copies are in flight while the tile it+1 is recomputed.
    let lead = ns - 3;
    let id = |n: &str| ident(n);
    let nst = model.state.len();
    // Raw per-step tensors: inputs, then output gradients.
    let mut raw: Vec<(String, Elem)> = model.inputs.iter().map(|n| format!("in_{}", id(n))).zip(inputs.iter().copied()).collect();
    raw.extend((0..emit.len()).map(|k| format!("g_{k}")).zip(out_grads.iter().copied()));
    let raw_names: Vec<String> = model.inputs.iter().cloned().chain(emit.iter().map(|o| output_grad_name(o))).collect();
    let (streamed, raw_rows) = stream_layout(&raw, l, t);
    // Each stage ends with the tile's checkpoints (one row of t floats per state).
    let raw_stage = raw_rows + nst * t * 4;
    let per_channel = per_channel_names(model, &split);
    let staged: Vec<String> = split.staged.iter().filter(|n| !per_channel.contains(*n)).cloned().collect();
    let stash = recompute_stash(model, &split);
    let stash_exprs: Vec<(String, Expr)> = stash.iter().filter_map(|(n, _)| split.parallel.iter().find(|(m, _)| m == n).cloned()).collect();
    // Shared memory: raw stages, recomputed states (3 tiles), carried adjoints (2), the f64
    // parameter sums, the recompute's stash (3 tiles).
    let tile_floats = l * t;
    let sv_base = ns * raw_stage;
    let sv_stage = nst * tile_floats * 4;
    let sa_base = sv_base + 3 * sv_stage;
    let dacc_base = sa_base + 2 * sv_stage;
    let ss_base = dacc_base + model.params.len() * 2 * (pt - t) * 8;
    let ss_stage = stash.len() * tile_floats * 4;
    if ss_base + 3 * ss_stage > plan.smem_bytes {
        return Err(format!("the tiled reverse scan of `{}` does not fit its plan's shared memory", model.name));
    }
    // The epilogue threads: each owns two adjacent channels (loads and stores of pairs) and
    // every `per`-th row of a tile; their parameter-gradient sums (f64, in shared memory at
    // `dacc`, [param][channel of the pair][thread]) are added up per channel at the end.
    let workers = pt - t;
    let per = workers / (t / 2);
    if workers % (t / 2) != 0 {
        return Err(format!("the tiled reverse scan's {workers} epilogue threads do not split evenly over {} channel pairs", t / 2));
    }
    // The per-column kernel's signature, with the launch bounds of a tiled block.
    let sig_end = per_column.find(") {").ok_or("unexpected kernel text")?;
    // Narrow blocks ask for two per SM, so that registers do not hold them to one.
    let min_blocks = if t < TILE_THREADS { 2 } else { 1 };
    let mut s = per_column[..sig_end + 3].replacen("__global__ void ", &format!("__global__ void __launch_bounds__({block}, {min_blocks}) "), 1);
    s.push('\n');
    let _ = writeln!(s, "  extern __shared__ __align__(16) unsigned char sp_smem[];");
    let _ = writeln!(s, "  const int tid = threadIdx.x;\n  const bool chain = tid < {t};\n  const int pt = tid - {t};");
    let _ = writeln!(s, "  const long long col0 = blockIdx.x * {t}LL;");
    let _ = writeln!(s, "  const int b = (int)(col0 / C), c0 = (int)(col0 % C);");
    let _ = writeln!(s, "  const long long tile_base = (long long)b * S * C + c0;");
    let _ = writeln!(s, "  const int ntiles = (S + {l} - 1) / {l};\n  const int nck = ntiles;");
    let reset = |s: &mut String, indent: &str| s.push_str(&token_reset(model, token_scope, indent));
    // Checkpoints, when the forward did not keep them: the chain threads run the forward.
    let _ = writeln!(s, "  if (!have_ck && chain) {{");
    let _ = writeln!(s, "    const long long col = col0 + tid;\n    const int c = c0 + tid;\n    const long long base = (long long)b * S * C + c;");
    for n in &model.params {
        let _ = writeln!(s, "    const float {} = p_{}[c];", id(n), id(n));
    }
    s.push_str(&checkpoint_pass(model, token_scope));
    let _ = writeln!(s, "  }}\n  __syncthreads();");
    // Each thread's channel (chain and recompute threads) or pair of channels from `pc`, and
    // rows of a tile from `row0` (epilogue threads).
    let _ = writeln!(s, "  const int wk = pt < {t} ? 0 : pt - {t};");
    let _ = writeln!(s, "  const int pc = 2 * (wk % {}), row0 = wk / {};", t / 2, t / 2);
    let _ = writeln!(s, "  const int ch = chain ? tid : (pt < {t} ? pt : pc), c = c0 + ch;");
    for n in &model.params {
        let _ = writeln!(s, "  const float {} = p_{}[c];", id(n), id(n));
    }
    let mut defined: std::collections::BTreeSet<&String> = model.params.iter().collect();
    let mut per_channel_lets = Vec::new();
    for (n, e) in split.parallel.iter().chain(&epilogue).filter(|(n, _)| per_channel.contains(n)) {
        if defined.insert(n) {
            let _ = writeln!(s, "  const float {} = {};", id(n), expr(e, &|v| id(v)));
            per_channel_lets.push((n, e));
        }
    }
    // The same at an epilogue thread's two channels (`w0_*`, `w1_*`).
    for h in 0..2 {
        for n in &model.params {
            let _ = writeln!(s, "  const float w{h}_{0} = p_{0}[c0 + pc + {h}];", id(n));
        }
        for (n, e) in &per_channel_lets {
            let _ = writeln!(s, "  const float w{h}_{} = {};", id(n), expr(e, &|v| format!("w{h}_{}", id(v))));
        }
    }
    // Copies of tile `cx` (recomputed at iteration cx - 1, its epilogue at cx + 1).
    let ck_rows: Vec<(String, usize)> = model.state.iter().enumerate().map(|(k, st)| (format!("ck_{}", id(&st.name)), raw_rows + k * t * 4)).collect();
    // The epilogue threads copy: the chain and recompute threads' loops then hold no copy slots.
    let copies = TileCopies::new(&streamed, &ck_rows, t, l, 2 * t, pt - t, ns, raw_stage, true);
    s.push_str(&copies.setup);
    let issue = copies.issue("cx", "ntiles - 1 - cx");
    // Loads row `j` of the raw stage `stg` at channel `ch` (C expressions), the tensors `wanted`.
    let load_raw_where = |s: &mut String, indent: &str, j: &str, ch: &str, wanted: &dyn Fn(&str) -> bool| {
        for (name, ((_, e), x)) in raw_names.iter().zip(raw.iter().zip(&streamed)).filter(|(n, _)| wanted(n)) {
            let _ = writeln!(s, "{indent}const float {} = sp_ld((const {}*)(stg + {} + ({j}) * {}), {ch});", id(name), e.c_type(), x.offset, x.row_bytes);
        }
    };
    let load_raw = |s: &mut String, indent: &str, j: &str| load_raw_where(s, indent, j, "ch", &|_| true);
    // Opens the block of a piece working on tile `x` (an expression of `it`): its time
    // offset, raw stage and recomputed states.
    let head = |s: &mut String, x: &str| {
        let _ = writeln!(s, "      {{\n      const int x = {x};\n      if (x >= 0 && x < ntiles) {{");
        let _ = writeln!(s, "        const int tl = ntiles - 1 - x;\n        const int s0 = tl * {l};");
        let _ = writeln!(s, "        const unsigned char* stg = sp_smem + (x % {ns}) * {raw_stage};");
        let _ = writeln!(s, "        float* sv = (float*)(sp_smem + {sv_base} + (x % 3) * {sv_stage});");
        let _ = writeln!(s, "        float* sa = (float*)(sp_smem + {sa_base} + (x & 1) * {sv_stage});");
        let _ = writeln!(s, "        float* ss = (float*)(sp_smem + {ss_base} + (x % 3) * {ss_stage});");
        let _ = writeln!(s, "        (void)sa; (void)ss;");
    };
    let tail = "      }\n      }\n";
    // Recompute: the forward over the tile from its checkpoint, one thread per channel.
    // Straight-line for a whole tile (see the forward), its states kept (see `kept_tile`); a
    // loop for the partial one.
    let mut recompute = String::new();
    head(&mut recompute, "it + 1");
    for (k, st) in model.state.iter().enumerate() {
        let _ = writeln!(recompute, "        float {} = ((const float*)(stg + {}))[ch];", id(&st.name), raw_rows + k * t * 4);
    }
    // Its stores: each step's state before the step (to `sv`) and the stashed lets (to `ss`).
    let kept_at = |k: usize, j: &str| {
        if k < nst {
            format!("sv[{} + ({j}) * {t} + ch]", k * tile_floats)
        } else {
            format!("ss[{} + ({j}) * {t} + ch]", (k - nst) * tile_floats)
        }
    };
    let recompute_step = |s: &mut String, j: &str, keep: bool| {
        reset(s, "          ");
        let put = |s: &mut String, k: usize, v: &str| {
            let _ = if keep { writeln!(s, "          keep_{k}_{j} = {v};") } else { writeln!(s, "          {} = {v};", kept_at(k, j)) };
        };
        for (k, st) in model.state.iter().enumerate() {
            put(s, k, &id(&st.name));
        }
        load_raw(s, "          ", j);
        let (step, lets) = forward_step_named(model, &[], &Default::default());
        s.push_str(&step);
        for (k, (_, b)) in stash.iter().enumerate() {
            put(s, nst + k, &lets[b]);
        }
    };
    let _ = writeln!(recompute, "        if (s0 + {l} <= S) {{");
    let steps: Vec<usize> = (0..l).collect();
    let mut whole_step = |s: &mut String, j: usize| {
        let _ = writeln!(s, "          {{\n          const int step = s0 + {j};");
        recompute_step(s, &j.to_string(), true);
        let _ = writeln!(s, "          }}");
    };
    kept_tile(&mut recompute, "          ", "keep_", nst + stash.len(), &steps, &mut whole_step, &|k, j| kept_at(k, &j.to_string()));
    let _ = writeln!(recompute, "        }} else {{");
    let _ = writeln!(recompute, "        for (int j = 0; j < {l}; ++j) {{");
    let _ = writeln!(recompute, "          const int step = s0 + j;\n          if (step >= S) break;");
    recompute_step(&mut recompute, "j", false);
    let _ = writeln!(recompute, "        }}\n        }}");
    recompute.push_str(tail);
    // Epilogue of tile it-1: input gradients stored, parameter gradients summed per thread.
    // A worker's rows are unrolled (at most ⌈l / per⌉, predicated) so that their loads and
    // math interleave; each row is two channels, loaded and stored as pairs.
    let mut epi = String::new();
    head(&mut epi, "it - 1");
    let _ = writeln!(epi, "        #pragma unroll\n        for (int k = 0; k < {}; ++k) {{", l.div_ceil(per));
    let _ = writeln!(epi, "          const int j = row0 + k * {per};");
    let _ = writeln!(epi, "          if (j >= {l} || s0 + j >= S) continue;");
    for (name, ((_, e), x)) in raw_names.iter().zip(raw.iter().zip(&streamed)) {
        let _ = writeln!(epi, "          const float2 r2_{} = sp_ld2((const {}*)(stg + {} + j * {}), pc);", id(name), e.c_type(), x.offset, x.row_bytes);
    }
    for (k, st) in model.state.iter().enumerate() {
        let _ = writeln!(epi, "          const float2 s2_{} = *(const float2*)(sv + {} + j * {t} + pc);", id(&st.name), k * tile_floats);
        let _ = writeln!(epi, "          const float2 a2_{} = *(const float2*)(sa + {} + j * {t} + pc);", id(&st.name), k * tile_floats);
    }
    for (k, (n, _)) in stash.iter().enumerate() {
        let _ = writeln!(epi, "          const float2 z2_{} = *(const float2*)(ss + {} + j * {t} + pc);", id(n), k * tile_floats);
    }
    for n in &model.inputs {
        let _ = writeln!(epi, "          float2 g2_{};", id(n));
    }
    for (h, lane) in ["x", "y"].iter().enumerate() {
        let _ = writeln!(epi, "          {{");
        for name in &raw_names {
            let _ = writeln!(epi, "            const float {0} = r2_{0}.{lane};", id(name));
        }
        for st in &model.state {
            let _ = writeln!(epi, "            const float {0} = s2_{0}.{lane};", id(&st.name));
            let _ = writeln!(epi, "            const float {} = a2_{}.{lane};", id(&state_grad_name(&st.name)), id(&st.name));
        }
        for n in model.params.iter().chain(per_channel_lets.iter().map(|(n, _)| *n)) {
            let _ = writeln!(epi, "            const float {0} = w{h}_{0};", id(n));
        }
        for (n, _) in &stash {
            let _ = writeln!(epi, "            const float {0} = z2_{0}.{lane};", id(n));
        }
        for (n, e) in epilogue.iter().filter(|(n, _)| !per_channel.contains(n) && !stash.iter().any(|(m, _)| m == n)) {
            let _ = writeln!(epi, "            const float {} = {};", id(n), expr(&with_stashed(e, &stash_exprs), &|v| id(v)));
        }
        for (n, g) in model.inputs.iter().zip(&split.step.input_grads) {
            let _ = writeln!(epi, "            g2_{}.{lane} = {};", id(n), id(g));
        }
        for (n, g) in model.params.iter().zip(&split.step.param_grads) {
            let _ = writeln!(epi, "            tacc{h}_{} += {};", id(n), id(g));
        }
        let _ = writeln!(epi, "          }}");
    }
    let _ = writeln!(epi, "          const long long at = tile_base + (long long)(s0 + j) * C + pc;");
    for n in &model.inputs {
        let _ = writeln!(epi, "          sp_st2(din_{0}, at, g2_{0});", id(n));
    }
    let _ = writeln!(epi, "        }}");
    epi.push_str(tail);
    // The chain on tile it.
    let mut chain = String::new();
    head(&mut chain, "it");
    // The values the chain reads that do not depend on the carried adjoint: the recompute's
    // stash, and the rest evaluated by the chain itself from the tile's inputs and states
    // (they are few and cheap: the output gradient, say).
    let for_staged: Vec<(String, Expr)> = closure(&split.parallel, &staged).into_iter().filter(|(n, _)| !stash.iter().any(|(m, _)| m == n)).collect();
    let staged_vars: std::collections::BTreeSet<String> = for_staged.iter().flat_map(|(_, e)| e.vars()).chain(staged.iter().cloned()).collect();
    // In a whole tile its stores of the incoming adjoints are kept (see `kept_tile`).
    let chain_step = |s: &mut String, j: &str, keep: bool| {
        for (k, st) in model.state.iter().enumerate() {
            if keep {
                let _ = writeln!(s, "        keep_a{k}_{j} = carry_{};", id(&st.name));
            } else {
                let _ = writeln!(s, "        sa[{} + ({j}) * {t} + tid] = carry_{};", k * tile_floats, id(&st.name));
            }
        }
        load_raw_where(s, "        ", j, "tid", &|n| staged_vars.contains(n));
        for (k, (n, _)) in stash.iter().enumerate() {
            let _ = writeln!(s, "        const float {} = ss[{} + ({j}) * {t} + tid];", id(n), k * tile_floats);
        }
        for (k, st) in model.state.iter().enumerate() {
            if staged_vars.contains(&st.name) {
                let _ = writeln!(s, "        const float {} = sv[{} + ({j}) * {t} + tid];", id(&st.name), k * tile_floats);
            }
        }
        for (n, e) in for_staged.iter().filter(|(n, _)| !per_channel.contains(n)) {
            let _ = writeln!(s, "        const float {} = {};", id(n), expr(e, &|v| id(v)));
        }
        for st in &model.state {
            let _ = writeln!(s, "        const float {} = carry_{};", id(&state_grad_name(&st.name)), id(&st.name));
        }
        for (n, e) in &split.chain {
            let _ = writeln!(s, "        const float {} = {};", id(n), expr(e, &|v| id(v)));
        }
        for (st, g) in model.state.iter().zip(&split.step.state_grads) {
            let cut = if token_scope { "(step % K == 0) ? 0.0f : " } else { "" };
            let _ = writeln!(s, "        carry_{} = {cut}{};", id(&st.name), id(g));
        }
    };
    // As in the forward: a whole tile is straight-line code, the first (partial) tile a loop.
    let _ = writeln!(chain, "        if (s0 + {l} <= S) {{");
    let steps: Vec<usize> = (0..l).rev().collect();
    let mut whole_step = |s: &mut String, j: usize| {
        let _ = writeln!(s, "        {{\n        const int step = s0 + {j};\n        (void)step;");
        chain_step(s, &j.to_string(), true);
        let _ = writeln!(s, "        }}");
    };
    kept_tile(&mut chain, "        ", "keep_a", nst, &steps, &mut whole_step, &|k, j| format!("sa[{} + {j} * {t} + tid]", k * tile_floats));
    let _ = writeln!(chain, "        }} else {{");
    let _ = writeln!(chain, "        for (int j = {}; j >= 0; --j) {{", l - 1);
    let _ = writeln!(chain, "        const int step = s0 + j;\n        if (step >= S) continue;");
    chain_step(&mut chain, "j", false);
    let _ = writeln!(chain, "        }}\n        }}");
    chain.push_str(tail);

    // The pipeline: tiles 0..lead in flight, then one iteration per tile, one to fill and one
    // to drain.
    for st in &model.state {
        let _ = writeln!(s, "  float carry_{0} = chain ? gf_{0}[col0 + tid] : 0.0f;", id(&st.name));
    }
    let _ = writeln!(s, "  double* dacc = (double*)(sp_smem + {dacc_base});");
    let _ = writeln!(s, "  if (pt >= {t}) {{");
    for k in 0..2 * model.params.len() {
        let _ = writeln!(s, "    dacc[{} + wk] = 0.0;", k * workers);
    }
    let _ = writeln!(s, "  }}");
    // One loop per role, in step through the barriers: 0 (all threads) ends an iteration, 1
    // (all but the chain) makes a tile's copies visible once its copiers have waited for them.
    let (end, landed) = ("      asm volatile(\"bar.sync 0;\" ::: \"memory\");", format!("      asm volatile(\"bar.sync 1, {pt};\" ::: \"memory\");"));
    let _ = writeln!(s, "  if (chain) {{\n  for (int it = -1; it <= ntiles; ++it) {{\n{chain}{end}\n  }}");
    let _ = writeln!(s, "  }} else if (pt < {t}) {{\n  for (int it = -1; it <= ntiles; ++it) {{\n{landed}\n      {{\n{recompute}      }}\n{end}\n  }}");
    let _ = writeln!(s, "  }} else {{");
    let _ = writeln!(s, "    for (int cx = 0; cx < {lead}; ++cx) {{\n{issue}    }}");
    // Parameter gradients: a float sum over a few tiles, then added to the thread's double
    // total (a float sum of at most 2·TACC_TILES terms loses nothing a bf16 input keeps).
    for n in &model.params {
        let _ = writeln!(s, "  float tacc0_{0} = 0.0f, tacc1_{0} = 0.0f;", id(n));
    }
    let _ = writeln!(s, "  for (int it = -1; it <= ntiles; ++it) {{");
    let _ = writeln!(s, "      {{\n      const int cx = it + 1 + {lead};\n{issue}      }}");
    let _ = writeln!(s, "      sp_cp_wait<{lead}>();\n{landed}");
    let _ = writeln!(s, "{epi}");
    if !model.params.is_empty() {
        let _ = writeln!(s, "      if (((it + 1) & {}) == 0 || it == ntiles) {{", TACC_TILES - 1);
        for (k, n) in model.params.iter().enumerate() {
            let _ = writeln!(s, "        dacc[{0} + wk] += (double)tacc0_{1};\n        dacc[{2} + wk] += (double)tacc1_{1};", 2 * k * workers, id(n), (2 * k + 1) * workers);
            let _ = writeln!(s, "        tacc0_{0} = 0.0f; tacc1_{0} = 0.0f;", id(n));
        }
        let _ = writeln!(s, "      }}");
    }
    let _ = writeln!(s, "{end}\n  }}\n  }}");
    // Results: the initial-state adjoints from the chain; the parameter gradients summed over
    // the epilogue threads of each channel (through the raw stages, free now).
    let _ = writeln!(s, "  if (chain) {{");
    for st in &model.state {
        let _ = writeln!(s, "    dinit_{0}[col0 + tid] = carry_{0};", id(&st.name));
    }
    let _ = writeln!(s, "  }}");
    if !model.params.is_empty() {
        // Channel `tid` is lane tid % 2 of the pair tid / 2, in each of the `per` rows.
        let _ = writeln!(s, "  __syncthreads();\n  if (chain) {{");
        for (k, n) in model.params.iter().enumerate() {
            let _ = writeln!(s, "    {{\n    double sum = 0.0;\n    for (int r = 0; r < {per}; ++r) sum += dacc[({} + tid % 2) * {workers} + r * {} + tid / 2];", 2 * k, t / 2);
            let _ = writeln!(s, "    dp_{}[col0 + tid] = (float)sum;\n    }}", id(n));
        }
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "}}");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkc_ir::neuron;

    #[test]
    fn kernels_are_generated_from_the_model() {
        let m = neuron::plif();
        let emit = ["leak".to_string()];
        let io = ScanIo::f32(&m, &emit);
        let src = scan_forward_simple("plif_fwd", &m, &emit, false, &io, 16);
        assert!(src.contains("extern \"C\" __global__ void plif_fwd("));
        assert!(src.contains(">= "), "{src}");
        assert!(src.contains("sp_sigmoid(v_w)"), "{src}");
        let io16 = ScanIo { inputs: vec![Elem::Bf16], outputs: vec![Elem::Bf16] };
        let tiled = scan_forward_tiled("plif_tiled", &m, &emit, false, &io16, tile_plan(&m, &io16, 227 * 1024));
        // `SHOW_KERNEL=1 cargo test -p sparkc-backend-cuda --lib -- --nocapture` prints the
        // generated kernels, for reading them.
        if std::env::var_os("SHOW_KERNEL").is_some() {
            eprintln!("{tiled}");
        }
        assert!(tiled.contains("const unsigned short* __restrict__ in_v_x"), "{tiled}");
        assert!(tiled.contains("sp_cp16_at("), "{tiled}");
        let adj = scan_adjoint_chunked("plif_bwd", &m, &emit, true, &[Elem::F32], &[Elem::Bf16], &[Elem::Bf16]).unwrap();
        assert!(adj.contains("unsigned short* __restrict__ din_v_x"), "{adj}");
        assert!(adj.contains("step % K == 0"), "{adj}");
        let sel = neuron::selective_plif();
        let vp = ["vpost".to_string()];
        let sel_plan = adjoint_tile_plan(&sel, &vp, &[Elem::Bf16; 3], &[Elem::Bf16], 7168, TILE_THREADS, 227 * 1024).unwrap();
        let tiled_adj = scan_adjoint_tiled("sel_bwd", &sel, &vp, false, &[Elem::Bf16; 3], &[Elem::Bf16], &[Elem::Bf16; 3], sel_plan).unwrap();
        if std::env::var_os("SHOW_KERNEL").is_some() {
            let plan = adjoint_tile_plan(&m, &emit, &[Elem::Bf16], &[Elem::Bf16], 896, NARROW_CHANNELS, 227 * 1024).unwrap();
            eprintln!("{}", scan_adjoint_tiled("plif_bwd_tiled", &m, &emit, false, &[Elem::Bf16], &[Elem::Bf16], &[Elem::Bf16], plan).unwrap());
        }
        if std::env::var_os("SHOW_KERNEL").is_some() {
            eprintln!("{tiled_adj}\n{:?}", split_adjoint(&sel, &vp).unwrap());
        }
        assert!(tiled_adj.contains("carry_v_v = "), "{tiled_adj}");
        // Selective PLIF with a detached reset: the chain needs only β, the previous state, the
        // spike and the output gradient; the recomputed step and the surrogate are parallel.
        let split = split_adjoint(&sel, &vp).unwrap();
        // The chain carries only the state adjoint: a_{t-1} = β·(a_t + g_t).
        assert_eq!(split.staged, ["beta", "d_f4"], "{split:?}");
        assert_eq!(split.chain.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["d_f3", "d_f0", "grad_v"], "{split:?}");
        // The gradients of β, u and θ are the epilogue's, with the surrogate-free spike term.
        let epi = epilogue_bindings(&split.step);
        assert!(epi.iter().any(|(n, _)| n == "grad_theta") && epi.iter().all(|(n, _)| n != "grad_v"), "{epi:?}");
    }

    #[test]
    fn the_recompute_keeps_the_lets_the_chain_reads() {
        // Selective PLIF as the scan-fusion pass leaves it: β = σ(b + b1) is a let of an input.
        let mut m = neuron::selective_plif();
        m.name = "selective_fused".into();
        m.params = vec!["b1".into()];
        m.inputs = vec!["b".into(), "u".into(), "theta".into()];
        m.lets = vec![neuron::Binding { name: "beta".into(), expr: sparkc_ir::parse_expr("sigmoid(b + b1)").unwrap() }];
        let vp = ["vpost".to_string()];
        let split = split_adjoint(&m, &vp).unwrap();
        assert_eq!(recompute_stash(&m, &split), [("f0".to_string(), "beta".to_string())]);
        let (io, g) = ([Elem::Bf16; 3], [Elem::Bf16]);
        let plan = adjoint_tile_plan(&m, &vp, &io, &g, 7168, TILE_THREADS, 227 * 1024).unwrap();
        let k = scan_adjoint_tiled("sel_bwd", &m, &vp, false, &io, &g, &io, plan).unwrap();
        // The chain reads σ from the stash and evaluates none; the recompute stores it.
        let chain = &k[k.find("if (chain) {\n  for").unwrap()..k.find("} else if (pt <").unwrap()];
        let recompute = &k[k.find("} else if (pt <").unwrap()..];
        assert!(!chain.contains("sp_sigmoid") && chain.contains("const float v_f0 = ss["), "{chain}");
        assert!(recompute.contains("ss[0 + (15) * 128 + ch] = keep_1_15;"), "{recompute}");
    }

    #[test]
    fn the_modulation_prologue_leaves_the_chain() {
        // Fused selective PLIF: σ, softplus and |·| of the inputs are state-independent.
        let m = neuron::plif();
        let split = split_step(&m);
        // PLIF: β = σ(w) is a per-channel constant; only the input is staged.
        assert_eq!(split.constant.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["beta"]);
        assert!(split.prologue.is_empty() && split.staged == ["x"], "{split:?}");
        let io = ScanIo::f32(&m, &["leak".to_string()]);
        assert!(can_tile(&m, 256, &io, 227 * 1024) && !can_tile(&m, 200, &io, 227 * 1024));
    }
}

