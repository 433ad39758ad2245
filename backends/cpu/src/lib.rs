//! CPU backend: compiles a verified graph into an executable plan and runs it in f32.
//!
//! This is the oracle of the project (ARCHITECTURE.md, principle 1): the simplest exact executor
//! of the IR. Expressions and neuron models are compiled to lane-vectorised bytecode, GEMMs go
//! through matrixmultiply, and independent rows/columns run on rayon's pool.

pub mod bytecode;
pub mod kernels;

use kernels::{dense, fixed, grad, map, reduce, scan};
use petgraph::stable_graph::NodeIndex;
use sparkc_ir::tensor::TensorData;
use sparkc_ir::types::DimBindings;
use sparkc_ir::{DType, Graph, Op, Tensor, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot compile for the CPU: {0}")]
    Compile(String),
    #[error("input error: {0}")]
    Input(String),
    #[error("parameter error: {0}")]
    Param(String),
    #[error("in `{op}` node `{node}`: {msg}")]
    Exec { op: String, node: String, msg: String },
    #[error(transparent)]
    Ir(#[from] sparkc_ir::IrError),
}

/// Wall time per op kind, in seconds, accumulated over runs.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub by_op: BTreeMap<&'static str, f64>,
}

enum Compiled {
    Map(map::CompiledMap),
    Scan(scan::CompiledScan),
    ScanAdjoint(scan::CompiledScanAdjoint),
    FixedMap(fixed::CompiledFixedMap),
    FixedScan(fixed::CompiledFixedScan),
}

/// A graph compiled for the CPU.
pub struct CpuProgram {
    graph: Graph,
    order: Vec<NodeIndex>,
    compiled: HashMap<NodeIndex, Compiled>,
    /// For each value, the position in `order` of its last reader (outputs live to the end).
    last_use: HashMap<Value, usize>,
}

impl CpuProgram {
    pub fn compile(graph: &Graph) -> Result<CpuProgram, CpuError> {
        sparkc_ir::verify::verify(graph)?;
        let order = graph.execution_order()?;
        let mut compiled = HashMap::new();
        let mut last_use = HashMap::new();
        for (pos, &n) in order.iter().enumerate() {
            let node = graph.node(n);
            let operands = graph.operands(n);
            for v in &operands {
                last_use.insert(*v, pos);
            }
            match &node.op {
                Op::Map { expr } => {
                    let m = map::compile(expr, operands.len()).map_err(|e| CpuError::Compile(format!("`{}`: {e}", node.name)))?;
                    compiled.insert(n, Compiled::Map(m));
                }
                Op::Scan { neuron, emit, scope } => {
                    let model = &graph.neurons[neuron];
                    let s = scan::compile(model, emit, *scope).map_err(|e| CpuError::Compile(format!("`{}`: {e}", node.name)))?;
                    compiled.insert(n, Compiled::Scan(s));
                }
                Op::ScanAdjoint { neuron, emit, scope } => {
                    let model = &graph.neurons[neuron];
                    let s = scan::compile_adjoint(model, emit, *scope).map_err(|e| CpuError::Compile(format!("`{}`: {e}", node.name)))?;
                    compiled.insert(n, Compiled::ScanAdjoint(s));
                }
                Op::FixedMap { expr, frac, bits } => {
                    let m = fixed::compile_fixed_map(expr, operands.len(), fixed::Fx::new(*frac, *bits))
                        .map_err(|e| CpuError::Compile(format!("`{}`: {e}", node.name)))?;
                    compiled.insert(n, Compiled::FixedMap(m));
                }
                Op::FixedScan { neuron, emit, scope, frac, bits } => {
                    let model = &graph.neurons[neuron];
                    let s = fixed::compile_fixed_scan(model, emit, *scope, fixed::Fx::new(*frac, *bits))
                        .map_err(|e| CpuError::Compile(format!("`{}`: {e}", node.name)))?;
                    compiled.insert(n, Compiled::FixedScan(s));
                }
                _ => {}
            }
        }
        for (_, v) in &graph.outputs {
            last_use.insert(*v, usize::MAX);
        }
        Ok(CpuProgram { graph: graph.clone(), order, compiled, last_use })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Bind the free dims from the inputs' shapes, checking every input against its declaration.
    fn bind_inputs<'a>(&self, inputs: &'a BTreeMap<String, Tensor>) -> Result<(DimBindings, HashMap<NodeIndex, Cow<'a, Tensor>>), CpuError> {
        let env = self.graph.bind_input_dims(|name| inputs.get(name).map(|t| t.shape.as_slice())).map_err(CpuError::Input)?;
        let mut fed = HashMap::new();
        let mut missing = Vec::new();
        for (n, name, ty) in self.graph.inputs() {
            let Some(t) = inputs.get(name) else {
                missing.push(name.to_string());
                continue;
            };
            let value = match (ty.dtype, &t.data) {
                (DType::I64 | DType::I32, TensorData::I64(_)) | (DType::F32, TensorData::F32(_)) => Cow::Borrowed(t),
                (DType::F32, TensorData::I64(v)) => Cow::Owned(Tensor::f32(t.shape.clone(), v.iter().map(|&x| x as f32).collect())),
                (want, _) => return Err(CpuError::Input(format!("`{name}` is {}, expected {want}", t.dtype()))),
            };
            fed.insert(n, value);
        }
        if !missing.is_empty() {
            return Err(CpuError::Input(format!("missing inputs: {}", missing.join(", "))));
        }
        Ok((env, fed))
    }

    /// Run the graph. `inputs` must hold every graph input (extra entries are ignored);
    /// `params` every parameter, as f32 of the declared shape.
    pub fn run(&self, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, CpuError> {
        self.run_profiled(inputs, params, None)
    }

    /// [`run`](Self::run), adding each op kind's wall time to `profile` when given.
    pub fn run_profiled(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
        mut profile: Option<&mut Profile>,
    ) -> Result<BTreeMap<String, Tensor>, CpuError> {
        let (env, mut fed) = self.bind_inputs(inputs)?;
        let mut values: HashMap<Value, Cow<Tensor>> = HashMap::new();
        for (pos, &n) in self.order.iter().enumerate() {
            let node = self.graph.node(n);
            let shapes: Vec<Vec<usize>> = node
                .results
                .iter()
                .map(|t| t.shape.concrete(&env))
                .collect::<Result<_, _>>()
                .map_err(|sym| self.exec_err(n, format!("dimension {sym} is not bound by any input")))?;
            let results: Vec<Cow<Tensor>> = match &node.op {
                Op::Input { .. } => vec![fed.remove(&n).expect("every input was bound")],
                Op::Param { name } => {
                    let t = params.get(name).ok_or_else(|| CpuError::Param(format!("missing parameter `{name}`")))?;
                    if t.shape != shapes[0] || t.as_f32().is_none() {
                        return Err(CpuError::Param(format!(
                            "`{name}` is {} {:?}, expected f32 {:?}",
                            t.dtype(),
                            t.shape,
                            shapes[0]
                        )));
                    }
                    vec![Cow::Borrowed(t)]
                }
                _ => {
                    let operands: Vec<&Tensor> = self.graph.operands(n).iter().map(|v| values[v].as_ref()).collect();
                    let start = std::time::Instant::now();
                    let r = self.exec(n, &operands, &shapes)?;
                    if let Some(p) = profile.as_deref_mut() {
                        *p.by_op.entry(node.op.name()).or_default() += start.elapsed().as_secs_f64();
                    }
                    r.into_iter().map(Cow::Owned).collect()
                }
            };
            for (port, t) in results.into_iter().enumerate() {
                let v = Value { node: n, port: port as u32 };
                if self.last_use.contains_key(&v) {
                    values.insert(v, t);
                }
            }
            // Free what no later node reads.
            for v in self.graph.operands(n) {
                if self.last_use.get(&v) == Some(&pos) {
                    values.remove(&v);
                }
            }
        }
        Ok(self
            .graph
            .outputs
            .iter()
            .map(|(name, v)| (name.clone(), values[v].clone().into_owned()))
            .collect())
    }

    fn exec_err(&self, n: NodeIndex, msg: String) -> CpuError {
        let node = self.graph.node(n);
        CpuError::Exec { op: node.op.name().to_string(), node: node.name.clone(), msg }
    }

    fn exec(&self, n: NodeIndex, ins: &[&Tensor], shapes: &[Vec<usize>]) -> Result<Vec<Tensor>, CpuError> {
        let node = self.graph.node(n);
        let f = |i: usize| -> Result<&[f32], CpuError> {
            ins[i].as_f32().ok_or_else(|| self.exec_err(n, format!("operand {i} must be f32")))
        };
        let ints = |i: usize| -> Result<&[i64], CpuError> {
            ins[i].as_i64().ok_or_else(|| self.exec_err(n, format!("operand {i} must be an integer tensor")))
        };
        let out = |data: Vec<f32>| Tensor::f32(shapes[0].clone(), data);
        let last = |i: usize| *ins[i].shape.last().unwrap_or(&1);
        Ok(match &node.op {
            Op::Input { .. } | Op::Param { .. } => unreachable!("sources are bound in run"),
            Op::Embedding => {
                let d = ins[0].shape[1];
                vec![out(dense::embedding(f(0)?, d, ints(1)?).map_err(|m| self.exec_err(n, m))?)]
            }
            Op::RepeatFrames { .. } => {
                let s = &shapes[0];
                vec![out(dense::repeat_frames(f(0)?, s[0] * s[1], s[2], s[3]))]
            }
            Op::MeanFrames => {
                let s = &ins[0].shape;
                vec![out(dense::mean_frames(f(0)?, s[0] * s[1], s[2], s[3]))]
            }
            Op::Linear { bias } => {
                let (o, i) = (ins[1].shape[0], ins[1].shape[1]);
                let m = ins[0].numel() / i.max(1);
                let b = if *bias { Some(f(2)?) } else { None };
                vec![out(dense::linear(f(0)?, f(1)?, b, m, i, o))]
            }
            Op::RmsNorm { eps } | Op::LateralInhibition { eps } => vec![out(dense::rms_norm(f(0)?, f(1)?, *eps))],
            Op::Map { .. } => {
                let Some(Compiled::Map(m)) = self.compiled.get(&n) else { unreachable!("maps are compiled") };
                let operands: Vec<(&[f32], &[usize])> =
                    (0..ins.len()).map(|i| Ok((f(i)?, ins[i].shape.as_slice()))).collect::<Result<_, CpuError>>()?;
                vec![out(m.run(&operands, &shapes[0]))]
            }
            Op::Scan { neuron, .. } => {
                let Some(Compiled::Scan(sc)) = self.compiled.get(&n) else { unreachable!("scans are compiled") };
                let model = &self.graph.neurons[neuron];
                let (ni, np) = (model.inputs.len(), model.params.len());
                let s = &ins[0].shape;
                let dims = scan::ScanDims { b: s[0], s: s[1] * s[2], k: s[2], c: s[3] };
                let all: Vec<&[f32]> = (0..ins.len()).map(f).collect::<Result<_, _>>()?;
                let (outs, finals) = sc.run(&all[..ni], &all[ni..ni + np], &all[ni + np..], dims);
                outs.into_iter()
                    .chain(finals)
                    .zip(shapes)
                    .map(|(d, sh)| Tensor::f32(sh.clone(), d))
                    .collect()
            }
            Op::PonderWeights { clamp, eps } => {
                let k = ins[0].shape[2];
                let (lam, ek) = reduce::ponder_weights(f(0)?, k, *clamp, *eps);
                vec![out(lam), Tensor::f32(shapes[1].clone(), ek)]
            }
            Op::FrameWeightedSum => {
                let s = &ins[0].shape;
                vec![out(dense::frame_weighted_sum(f(0)?, f(1)?, s[2], s[3]))]
            }
            Op::CenterLast => vec![out(dense::center_last(f(0)?, last(0)))],
            Op::CrossEntropy { ignore_index } => {
                let ce = reduce::cross_entropy(f(0)?, ints(1)?, last(0), *ignore_index).map_err(|m| self.exec_err(n, m))?;
                vec![out(ce)]
            }
            Op::MaskedMean => vec![out(vec![reduce::masked_mean(f(0)?, f(1)?)])],
            Op::Mean => vec![out(vec![reduce::mean(f(0)?)])],
            Op::ZerosLike => vec![match &ins[0].data {
                TensorData::F32(_) => Tensor::zeros(shapes[0].clone()),
                TensorData::I64(v) => Tensor::i64(shapes[0].clone(), vec![0; v.len()]),
            }],
            Op::ReduceLike => vec![out(grad::reduce_like(f(0)?, &ins[0].shape, &shapes[0]))],
            Op::LinearGradInput => {
                let (o, i) = (ins[1].shape[0], ins[1].shape[1]);
                let m = ins[0].numel() / o.max(1);
                vec![out(grad::linear_grad_input(f(0)?, f(1)?, m, o, i))]
            }
            Op::LinearGradWeight => {
                let (o, i) = (last(0), last(1));
                let m = ins[0].numel() / o.max(1);
                vec![out(grad::linear_grad_weight(f(0)?, f(1)?, m, o, i))]
            }
            Op::EmbeddingGrad => {
                let (v, d) = (ins[2].shape[0], ins[2].shape[1]);
                vec![out(grad::embedding_grad(f(0)?, ints(1)?, v, d).map_err(|m| self.exec_err(n, m))?)]
            }
            Op::SumFrames => {
                let s = &ins[0].shape;
                vec![out(grad::sum_frames(f(0)?, s[2], s[3]))]
            }
            Op::RmsNormGrad { eps } => {
                let (dx, dw) = grad::rms_norm_grad(f(0)?, f(1)?, f(2)?, *eps);
                vec![out(dx), Tensor::f32(shapes[1].clone(), dw)]
            }
            Op::ScanAdjoint { neuron, emit, .. } => {
                let Some(Compiled::ScanAdjoint(sc)) = self.compiled.get(&n) else { unreachable!("scan adjoints are compiled") };
                let model = &self.graph.neurons[neuron];
                let (ni, np, ns) = (model.inputs.len(), model.params.len(), model.state.len());
                let s = &ins[0].shape;
                let dims = scan::ScanDims { b: s[0], s: s[1] * s[2], k: s[2], c: s[3] };
                let all: Vec<&[f32]> = (0..ins.len()).map(f).collect::<Result<_, _>>()?;
                let fwd = ni + np + ns;
                let g = sc.run(&all[..ni], &all[ni..ni + np], &all[ni + np..fwd], &all[fwd..fwd + emit.len()], &all[fwd + emit.len()..], dims);
                g.inputs.into_iter().chain(g.params).chain(g.init).zip(shapes).map(|(d, sh)| Tensor::f32(sh.clone(), d)).collect()
            }
            Op::PonderWeightsGrad { clamp, eps } => {
                let k = ins[2].shape[2];
                vec![out(grad::ponder_weights_grad(f(0)?, f(1)?, f(2)?, k, *clamp, *eps))]
            }
            Op::FrameWeightedSumGrad => {
                let s = &ins[1].shape;
                let (df, dw) = grad::frame_weighted_sum_grad(f(0)?, f(1)?, f(2)?, s[2], s[3]);
                vec![out(df), Tensor::f32(shapes[1].clone(), dw)]
            }
            Op::CrossEntropyGrad { ignore_index } => {
                let d = grad::cross_entropy_grad(f(0)?, f(1)?, ints(2)?, last(1), *ignore_index).map_err(|m| self.exec_err(n, m))?;
                vec![out(d)]
            }
            Op::MaskedMeanGrad => vec![out(grad::masked_mean_grad(f(0)?[0], f(1)?))],
            Op::MeanGrad => {
                let numel = ins[1].numel().max(1);
                vec![out(vec![f(0)?[0] / numel as f32; numel])]
            }
            Op::Quantize { frac, bits } => vec![Tensor::i64(shapes[0].clone(), fixed::quantize(f(0)?, fixed::Fx::new(*frac, *bits)))],
            Op::GradedSpike { bits, shift } => vec![Tensor::i64(shapes[0].clone(), fixed::graded_spike(ints(0)?, f(1)?, *shift, *bits))],
            Op::SynapseLinear { bias, shift, bits } => {
                let (o, i) = (ins[1].shape[0], ins[1].shape[1]);
                let m = ins[0].numel() / i.max(1);
                let b = if *bias { Some(f(3)?) } else { None };
                vec![Tensor::i64(shapes[0].clone(), fixed::synapse_linear(ints(0)?, f(1)?, f(2)?, b, m, i, o, *shift, *bits))]
            }
            Op::FixedMap { .. } => {
                let Some(Compiled::FixedMap(m)) = self.compiled.get(&n) else { unreachable!("fixed maps are compiled") };
                let operands: Vec<(fixed::IntOperand, &[usize])> = ins.iter().map(|t| (int_operand(t), t.shape.as_slice())).collect();
                vec![Tensor::i64(shapes[0].clone(), m.run(&operands, &shapes[0]))]
            }
            Op::FixedScan { neuron, .. } => {
                let Some(Compiled::FixedScan(sc)) = self.compiled.get(&n) else { unreachable!("fixed scans are compiled") };
                let model = &self.graph.neurons[neuron];
                let (ni, np) = (model.inputs.len(), model.params.len());
                let s = &ins[0].shape;
                let inputs: Vec<&[i64]> = (0..ni).map(ints).collect::<Result<_, _>>()?;
                let params: Vec<fixed::IntOperand> = ins[ni..ni + np].iter().map(|t| int_operand(t)).collect();
                let init: Vec<&[i64]> = (ni + np..ins.len()).map(ints).collect::<Result<_, _>>()?;
                let (outs, finals) = sc.run(&inputs, &params, &init, s[0], s[1] * s[2], s[2], s[3]);
                outs.into_iter().chain(finals).zip(shapes).map(|(d, sh)| Tensor::i64(sh.clone(), d)).collect()
            }
            Op::Cast { to } => {
                let t = match (*to, &ins[0].data) {
                    (DType::F32 | DType::F64 | DType::BF16, d) => Tensor::f32(shapes[0].clone(), match d {
                        TensorData::F32(v) => v.clone(),
                        TensorData::I64(v) => v.iter().map(|&x| x as f32).collect(),
                    }),
                    (DType::I64 | DType::I32, d) => Tensor::i64(shapes[0].clone(), match d {
                        TensorData::F32(v) => v.iter().map(|&x| x as i64).collect(),
                        TensorData::I64(v) => v.clone(),
                    }),
                    (DType::Spike, _) => return Err(self.exec_err(n, "cannot cast to spike".into())),
                };
                vec![t]
            }
        })
    }
}

/// An operand of an integer kernel: i64 values, or integer-valued f32 constants.
fn int_operand(t: &Tensor) -> fixed::IntOperand<'_> {
    match &t.data {
        TensorData::I64(v) => fixed::IntOperand::I64(v),
        TensorData::F32(v) => fixed::IntOperand::F32(v),
    }
}
