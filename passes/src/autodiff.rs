//! Reverse-mode automatic differentiation: forward graph → forward + backward graph in the same IR.
//!
//! Every forward op has a rule that emits gradient ops (see the gradient ops of [`Op`]). Scans
//! get a `scan_adjoint`: a reverse scan whose step is derived from the neuron model
//! (`sparkc_ir::adjoint`), so a new neuron model needs no new backward code.

use sparkc_ir::types::resolve_dim;
use sparkc_ir::{parse_expr, BinOp, Expr, Graph, IrError, Op, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, thiserror::Error)]
pub enum AutodiffError {
    #[error("the graph has no output `{0}` to differentiate")]
    NoSuchOutput(String),
    #[error("the loss `{name}` must be a scalar, got {ty}")]
    NotScalar { name: String, ty: String },
    #[error("no input named `{0}`")]
    NoSuchInput(String),
    #[error("cannot differentiate `{op}` node `{node}`: {msg}")]
    Unsupported { op: String, node: String, msg: String },
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// Prefix of the gradient outputs: `grad.<param or input name>`.
pub const GRAD_PREFIX: &str = "grad.";

struct Ad {
    g: Graph,
    adj: HashMap<Value, Value>,
}

impl Ad {
    fn add(&mut self, op: Op, operands: &[Value], name: &str) -> Result<Vec<Value>, IrError> {
        self.g.add(op, operands, name)
    }

    fn add1(&mut self, op: Op, operands: &[Value], name: &str) -> Result<Value, IrError> {
        self.g.add1(op, operands, name)
    }

    fn map(&mut self, expr: Expr, operands: &[Value], name: &str) -> Result<Value, IrError> {
        self.add1(Op::Map { expr }, operands, name)
    }

    /// Add `contribution` to the adjoint of `v`.
    fn accumulate(&mut self, v: Value, contribution: Value, name: &str) -> Result<(), IrError> {
        let total = match self.adj.get(&v) {
            Some(&old) => self.map(parse_expr("x0 + x1").expect("valid"), &[old, contribution], &format!("{name}.accumulate"))?,
            None => contribution,
        };
        self.adj.insert(v, total);
        Ok(())
    }

    /// The adjoint of `v`, or zeros of its type.
    fn adjoint_or_zeros(&mut self, v: Value, name: &str) -> Result<Value, IrError> {
        match self.adj.get(&v) {
            Some(&a) => Ok(a),
            None => self.add1(Op::ZerosLike, &[v], &format!("{name}.zeros")),
        }
    }
}

/// Values that depend on a parameter or on one of the `inputs`.
fn requires_grad(g: &Graph, order: &[sparkc_ir::NodeIndex], inputs: &BTreeSet<String>) -> BTreeSet<sparkc_ir::NodeIndex> {
    let mut req = BTreeSet::new();
    for &n in order {
        let node = g.node(n);
        let yes = match &node.op {
            Op::Param { .. } => node.results[0].dtype.is_float(),
            Op::Input { name } => inputs.contains(name),
            _ => g.operands(n).iter().any(|v| req.contains(&v.node)),
        };
        if yes {
            req.insert(n);
        }
    }
    req
}

/// Differentiate the scalar output `loss` w.r.t. every float parameter and the given inputs.
/// The result keeps every forward output and adds `grad.<name>` outputs.
pub fn differentiate(fwd: &Graph, loss: &str, inputs: &[&str]) -> Result<Graph, AutodiffError> {
    let loss_v = fwd.output(loss).ok_or_else(|| AutodiffError::NoSuchOutput(loss.to_string()))?;
    let ty = fwd.value_type(loss_v);
    if ty.shape.rank() != 0 {
        return Err(AutodiffError::NotScalar { name: loss.to_string(), ty: ty.to_string() });
    }
    let wanted: BTreeSet<String> = inputs.iter().map(|s| s.to_string()).collect();
    for i in &wanted {
        if !fwd.inputs().iter().any(|(_, n, _)| n == i) {
            return Err(AutodiffError::NoSuchInput(i.clone()));
        }
    }
    let order = fwd.topo_order()?;
    let req = requires_grad(fwd, &order, &wanted);
    let mut ad = Ad { g: fwd.clone(), adj: HashMap::new() };
    let seed = ad.map(Expr::c(1.0), &[loss_v], &format!("{loss}.seed"))?;
    ad.adj.insert(loss_v, seed);

    for &n in order.iter().rev() {
        let node = fwd.node(n).clone();
        if !req.contains(&n) || node.op.is_source() {
            continue;
        }
        let results: Vec<Value> = (0..node.results.len() as u32).map(|port| Value { node: n, port }).collect();
        if !results.iter().any(|v| ad.adj.contains_key(v)) {
            continue;
        }
        let ops = fwd.operands(n);
        let needs = |i: usize| req.contains(&ops[i].node) && fwd.value_type(ops[i]).dtype.is_float();
        let name = format!("{}.grad", node.name);
        let dy = ad.adjoint_or_zeros(results[0], &name)?;
        let unsupported = |msg: &str| AutodiffError::Unsupported { op: node.op.name().into(), node: node.name.clone(), msg: msg.into() };
        match &node.op {
            Op::Embedding => {
                if needs(0) {
                    let d = ad.add1(Op::EmbeddingGrad, &[dy, ops[1], ops[0]], &name)?;
                    ad.accumulate(ops[0], d, &name)?;
                }
            }
            Op::RepeatFrames { .. } => {
                let d = ad.add1(Op::SumFrames, &[dy], &name)?;
                ad.accumulate(ops[0], d, &name)?;
            }
            Op::MeanFrames => {
                let xt = fwd.value_type(ops[0]);
                let k_dim = xt.shape.dims()[2].clone();
                let Some(k) = resolve_dim(&k_dim, &fwd.dims).as_const() else {
                    return Err(unsupported(&format!("frames dimension {k_dim} is not fixed by the graph")));
                };
                let rep = ad.add1(Op::RepeatFrames { frames: k_dim }, &[dy], &name)?;
                let d = ad.map(Expr::bin(BinOp::Div, Expr::var("x0"), Expr::c(k as f64)), &[rep], &format!("{name}.scale"))?;
                ad.accumulate(ops[0], d, &name)?;
            }
            Op::Linear { bias } => {
                if needs(0) {
                    let d = ad.add1(Op::LinearGradInput, &[dy, ops[1]], &format!("{name}.input"))?;
                    ad.accumulate(ops[0], d, &name)?;
                }
                if needs(1) {
                    let d = ad.add1(Op::LinearGradWeight, &[dy, ops[0]], &format!("{name}.weight"))?;
                    ad.accumulate(ops[1], d, &name)?;
                }
                if *bias && needs(2) {
                    let d = ad.add1(Op::ReduceLike, &[dy, ops[2]], &format!("{name}.bias"))?;
                    ad.accumulate(ops[2], d, &name)?;
                }
            }
            Op::RmsNorm { eps } | Op::LateralInhibition { eps } => {
                let d = ad.add(Op::RmsNormGrad { eps: *eps }, &[dy, ops[0], ops[1]], &name)?;
                if needs(0) {
                    ad.accumulate(ops[0], d[0], &name)?;
                }
                if needs(1) {
                    ad.accumulate(ops[1], d[1], &name)?;
                }
            }
            Op::Map { expr } => {
                let dy_var = format!("x{}", ops.len());
                let mut operands = ops.clone();
                operands.push(dy);
                for i in 0..ops.len() {
                    if !needs(i) {
                        continue;
                    }
                    let local = expr.diff(&format!("x{i}"));
                    if local == Expr::c(0.0) {
                        continue;
                    }
                    let e = Expr::bin(BinOp::Mul, Expr::var(&dy_var), local).simplify();
                    // A gradient that is the incoming one unchanged (either side of a sum) is
                    // that value, not a copy of it.
                    let mut d = if e == Expr::var(&dy_var) { dy } else { ad.map(e, &operands, &format!("{name}.x{i}"))? };
                    let (xt, outt) = (fwd.value_type(ops[i]), fwd.value_type(results[0]));
                    if xt.shape.resolve(&fwd.dims) != outt.shape.resolve(&fwd.dims) {
                        d = ad.add1(Op::ReduceLike, &[d, ops[i]], &format!("{name}.x{i}.reduce"))?;
                    }
                    ad.accumulate(ops[i], d, &name)?;
                }
            }
            Op::Scan { neuron, emit, scope } => {
                let mut operands = ops.clone();
                for (i, &r) in results.iter().enumerate() {
                    operands.push(if i == 0 { dy } else { ad.adjoint_or_zeros(r, &format!("{name}.r{i}"))? });
                }
                let op = Op::ScanAdjoint { neuron: neuron.clone(), emit: emit.clone(), scope: *scope };
                let grads = ad.add(op, &operands, &name)?;
                for (i, &gv) in grads.iter().enumerate() {
                    if needs(i) {
                        ad.accumulate(ops[i], gv, &name)?;
                    }
                }
            }
            Op::PonderWeights { clamp, eps } => {
                let dek = ad.adjoint_or_zeros(results[1], &format!("{name}.expected"))?;
                let d = ad.add1(Op::PonderWeightsGrad { clamp: *clamp, eps: *eps }, &[dy, dek, ops[0]], &name)?;
                ad.accumulate(ops[0], d, &name)?;
            }
            Op::FrameWeightedSum => {
                let d = ad.add(Op::FrameWeightedSumGrad, &[dy, ops[0], ops[1]], &name)?;
                for i in 0..2 {
                    if needs(i) {
                        ad.accumulate(ops[i], d[i], &name)?;
                    }
                }
            }
            Op::CenterLast => {
                let d = ad.add1(Op::CenterLast, &[dy], &name)?;
                ad.accumulate(ops[0], d, &name)?;
            }
            Op::CrossEntropy { ignore_index } => {
                let d = ad.add1(Op::CrossEntropyGrad { ignore_index: *ignore_index }, &[dy, ops[0], ops[1]], &name)?;
                ad.accumulate(ops[0], d, &name)?;
            }
            Op::MaskedMean => {
                if needs(1) {
                    return Err(unsupported("the mask cannot take a gradient"));
                }
                let d = ad.add1(Op::MaskedMeanGrad, &[dy, ops[1]], &name)?;
                ad.accumulate(ops[0], d, &name)?;
            }
            Op::Mean => {
                let d = ad.add1(Op::MeanGrad, &[dy, ops[0]], &name)?;
                ad.accumulate(ops[0], d, &name)?;
            }
            Op::Cast { to } => {
                if to.is_float() && needs(0) {
                    ad.accumulate(ops[0], dy, &name)?;
                }
            }
            Op::Input { .. } | Op::Param { .. } => {}
            Op::ZerosLike => {}
            Op::ReduceLike
            | Op::LinearGradInput
            | Op::LinearGradWeight
            | Op::EmbeddingGrad
            | Op::SumFrames
            | Op::RmsNormGrad { .. }
            | Op::ScanAdjoint { .. }
            | Op::PonderWeightsGrad { .. }
            | Op::FrameWeightedSumGrad
            | Op::CrossEntropyGrad { .. }
            | Op::MaskedMeanGrad
            | Op::MeanGrad => return Err(unsupported("gradient ops are not differentiated again (no second order)")),
            Op::Quantize { .. } | Op::GradedSpike { .. } | Op::SynapseLinear { .. } | Op::FixedMap { .. } | Op::FixedScan { .. } => {
                return Err(unsupported("fixed-point ops are not differentiable (quantize after training)"))
            }
        }
    }

    let mut grads: BTreeMap<String, Value> = BTreeMap::new();
    for (n, name, ty) in fwd.params() {
        if ty.dtype.is_float() {
            grads.insert(name.to_string(), Value { node: n, port: 0 });
        }
    }
    for (n, name, _) in fwd.inputs() {
        if wanted.contains(name) {
            grads.insert(name.to_string(), Value { node: n, port: 0 });
        }
    }
    for (name, v) in grads {
        let d = ad.adjoint_or_zeros(v, &format!("{GRAD_PREFIX}{name}"))?;
        ad.g.set_output(&format!("{GRAD_PREFIX}{name}"), d);
    }
    sparkc_ir::verify::verify(&ad.g)?;
    Ok(ad.g)
}
