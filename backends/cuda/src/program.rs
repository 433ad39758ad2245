//! A graph compiled for the GPU: one CUDA module per graph (generated map and scan kernels plus
//! the library), cuBLAS for the linear layers, device-resident parameters.

use crate::codegen::{self, Elem};
use crate::capture::{graph_node_kinds, CapturePool, GraphTables};
use crate::device::Gpu;
use crate::fusion::{self, Fused, FusionPlan};
use crate::scan_codegen::{self, ScanIo, TilePlan};
use crate::scan_segmented;
use crate::library::LIBRARY;
use crate::CudaError;
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use sparkc_ir::tensor::TensorData;
use sparkc_ir::types::DimBindings;
use sparkc_ir::{DType, Graph, NodeIndex, Op, Tensor, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// A tensor on the device.
pub enum DevTensor {
    F32 { shape: Vec<usize>, data: CudaSlice<f32> },
    /// bf16 bit patterns (activations that GEMMs read or write, in bf16 precision).
    Bf16 { shape: Vec<usize>, data: CudaSlice<u16> },
    I64 { shape: Vec<usize>, data: CudaSlice<i64> },
}

impl DevTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            DevTensor::F32 { shape, .. } | DevTensor::Bf16 { shape, .. } | DevTensor::I64 { shape, .. } => shape,
        }
    }

    pub(crate) fn f32(&self) -> Option<&CudaSlice<f32>> {
        match self {
            DevTensor::F32 { data, .. } => Some(data),
            _ => None,
        }
    }

    fn i64(&self) -> Option<&CudaSlice<i64>> {
        match self {
            DevTensor::I64 { data, .. } => Some(data),
            _ => None,
        }
    }

    fn elem(&self) -> Option<Elem> {
        match self {
            DevTensor::F32 { .. } => Some(Elem::F32),
            DevTensor::Bf16 { .. } => Some(Elem::Bf16),
            DevTensor::I64 { .. } => None,
        }
    }

    /// Push the device pointer as a kernel argument, whatever the element type.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        match self {
            DevTensor::F32 { data, .. } => b.arg(data),
            DevTensor::Bf16 { data, .. } => b.arg(data),
            DevTensor::I64 { data, .. } => b.arg(data),
        };
    }

    fn push_mut<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
        match self {
            DevTensor::F32 { data, .. } => b.arg(data),
            DevTensor::Bf16 { data, .. } => b.arg(data),
            DevTensor::I64 { data, .. } => b.arg(data),
        };
    }

    fn ptr(&self, st: &Arc<cudarc::driver::CudaStream>) -> u64 {
        use cudarc::driver::DevicePtr;
        match self {
            DevTensor::F32 { data, .. } => data.device_ptr(st).0,
            DevTensor::Bf16 { data, .. } => data.device_ptr(st).0,
            DevTensor::I64 { data, .. } => data.device_ptr(st).0,
        }
    }
}

/// Checkpoints a forward scan keeps for its reverse scan (one buffer per state variable).
type Tapes = HashMap<NodeIndex, Vec<CudaSlice<f32>>>;

/// The carried values of a program kept on the device between runs, and the captured step.
struct Resident {
    batch: usize,
    state: BTreeMap<String, DevTensor>,
    captured: Option<Captured>,
    /// The per-step input shapes of the previous run: a second run like it is captured.
    seen: Option<Vec<(String, Vec<usize>)>>,
}

/// A per-step run captured as a CUDA graph, with the buffers it reads inputs from and writes
/// outputs to.
struct Captured {
    key: Vec<(String, Vec<usize>)>,
    /// The inputs fed from the host per step: name, input node, dtype.
    feeds: Vec<(String, NodeIndex, DType)>,
    inputs: BTreeMap<String, DevTensor>,
    outputs: BTreeMap<String, DevTensor>,
    graph: cudarc::driver::CudaGraph,
    /// Batched GEMMs' pointer tables the graph reads (dropped after it).
    _tables: GraphTables,
}

pub(crate) enum Slot<'a> {
    Owned(DevTensor),
    Param(&'a DevTensor),
}

impl Slot<'_> {
    fn get(&self) -> &DevTensor {
        match self {
            Slot::Owned(t) => t,
            Slot::Param(t) => t,
        }
    }
}

/// A graph output as [`GpuProgram::walk`] hands it over: its buffer, when nothing in the graph
/// reads it any more (a gradient emitted as soon as it is made), or a view.
pub(crate) enum Emitted<'x> {
    Owned(DevTensor),
    Borrowed(&'x DevTensor),
}

impl Emitted<'_> {
    pub(crate) fn get(&self) -> &DevTensor {
        match self {
            Emitted::Owned(t) => t,
            Emitted::Borrowed(t) => t,
        }
    }
}

/// Arithmetic of the linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// fp32 GEMMs (no TF32): matches the CPU oracle to rounding; what the goldens check.
    F32,
    /// bf16 GEMM operands with fp32 accumulation, as the original's autocast: activations that
    /// only GEMMs, element-wise maps and scans read are stored in bf16 (a GEMM writes them in
    /// bf16, a scan reads them); scan state and arithmetic, norms, the residual stream,
    /// weights and their gradients stay fp32.
    Bf16,
}

pub struct GpuProgram {
    pub gpu: Gpu,
    precision: Precision,
    /// bf16 copies of the parameters that feed GEMMs (bf16 mode only).
    pub(crate) params_bf16: BTreeMap<String, CudaSlice<u16>>,
    graph: Graph,
    order: Vec<NodeIndex>,
    module: Arc<CudaModule>,
    kernels: HashMap<String, CudaFunction>,
    last_use: HashMap<Value, usize>,
    /// Gradient outputs no node reads: handed out as soon as they are produced and freed
    /// then, so a training step never holds the whole gradient set twice.
    early_outputs: HashMap<Value, String>,
    /// The generated kernel each map / scan node runs (shared between identical nodes).
    kernel_of: HashMap<NodeIndex, String>,
    /// Values stored in bf16 (bf16 mode only); all others are f32 (or integer).
    storage: HashMap<Value, Elem>,
    /// Chains of row ops run as one kernel each (inference).
    fusion: FusionPlan,
    /// Reverse scan → the forward scan whose checkpoints it reads.
    tape_of: HashMap<NodeIndex, NodeIndex>,
    /// Forward scans that keep checkpoints for a reverse scan.
    taped: HashSet<NodeIndex>,
    /// Scans (forward and reverse) run by the tiled kernel, with its plan.
    tiled: HashMap<NodeIndex, TilePlan>,
    /// Tiled scans that also have a 64-channel-block kernel, for batches too small to give
    /// every SM a 128-channel block.
    narrow: HashMap<NodeIndex, (TilePlan, String)>,
    /// Reverse scans that also have the time-parallel pair (summary, adjoint kernel), for few
    /// columns ([`scan_segmented`]).
    segmented: HashMap<NodeIndex, (String, String)>,
    /// Forward scans run by the tiled kernel that also have a one-thread-per-column kernel,
    /// for runs of a few steps (a decode step's 16 frames), where the tiled kernel's setup and
    /// shared-memory pipeline cost more than the steps.
    short: HashMap<NodeIndex, String>,
    /// Carried values kept on the device between runs, when asked for.
    resident: Option<Resident>,
    /// Where a step being captured allocates (made at the first capture), and whether one is.
    capture_pool: std::cell::OnceCell<CapturePool>,
    capturing: std::cell::Cell<bool>,
    /// Pointer tables of the step being captured, handed to its graph.
    graph_tables: std::cell::RefCell<GraphTables>,
    /// Final-state results of scans that may be written over the carried state they start
    /// from (the state's only reader is that scan, and the result is read by nothing but the
    /// state output): final value → the state's name.
    carried_in_place: HashMap<Value, String>,
    /// During a resident run: the kept state buffers, and the states a scan wrote in place
    /// (which then need no copy at the end of the run).
    state_buffers: std::cell::RefCell<HashMap<String, u64>>,
    written_in_place: std::cell::RefCell<HashSet<String>>,
    /// No host round trip inside a run (no embedding gradient): a run can be captured.
    capturable: bool,
    pub(crate) params: BTreeMap<String, DevTensor>,
    /// Identity (data address and length) of the host parameters last uploaded.
    pub(crate) uploaded_from: BTreeMap<String, (usize, usize)>,
    /// The parameter map the last complete [`GpuProgram::set_params`] saw, as (key, data,
    /// shape) identities per entry: a decode step passes the same map every token, and
    /// checking 300 parameters one by one took longer than a fifth of the step.
    pub(crate) params_seen: Vec<[usize; 5]>,
    /// Per-node CUDA events of the runs made while profiling (see [`GpuProgram::profile`]).
    profile: Option<std::cell::RefCell<Vec<(NodeIndex, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>>>,
    /// Device-side training state (gradient accumulators, Adam moments), when used.
    pub(crate) training: crate::training::TrainingState,
}

/// Linear layers with at most this many outputs run as one fused dot-product kernel.
const NARROW_LINEAR: usize = 4;

/// The name generated kernels carry until they are named by the hash of their source.
const PLACEHOLDER: &str = "SP_KERNEL_NAME";

pub(crate) fn grid(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Runs of at most this many steps use a tiled scan's one-thread-per-column kernel.
const SHORT_SCAN_STEPS: usize = 64;

/// One thread per column, 128 per block (the untiled scan kernels).
fn simple_scan_launch(cols: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (cols.div_ceil(128).max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

/// Below this many rows a library row kernel gives each row a whole block.
const FEW_ROWS: usize = 2048;

/// The widest rows `sp_rms_norm_grad_blocks` takes (32 lanes × RMS_LANE_VECS float4s).
const RMS_GRAD_BLOCK_COLS: usize = 32 * 32;

/// The team of threads per row of the library's row kernels (`ROW_TEAM`): a warp per row, eight
/// rows per block, when there are many rows; a 256-thread block per row when there are few.
fn row_teams(rows: usize) -> LaunchConfig {
    if rows < FEW_ROWS {
        return LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    }
    LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
}

/// Blocks over (columns of `d`, rows) for the kernels that write a row's k frames from one
/// read (repeat_frames and the frame-weighted sum's frame gradient).
fn repeat_grid(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (d.max(1).div_ceil(256) as u32, rows.clamp(1, 65_535) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn rows(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.next_power_of_two().clamp(32, 256) as u32;
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

impl GpuProgram {
    /// Generate and compile the module for `graph` (verified first), fp32 throughout.
    pub fn compile(gpu: Gpu, graph: &Graph) -> Result<GpuProgram, CudaError> {
        GpuProgram::compile_with(gpu, graph, Precision::F32)
    }

    pub fn compile_with(gpu: Gpu, graph: &Graph, precision: Precision) -> Result<GpuProgram, CudaError> {
        sparkc_ir::verify::verify(graph).map_err(|e| CudaError::Unsupported(e.to_string()))?;
        let order = graph.execution_order().map_err(|e| CudaError::Unsupported(e.to_string()))?;
        let mut src = String::from(codegen::PRELUDE);
        src.push_str(LIBRARY);
        let mut names = vec![
            "sp_embedding", "sp_linear_narrow", "sp_repeat_frames", "sp_mean_frames", "sp_add_bias", "sp_rms_norm", "sp_center_last",
            "sp_centered_residual", "sp_zero", "sp_pointer_table", "sp_ponder_weights", "sp_frame_weighted_sum", "sp_cross_entropy", "sp_masked_mean", "sp_to_bf16",
            "sp_sum_rows", "sp_sum_rows_partial", "sp_sum_chunks", "sp_sum_all_partial", "sp_sum_inner", "sp_embedding_grad", "sp_sum_frames", "sp_rms_norm_grad", "sp_rms_norm_grad_blocks", "sp_ponder_weights_grad",
            "sp_frame_weighted_sum_grad_frames", "sp_frame_weighted_sum_grad_weights", "sp_cross_entropy_grad", "sp_mean_grad",
            "sp_accumulate", "sp_sum_squares", "sp_adam",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        let storage = if precision == Precision::Bf16 { plan_storage(graph) } else { HashMap::new() };
        let elem = |v: Value| storage.get(&v).copied().unwrap_or(Elem::F32);
        let inference = !graph.g.node_indices().any(|n| matches!(graph.node(n).op, Op::LinearGradWeight));
        let fusion = fusion::plan(graph, &order, precision == Precision::Bf16 && inference, |v| elem(v) == Elem::F32);
        let tape_of = pair_reverse_scans(graph);
        let taped: HashSet<NodeIndex> = tape_of.values().copied().collect();
        let mut tiled = HashMap::new();
        let mut narrow: HashMap<NodeIndex, (TilePlan, String)> = HashMap::new();
        let mut segmented: HashMap<NodeIndex, (String, String)> = HashMap::new();
        let mut short: HashMap<NodeIndex, String> = HashMap::new();
        let mut kernel_of: HashMap<NodeIndex, String> = HashMap::new();
        // Nodes with identical generated kernels share one (a training graph has hundreds of
        // identical gradient-accumulation maps, and every layer the same scans): the kernel is
        // named by a hash of its source, so NVRTC compiles each once.
        let mut generated: HashSet<String> = HashSet::new();
        let mut generated_src = String::new();
        let mut add_kernel = |op: &str, text: String| -> String {
            let name = format!("{op}_{:016x}", crate::device::fnv64(&[&text]));
            if generated.insert(name.clone()) {
                generated_src.push_str(&text.replacen(PLACEHOLDER, &name, 1));
                names.push(name.clone());
            }
            name
        };
        for (&n, f) in &fusion.anchors {
            if let Fused::PonderAggregate { expr, operands, .. } = f {
                let ins: Vec<Elem> = operands.iter().map(|&v| elem(v)).collect();
                kernel_of.insert(n, add_kernel("ponder", codegen::ponder_aggregate_kernel(PLACEHOLDER, expr, &ins)));
            }
        }
        let mut last_use = HashMap::new();
        for (pos, &n) in order.iter().enumerate() {
            let node = graph.node(n);
            let operands = graph.operands(n);
            for v in fusion.inputs_of(graph, n) {
                last_use.insert(v, pos);
            }
            match &node.op {
                Op::Map { expr } => {
                    let ins: Vec<Elem> = operands.iter().map(|&v| elem(v)).collect();
                    let k = codegen::map_kernel_typed(PLACEHOLDER, expr, &ins, elem(Value { node: n, port: 0 }));
                    kernel_of.insert(n, add_kernel("map", k));
                }
                Op::Scan { neuron, emit, scope } => {
                    let token = *scope == sparkc_ir::StateScope::Token;
                    let model = &graph.neurons[neuron];
                    let io = ScanIo {
                        inputs: operands[..model.inputs.len()].iter().map(|&v| elem(v)).collect(),
                        outputs: (0..emit.len()).map(|k| elem(Value { node: n, port: k as u32 })).collect(),
                    };
                    let c = node.results[0].shape.resolve(&graph.dims).dims().last().and_then(|d| d.as_const()).unwrap_or(0) as usize;
                    let k = if scan_codegen::can_tile(model, c, &io, gpu.max_smem) {
                        let plan = scan_codegen::tile_plan(model, &io, gpu.max_smem);
                        tiled.insert(n, plan);
                        if let Some(p) = scan_codegen::narrow_tile_plan(model, c, &io, gpu.max_smem) {
                            let k = scan_codegen::scan_forward_tiled(PLACEHOLDER, model, emit, token, &io, p);
                            narrow.insert(n, (p, add_kernel("scan", k)));
                        }
                        if !taped.contains(&n) {
                            let k = scan_codegen::scan_forward_simple(PLACEHOLDER, model, emit, token, &io, scan_codegen::scan_unroll(model));
                            short.insert(n, add_kernel("scan", k));
                        }
                        scan_codegen::scan_forward_tiled(PLACEHOLDER, model, emit, token, &io, plan)
                    } else {
                        scan_codegen::scan_forward_simple(PLACEHOLDER, model, emit, token, &io, scan_codegen::scan_unroll(model))
                    };
                    kernel_of.insert(n, add_kernel("scan", k));
                }
                Op::ScanAdjoint { neuron, emit, scope } => {
                    let token = *scope == sparkc_ir::StateScope::Token;
                    let model = &graph.neurons[neuron];
                    let (ni, np, ns) = (model.inputs.len(), model.params.len(), model.state.len());
                    let inputs: Vec<Elem> = operands[..ni].iter().map(|&v| elem(v)).collect();
                    let out_grads: Vec<Elem> = operands[ni + np + ns..ni + np + ns + emit.len()].iter().map(|&v| elem(v)).collect();
                    let in_grads: Vec<Elem> = (0..ni).map(|i| elem(Value { node: n, port: i as u32 })).collect();
                    let c = operands[0].node;
                    let c = graph.value_type(Value { node: c, port: operands[0].port }).shape.resolve(&graph.dims).dims().last().and_then(|d| d.as_const()).unwrap_or(0) as usize;
                    let k = match scan_codegen::adjoint_tile_plan(model, emit, &inputs, &out_grads, c, scan_codegen::TILE_THREADS, gpu.max_smem) {
                        Some(plan) => {
                            tiled.insert(n, plan);
                            if let Some(p) = scan_codegen::adjoint_tile_plan(model, emit, &inputs, &out_grads, c, scan_codegen::NARROW_CHANNELS, gpu.max_smem) {
                                let k = scan_codegen::scan_adjoint_tiled(PLACEHOLDER, model, emit, token, &inputs, &out_grads, &in_grads, p).map_err(CudaError::Unsupported)?;
                                narrow.insert(n, (p, add_kernel("scan_adjoint", k)));
                            }
                            scan_codegen::scan_adjoint_tiled(PLACEHOLDER, model, emit, token, &inputs, &out_grads, &in_grads, plan)
                        }
                        None => scan_codegen::scan_adjoint_chunked(PLACEHOLDER, model, emit, token, &inputs, &out_grads, &in_grads),
                    }
                    .map_err(CudaError::Unsupported)?;
                    kernel_of.insert(n, add_kernel("scan_adjoint", k));
                    if let Ok(k) = scan_segmented::scan_adjoint_segmented(PLACEHOLDER, PLACEHOLDER, model, emit, token, &inputs, &out_grads, &in_grads) {
                        segmented.insert(n, (add_kernel("scan_summary", k.summary), add_kernel("scan_adjoint_segments", k.adjoint)));
                    }
                }
                Op::PonderWeightsGrad { .. } => {
                    let k = graph.value_type(operands[2]).shape.resolve(&graph.dims).dims()[2].as_const();
                    if k.is_none_or(|k| k > 64) {
                        return Err(CudaError::Unsupported(format!("`{}`: the CUDA PonderNet gradient handles at most 64 frames", node.name)));
                    }
                }
                Op::Input { .. } | Op::Param { .. } | Op::Embedding | Op::RepeatFrames { .. } | Op::MeanFrames | Op::Linear { .. }
                | Op::RmsNorm { .. } | Op::LateralInhibition { .. } | Op::PonderWeights { .. } | Op::FrameWeightedSum
                | Op::CenterLast | Op::CrossEntropy { .. } | Op::MaskedMean | Op::Mean | Op::ZerosLike | Op::ReduceLike
                | Op::LinearGradInput | Op::LinearGradWeight | Op::EmbeddingGrad | Op::SumFrames | Op::RmsNormGrad { .. }
                | Op::FrameWeightedSumGrad | Op::CrossEntropyGrad { .. } | Op::MaskedMeanGrad | Op::MeanGrad => {}
                other => {
                    return Err(CudaError::Unsupported(format!(
                        "`{}` (node `{}`) has no CUDA kernel yet",
                        other.name(),
                        node.name
                    )))
                }
            }
        }
        let early_outputs = early_outputs(graph, &last_use);
        for (_, v) in &graph.outputs {
            if !early_outputs.contains_key(v) {
                last_use.insert(*v, usize::MAX);
            }
        }
        src.push_str(&generated_src);
        let module = gpu.load_with(&src, precision == Precision::Bf16)?;
        let mut kernels = HashMap::new();
        for name in names {
            let f = module.load_function(&name).map_err(|e| CudaError::Driver(format!("kernel {name}: {e:?}")))?;
            kernels.insert(name, f);
        }
        let plans = tiled.iter().map(|(n, plan)| (plan, &kernel_of[n])).chain(narrow.values().map(|(plan, k)| (plan, k)));
        for (plan, kernel) in plans {
            // More than 48 KB of dynamic shared memory must be asked for per kernel.
            let f = &kernels[kernel];
            f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.smem_bytes as i32)
                .map_err(|e| CudaError::Driver(format!("shared memory for the tiled scan: {e:?}")))?;
        }
        Ok(GpuProgram {
            gpu,
            precision,
            params_bf16: BTreeMap::new(),
            graph: graph.clone(),
            order,
            module,
            kernels,
            last_use,
            early_outputs,
            storage,
            fusion,
            kernel_of,
            tape_of,
            taped,
            tiled,
            narrow,
            segmented,
            short,
            resident: None,
            capture_pool: Default::default(),
            capturing: Default::default(),
            graph_tables: Default::default(),
            carried_in_place: carried_in_place(graph),
            state_buffers: Default::default(),
            written_in_place: Default::default(),
            capturable: !graph.g.node_indices().any(|n| matches!(graph.node(n).op, Op::EmbeddingGrad)),
            params: BTreeMap::new(),
            uploaded_from: BTreeMap::new(),
            params_seen: Vec::new(),
            training: Default::default(),
            profile: None,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The generated module (kept alive with its kernels).
    pub fn module(&self) -> &Arc<CudaModule> {
        &self.module
    }

    pub(crate) fn upload(&self, t: &Tensor) -> Result<DevTensor, CudaError> {
        Ok(match &t.data {
            TensorData::F32(v) => DevTensor::F32 { shape: t.shape.clone(), data: drv!(self.gpu.stream.clone_htod(v)) },
            TensorData::I64(v) => DevTensor::I64 { shape: t.shape.clone(), data: drv!(self.gpu.stream.clone_htod(v)) },
        })
    }

    pub(crate) fn download(&self, t: &DevTensor) -> Result<Tensor, CudaError> {
        Ok(match t {
            DevTensor::F32 { shape, data } => Tensor::f32(shape.clone(), drv!(self.gpu.stream.clone_dtoh(data))),
            DevTensor::Bf16 { shape, data } => Tensor::f32(shape.clone(), drv!(self.gpu.stream.clone_dtoh(data)).into_iter().map(|h| f32::from_bits((h as u32) << 16)).collect()),
            DevTensor::I64 { shape, data } => Tensor::i64(shape.clone(), drv!(self.gpu.stream.clone_dtoh(data))),
        })
    }

    /// Keep device copies of the parameters; re-uploads only the ones whose host buffer changed.
    pub fn set_params(&mut self, params: &BTreeMap<String, Tensor>) -> Result<(), CudaError> {
        let seen: Vec<[usize; 5]> = params
            .iter()
            .map(|(k, t)| {
                let (ptr, len) = t.as_f32().map(|d| (d.as_ptr() as usize, d.len())).unwrap_or((0, 0));
                [k.as_ptr() as usize, k.len(), ptr, len, t.shape.iter().fold(t.shape.len(), |h, &d| h.wrapping_mul(31).wrapping_add(d))]
            })
            .collect();
        if !self.params_seen.is_empty() && seen == self.params_seen {
            return Ok(());
        }
        self.params_seen.clear();
        for (_, name, ty) in self.graph.params() {
            let t = params.get(name).ok_or_else(|| CudaError::Input(format!("missing parameter `{name}`")))?;
            let want = ty.shape.concrete(&self.graph.dims).map_err(|s| CudaError::Input(format!("parameter `{name}` has a free dimension {s}")))?;
            let host = t.as_f32().ok_or_else(|| CudaError::Input(format!("parameter `{name}` must be f32")))?;
            if t.shape != want {
                return Err(CudaError::Input(format!("parameter `{name}` is {:?}, expected {want:?}", t.shape)));
            }
            let id = (host.as_ptr() as usize, host.len());
            if self.uploaded_from.get(name) != Some(&id) {
                let d = self.upload(t)?;
                if self.precision == Precision::Bf16 && t.shape.len() == 2 {
                    let bf = self.to_bf16(d.f32().expect("uploaded f32"), host.len())?;
                    self.params_bf16.insert(name.to_string(), bf);
                }
                self.params.insert(name.to_string(), d);
                self.uploaded_from.insert(name.to_string(), id);
            }
        }
        self.params_seen = seen;
        Ok(())
    }

    /// Forget which host buffers the device copies came from, so the next
    /// [`GpuProgram::set_params`] uploads everything again (after in-place updates).
    pub fn forget_params(&mut self) {
        self.uploaded_from.clear();
        self.params_seen.clear();
    }

    fn to_bf16(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>, CudaError> {
        // SAFETY: the conversion kernel writes all n elements.
        let mut out = unsafe { self.raw_alloc::<u16>(n) }?;
        let count = n as i64;
        let mut b = self.gpu.stream.launch_builder(self.f("sp_to_bf16"));
        b.arg(&mut out);
        b.arg(x);
        b.arg(&count);
        // SAFETY: out and x hold n elements.
        unsafe { drv!(b.launch(grid(n))) };
        Ok(out)
    }

    /// A bf16 view of an operand: its own buffer, or a converted copy kept alive by the guard.
    fn bf16_operand(&self, t: &DevTensor) -> Result<(u64, Option<CudaSlice<u16>>), CudaError> {
        match t {
            DevTensor::Bf16 { .. } => Ok((t.ptr(&self.gpu.stream), None)),
            DevTensor::F32 { data, .. } => {
                let b = self.to_bf16(data, data.len())?;
                let p = { use cudarc::driver::DevicePtr; b.device_ptr(&self.gpu.stream).0 };
                Ok((p, Some(b)))
            }
            DevTensor::I64 { .. } => Err(CudaError::Input("a GEMM operand must be floating point".into())),
        }
    }

    /// Column-major C(m×n) = op(A)·op(B) with bf16 A and B and fp32 accumulation
    /// (cublasGemmEx); C is written as it is stored (f32 or bf16).
    #[allow(clippy::too_many_arguments)]
    /// C = A·B + β·C with bf16 operands, f32 accumulation, C stored as it is.
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(&self, ta: bool, tb: bool, m: usize, n: usize, k: usize, a: u64, lda: usize, b: u64, ldb: usize, c: &mut DevTensor, ldc: usize, beta: f32) -> Result<(), CudaError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let c_type = match c {
            DevTensor::Bf16 { .. } => cudaDataType::CUDA_R_16BF,
            _ => cudaDataType::CUDA_R_32F,
        };
        let cp = c.ptr(&self.gpu.stream);
        let alpha = 1.0f32;
        // SAFETY: the pointers address the matrices the dimensions and leading sizes describe.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.gpu.blas.handle(),
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                cudaDataType::CUDA_R_16BF,
                lda as i32,
                b as *const _,
                cudaDataType::CUDA_R_16BF,
                ldb as i32,
                (&beta) as *const f32 as *const _,
                cp as *mut _,
                c_type,
                ldc as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Driver(format!("cuBLAS GemmEx: {e:?}")))
    }

    /// Column-major out(M×N) = op(W)·X for a linear layer's weight W (operand 1, O×I row-major,
    /// leading dimension I; transposed in the forward, not in the input gradient) and its
    /// activation X (operand 0, leading dimension `ldx`): bf16 GemmEx over the weight's bf16
    /// copy when there is one, fp32 cuBLAS otherwise.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    fn weight_gemm(&self, n: NodeIndex, ins: &[&DevTensor], tw: bool, (mm, nn, kk): (usize, usize, usize), ldx: usize, out: &mut DevTensor, ldc: usize, beta: f32) -> Result<(), CudaError> {
        let ldw = ins[1].shape()[1];
        if let Some(w) = self.weight_bf16(n) {
            let (xp, _keep) = self.bf16_operand(ins[0])?;
            let wp = { use cudarc::driver::DevicePtr; w.device_ptr(&self.gpu.stream).0 };
            return self.gemm_ex(tw, false, mm, nn, kk, wp, ldw, xp, ldx, out, ldc, beta);
        }
        let op = if tw { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let cfg = GemmConfig { transa: op, transb: cublasOperation_t::CUBLAS_OP_N, m: mm as i32, n: nn as i32, k: kk as i32, alpha: 1.0f32, lda: ldw as i32, ldb: ldx as i32, beta, ldc: ldc as i32 };
        let (Some(w), Some(x), DevTensor::F32 { data: d, .. }) = (ins[1].f32(), ins[0].f32(), out) else {
            return Err(CudaError::Unsupported("an fp32 GEMM reads and writes f32".into()));
        };
        // SAFETY: the buffers hold the matrices the dimensions and leading sizes describe.
        unsafe { self.gpu.blas.gemm(cfg, w, x, d) }.map_err(|e| CudaError::Driver(format!("cuBLAS: {e:?}")))
    }

    /// dx = dy·W of `linear_grad_input` node `n` (ins: dy, W), or dx += dy·W when
    /// `accumulate` (dx then holds the other gradient contributions already).
    fn linear_grad_input(&self, n: NodeIndex, ins: &[&DevTensor], dx: &mut DevTensor, accumulate: bool) -> Result<(), CudaError> {
        let (o, i) = (ins[1].shape()[0], ins[1].shape()[1]);
        let m = ins[0].shape().iter().product::<usize>() / o.max(1);
        if m == 0 || o == 0 || i == 0 {
            return if accumulate { Ok(()) } else { self.zero(dx) };
        }
        // Column-major dxᵀ(I×M) = w'(I×O)·dy'(O×M) (+ dxᵀ).
        self.weight_gemm(n, ins, false, (i, m, o), o, dx, i, if accumulate { 1.0 } else { 0.0 })
    }

    /// The bf16 copy of the weight operand (slot 1) of a linear layer or its input gradient,
    /// in bf16 mode.
    fn weight_bf16(&self, n: NodeIndex) -> Option<&CudaSlice<u16>> {
        if self.precision != Precision::Bf16 {
            return None;
        }
        match &self.graph.node(self.graph.operands(n)[1].node).op {
            Op::Param { name } => self.params_bf16.get(name),
            _ => None,
        }
    }

    /// An output buffer for `v`, stored as planned; uninitialised (its kernel writes all of it).
    fn alloc_value(&self, v: Value, shape: &[usize]) -> Result<DevTensor, CudaError> {
        let n = shape.iter().product::<usize>().max(1);
        // SAFETY: every caller launches a kernel that writes all n elements before any read.
        Ok(match self.storage.get(&v) {
            Some(Elem::Bf16) => DevTensor::Bf16 { shape: shape.to_vec(), data: unsafe { self.raw_alloc::<u16>(n) }? },
            _ => DevTensor::F32 { shape: shape.to_vec(), data: unsafe { self.raw_alloc::<f32>(n) }? },
        })
    }

    fn alloc_uninit(&self, n: usize) -> Result<CudaSlice<f32>, CudaError> {
        // SAFETY: callers write every element before reading it.
        unsafe { self.raw_alloc(n) }
    }

    /// `n` uninitialised elements for a value of a run: from the capture pool while a step is
    /// being captured (see [`crate::capture`]), from the stream's pool otherwise.
    ///
    /// # Safety
    /// The caller writes the elements before reading them.
    unsafe fn raw_alloc<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>, CudaError> {
        match self.capture_pool.get().filter(|_| self.capturing.get()) {
            // SAFETY: passed on to the caller.
            Some(pool) => unsafe { pool.alloc(n) },
            None => Ok(drv!(unsafe { self.gpu.stream.alloc::<T>(n.max(1)) })),
        }
    }

    /// Run the graph on host inputs (parameters come from [`GpuProgram::set_params`]).
    pub fn run(&self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let (env, fed) = self.upload_inputs(inputs)?;
        let mut out = BTreeMap::new();
        self.walk(&env, fed, &mut |name, t| {
            out.insert(name.to_string(), self.download(t.get())?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Bind the dimensions and upload every graph input (none kept on the device).
    pub(crate) fn upload_inputs(&self, inputs: &BTreeMap<String, Tensor>) -> Result<(DimBindings, HashMap<NodeIndex, Slot<'_>>), CudaError> {
        let env = self.bind(inputs, &HashSet::new())?;
        let mut fed = HashMap::new();
        for (n, name, ty) in self.graph.inputs() {
            let t = self.host_input(n, name, ty.dtype, inputs)?;
            fed.insert(n, Slot::Owned(self.upload(&t)?));
        }
        Ok((env, fed))
    }

    /// Dimension bindings from the host inputs (and the kept state, whose names are `kept`).
    fn bind(&self, inputs: &BTreeMap<String, Tensor>, kept: &HashSet<String>) -> Result<DimBindings, CudaError> {
        let batch = self.resident.as_ref().map(|r| r.batch);
        self.graph
            .bind_input_dims(|name| {
                if kept.contains(name) {
                    return None;
                }
                inputs.get(name).map(|t| t.shape.as_slice())
            })
            .map_err(CudaError::Input)
            .map(|mut env| {
                if let Some(b) = batch {
                    env.entry("B".to_string()).or_insert(b as u64);
                }
                env
            })
    }

    /// A host input in the graph's dtype, with table indices checked.
    fn host_input(&self, n: NodeIndex, name: &str, dtype: DType, inputs: &BTreeMap<String, Tensor>) -> Result<Tensor, CudaError> {
        let t = inputs.get(name).ok_or_else(|| CudaError::Input(format!("missing input `{name}`")))?;
        let t = match (dtype, &t.data) {
            (DType::F32, TensorData::I64(v)) => Tensor::f32(t.shape.clone(), v.iter().map(|&x| x as f32).collect()),
            (DType::I64 | DType::I32, TensorData::F32(_)) => return Err(CudaError::Input(format!("`{name}` must be an integer tensor"))),
            _ => t.clone(),
        };
        self.check_ids(n, &t)?;
        Ok(t)
    }

    /// Execute every node in order over device inputs `fed`; each graph output is handed to
    /// `emit` at the end. Intermediates are freed at their last use.
    pub(crate) fn walk<'a>(&'a self, env: &DimBindings, mut fed: HashMap<NodeIndex, Slot<'a>>, emit: &mut dyn FnMut(&str, Emitted<'_>) -> Result<(), CudaError>) -> Result<(), CudaError> {
        let mut values: HashMap<Value, Slot> = HashMap::new();
        let mut tapes = Tapes::new();
        for (pos, &n) in self.order.iter().enumerate() {
            let node = self.graph.node(n);
            let shapes: Vec<Vec<usize>> = node
                .results
                .iter()
                .map(|t| t.shape.concrete(env))
                .collect::<Result<_, _>>()
                .map_err(|s| CudaError::Input(format!("dimension {s} is not bound by any input")))?;
            let results: Vec<Slot> = match &node.op {
                _ if self.fusion.absorbed.contains(&n) => Vec::new(),
                Op::Input { .. } => vec![fed.remove(&n).expect("inputs are bound")],
                Op::Param { name } => vec![Slot::Param(self.params.get(name).ok_or_else(|| CudaError::Input(format!("parameter `{name}` was not uploaded")))?)],
                _ => {
                    // An accumulated input gradient adds into a buffer nothing else reads: it
                    // leaves the values before the others are borrowed, and becomes the result.
                    let mut into = match self.fusion.anchors.get(&n) {
                        Some(Fused::AccumulatedGradInput { into, grad_input, .. }) => match values.remove(into) {
                            Some(Slot::Owned(t)) => Some((*into, *grad_input, t)),
                            _ => return Err(CudaError::Unsupported(format!("`{}`: the gradient to accumulate into is not an owned buffer", node.name))),
                        },
                        _ => None,
                    };
                    // A batched group's later weights are read before their param nodes' turn.
                    let ops: Vec<&DevTensor> = self
                        .fusion
                        .inputs_of(&self.graph, n)
                        .iter()
                        .filter(|v| into.as_ref().is_none_or(|(i, _, _)| *i != **v))
                        .map(|v| match (values.get(v), &self.graph.node(v.node).op) {
                            (Some(slot), _) => Ok(slot.get()),
                            (None, Op::Param { name }) => self.params.get(name).ok_or_else(|| CudaError::Input(format!("parameter `{name}` was not uploaded"))),
                            (None, _) => Err(CudaError::Unsupported(format!("`{}` reads a value not computed yet", node.name))),
                        })
                        .collect::<Result<_, _>>()?;
                    let start = self.profile.as_ref().map(|_| self.timing_event()).transpose()?;
                    let out = match &mut into {
                        Some((_, grad_input, acc)) => self.linear_grad_input(*grad_input, &ops, acc, true).map(|_| Vec::new()),
                        None => self.exec(n, &ops, &shapes, &mut tapes),
                    };
                    let out = out.map_err(|e| match e {
                        CudaError::Driver(m) => CudaError::Driver(format!("{m} (at node `{}`)", node.name)),
                        e => e,
                    })?;
                    if let (Some(p), Some(start)) = (&self.profile, start) {
                        p.borrow_mut().push((n, start, self.timing_event()?));
                    }
                    into.map(|(_, _, t)| t).into_iter().chain(out).map(Slot::Owned).collect()
                }
            };
            let produced: Vec<Value> = match self.fusion.anchors.get(&n) {
                Some(f) => f.results(n),
                None => (0..results.len() as u32).map(|port| Value { node: n, port }).collect(),
            };
            for (v, t) in produced.into_iter().zip(results) {
                let kept = self.last_use.contains_key(&v);
                match (self.early_outputs.get(&v), t) {
                    (Some(name), Slot::Owned(t)) if !kept => emit(name, Emitted::Owned(t))?,
                    (Some(name), t) => {
                        emit(name, Emitted::Borrowed(t.get()))?;
                        if kept {
                            values.insert(v, t);
                        }
                    }
                    (None, t) if kept => {
                        values.insert(v, t);
                    }
                    (None, _) => {}
                }
            }
            for v in self.fusion.inputs_of(&self.graph, n) {
                if self.last_use.get(&v) == Some(&pos) {
                    values.remove(&v);
                }
            }
        }
        for (name, v) in &self.graph.outputs {
            if !self.early_outputs.contains_key(v) {
                emit(name, Emitted::Borrowed(values[v].get()))?;
            }
        }
        Ok(())
    }

    /// Start (or stop) timing every node of later runs with CUDA events.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Default::default);
    }

    fn timing_event(&self) -> Result<cudarc::driver::CudaEvent, CudaError> {
        Ok(drv!(self.gpu.stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))))
    }

    /// Device time per kind of node over the runs since profiling started, longest first:
    /// (what, calls, milliseconds). Clears the record.
    pub fn profile(&self) -> Result<Vec<(String, usize, f64)>, CudaError> {
        let Some(p) = &self.profile else { return Ok(Vec::new()) };
        let mut by_kind: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        for (n, start, end) in p.borrow_mut().drain(..) {
            let ms = drv!(start.elapsed_ms(&end)) as f64;
            let e = by_kind.entry(self.profile_label(n)).or_default();
            e.0 += 1;
            e.1 += ms;
        }
        let mut rows: Vec<(String, usize, f64)> = by_kind.into_iter().map(|(k, (c, ms))| (k, c, ms)).collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        Ok(rows)
    }

    /// What a node is, for the profile: its op, and the neuron and width of a scan, or the
    /// output width of a linear layer.
    fn profile_label(&self, n: NodeIndex) -> String {
        let node = self.graph.node(n);
        if let Some(f) = self.fusion.anchors.get(&n) {
            return f.label().to_string();
        }
        let width = |v: Value| self.graph.value_type(v).shape.dims().last().and_then(|d| d.as_const()).map(|c| c.to_string()).unwrap_or_default();
        match &node.op {
            Op::Scan { neuron, .. } | Op::ScanAdjoint { neuron, .. } => format!("{} {neuron} C={}", node.op.name(), width(self.graph.operands(n)[0])),
            Op::Linear { .. } | Op::LinearGradInput | Op::LinearGradWeight => format!("{} {}", node.op.name(), width(Value { node: n, port: 0 })),
            Op::Map { expr } => {
                let text = expr.to_string();
                let short: String = text.chars().take(40).collect();
                format!("map {}{} C={}", short, if short.len() < text.len() { "…" } else { "" }, width(Value { node: n, port: 0 }))
            }
            op => op.name().to_string(),
        }
    }

    /// Keep the carried values (graph inputs that are also outputs: the neuron state) on the
    /// device from now on, starting `batch` new sequences from zeros. Runs through
    /// [`GpuProgram::run_resident`] then take them from there and leave them there; the
    /// per-step run of an inference graph is captured as a CUDA graph the second time it is
    /// seen with the same input shapes, and replayed after that.
    pub fn start_sequences(&mut self, batch: usize) -> Result<(), CudaError> {
        let mut state = BTreeMap::new();
        for (_, name, ty) in self.graph.inputs() {
            if self.graph.output(name).is_none() {
                continue;
            }
            let mut shape = vec![batch];
            shape.extend(ty.shape.dims()[1..].iter().map(|d| d.as_const().unwrap_or(0) as usize));
            let n = shape.iter().product::<usize>().max(1);
            state.insert(name.to_string(), DevTensor::F32 { shape, data: drv!(self.gpu.stream.alloc_zeros::<f32>(n)) });
        }
        // A captured step addresses the previous state buffers: start over.
        self.resident = Some(Resident { batch, state, captured: None, seen: None });
        Ok(())
    }

    /// The nodes of the captured per-step graph by kind ("kernel", "memalloc", ...), once a
    /// step has been captured.
    pub fn captured_step_nodes(&self) -> Result<Option<BTreeMap<&'static str, usize>>, CudaError> {
        let Some(c) = self.resident.as_ref().and_then(|r| r.captured.as_ref()) else { return Ok(None) };
        Ok(Some(graph_node_kinds(c.graph.cu_graph())?))
    }

    /// Device milliseconds per replay of the captured step, over `reps` back-to-back replays
    /// (each advances the kept state, as a decoded token would), once a step has been captured.
    pub fn time_captured_step(&self, reps: usize) -> Result<Option<f64>, CudaError> {
        let Some(c) = self.resident.as_ref().and_then(|r| r.captured.as_ref()) else { return Ok(None) };
        let start = self.timing_event()?;
        for _ in 0..reps {
            drv!(c.graph.launch());
        }
        let end = self.timing_event()?;
        drv!(end.synchronize());
        Ok(Some(drv!(start.elapsed_ms(&end)) as f64 / reps.max(1) as f64))
    }

    pub fn keeps_state(&self) -> bool {
        self.resident.is_some()
    }

    /// Run with the carried values kept on the device (see [`GpuProgram::start_sequences`]);
    /// returns the other outputs.
    pub fn run_resident(&mut self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let mut res = self.resident.take().ok_or_else(|| CudaError::Input("call start_sequences first".into()))?;
        let result = self.step_resident(&mut res, inputs);
        self.resident = Some(res);
        result
    }

    fn step_resident(&self, res: &mut Resident, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let st = &self.gpu.stream;
        // A step like the captured one replays it; checked straight against the inputs, as
        // binding dimensions and scanning the graph's inputs took longer than the launch.
        if let Some(c) = res.captured.as_mut().filter(|c| c.key.iter().all(|(name, shape)| inputs.get(name).is_some_and(|t| &t.shape == shape))) {
            for (name, node, dtype) in &c.feeds {
                let t = self.host_input(*node, name, *dtype, inputs)?;
                upload_into(st, &t, c.inputs.get_mut(name).expect("captured inputs"))?;
            }
            drv!(c.graph.launch());
            return c.outputs.iter().map(|(k, t)| Ok((k.clone(), self.download(t)?))).collect();
        }
        let kept: HashSet<String> = res.state.keys().cloned().collect();
        let env = self.bind(inputs, &kept)?;
        let mut host = BTreeMap::new();
        for (n, name, ty) in self.graph.inputs() {
            if !kept.contains(name) {
                host.insert(name.to_string(), (n, self.host_input(n, name, ty.dtype, inputs)?));
            }
        }
        let key: Vec<(String, Vec<usize>)> = host.iter().map(|(k, (_, t))| (k.clone(), t.shape.clone())).collect();
        let capture = self.capturable && res.seen.as_ref() == Some(&key);
        // Inputs in buffers that outlive this run (a captured graph reads them again).
        let mut in_bufs: BTreeMap<String, DevTensor> = BTreeMap::new();
        for (name, (_, t)) in &host {
            in_bufs.insert(name.clone(), self.upload(t)?);
        }
        let mut out_bufs: BTreeMap<String, DevTensor> = BTreeMap::new();
        if capture {
            for (name, v) in &self.graph.outputs {
                if !kept.contains(name) {
                    let shape = self.graph.value_type(*v).shape.concrete(&env).map_err(|s| CudaError::Input(format!("dimension {s} is not bound")))?;
                    let n = shape.iter().product::<usize>().max(1);
                    let t = match self.graph.value_type(*v).dtype {
                        DType::F32 => DevTensor::F32 { shape, data: drv!(st.alloc_zeros::<f32>(n)) },
                        _ => DevTensor::I64 { shape, data: drv!(st.alloc_zeros::<i64>(n)) },
                    };
                    out_bufs.insert(name.clone(), t);
                }
            }
            drv!(st.synchronize());
            if self.capture_pool.get().is_none() {
                let _ = self.capture_pool.set(CapturePool::new(&self.gpu)?);
            }
            // Relaxed: the capture pool's allocations, on a stream not being captured, count as
            // "potentially unsafe" calls, which the stricter modes refuse.
            drv!(st.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED));
            self.capturing.set(true);
        }
        let state_ptrs: HashMap<String, u64> = res.state.iter().map(|(k, t)| (k.clone(), t.ptr(st))).collect();
        *self.state_buffers.borrow_mut() = state_ptrs.clone();
        self.written_in_place.borrow_mut().clear();
        let out_ptrs: HashMap<String, u64> = out_bufs.iter().map(|(k, t)| (k.clone(), t.ptr(st))).collect();
        let mut downloaded = BTreeMap::new();
        let walked = {
            let mut fed: HashMap<NodeIndex, Slot> = HashMap::new();
            for (n, name, _) in self.graph.inputs() {
                let slot = match res.state.get(name) {
                    Some(t) => Slot::Param(t),
                    None => Slot::Param(&in_bufs[name]),
                };
                fed.insert(n, slot);
            }
            self.walk(&env, fed, &mut |name, t| {
                let t = t.get();
                // New state over the old (every read of the old one is done by now); other
                // outputs to their buffers (captured) or to the host.
                if self.written_in_place.borrow().contains(name) {
                    Ok(())
                } else if let Some(&dst) = state_ptrs.get(name) {
                    copy_device(st, t, dst)
                } else if let Some(&dst) = out_ptrs.get(name) {
                    copy_device(st, t, dst)
                } else {
                    downloaded.insert(name.to_string(), self.download(t)?);
                    Ok(())
                }
            })
        };
        self.state_buffers.borrow_mut().clear();
        if !capture {
            walked?;
            res.seen = Some(key);
            return Ok(downloaded);
        }
        self.capturing.set(false);
        if walked.is_err() {
            drop(self.graph_tables.take());
        }
        let graph = st.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        walked?;
        let graph = graph.map_err(|e| CudaError::Driver(format!("capturing the step: {e:?}")))?.ok_or_else(|| CudaError::Driver("stream capture produced no graph".into()))?;
        drv!(graph.launch());
        let outputs: BTreeMap<String, Tensor> = out_bufs.iter().map(|(k, t)| Ok((k.clone(), self.download(t)?))).collect::<Result<_, CudaError>>()?;
        let feeds = host.iter().map(|(name, (n, _))| (name.clone(), *n, self.graph.value_type(Value { node: *n, port: 0 }).dtype)).collect();
        res.captured = Some(Captured { key, feeds, _tables: self.graph_tables.take(), inputs: in_bufs, outputs: out_bufs, graph });
        Ok(outputs)
    }

    /// Integer inputs that index a table (embedding ids, cross-entropy targets) must be in
    /// range; checked on the host, where they come from, so the device never syncs for it.
    fn check_ids(&self, input: NodeIndex, t: &Tensor) -> Result<(), CudaError> {
        let Some(ids) = t.as_i64() else { return Ok(()) };
        for e in self.graph.g.edges_directed(input, petgraph::Direction::Outgoing) {
            use petgraph::visit::EdgeRef;
            let consumer = self.graph.node(e.target());
            let limit = match (&consumer.op, e.weight().dst) {
                (Op::Embedding, 1) | (Op::CrossEntropy { .. }, 1) => {
                    let table = self.graph.value_type(self.graph.operands(e.target())[0]);
                    let dim = if matches!(consumer.op, Op::Embedding) { 0 } else { table.shape.rank() - 1 };
                    table.shape.resolve(&self.graph.dims).dims()[dim].as_const()
                }
                _ => None,
            };
            let ignore = match consumer.op {
                Op::CrossEntropy { ignore_index } => Some(ignore_index),
                _ => None,
            };
            if let Some(v) = limit {
                if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &i)| Some(i) != ignore && (i < 0 || i as u64 >= v)) {
                    return Err(CudaError::Input(format!("id {id} at position {pos} of `{}` is outside the vocabulary of {v}", self.graph.node(input).name)));
                }
            }
        }
        Ok(())
    }

    /// The launch of a forward or reverse scan over B·C columns: tiled (a 1024-thread block
    /// per 128 channels) or one thread per column.
    fn scan_launch(&self, n: NodeIndex, bsz: usize, c: usize) -> Result<LaunchConfig, CudaError> {
        let cols = bsz * c;
        Ok(match self.tiled.get(&n) {
            Some(plan) if c.is_multiple_of(plan.channels) => self.tiled_launch(plan, cols),
            Some(_) => return Err(CudaError::Input(format!("`{}`: the tiled scan needs a multiple of 128 channels, got {c}", self.graph.node(n).name))),
            None => simple_scan_launch(cols),
        })
    }

    /// A block of `plan.block_threads()` per `plan.channels` of the `cols` columns.
    fn tiled_launch(&self, plan: &TilePlan, cols: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((cols / plan.channels).max(1) as u32, 1, 1),
            block_dim: (plan.block_threads() as u32, 1, 1),
            shared_mem_bytes: plan.smem_bytes as u32,
        }
    }

    /// out[j] = Σ_r x[r·n + j]. Many rows are split into chunks summed in parallel first
    /// (one thread per column over 16k rows would take milliseconds).
    fn sum_rows(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, rows: usize, n: usize) -> Result<(), CudaError> {
        let st = &self.gpu.stream;
        let (r, nn) = (rows as i64, n as i64);
        if rows <= 64 {
            let mut b = st.launch_builder(self.f("sp_sum_rows"));
            b.arg(out).arg(x).arg(&r).arg(&nn);
            // SAFETY: x holds rows × n floats, out n.
            unsafe { drv!(b.launch(grid(n))) };
            return Ok(());
        }
        // At most 65,535 chunks (the grid's y limit), of at least 64 rows.
        let chunk = 64.max(rows.div_ceil(65_535));
        let chunks = rows.div_ceil(chunk);
        // SAFETY: every chunk's partial sums are written by the first pass.
        let mut partial = unsafe { self.raw_alloc::<f64>(chunks * n) }?;
        let (ck, cks) = (chunk as i64, chunks as i64);
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(32) as u32, chunks as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        let mut b = st.launch_builder(self.f("sp_sum_rows_partial"));
        b.arg(&mut partial).arg(x).arg(&r).arg(&nn).arg(&ck);
        // SAFETY: x holds rows × n floats; partial chunks × n doubles.
        unsafe { drv!(b.launch(cfg)) };
        let mut b = st.launch_builder(self.f("sp_sum_chunks"));
        b.arg(out).arg(&partial).arg(&cks).arg(&nn);
        // SAFETY: partial holds chunks × n doubles, out n floats.
        unsafe { drv!(b.launch(grid(n))) };
        Ok(())
    }

    pub(crate) fn f(&self, name: &str) -> &CudaFunction {
        &self.kernels[name]
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>, CudaError> {
        // SAFETY: zeroed (on the run's stream, so also in a captured step) before any read.
        let mut t = DevTensor::F32 { shape: vec![], data: unsafe { self.raw_alloc::<f32>(n) }? };
        self.zero(&mut t)?;
        let DevTensor::F32 { data, .. } = t else { unreachable!("made f32 above") };
        Ok(data)
    }

    /// Zero a buffer on the run's stream. While a step is being captured this is a kernel: a
    /// memset node over the capture pool's memory is refused when the graph is instantiated.
    fn zero(&self, t: &mut DevTensor) -> Result<(), CudaError> {
        let st = &self.gpu.stream;
        if !self.capturing.get() {
            return zero(st, t);
        }
        let bytes = match t {
            DevTensor::F32 { data, .. } => data.len() * 4,
            DevTensor::Bf16 { data, .. } => data.len() * 2,
            DevTensor::I64 { data, .. } => data.len() * 8,
        };
        let (words, tail) = ((bytes / 4) as i64, (bytes % 4 != 0) as i32);
        let ptr = t.ptr(st);
        let mut b = st.launch_builder(self.f("sp_zero"));
        b.arg(&ptr).arg(&words).arg(&tail);
        // SAFETY: ptr addresses `bytes` bytes: `words` 4-byte words and a 2-byte tail if set.
        unsafe { drv!(b.launch(grid(words as usize + 1))) };
        Ok(())
    }

    /// Write a batched GEMM's pointer table (at most 12 entries) with a kernel, in stream order.
    fn write_pointer_table(&self, dev: &mut CudaSlice<u64>, table: &[u64]) -> Result<(), CudaError> {
        let mut padded = [0u64; 12];
        padded[..table.len()].copy_from_slice(table);
        let n = table.len() as i32;
        let mut b = self.gpu.stream.launch_builder(self.f("sp_pointer_table"));
        b.arg(dev).arg(&n);
        for p in &padded {
            b.arg(p);
        }
        // SAFETY: dev holds table.len() u64s; the kernel writes the first n.
        unsafe { drv!(b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 })) };
        Ok(())
    }

    /// Linear layers of one input (`ins[0]`) and weights `ins[1..]` of one shape as one batched
    /// bf16 GEMM (cublasGemmBatchedEx) over the weights' bf16 copies; a result per member.
    fn linear_group(&self, members: &[NodeIndex], ins: &[&DevTensor], shape: &[usize]) -> Result<Vec<DevTensor>, CudaError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        use cudarc::driver::DevicePtr;
        let st = &self.gpu.stream;
        let (o, i) = (ins[1].shape()[0], ins[1].shape()[1]);
        let m = ins[0].shape().iter().product::<usize>() / i.max(1);
        let mut outs = members.iter().map(|&mb| self.alloc_value(Value { node: mb, port: 0 }, shape)).collect::<Result<Vec<_>, _>>()?;
        if m == 0 || o == 0 || i == 0 {
            for y in outs.iter_mut() {
                self.zero(y)?;
            }
            return Ok(outs);
        }
        let (x, _keep) = self.bf16_operand(ins[0])?;
        // Pointer arrays: the weights' bf16 copies, the shared input, the outputs.
        let mut table: Vec<u64> = Vec::with_capacity(3 * members.len());
        for &mb in members {
            let w = self.weight_bf16(mb).ok_or_else(|| CudaError::Unsupported("a batched linear needs bf16 weight copies".into()))?;
            table.push(w.device_ptr(st).0);
        }
        table.extend(std::iter::repeat_n(x, members.len()));
        table.extend(outs.iter().map(|y| y.ptr(st)));
        if table.len() > 12 {
            return Err(CudaError::Unsupported(format!("a batched linear of {} members (at most {})", members.len(), fusion::MAX_GROUP)));
        }
        let mut _table_buffer = None;
        let base = if self.capturing.get() {
            // A captured step's table never changes: written once now, into memory the graph
            // keeps (no node per replay).
            self.graph_tables.borrow_mut().add(&table)?
        } else {
            // SAFETY: written by the next call, before the GEMM reads it.
            let dev = _table_buffer.insert(unsafe { self.raw_alloc::<u64>(table.len()) }?);
            self.write_pointer_table(dev, &table)?;
            dev.device_ptr(st).0
        };
        let count = members.len() as u64;
        let c_type = match outs[0] {
            DevTensor::Bf16 { .. } => cudaDataType::CUDA_R_16BF,
            _ => cudaDataType::CUDA_R_32F,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Row-major y[M,O] = x[M,I]·w[O,I]ᵀ per member, as in `weight_gemm`.
        // SAFETY: the table holds `count` pointers each to weights (O×I), input (M×I) and
        // outputs (M×O), all alive until the GEMM has run (the table and a converted input are
        // freed in stream order after it, or, while capturing, reused only by later kernels).
        let r = unsafe {
            cudarc::cublas::sys::cublasGemmBatchedEx(
                *self.gpu.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                o as i32,
                m as i32,
                i as i32,
                (&alpha) as *const f32 as *const _,
                base as *const *const _,
                cudaDataType::CUDA_R_16BF,
                i as i32,
                (base + 8 * count) as *const *const _,
                cudaDataType::CUDA_R_16BF,
                i as i32,
                (&beta) as *const f32 as *const _,
                (base + 16 * count) as *const *mut _,
                c_type,
                o as i32,
                count as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if r != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(CudaError::Driver(format!("cublasGemmBatchedEx: {r:?}")));
        }
        Ok(outs)
    }

    /// Run a fused chain (see [`crate::fusion`]) at its anchor `n`; `ins` are the chain's inputs.
    fn exec_fused(&self, n: NodeIndex, fused: &Fused, ins: &[&DevTensor], shape: &[usize]) -> Result<Vec<DevTensor>, CudaError> {
        let st = &self.gpu.stream;
        let f32_in = |i: usize| ins[i].f32().ok_or_else(|| CudaError::Input(format!("`{}`: fused operand {i} must be f32", self.graph.node(n).name)));
        let mut y = self.alloc_value(Value { node: n, port: 0 }, shape)?;
        match fused {
            Fused::PonderAggregate { operands, clamp, eps, .. } => {
                let s = ins[0].shape();
                let (rows, k, d) = ((s[0] * s[1]) as i64, s[2] as i32, s[3] as i32);
                let bf16 = i32::from(y.elem() == Some(Elem::Bf16));
                let (c, e) = (*clamp as f32, *eps as f32);
                let cfg = LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
                let nops = operands.len();
                let mut b = st.launch_builder(self.f(&self.kernel_of[&n]));
                y.push_mut(&mut b);
                b.arg(&bf16);
                for t in &ins[..nops] {
                    t.push(&mut b);
                }
                b.arg(f32_in(nops)?).arg(f32_in(nops + 1)?).arg(&rows).arg(&k).arg(&d).arg(&c).arg(&e);
                // SAFETY: the generated kernel takes (out, out_bf16, the operands typed as
                // stored, each rows·k·d elements, the halt weight (d) and bias (1), sizes);
                // y holds rows·d elements of its storage type.
                unsafe { drv!(b.launch(cfg)) };
            }
            Fused::LinearGroup { members, .. } => return self.linear_group(members, ins, shape),
            Fused::AccumulatedGradInput { .. } => return Err(CudaError::Unsupported("an accumulated input gradient runs in place, from `walk`".into())),
            Fused::CenteredResidual { .. } => {
                let (rows, k, d) = ((shape[0] * shape[1]) as i64, shape[2] as i32, shape[3] as i32);
                let DevTensor::F32 { data, .. } = &mut y else { return Err(CudaError::Unsupported("the residual stream is f32".into())) };
                let mut b = st.launch_builder(self.f("sp_centered_residual"));
                b.arg(data).arg(f32_in(0)?).arg(f32_in(1)?).arg(&rows).arg(&k).arg(&d);
                // SAFETY: the residual and y hold rows·k·d floats, the update rows·d.
                let cfg = LaunchConfig { grid_dim: (rows.max(1) as u32, k.max(1) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                unsafe { drv!(b.launch(cfg)) };
            }
        }
        Ok(vec![y])
    }

    fn exec(&self, n: NodeIndex, ins: &[&DevTensor], shapes: &[Vec<usize>], tapes: &mut Tapes) -> Result<Vec<DevTensor>, CudaError> {
        let node = self.graph.node(n);
        let st = &self.gpu.stream;
        let bad = |what: &str| CudaError::Input(format!("`{}` node `{}`: {what}", node.op.name(), node.name));
        let fl = |i: usize| ins[i].f32().ok_or_else(|| bad(&format!("operand {i} must be f32")));
        let numel = |s: &[usize]| s.iter().product::<usize>();
        let out_n = numel(&shapes[0]);
        let result = |port: u32| Value { node: n, port };
        if let Some(f) = self.fusion.anchors.get(&n) {
            return self.exec_fused(n, f, ins, &shapes[0]);
        }
        // Ops with typed outputs allocate their own, uninitialised; ops whose kernel writes every
        // element get an uninitialised buffer (a memset each would be a graph node per op at
        // decode); the rest start from zeros.
        let typed = matches!(node.op, Op::Linear { .. } | Op::Map { .. } | Op::Scan { .. } | Op::ScanAdjoint { .. } | Op::LinearGradInput | Op::LinearGradWeight | Op::FrameWeightedSum);
        let writes_all = matches!(
            node.op,
            Op::Embedding | Op::RepeatFrames { .. } | Op::MeanFrames | Op::RmsNorm { .. } | Op::LateralInhibition { .. } | Op::CenterLast | Op::PonderWeights { .. } | Op::SumFrames
        );
        let mut out = if typed { self.alloc_uninit(1)? } else if writes_all { self.alloc_uninit(out_n)? } else { self.alloc(out_n)? };
        let wrap = |data: CudaSlice<f32>, shape: &Vec<usize>| DevTensor::F32 { shape: shape.clone(), data };
        macro_rules! launch {
            ($kernel:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
                let mut b = st.launch_builder($kernel);
                $( b.arg($arg); )*
                // SAFETY: every kernel's arguments are the buffers and sizes it is written for.
                unsafe { drv!(b.launch($cfg)) };
            }};
        }
        match &node.op {
            Op::Embedding => {
                let d = ins[0].shape()[1] as i32;
                // Ids are checked against the table on the host before upload (`run`).
                let ids = ins[1].i64().ok_or_else(|| bad("ids must be integers"))?;
                let count = numel(ins[1].shape()) as i64;
                launch!(self.f("sp_embedding"), grid(out_n), &mut out, fl(0)?, ids, &count, &d);
            }
            Op::RepeatFrames { .. } => {
                let s = &shapes[0];
                let (rows, k, d) = ((s[0] * s[1]) as i64, s[2] as i32, s[3] as i32);
                launch!(self.f("sp_repeat_frames"), repeat_grid(rows as usize, d as usize), &mut out, fl(0)?, &rows, &k, &d);
            }
            Op::MeanFrames => {
                let s = ins[0].shape();
                let (rows, k, d) = ((s[0] * s[1]) as i64, s[2] as i32, s[3] as i32);
                launch!(self.f("sp_mean_frames"), grid(out_n), &mut out, fl(0)?, &rows, &k, &d);
            }
            Op::Linear { bias } => {
                let (o, i) = (ins[1].shape()[0], ins[1].shape()[1]);
                let m = numel(ins[0].shape()) / i.max(1);
                let mut y = self.alloc_value(result(0), &shapes[0])?;
                let narrow = o <= NARROW_LINEAR && m > 0 && (!*bias || ins[2].f32().is_some());
                if let (true, DevTensor::F32 { data: yd, .. }, Some(x), Some(w)) = (narrow, &mut y, ins[0].f32(), ins[1].f32()) {
                    let (rows_, ii, oi) = (m as i64, i as i32, o as i32);
                    let bias_ptr: u64 = if *bias { ins[2].ptr(st) } else { 0 };
                    let mut b = st.launch_builder(self.f("sp_linear_narrow"));
                    b.arg(yd).arg(x).arg(w).arg(&bias_ptr).arg(&rows_).arg(&ii).arg(&oi);
                    let cfg = LaunchConfig { grid_dim: (m.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                    // SAFETY: x holds m·i floats, w o·i, the bias (when not null) o, y m·o.
                    unsafe { drv!(b.launch(cfg)) };
                    return Ok(vec![y]);
                }
                if m > 0 && o > 0 && i > 0 {
                    // Row-major y[M,O] = x[M,I]·w[O,I]ᵀ is column-major yᵀ(O×M) = op(W)(O×I)·X(I×M).
                    self.weight_gemm(n, ins, true, (o, m, i), i, &mut y, o, 0.0)?;
                } else {
                    self.zero(&mut y)?;
                }
                if *bias {
                    let DevTensor::F32 { data: yd, .. } = &mut y else { return Err(bad("a biased linear writes f32")) };
                    let (rows_, oi) = (m as i64, o as i32);
                    launch!(self.f("sp_add_bias"), grid(out_n), yd, fl(2)?, &rows_, &oi);
                }
                return Ok(vec![y]);
            }
            Op::RmsNorm { eps } | Op::LateralInhibition { eps } => {
                let d = *shapes[0].last().unwrap_or(&1);
                let r = out_n / d.max(1);
                let di = d as i32;
                let rr = r as i64;
                launch!(self.f("sp_rms_norm"), row_teams(r), &mut out, fl(0)?, fl(1)?, &rr, &di, eps);
            }
            Op::CenterLast => {
                let d = *shapes[0].last().unwrap_or(&1);
                let di = d as i32;
                let r = out_n / d.max(1);
                let rr = r as i64;
                launch!(self.f("sp_center_last"), row_teams(r), &mut out, fl(0)?, &rr, &di);
            }
            Op::Map { .. } => {
                let name = &self.kernel_of[&n];
                let mut y = self.alloc_value(result(0), &shapes[0])?;
                let mut modes = Vec::new();
                for (i, t) in ins.iter().enumerate() {
                    let (mode, extent) = bcast_mode(t.shape(), &shapes[0]).ok_or_else(|| bad(&format!("operand {i} {:?} broadcasts to {:?} in a way the CUDA backend does not index", t.shape(), shapes[0])))?;
                    if t.elem().is_none() {
                        return Err(bad("map operands must be floating point"));
                    }
                    modes.push((mode, extent as i64));
                }
                let total = out_n as i64;
                let mut b = st.launch_builder(self.f(name));
                y.push_mut(&mut b);
                b.arg(&total);
                for (i, t) in ins.iter().enumerate() {
                    t.push(&mut b);
                    b.arg(&modes[i].0);
                    b.arg(&modes[i].1);
                }
                // SAFETY: the generated kernel takes (out, n, then ptr/mode/extent per operand),
                // typed as the storage plan says.
                unsafe { drv!(b.launch(grid(out_n))) };
                drop(b);
                return Ok(vec![y]);
            }
            Op::Scan { neuron, emit, .. } => {
                let model = &self.graph.neurons[neuron];
                let s = ins[0].shape();
                let (bsz, steps, c) = (s[0], s[1] * s[2], s[3]);
                let mut outs = (0..emit.len()).map(|k| self.alloc_value(result(k as u32), &shapes[k])).collect::<Result<Vec<_>, _>>()?;
                let mut finals = (0..model.state.len()).map(|_| self.alloc_uninit(bsz * c)).collect::<Result<Vec<_>, _>>()?;
                let mut ck = if self.taped.contains(&n) {
                    (0..model.state.len()).map(|_| self.alloc_uninit(bsz * scan_codegen::checkpoints(steps) * c)).collect::<Result<Vec<_>, _>>()?
                } else {
                    Vec::new()
                };
                let null = 0u64;
                let (bi, si, ki, ci) = (bsz as i32, steps as i32, s[2] as i32, c as i32);
                let short = steps <= SHORT_SCAN_STEPS && self.short.contains_key(&n);
                let (kernel, cfg) = match (self.short.get(&n), self.narrow.get(&n)) {
                    (Some(k), _) if short => (k, simple_scan_launch(bsz * c)),
                    (_, Some((plan, k))) if scan_codegen::prefer_narrow(bsz * c, self.gpu.sms) => (k, self.tiled_launch(plan, bsz * c)),
                    _ => (&self.kernel_of[&n], self.scan_launch(n, bsz, c)?),
                };
                // The one-thread-per-column kernel reads a column's initial state before it writes
                // the final one, so a carried state can be updated in place (no copy afterwards).
                let in_place: Vec<Option<(String, u64)>> = (0..model.state.len())
                    .map(|i| {
                        let name = self.carried_in_place.get(&result((emit.len() + i) as u32)).filter(|_| short)?;
                        Some((name.clone(), *self.state_buffers.borrow().get(name)?))
                    })
                    .collect();
                let mut b = st.launch_builder(self.f(kernel));
                for (i, t) in ins.iter().enumerate() {
                    if t.elem().is_none() {
                        return Err(bad(&format!("scan operand {i} must be floating point")));
                    }
                    t.push(&mut b);
                }
                for o in outs.iter_mut() {
                    o.push_mut(&mut b);
                }
                for (f, carried) in finals.iter_mut().zip(&in_place) {
                    match carried {
                        Some((_, ptr)) => b.arg(ptr),
                        None => b.arg(f),
                    };
                }
                if ck.is_empty() {
                    for _ in &model.state {
                        b.arg(&null);
                    }
                } else {
                    for x in ck.iter_mut() {
                        b.arg(x);
                    }
                }
                b.arg(&bi);
                b.arg(&si);
                b.arg(&ki);
                b.arg(&ci);
                // SAFETY: the generated kernel's parameters are exactly these buffers and sizes.
                unsafe { drv!(b.launch(cfg)) };
                drop(b);
                self.written_in_place.borrow_mut().extend(in_place.into_iter().flatten().map(|(name, _)| name));
                if !ck.is_empty() {
                    tapes.insert(n, ck);
                }
                for (i, f) in finals.into_iter().enumerate() {
                    outs.push(wrap(f, &shapes[emit.len() + i]));
                }
                return Ok(outs);
            }
            Op::PonderWeights { clamp, eps } => {
                let k = ins[0].shape()[2] as i32;
                let r = (out_n / k as usize) as i64;
                let mut ek = self.alloc_uninit(r as usize)?;
                let (c, e) = (*clamp as f32, *eps as f32);
                launch!(self.f("sp_ponder_weights"), grid(r as usize), &mut out, &mut ek, fl(0)?, &r, &k, &c, &e);
                return Ok(vec![wrap(out, &shapes[0]), wrap(ek, &shapes[1])]);
            }
            Op::FrameWeightedSum => {
                let s = ins[0].shape();
                let (r, k, d) = ((s[0] * s[1]) as i64, s[2] as i32, s[3] as i32);
                let mut y = self.alloc_value(result(0), &shapes[0])?;
                let bf16 = i32::from(y.elem() == Some(Elem::Bf16));
                let mut b = st.launch_builder(self.f("sp_frame_weighted_sum"));
                y.push_mut(&mut b);
                b.arg(&bf16).arg(fl(0)?).arg(fl(1)?).arg(&r).arg(&k).arg(&d);
                // SAFETY: x holds r·k·d floats, w r·k, y r·d elements of its storage type.
                unsafe { drv!(b.launch(grid(out_n))) };
                drop(b);
                return Ok(vec![y]);
            }
            Op::CrossEntropy { ignore_index } => {
                let v = *ins[0].shape().last().unwrap_or(&1);
                let targets = ins[1].i64().ok_or_else(|| bad("targets must be integers"))?;
                let vi = v as i32;
                launch!(self.f("sp_cross_entropy"), rows(out_n, v), &mut out, fl(0)?, targets, &vi, ignore_index);
            }
            Op::MaskedMean => {
                let count = numel(ins[0].shape()) as i64;
                launch!(self.f("sp_masked_mean"), rows(1, 256), &mut out, fl(0)?, fl(1)?, &count);
            }
            Op::Mean => {
                let count = numel(ins[0].shape()) as i64;
                let null = 0u64;
                launch!(self.f("sp_masked_mean"), rows(1, 256), &mut out, fl(0)?, &null, &count);
            }
            Op::ZerosLike => {}
            Op::ReduceLike => {
                let (x_shape, like) = (ins[0].shape(), &shapes[0]);
                let total = numel(x_shape) as i64;
                match bcast_mode(like, x_shape) {
                    Some((0, _)) => drv!(st.memcpy_dtod(fl(0)?, &mut out)),
                    Some((1, m)) => {
                        let (r, m) = (total / m as i64, m as i64);
                        self.sum_rows(&mut out, fl(0)?, r as usize, m as usize)?;
                    }
                    Some((2, inner)) => {
                        let (r, inner) = (numel(like) as i64, inner as i64);
                        launch!(self.f("sp_sum_inner"), grid(32 * r as usize), &mut out, fl(0)?, &r, &inner);
                    }
                    Some(_) => {
                        // Block partial sums (fixed grid, fixed order), then their sum.
                        let blocks = (total as usize).div_ceil(256).clamp(1, 1024);
                        // SAFETY: every block writes its partial sum.
                        let mut partial = unsafe { self.raw_alloc::<f64>(blocks) }?;
                        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                        launch!(self.f("sp_sum_all_partial"), cfg, &mut partial, fl(0)?, &total);
                        let (chunks, one) = (blocks as i64, 1i64);
                        launch!(self.f("sp_sum_chunks"), grid(1), &mut out, &partial, &chunks, &one);
                    }
                    None => return Err(bad("this broadcast has no CUDA reduction")),
                }
            }
            Op::LinearGradInput => {
                let mut dx = self.alloc_value(result(0), &shapes[0])?;
                self.linear_grad_input(n, ins, &mut dx, false)?;
                return Ok(vec![dx]);
            }
            Op::LinearGradWeight => {
                let o = *ins[0].shape().last().unwrap_or(&1);
                let i = *ins[1].shape().last().unwrap_or(&1);
                let m = numel(ins[0].shape()) / o.max(1);
                let mut dw = DevTensor::F32 { shape: shapes[0].clone(), data: self.alloc_uninit(out_n)? };
                if m > 0 && o > 0 && i > 0 {
                    // Column-major dwᵀ(I×O) = x'(I×M)·dy'ᵀ(M×O).
                    if self.precision == Precision::Bf16 {
                        let (dyp, _k1) = self.bf16_operand(ins[0])?;
                        let (xp, _k2) = self.bf16_operand(ins[1])?;
                        self.gemm_ex(false, true, i, o, m, xp, i, dyp, o, &mut dw, i, 0.0)?;
                    } else {
                        let cfg = GemmConfig { transa: cublasOperation_t::CUBLAS_OP_N, transb: cublasOperation_t::CUBLAS_OP_T, m: i as i32, n: o as i32, k: m as i32, alpha: 1.0f32, lda: i as i32, ldb: o as i32, beta: 0.0f32, ldc: i as i32 };
                        let DevTensor::F32 { data: d, .. } = &mut dw else { unreachable!("allocated f32 above") };
                        // SAFETY: x is m·i, dy is m·o and dw is o·i floats.
                        unsafe { self.gpu.blas.gemm(cfg, fl(1)?, fl(0)?, d) }.map_err(|e| CudaError::Driver(format!("cuBLAS: {e:?}")))?;
                    }
                } else {
                    self.zero(&mut dw)?;
                }
                return Ok(vec![dw]);
            }
            Op::EmbeddingGrad => {
                let (v, d) = (shapes[0][0], shapes[0][1]);
                let ids = drv!(st.clone_dtoh(ins[1].i64().ok_or_else(|| bad("ids must be integers"))?));
                // Group positions by id on the host so every table row sums its own, in order.
                let mut offsets = vec![0i64; v + 1];
                for &id in &ids {
                    offsets[id as usize + 1] += 1;
                }
                for j in 0..v {
                    offsets[j + 1] += offsets[j];
                }
                let mut fill = offsets.clone();
                let mut positions = vec![0i64; ids.len()];
                for (p, &id) in ids.iter().enumerate() {
                    positions[fill[id as usize] as usize] = p as i64;
                    fill[id as usize] += 1;
                }
                let offsets = drv!(st.clone_htod(&offsets));
                let positions = drv!(st.clone_htod(&positions));
                let (vv, di) = (v as i64, d as i32);
                launch!(self.f("sp_embedding_grad"), grid(out_n), &mut out, fl(0)?, &offsets, &positions, &vv, &di);
            }
            Op::SumFrames => {
                let s = ins[0].shape();
                let (r, k, d) = ((s[0] * s[1]) as i64, s[2] as i32, s[3] as i32);
                launch!(self.f("sp_sum_frames"), grid(out_n), &mut out, fl(0)?, &r, &k, &d);
            }
            Op::RmsNormGrad { eps } => {
                let d = *shapes[0].last().unwrap_or(&1);
                let r = out_n / d.max(1);
                let mut dw = self.alloc(d)?;
                let di = d as i32;
                let rr = r as i64;
                if d <= RMS_GRAD_BLOCK_COLS && d.is_multiple_of(4) {
                    // Two blocks per SM, each summing its rows' dw.
                    let blocks = (2 * self.gpu.sms).min(r.div_ceil(8)).max(1);
                    // SAFETY: every block writes its d partial sums.
                    let mut partial = unsafe { self.raw_alloc::<f64>(blocks * d) }?;
                    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
                    launch!(self.f("sp_rms_norm_grad_blocks"), cfg, &mut out, &mut partial, fl(0)?, fl(1)?, fl(2)?, &rr, &di, eps);
                    let (nb, dd) = (blocks as i64, d as i64);
                    launch!(self.f("sp_sum_chunks"), grid(d), &mut dw, &partial, &nb, &dd);
                } else {
                    let mut dw_rows = self.alloc(out_n)?;
                    launch!(self.f("sp_rms_norm_grad"), row_teams(r), &mut out, &mut dw_rows, fl(0)?, fl(1)?, fl(2)?, &rr, &di, eps);
                    self.sum_rows(&mut dw, &dw_rows, r, d)?;
                }
                return Ok(vec![wrap(out, &shapes[0]), wrap(dw, &shapes[1])]);
            }
            Op::ScanAdjoint { neuron, emit, .. } => {
                let model = &self.graph.neurons[neuron];
                let (ni, np, ns) = (model.inputs.len(), model.params.len(), model.state.len());
                let s = ins[0].shape();
                let (bsz, steps, c) = (s[0], s[1] * s[2], s[3]);
                let cols = bsz * c;
                // The forward's checkpoints when it kept them; otherwise the kernel makes its own.
                let tape = self.tape_of.get(&n).and_then(|f| tapes.remove(f));
                let have_ck = tape.is_some() as i32;
                let mut ck = match tape {
                    Some(t) => t,
                    None => (0..ns).map(|_| self.alloc_uninit(cols * scan_codegen::checkpoints(steps))).collect::<Result<Vec<_>, _>>()?,
                };
                let mut din = (0..ni).map(|i| self.alloc_value(result(i as u32), &shapes[i])).collect::<Result<Vec<_>, _>>()?;
                let mut dinit = (0..ns).map(|_| self.alloc_uninit(cols)).collect::<Result<Vec<_>, _>>()?;
                // Few columns run the time-parallel pair (`scan_segmented`), given checkpoints.
                let segments = self.segmented.get(&n).filter(|_| have_ck == 1 && scan_segmented::prefer_segments(cols, self.gpu.sms));
                let nseg = if segments.is_some() { scan_segmented::segments(steps) } else { 1 };
                let mut dp_rows = (0..np).map(|_| self.alloc_uninit(nseg * cols)).collect::<Result<Vec<_>, _>>()?;
                let lead = ni + np + ns + emit.len() + ns;
                if let Some(i) = ins.iter().take(lead).position(|t| t.elem().is_none()) {
                    return Err(bad(&format!("operand {i} must be floating point")));
                }
                let (bi, si, ki, ci) = (bsz as i32, steps as i32, s[2] as i32, c as i32);
                // The segmented pair first composes each segment's carry transform (seg_a, seg_b);
                // its adjoint kernel takes those where the others take `have_ck`.
                let nseg_i = nseg as i32;
                let (kernel, cfg, summaries) = match segments {
                    Some((summary, adjoint)) => {
                        let mut seg_a = self.alloc_uninit(nseg * cols)?;
                        let mut seg_b = self.alloc_uninit(nseg * cols)?;
                        let cfg = LaunchConfig { grid_dim: (cols.div_ceil(128) as u32, nseg as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
                        let mut b = st.launch_builder(self.f(summary));
                        ins.iter().take(lead).for_each(|t| t.push(&mut b));
                        for x in ck.iter_mut() {
                            b.arg(x);
                        }
                        b.arg(&mut seg_a).arg(&mut seg_b).arg(&nseg_i).arg(&bi).arg(&si).arg(&ki).arg(&ci);
                        // SAFETY: the summary kernel's parameters are exactly these buffers and sizes.
                        unsafe { drv!(b.launch(cfg)) };
                        drop(b);
                        (adjoint, cfg, Some((seg_a, seg_b)))
                    }
                    None => match self.narrow.get(&n) {
                        Some((plan, k)) if scan_codegen::prefer_narrow_reverse(cols, self.gpu.sms) => (k, self.tiled_launch(plan, cols), None),
                        _ => (&self.kernel_of[&n], self.scan_launch(n, bsz, c)?, None),
                    },
                };
                let mut b = st.launch_builder(self.f(kernel));
                ins.iter().take(lead).for_each(|t| t.push(&mut b));
                for x in ck.iter_mut() {
                    b.arg(x);
                }
                match &summaries {
                    Some((seg_a, seg_b)) => b.arg(seg_a).arg(seg_b).arg(&nseg_i),
                    None => b.arg(&have_ck),
                };
                for x in din.iter_mut() {
                    x.push_mut(&mut b);
                }
                for x in dp_rows.iter_mut().chain(dinit.iter_mut()) {
                    b.arg(x);
                }
                b.arg(&bi).arg(&si).arg(&ki).arg(&ci);
                // SAFETY: the generated kernel's parameters are exactly these buffers and sizes.
                unsafe { drv!(b.launch(cfg)) };
                drop(b);
                drop(ck);
                let mut res = din;
                for (j, rows_) in dp_rows.iter().enumerate() {
                    let mut g = self.alloc(c)?;
                    self.sum_rows(&mut g, rows_, nseg * bsz, c)?;
                    res.push(wrap(g, &shapes[ni + j]));
                }
                for (j, d) in dinit.into_iter().enumerate() {
                    res.push(wrap(d, &shapes[ni + np + j]));
                }
                return Ok(res);
            }
            Op::PonderWeightsGrad { clamp, eps } => {
                let k = ins[2].shape()[2] as i32;
                let r = (out_n / k as usize) as i64;
                launch!(self.f("sp_ponder_weights_grad"), grid(r as usize), &mut out, fl(0)?, fl(1)?, fl(2)?, &r, &k, clamp, eps);
            }
            Op::FrameWeightedSumGrad => {
                let s = ins[1].shape();
                let (r, k, d) = ((s[0] * s[1]) as i64, s[2] as i32, s[3] as i32);
                let mut dw = self.alloc(numel(&shapes[1]))?;
                launch!(self.f("sp_frame_weighted_sum_grad_frames"), repeat_grid(r as usize, d as usize), &mut out, fl(0)?, fl(2)?, &r, &k, &d);
                let rks = r * k as i64;
                launch!(self.f("sp_frame_weighted_sum_grad_weights"), row_teams(rks as usize), &mut dw, fl(0)?, fl(1)?, &rks, &k, &d);
                return Ok(vec![wrap(out, &shapes[0]), wrap(dw, &shapes[1])]);
            }
            Op::CrossEntropyGrad { ignore_index } => {
                let v = *ins[1].shape().last().unwrap_or(&1);
                let targets = ins[2].i64().ok_or_else(|| bad("targets must be integers"))?;
                let vi = v as i32;
                launch!(self.f("sp_cross_entropy_grad"), rows(out_n / v.max(1), v), &mut out, fl(0)?, fl(1)?, targets, &vi, ignore_index);
            }
            Op::MaskedMeanGrad => {
                let count = out_n as i64;
                launch!(self.f("sp_mean_grad"), rows(1, 256), &mut out, fl(0)?, fl(1)?, &count);
            }
            Op::MeanGrad => {
                let (count, null) = (out_n as i64, 0u64);
                launch!(self.f("sp_mean_grad"), rows(1, 256), &mut out, fl(0)?, &null, &count);
            }
            other => return Err(CudaError::Unsupported(format!("`{}` has no CUDA kernel yet", other.name()))),
        }
        Ok(vec![wrap(out, &shapes[0])])
    }
}

/// How the generated map kernel indexes an operand of `shape` inside an output of `out`
/// (0 same, 1 repeating suffix, 2 leading broadcast over an inner block, 3 scalar).
/// Outputs that can be handed out when produced: gradients (`grad.*`) that no node reads and
/// no other output names. Carried state is not among them: it must not overwrite the old
/// state while later nodes may still read that.
fn early_outputs(g: &Graph, last_use: &HashMap<Value, usize>) -> HashMap<Value, String> {
    let mut names: HashMap<Value, Vec<&str>> = HashMap::new();
    for (name, v) in &g.outputs {
        names.entry(*v).or_default().push(name);
    }
    names
        .into_iter()
        .filter(|(v, n)| n.len() == 1 && n[0].starts_with("grad.") && !last_use.contains_key(v))
        .map(|(v, n)| (v, n[0].to_string()))
        .collect()
}

fn bcast_mode(shape: &[usize], out: &[usize]) -> Option<(i32, usize)> {
    let numel: usize = shape.iter().product();
    let out_n: usize = out.iter().product();
    if numel == out_n {
        return Some((0, numel));
    }
    if numel == 1 {
        return Some((3, 1));
    }
    let mut padded = vec![1usize; out.len().saturating_sub(shape.len())];
    padded.extend_from_slice(shape);
    let first = padded.iter().position(|&d| d != 1).unwrap_or(padded.len());
    if padded[first..] == out[first..] {
        return Some((1, numel));
    }
    let last = padded.iter().rposition(|&d| d != 1).map_or(0, |p| p + 1);
    if padded[..last] == out[..last] && padded[last..].iter().all(|&d| d == 1) {
        return Some((2, out[last..].iter().product()));
    }
    None
}

/// Zero a buffer (a GEMM with an empty inner dimension writes nothing).
fn zero(st: &Arc<cudarc::driver::CudaStream>, t: &mut DevTensor) -> Result<(), CudaError> {
    match t {
        DevTensor::F32 { data, .. } => drv!(st.memset_zeros(data)),
        DevTensor::Bf16 { data, .. } => drv!(st.memset_zeros(data)),
        DevTensor::I64 { data, .. } => drv!(st.memset_zeros(data)),
    }
    Ok(())
}

/// Which values are stored in bf16 (bf16 mode): those a bf16-capable kernel writes and that
/// only bf16-capable kernels read — GEMM operands, element-wise maps, scan inputs and outputs
/// and their gradients. Graph outputs, scan state, norms, reductions and the residual stream
/// (read by norms) stay f32.
fn plan_storage(g: &Graph) -> HashMap<Value, Elem> {
    use petgraph::visit::EdgeRef;
    let outputs: HashSet<Value> = g.outputs.iter().map(|(_, v)| *v).collect();
    let mut plan = HashMap::new();
    for n in g.g.node_indices() {
        let node = g.node(n);
        for port in 0..node.results.len() as u32 {
            let v = Value { node: n, port };
            if node.results[port as usize].dtype != DType::F32 || outputs.contains(&v) || !writes_bf16(g, n, port) {
                continue;
            }
            let readers: Vec<_> = g.g.edges_directed(n, petgraph::Direction::Outgoing).filter(|e| e.weight().src == port).collect();
            if !readers.is_empty() && readers.iter().all(|e| reads_bf16(g, e.target(), e.weight().dst as usize)) {
                plan.insert(v, Elem::Bf16);
            }
        }
    }
    plan
}

fn weight_is_param(g: &Graph, n: NodeIndex) -> bool {
    g.operands(n).get(1).is_some_and(|w| matches!(g.node(w.node).op, Op::Param { .. }))
}

fn writes_bf16(g: &Graph, n: NodeIndex, port: u32) -> bool {
    match &g.node(n).op {
        Op::Linear { bias: false } | Op::LinearGradInput => port == 0 && weight_is_param(g, n),
        Op::Map { .. } | Op::FrameWeightedSum => port == 0,
        Op::Scan { emit, .. } => (port as usize) < emit.len(),
        Op::ScanAdjoint { neuron, .. } => (port as usize) < g.neurons[neuron].inputs.len(),
        _ => false,
    }
}

fn reads_bf16(g: &Graph, n: NodeIndex, slot: usize) -> bool {
    match &g.node(n).op {
        Op::Linear { .. } | Op::LinearGradInput => slot == 0 && weight_is_param(g, n),
        Op::LinearGradWeight => slot <= 1,
        Op::Map { .. } => true,
        Op::Scan { neuron, .. } => slot < g.neurons[neuron].inputs.len(),
        Op::ScanAdjoint { neuron, emit, .. } => {
            let m = &g.neurons[neuron];
            let fwd = m.inputs.len() + m.params.len() + m.state.len();
            slot < m.inputs.len() || (slot >= fwd && slot < fwd + emit.len())
        }
        _ => false,
    }
}

/// Pair each reverse scan with the forward scan it differentiates (same model, emitted
/// outputs, scope and operands), so that the forward keeps checkpoints for it.
fn pair_reverse_scans(g: &Graph) -> HashMap<NodeIndex, NodeIndex> {
    let key = |neuron: &str, emit: &[String], scope: &sparkc_ir::StateScope, ops: &[Value]| (format!("{neuron}/{emit:?}/{scope:?}"), ops.to_vec());
    let mut forward = HashMap::new();
    for n in g.g.node_indices() {
        if let Op::Scan { neuron, emit, scope } = &g.node(n).op {
            forward.insert(key(neuron, emit, scope, &g.operands(n)), n);
        }
    }
    let mut pairs = HashMap::new();
    for n in g.g.node_indices() {
        if let Op::ScanAdjoint { neuron, emit, scope } = &g.node(n).op {
            let m = &g.neurons[neuron];
            let ops = g.operands(n);
            let k = (m.inputs.len() + m.params.len() + m.state.len()).min(ops.len());
            if let Some(&f) = forward.get(&key(neuron, emit, scope, &ops[..k])) {
                pairs.insert(n, f);
            }
        }
    }
    pairs
}

/// Copy a host tensor into an existing device buffer of the same size.
fn upload_into(st: &Arc<cudarc::driver::CudaStream>, t: &Tensor, dst: &mut DevTensor) -> Result<(), CudaError> {
    match (&t.data, dst) {
        (TensorData::F32(v), DevTensor::F32 { data, .. }) if data.len() == v.len().max(1) || data.len() == v.len() => drv!(st.memcpy_htod(v, data)),
        (TensorData::I64(v), DevTensor::I64 { data, .. }) if data.len() == v.len().max(1) || data.len() == v.len() => drv!(st.memcpy_htod(v, data)),
        _ => return Err(CudaError::Input("an input changed type or size between captured steps".into())),
    }
    Ok(())
}

/// Stream-ordered device-to-device copy of a whole tensor to `dst` (a buffer of its size and
/// type; raw pointer, because the destination may be one of the run's own inputs).
fn copy_device(st: &Arc<cudarc::driver::CudaStream>, t: &DevTensor, dst: u64) -> Result<(), CudaError> {
    let bytes = match t {
        DevTensor::F32 { data, .. } => data.len() * 4,
        DevTensor::Bf16 { data, .. } => data.len() * 2,
        DevTensor::I64 { data, .. } => data.len() * 8,
    };
    // SAFETY: both buffers hold `bytes` bytes (the destination was allocated for this output).
    unsafe { drv!(cudarc::driver::result::memcpy_dtod_async(dst, t.ptr(st), bytes, st.cu_stream())) };
    Ok(())
}

/// Scan final-state results that can be written over the carried state they start from: the
/// state input is read only by that scan, and the result only by the state output of the
/// same name.
fn carried_in_place(g: &Graph) -> HashMap<Value, String> {
    let mut out = HashMap::new();
    for (name, v) in &g.outputs {
        let Op::Scan { neuron, emit, .. } = &g.node(v.node).op else { continue };
        let m = &g.neurons[neuron];
        let Some(i) = (v.port as usize).checked_sub(emit.len()).filter(|&i| i < m.state.len()) else { continue };
        let init = g.operands(v.node)[m.inputs.len() + m.params.len() + i];
        let is_this_input = matches!(&g.node(init.node).op, Op::Input { name: n } if n == name);
        let named_once = g.outputs.iter().filter(|(_, w)| w == v).count() == 1;
        if is_this_input && g.readers_of(init).len() == 1 && g.readers_of(*v).is_empty() && named_once {
            out.insert(*v, name.clone());
        }
    }
    out
}
