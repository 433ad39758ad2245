//! A graph compiled for the GPU: one CUDA module per graph (generated map and scan kernels plus
//! the library), cuBLAS for the linear layers, device-resident parameters.

use crate::codegen;
use crate::device::Gpu;
use crate::library::LIBRARY;
use crate::CudaError;
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};
use sparkc_ir::tensor::TensorData;
use sparkc_ir::types::DimBindings;
use sparkc_ir::{DType, Graph, NodeIndex, Op, Tensor, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A tensor on the device.
pub enum DevTensor {
    F32 { shape: Vec<usize>, data: CudaSlice<f32> },
    I64 { shape: Vec<usize>, data: CudaSlice<i64> },
}

impl DevTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            DevTensor::F32 { shape, .. } | DevTensor::I64 { shape, .. } => shape,
        }
    }

    fn f32(&self) -> Option<&CudaSlice<f32>> {
        match self {
            DevTensor::F32 { data, .. } => Some(data),
            DevTensor::I64 { .. } => None,
        }
    }

    fn i64(&self) -> Option<&CudaSlice<i64>> {
        match self {
            DevTensor::I64 { data, .. } => Some(data),
            DevTensor::F32 { .. } => None,
        }
    }
}

enum Slot<'a> {
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

/// Arithmetic of the linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// fp32 GEMMs (no TF32): matches the CPU oracle to rounding; what the goldens check.
    F32,
    /// bf16 GEMM operands with fp32 accumulation and output, as the original's autocast; scans,
    /// norms and the residual stream stay fp32.
    Bf16,
}

pub struct GpuProgram {
    pub gpu: Gpu,
    precision: Precision,
    /// bf16 copies of the parameters that feed GEMMs (bf16 mode only).
    params_bf16: BTreeMap<String, CudaSlice<u16>>,
    graph: Graph,
    order: Vec<NodeIndex>,
    module: Arc<CudaModule>,
    kernels: HashMap<String, CudaFunction>,
    last_use: HashMap<Value, usize>,
    params: BTreeMap<String, DevTensor>,
    /// Identity (data address and length) of the host parameters last uploaded.
    uploaded_from: BTreeMap<String, (usize, usize)>,
}

fn kernel_name(op: &str, n: NodeIndex) -> String {
    format!("{op}_{}", n.index())
}

fn grid(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn rows(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.next_power_of_two().clamp(32, 256) as u32;
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

macro_rules! drv {
    ($e:expr) => {
        $e.map_err(|e| CudaError::Driver(format!("{e:?}")))?
    };
}

impl GpuProgram {
    /// Generate and compile the module for `graph` (verified first), fp32 throughout.
    pub fn compile(gpu: Gpu, graph: &Graph) -> Result<GpuProgram, CudaError> {
        GpuProgram::compile_with(gpu, graph, Precision::F32)
    }

    pub fn compile_with(gpu: Gpu, graph: &Graph, precision: Precision) -> Result<GpuProgram, CudaError> {
        sparkc_ir::verify::verify(graph).map_err(|e| CudaError::Unsupported(e.to_string()))?;
        let order = graph.topo_order().map_err(|e| CudaError::Unsupported(e.to_string()))?;
        let mut src = String::from(codegen::PRELUDE);
        src.push_str(LIBRARY);
        let mut names = vec![
            "sp_embedding", "sp_repeat_frames", "sp_mean_frames", "sp_add_bias", "sp_rms_norm", "sp_center_last",
            "sp_ponder_weights", "sp_frame_weighted_sum", "sp_cross_entropy", "sp_masked_mean", "sp_to_bf16",
            "sp_sum_rows", "sp_sum_inner", "sp_embedding_grad", "sp_sum_frames", "sp_rms_norm_grad", "sp_ponder_weights_grad",
            "sp_frame_weighted_sum_grad_frames", "sp_frame_weighted_sum_grad_weights", "sp_cross_entropy_grad", "sp_mean_grad",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        let mut last_use = HashMap::new();
        for (pos, &n) in order.iter().enumerate() {
            let node = graph.node(n);
            let operands = graph.operands(n);
            for v in &operands {
                last_use.insert(*v, pos);
            }
            match &node.op {
                Op::Map { expr } => {
                    let name = kernel_name("map", n);
                    src.push_str(&codegen::map_kernel(&name, expr, operands.len()));
                    names.push(name);
                }
                Op::Scan { neuron, emit, scope } => {
                    let name = kernel_name("scan", n);
                    let token = *scope == sparkc_ir::StateScope::Token;
                    src.push_str(&codegen::scan_forward_kernel(&name, &graph.neurons[neuron], emit, token));
                    names.push(name);
                }
                Op::ScanAdjoint { neuron, emit, scope } => {
                    let name = kernel_name("scan_adjoint", n);
                    let token = *scope == sparkc_ir::StateScope::Token;
                    let k = codegen::scan_adjoint_kernel(&name, &graph.neurons[neuron], emit, token).map_err(CudaError::Unsupported)?;
                    src.push_str(&k);
                    names.push(name);
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
        for (_, v) in &graph.outputs {
            last_use.insert(*v, usize::MAX);
        }
        let module = gpu.load(&src)?;
        let mut kernels = HashMap::new();
        for name in names {
            let f = module.load_function(&name).map_err(|e| CudaError::Driver(format!("kernel {name}: {e:?}")))?;
            kernels.insert(name, f);
        }
        Ok(GpuProgram { gpu, precision, params_bf16: BTreeMap::new(), graph: graph.clone(), order, module, kernels, last_use, params: BTreeMap::new(), uploaded_from: BTreeMap::new() })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The generated module (kept alive with its kernels).
    pub fn module(&self) -> &Arc<CudaModule> {
        &self.module
    }

    fn upload(&self, t: &Tensor) -> Result<DevTensor, CudaError> {
        Ok(match &t.data {
            TensorData::F32(v) => DevTensor::F32 { shape: t.shape.clone(), data: drv!(self.gpu.stream.clone_htod(v)) },
            TensorData::I64(v) => DevTensor::I64 { shape: t.shape.clone(), data: drv!(self.gpu.stream.clone_htod(v)) },
        })
    }

    fn download(&self, t: &DevTensor) -> Result<Tensor, CudaError> {
        Ok(match t {
            DevTensor::F32 { shape, data } => Tensor::f32(shape.clone(), drv!(self.gpu.stream.clone_dtoh(data))),
            DevTensor::I64 { shape, data } => Tensor::i64(shape.clone(), drv!(self.gpu.stream.clone_dtoh(data))),
        })
    }

    /// Keep device copies of the parameters; re-uploads only the ones whose host buffer changed.
    pub fn set_params(&mut self, params: &BTreeMap<String, Tensor>) -> Result<(), CudaError> {
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
        Ok(())
    }

    /// Forget which host buffers the device copies came from, so the next
    /// [`GpuProgram::set_params`] uploads everything again (after in-place updates).
    pub fn forget_params(&mut self) {
        self.uploaded_from.clear();
    }

    fn to_bf16(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>, CudaError> {
        let mut out = drv!(self.gpu.stream.alloc_zeros::<u16>(n.max(1)));
        let count = n as i64;
        let mut b = self.gpu.stream.launch_builder(self.f("sp_to_bf16"));
        b.arg(&mut out);
        b.arg(x);
        b.arg(&count);
        // SAFETY: out and x hold n elements.
        unsafe { drv!(b.launch(grid(n))) };
        Ok(out)
    }

    /// y[M,O] = x[M,I]·w[O,I]ᵀ in bf16 with fp32 accumulation (cublasGemmEx).
    fn gemm_bf16(&self, x: &CudaSlice<f32>, w: &CudaSlice<u16>, out: &mut CudaSlice<f32>, m: usize, i: usize, o: usize) -> Result<(), CudaError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let xb = self.to_bf16(x, m * i)?;
        let st = &self.gpu.stream;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wp, _g1) = w.device_ptr(st);
        let (xp, _g2) = xb.device_ptr(st);
        let (yp, _g3) = out.device_ptr_mut(st);
        // SAFETY: the pointers address o·i, m·i and m·o elements as the dimensions say.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.gpu.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                o as i32,
                m as i32,
                i as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                cudaDataType::CUDA_R_16BF,
                i as i32,
                xp as *const _,
                cudaDataType::CUDA_R_16BF,
                i as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                cudaDataType::CUDA_R_32F,
                o as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Driver(format!("cuBLAS GemmEx: {e:?}")))
    }

    /// Run the graph on host inputs (parameters come from [`GpuProgram::set_params`]).
    pub fn run(&self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let env: DimBindings = self.graph.bind_input_dims(|name| inputs.get(name).map(|t| t.shape.as_slice())).map_err(CudaError::Input)?;
        let mut fed: HashMap<NodeIndex, DevTensor> = HashMap::new();
        for (n, name, ty) in self.graph.inputs() {
            let t = inputs.get(name).ok_or_else(|| CudaError::Input(format!("missing input `{name}`")))?;
            let t = match (ty.dtype, &t.data) {
                (DType::F32, TensorData::I64(v)) => Tensor::f32(t.shape.clone(), v.iter().map(|&x| x as f32).collect()),
                (DType::I64 | DType::I32, TensorData::F32(_)) => return Err(CudaError::Input(format!("`{name}` must be an integer tensor"))),
                _ => t.clone(),
            };
            self.check_ids(n, &t)?;
            fed.insert(n, self.upload(&t)?);
        }
        let mut values: HashMap<Value, Slot> = HashMap::new();
        for (pos, &n) in self.order.iter().enumerate() {
            let node = self.graph.node(n);
            let shapes: Vec<Vec<usize>> = node
                .results
                .iter()
                .map(|t| t.shape.concrete(&env))
                .collect::<Result<_, _>>()
                .map_err(|s| CudaError::Input(format!("dimension {s} is not bound by any input")))?;
            let results: Vec<Slot> = match &node.op {
                Op::Input { .. } => vec![Slot::Owned(fed.remove(&n).expect("inputs are bound"))],
                Op::Param { name } => vec![Slot::Param(self.params.get(name).ok_or_else(|| CudaError::Input(format!("parameter `{name}` was not uploaded")))?)],
                _ => {
                    let ops: Vec<&DevTensor> = self.graph.operands(n).iter().map(|v| values[v].get()).collect();
                    self.exec(n, &ops, &shapes)?.into_iter().map(Slot::Owned).collect()
                }
            };
            for (port, t) in results.into_iter().enumerate() {
                let v = Value { node: n, port: port as u32 };
                if self.last_use.contains_key(&v) {
                    values.insert(v, t);
                }
            }
            for v in self.graph.operands(n) {
                if self.last_use.get(&v) == Some(&pos) {
                    values.remove(&v);
                }
            }
        }
        let mut out = BTreeMap::new();
        for (name, v) in &self.graph.outputs {
            out.insert(name.clone(), self.download(values[v].get())?);
        }
        Ok(out)
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

    fn f(&self, name: &str) -> &CudaFunction {
        &self.kernels[name]
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>, CudaError> {
        Ok(drv!(self.gpu.stream.alloc_zeros::<f32>(n.max(1))))
    }

    fn exec(&self, n: NodeIndex, ins: &[&DevTensor], shapes: &[Vec<usize>]) -> Result<Vec<DevTensor>, CudaError> {
        let node = self.graph.node(n);
        let st = &self.gpu.stream;
        let bad = |what: &str| CudaError::Input(format!("`{}` node `{}`: {what}", node.op.name(), node.name));
        let fl = |i: usize| ins[i].f32().ok_or_else(|| bad(&format!("operand {i} must be f32")));
        let numel = |s: &[usize]| s.iter().product::<usize>();
        let out_n = numel(&shapes[0]);
        let mut out = self.alloc(out_n)?;
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
                launch!(self.f("sp_repeat_frames"), grid(out_n), &mut out, fl(0)?, &rows, &k, &d);
            }
            Op::MeanFrames => {
                let s = ins[0].shape();
                let (rows, k, d) = ((s[0] * s[1]) as i64, s[2] as i32, s[3] as i32);
                launch!(self.f("sp_mean_frames"), grid(out_n), &mut out, fl(0)?, &rows, &k, &d);
            }
            Op::Linear { bias } => {
                let (o, i) = (ins[1].shape()[0], ins[1].shape()[1]);
                let m = numel(ins[0].shape()) / i.max(1);
                // Row-major y[M,O] = x[M,I]·w[O,I]ᵀ is column-major yᵀ = wᵀᵀ·xᵀ: C(O×M) = op(W)(O×I)·X(I×M).
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: o as i32,
                    n: m as i32,
                    k: i as i32,
                    alpha: 1.0f32,
                    lda: i as i32,
                    ldb: i as i32,
                    beta: 0.0f32,
                    ldc: o as i32,
                };
                let w_bf16 = match self.graph.node(self.graph.operands(n)[1].node).op {
                    Op::Param { ref name } => self.params_bf16.get(name),
                    _ => None,
                };
                if m > 0 && o > 0 && i > 0 {
                    match w_bf16 {
                        Some(w) if self.precision == Precision::Bf16 => self.gemm_bf16(fl(0)?, w, &mut out, m, i, o)?,
                        // SAFETY: the buffers hold o·i, m·i and m·o floats as the config says.
                        _ => unsafe { self.gpu.blas.gemm(cfg, fl(1)?, fl(0)?, &mut out) }.map_err(|e| CudaError::Driver(format!("cuBLAS: {e:?}")))?,
                    }
                }
                if *bias {
                    let (rows_, oi) = (m as i64, o as i32);
                    launch!(self.f("sp_add_bias"), grid(out_n), &mut out, fl(2)?, &rows_, &oi);
                }
            }
            Op::RmsNorm { eps } | Op::LateralInhibition { eps } => {
                let d = *shapes[0].last().unwrap_or(&1);
                let r = out_n / d.max(1);
                let di = d as i32;
                launch!(self.f("sp_rms_norm"), rows(r, d), &mut out, fl(0)?, fl(1)?, &di, eps);
            }
            Op::CenterLast => {
                let d = *shapes[0].last().unwrap_or(&1);
                let di = d as i32;
                launch!(self.f("sp_center_last"), rows(out_n / d.max(1), d), &mut out, fl(0)?, &di);
            }
            Op::Map { .. } => {
                let name = kernel_name("map", n);
                let mut b = st.launch_builder(self.f(&name));
                let total = out_n as i64;
                b.arg(&mut out);
                b.arg(&total);
                let mut modes = Vec::new();
                for (i, t) in ins.iter().enumerate() {
                    let (mode, extent) = bcast_mode(t.shape(), &shapes[0]).ok_or_else(|| bad(&format!("operand {i} {:?} broadcasts to {:?} in a way the CUDA backend does not index", t.shape(), shapes[0])))?;
                    modes.push((mode, extent as i64));
                }
                for (i, t) in ins.iter().enumerate() {
                    b.arg(t.f32().ok_or_else(|| bad("map operands must be f32"))?);
                    b.arg(&modes[i].0);
                    b.arg(&modes[i].1);
                }
                // SAFETY: the generated kernel takes (out, n, then ptr/mode/extent per operand).
                unsafe { drv!(b.launch(grid(out_n))) };
            }
            Op::Scan { neuron, emit, .. } => {
                let model = &self.graph.neurons[neuron];
                let s = ins[0].shape();
                let (bsz, steps, k, c) = (s[0] as i32, (s[1] * s[2]) as i32, s[2] as i32, s[3] as i32);
                let mut outs: Vec<CudaSlice<f32>> = vec![out];
                for _ in 1..emit.len() {
                    outs.push(self.alloc(out_n)?);
                }
                let mut finals: Vec<CudaSlice<f32>> = Vec::new();
                for _ in &model.state {
                    finals.push(self.alloc((bsz * c) as usize)?);
                }
                let name = kernel_name("scan", n);
                let mut b = st.launch_builder(self.f(&name));
                for (i, t) in ins.iter().enumerate() {
                    b.arg(t.f32().ok_or_else(|| bad(&format!("scan operand {i} must be f32")))?);
                }
                for o in outs.iter_mut() {
                    b.arg(o);
                }
                for f in finals.iter_mut() {
                    b.arg(f);
                }
                b.arg(&bsz);
                b.arg(&steps);
                b.arg(&k);
                b.arg(&c);
                let cols = (bsz as usize) * (c as usize);
                let cfg = LaunchConfig { grid_dim: (cols.div_ceil(128).max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the generated kernel's parameters are exactly these buffers and sizes.
                unsafe { drv!(b.launch(cfg)) };
                drop(b);
                let mut res: Vec<DevTensor> = outs.into_iter().map(|d| wrap(d, &shapes[0])).collect();
                for (i, f) in finals.into_iter().enumerate() {
                    res.push(wrap(f, &shapes[emit.len() + i]));
                }
                return Ok(res);
            }
            Op::PonderWeights { clamp, eps } => {
                let k = ins[0].shape()[2] as i32;
                let r = (out_n / k as usize) as i64;
                let mut ek = self.alloc(r as usize)?;
                let (c, e) = (*clamp as f32, *eps as f32);
                launch!(self.f("sp_ponder_weights"), grid(r as usize), &mut out, &mut ek, fl(0)?, &r, &k, &c, &e);
                return Ok(vec![wrap(out, &shapes[0]), wrap(ek, &shapes[1])]);
            }
            Op::FrameWeightedSum => {
                let s = ins[0].shape();
                let (r, k, d) = ((s[0] * s[1]) as i64, s[2] as i32, s[3] as i32);
                launch!(self.f("sp_frame_weighted_sum"), grid(out_n), &mut out, fl(0)?, fl(1)?, &r, &k, &d);
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
                        launch!(self.f("sp_sum_rows"), grid(m as usize), &mut out, fl(0)?, &r, &m);
                    }
                    Some((2, inner)) => {
                        let (r, inner) = (numel(like) as i64, inner as i64);
                        launch!(self.f("sp_sum_inner"), grid(r as usize), &mut out, fl(0)?, &r, &inner);
                    }
                    Some(_) => {
                        let one = 1i64;
                        launch!(self.f("sp_sum_inner"), grid(1), &mut out, fl(0)?, &one, &total);
                    }
                    None => return Err(bad("this broadcast has no CUDA reduction")),
                }
            }
            Op::LinearGradInput => {
                let (o, i) = (ins[1].shape()[0], ins[1].shape()[1]);
                let m = numel(ins[0].shape()) / o.max(1);
                // Column-major dxᵀ(I×M) = w'(I×O)·dy'(O×M).
                let cfg = GemmConfig { transa: cublasOperation_t::CUBLAS_OP_N, transb: cublasOperation_t::CUBLAS_OP_N, m: i as i32, n: m as i32, k: o as i32, alpha: 1.0f32, lda: i as i32, ldb: o as i32, beta: 0.0f32, ldc: i as i32 };
                if m > 0 && o > 0 && i > 0 {
                    // SAFETY: w is o·i, dy is m·o and dx is m·i floats.
                    unsafe { self.gpu.blas.gemm(cfg, fl(1)?, fl(0)?, &mut out) }.map_err(|e| CudaError::Driver(format!("cuBLAS: {e:?}")))?;
                }
            }
            Op::LinearGradWeight => {
                let o = *ins[0].shape().last().unwrap_or(&1);
                let i = *ins[1].shape().last().unwrap_or(&1);
                let m = numel(ins[0].shape()) / o.max(1);
                // Column-major dwᵀ(I×O) = x'(I×M)·dy'ᵀ(M×O).
                let cfg = GemmConfig { transa: cublasOperation_t::CUBLAS_OP_N, transb: cublasOperation_t::CUBLAS_OP_T, m: i as i32, n: o as i32, k: m as i32, alpha: 1.0f32, lda: i as i32, ldb: o as i32, beta: 0.0f32, ldc: i as i32 };
                if m > 0 && o > 0 && i > 0 {
                    // SAFETY: x is m·i, dy is m·o and dw is o·i floats.
                    unsafe { self.gpu.blas.gemm(cfg, fl(1)?, fl(0)?, &mut out) }.map_err(|e| CudaError::Driver(format!("cuBLAS: {e:?}")))?;
                }
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
                let mut dw_rows = self.alloc(out_n)?;
                let mut dw = self.alloc(d)?;
                let di = d as i32;
                launch!(self.f("sp_rms_norm_grad"), rows(r, d), &mut out, &mut dw_rows, fl(0)?, fl(1)?, fl(2)?, &di, eps);
                let (rr, dd) = (r as i64, d as i64);
                launch!(self.f("sp_sum_rows"), grid(d), &mut dw, &dw_rows, &rr, &dd);
                return Ok(vec![wrap(out, &shapes[0]), wrap(dw, &shapes[1])]);
            }
            Op::ScanAdjoint { neuron, .. } => {
                let model = &self.graph.neurons[neuron];
                let (ni, np, ns) = (model.inputs.len(), model.params.len(), model.state.len());
                let s = ins[0].shape();
                let (bsz, steps, k, c) = (s[0], s[1] * s[2], s[2], s[3]);
                let frames = bsz * steps * c;
                let mut scratch = (0..ns).map(|_| self.alloc(frames)).collect::<Result<Vec<_>, _>>()?;
                let mut din = (0..ni).map(|_| self.alloc(frames)).collect::<Result<Vec<_>, _>>()?;
                let mut dp_rows = (0..np).map(|_| self.alloc(bsz * c)).collect::<Result<Vec<_>, _>>()?;
                let mut dinit = (0..ns).map(|_| self.alloc(bsz * c)).collect::<Result<Vec<_>, _>>()?;
                let name = kernel_name("scan_adjoint", n);
                let mut b = st.launch_builder(self.f(&name));
                for (i, t) in ins.iter().enumerate() {
                    b.arg(t.f32().ok_or_else(|| bad(&format!("operand {i} must be f32")))?);
                }
                for x in scratch.iter_mut().chain(din.iter_mut()).chain(dp_rows.iter_mut()).chain(dinit.iter_mut()) {
                    b.arg(x);
                }
                let (bi, si, ki, ci) = (bsz as i32, steps as i32, k as i32, c as i32);
                b.arg(&bi);
                b.arg(&si);
                b.arg(&ki);
                b.arg(&ci);
                let cfg = LaunchConfig { grid_dim: ((bsz * c).div_ceil(128).max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the generated kernel's parameters are exactly these buffers and sizes.
                unsafe { drv!(b.launch(cfg)) };
                drop(b);
                drop(scratch);
                let mut res: Vec<DevTensor> = din.into_iter().enumerate().map(|(i, d)| wrap(d, &shapes[i])).collect();
                for (j, rows_) in dp_rows.iter().enumerate() {
                    let mut g = self.alloc(c)?;
                    let (rr, cc) = (bsz as i64, c as i64);
                    launch!(self.f("sp_sum_rows"), grid(c), &mut g, rows_, &rr, &cc);
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
                launch!(self.f("sp_frame_weighted_sum_grad_frames"), grid(out_n), &mut out, fl(0)?, fl(2)?, &r, &k, &d);
                launch!(self.f("sp_frame_weighted_sum_grad_weights"), rows(r as usize * k as usize, d as usize), &mut dw, fl(0)?, fl(1)?, &k, &d);
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
