//! Operations and their typing rules.

use crate::expr::Expr;
use crate::neuron::NeuronModel;
use crate::types::{resolve_dim, DType, Dim, DimBindings, Shape, ValueType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Whether a scan's state runs on across token boundaries or restarts at every token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StateScope {
    /// The state carries across the T tokens of the call and out of it (final-state outputs).
    Sequence,
    /// The state restarts from the model's initial values at every token's first frame.
    Token,
}

impl StateScope {
    pub fn name(self) -> &'static str {
        match self {
            StateScope::Sequence => "sequence",
            StateScope::Token => "token",
        }
    }
}

/// One operation. Operand conventions are documented per variant; `[B,T,K,C]` means
/// batch, tokens, frames per token, channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input fed at run time (token ids, targets, masks, carried neuron state).
    Input { name: String },
    /// A trained parameter, looked up by its checkpoint key.
    Param { name: String },
    /// (table [V,D], ids [B,T] int) → [B,T,D]: row lookup.
    Embedding,
    /// [B,T,D] → [B,T,K,D]: every token's vector repeated over its K frames.
    RepeatFrames { frames: Dim },
    /// [B,T,K,D] → [B,T,D]: uniform mean over the K frames.
    MeanFrames,
    /// (x [...,I], w [O,I], b [O] if `bias`) → [...,O]: x·wᵀ + b.
    Linear { bias: bool },
    /// (x [...,D], w [D]) → x / sqrt(mean_D x² + eps) · w.
    RmsNorm { eps: f64 },
    /// (q [...,D], gain [D]) → divisive normalisation q / sqrt(mean_D q² + eps) · gain.
    LateralInhibition { eps: f64 },
    /// Element-wise `expr` over operands `x0, x1, ...`, broadcast NumPy-style (trailing dims).
    Map { expr: Expr },
    /// A neuron scan: operands are the model's per-step inputs [B,T,K,C], then its per-channel
    /// params [C], then the initial value of each state variable [B,C]. Results are the
    /// `emit`ted outputs [B,T,K,C], then each state variable's final value [B,C].
    /// Time runs over all T·K frames in order s = t·K + k.
    Scan { neuron: String, emit: Vec<String>, scope: StateScope },
    /// PonderNet halting: logits [B,T,K,1] → (λ̂ [B,T,K,1], E[K] [B,T,1]). p = clamp(σ(ℓ),
    /// clamp, 1−clamp); λ_k = p_k·Π_{j<k}(1−p_j); λ̂ = λ/(Σλ + eps); E[K] = Σ k·λ̂_k (k from 1).
    PonderWeights { clamp: f64, eps: f64 },
    /// (frames [B,T,K,D], weights [B,T,K,1]) → [B,T,D]: Σ_k w_k·frame_k.
    FrameWeightedSum,
    /// [...,D] → x − mean_D(x): the residual centering.
    CenterLast,
    /// (logits [...,V], targets [...] int) → per-position cross-entropy [...], 0 where the
    /// target is `ignore_index`.
    CrossEntropy { ignore_index: i64 },
    /// (x [...], mask [...]) → [] : Σ x·mask / Σ mask.
    MaskedMean,
    /// x [...] → [] : mean of all elements.
    Mean,
    /// Element type conversion.
    Cast { to: DType },

    // ---- gradient ops: what the autodiff pass emits (each documented by its forward op) ----
    /// Zeros of the operand's type (an upstream gradient that nothing produces).
    ZerosLike,
    /// (x, like) → x summed over the dims that broadcasting added or expanded to reach x's
    /// shape from like's shape: the adjoint of a broadcast.
    ReduceLike,
    /// (dy [...,O], w [O,I]) → dx [...,I] = dy·w: `Linear`'s input gradient.
    LinearGradInput,
    /// (dy [...,O], x [...,I]) → dw [O,I] = Σ_rows dyᵀ·x: `Linear`'s weight gradient.
    LinearGradWeight,
    /// (dy [B,T,D], ids [B,T], table [V,D]) → dtable [V,D]: scatter-add of rows.
    EmbeddingGrad,
    /// [B,T,K,D] → [B,T,D]: sum over frames (the adjoint of `RepeatFrames`).
    SumFrames,
    /// (dy, x, w) → (dx, dw [D]): the gradient of `RmsNorm` / `LateralInhibition`.
    RmsNormGrad { eps: f64 },
    /// The reverse scan: operands are the forward scan's operands, then the upstream gradient
    /// of every emitted output [B,T,K,C], then of every final state [B,C]. Results are the
    /// gradients of the per-step inputs, of the params (summed over batch and time) and of the
    /// initial states. The step's adjoint is derived from the neuron model (surrogate for the
    /// fire step; the reset's spike is constant when the model detaches it).
    ScanAdjoint { neuron: String, emit: Vec<String>, scope: StateScope },
    /// (dλ̂ [B,T,K,1], dE [B,T,1], logits [B,T,K,1]) → dlogits: `PonderWeights`' gradient.
    PonderWeightsGrad { clamp: f64, eps: f64 },
    /// (dy [B,T,D], frames [B,T,K,D], weights [B,T,K,1]) → (dframes, dweights).
    FrameWeightedSumGrad,
    /// (dce [...], logits [...,V], targets [...]) → dlogits: (softmax − onehot)·dce, 0 where ignored.
    CrossEntropyGrad { ignore_index: i64 },
    /// (dy [], mask [...]) → dy·mask / Σ mask.
    MaskedMeanGrad,
    /// (dy [], like) → dy / numel(like), shaped like `like`.
    MeanGrad,

    // ---- fixed-point ops: what the quantize pass emits (integer mode; see backends/neuro) ----
    // Integers travel as i64 tensors holding fixed-point values with `frac` fractional bits,
    // saturated to `bits` (signed). Integer constants (weights, multipliers, quantized
    // parameters) are f32 params holding integers of at most 24 bits, which f32 stores exactly.
    /// f32 → i64: round(x·2^frac) (half away from zero), saturated to `bits`.
    Quantize { frac: u32, bits: u32 },
    /// (x i64 [...,C], mult [C]) → graded-spike payloads i64 [...,C]: round_shift(x·mult, shift)
    /// saturated to `bits` (a one-bit payload is unsigned: 0 or 1). A zero payload is no event.
    GradedSpike { bits: u32, shift: u32 },
    /// (payloads i64 [...,I], w [O,I], mult [O], bias [O] if `bias`) → i64 [...,O]:
    /// round_shift((Σ_i w·p)·mult, shift) + bias, saturated to `bits`: a synapse layer and the
    /// dendrite that scales its sum into the neuron's fixed-point format.
    SynapseLinear { bias: bool, shift: u32, bits: u32 },
    /// `Map` in fixed point: every expression node is evaluated on `frac`-bit fixed-point values
    /// and saturated to `bits`; transcendental functions use the shared lookup tables.
    FixedMap { expr: Expr, frac: u32, bits: u32 },
    /// `Scan` in fixed point (operands and results are i64 fixed-point values).
    FixedScan { neuron: String, emit: Vec<String>, scope: StateScope, frac: u32, bits: u32 },
}

/// An attribute value in the text form.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f64),
    Str(String),
    Ident(String),
    List(Vec<Attr>),
    Expr(Expr),
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Embedding => "embedding",
            Op::RepeatFrames { .. } => "repeat_frames",
            Op::MeanFrames => "mean_frames",
            Op::Linear { .. } => "linear",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LateralInhibition { .. } => "lateral_inhibition",
            Op::Map { .. } => "map",
            Op::Scan { .. } => "scan",
            Op::PonderWeights { .. } => "ponder_weights",
            Op::FrameWeightedSum => "frame_weighted_sum",
            Op::CenterLast => "center_last",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::MaskedMean => "masked_mean",
            Op::Mean => "mean",
            Op::Cast { .. } => "cast",
            Op::ZerosLike => "zeros_like",
            Op::ReduceLike => "reduce_like",
            Op::LinearGradInput => "linear_grad_input",
            Op::LinearGradWeight => "linear_grad_weight",
            Op::EmbeddingGrad => "embedding_grad",
            Op::SumFrames => "sum_frames",
            Op::RmsNormGrad { .. } => "rms_norm_grad",
            Op::ScanAdjoint { .. } => "scan_adjoint",
            Op::PonderWeightsGrad { .. } => "ponder_weights_grad",
            Op::FrameWeightedSumGrad => "frame_weighted_sum_grad",
            Op::CrossEntropyGrad { .. } => "cross_entropy_grad",
            Op::MaskedMeanGrad => "masked_mean_grad",
            Op::MeanGrad => "mean_grad",
            Op::Quantize { .. } => "quantize",
            Op::GradedSpike { .. } => "graded_spike",
            Op::SynapseLinear { .. } => "synapse_linear",
            Op::FixedMap { .. } => "fixed_map",
            Op::FixedScan { .. } => "fixed_scan",
        }
    }

    /// The attributes as printed in the text form, in a fixed order.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        match self {
            Op::Input { name } | Op::Param { name } => vec![("name", Attr::Str(name.clone()))],
            Op::RepeatFrames { frames } => vec![(
                "frames",
                match frames {
                    Dim::Const(n) => Attr::Int(*n as i64),
                    Dim::Sym(s) => Attr::Ident(s.clone()),
                },
            )],
            Op::Linear { bias } => vec![("bias", Attr::Ident(bias.to_string()))],
            Op::RmsNorm { eps } | Op::LateralInhibition { eps } | Op::RmsNormGrad { eps } => vec![("eps", Attr::Float(*eps))],
            Op::Map { expr } => vec![("f", Attr::Expr(expr.clone()))],
            Op::Scan { neuron, emit, scope } | Op::ScanAdjoint { neuron, emit, scope } => vec![
                ("neuron", Attr::Ident(neuron.clone())),
                ("emit", Attr::List(emit.iter().map(|e| Attr::Ident(e.clone())).collect())),
                ("scope", Attr::Ident(scope.name().into())),
            ],
            Op::PonderWeights { clamp, eps } | Op::PonderWeightsGrad { clamp, eps } => {
                vec![("clamp", Attr::Float(*clamp)), ("eps", Attr::Float(*eps))]
            }
            Op::CrossEntropy { ignore_index } | Op::CrossEntropyGrad { ignore_index } => {
                vec![("ignore_index", Attr::Int(*ignore_index))]
            }
            Op::Cast { to } => vec![("to", Attr::Ident(to.name().into()))],
            Op::Embedding
            | Op::MeanFrames
            | Op::FrameWeightedSum
            | Op::CenterLast
            | Op::MaskedMean
            | Op::Mean
            | Op::ZerosLike
            | Op::ReduceLike
            | Op::LinearGradInput
            | Op::LinearGradWeight
            | Op::EmbeddingGrad
            | Op::SumFrames
            | Op::FrameWeightedSumGrad
            | Op::MaskedMeanGrad
            | Op::MeanGrad => vec![],
            Op::Quantize { frac, bits } => vec![("frac", Attr::Int(*frac as i64)), ("bits", Attr::Int(*bits as i64))],
            Op::GradedSpike { bits, shift } => vec![("bits", Attr::Int(*bits as i64)), ("shift", Attr::Int(*shift as i64))],
            Op::SynapseLinear { bias, shift, bits } => vec![
                ("bias", Attr::Ident(bias.to_string())),
                ("shift", Attr::Int(*shift as i64)),
                ("bits", Attr::Int(*bits as i64)),
            ],
            Op::FixedMap { expr, frac, bits } => {
                vec![("f", Attr::Expr(expr.clone())), ("frac", Attr::Int(*frac as i64)), ("bits", Attr::Int(*bits as i64))]
            }
            Op::FixedScan { neuron, emit, scope, frac, bits } => vec![
                ("neuron", Attr::Ident(neuron.clone())),
                ("emit", Attr::List(emit.iter().map(|e| Attr::Ident(e.clone())).collect())),
                ("scope", Attr::Ident(scope.name().into())),
                ("frac", Attr::Int(*frac as i64)),
                ("bits", Attr::Int(*bits as i64)),
            ],
        }
    }

    /// Rebuild an op from its name and attributes (the inverse of [`Op::name`] + [`Op::attrs`]).
    pub fn from_parts(name: &str, attrs: &BTreeMap<String, Attr>) -> Result<Op, String> {
        let get = |k: &str| attrs.get(k).ok_or_else(|| format!("`{name}` needs attribute `{k}`"));
        let string = |k: &str| match get(k)? {
            Attr::Str(s) => Ok(s.clone()),
            other => Err(format!("attribute `{k}` of `{name}` must be a string, got {other:?}")),
        };
        let ident = |k: &str| match get(k)? {
            Attr::Ident(s) => Ok(s.clone()),
            other => Err(format!("attribute `{k}` of `{name}` must be a name, got {other:?}")),
        };
        let float = |k: &str| match get(k)? {
            Attr::Float(f) => Ok(*f),
            Attr::Int(i) => Ok(*i as f64),
            Attr::Ident(s) if s == "inf" => Ok(f64::INFINITY),
            Attr::Ident(s) if s == "nan" => Ok(f64::NAN),
            other => Err(format!("attribute `{k}` of `{name}` must be a number, got {other:?}")),
        };
        let op = match name {
            "input" => Op::Input { name: string("name")? },
            "param" => Op::Param { name: string("name")? },
            "embedding" => Op::Embedding,
            "repeat_frames" => Op::RepeatFrames {
                frames: match get("frames")? {
                    Attr::Int(n) if *n > 0 => Dim::Const(*n as u64),
                    Attr::Ident(s) => Dim::Sym(s.clone()),
                    other => return Err(format!("`frames` must be a positive size or a name, got {other:?}")),
                },
            },
            "mean_frames" => Op::MeanFrames,
            "linear" => Op::Linear {
                bias: match ident("bias")?.as_str() {
                    "true" => true,
                    "false" => false,
                    other => return Err(format!("`bias` must be true or false, got `{other}`")),
                },
            },
            "rms_norm" => Op::RmsNorm { eps: float("eps")? },
            "rms_norm_grad" => Op::RmsNormGrad { eps: float("eps")? },
            "lateral_inhibition" => Op::LateralInhibition { eps: float("eps")? },
            "map" => Op::Map {
                expr: match get("f")? {
                    Attr::Expr(e) => e.clone(),
                    other => return Err(format!("`f` of `map` must be an expression, got {other:?}")),
                },
            },
            "scan" | "scan_adjoint" => {
                let (neuron, emit, scope) = scan_attrs(name, attrs)?;
                if name == "scan" {
                    Op::Scan { neuron, emit, scope }
                } else {
                    Op::ScanAdjoint { neuron, emit, scope }
                }
            }
            "ponder_weights" => Op::PonderWeights { clamp: float("clamp")?, eps: float("eps")? },
            "ponder_weights_grad" => Op::PonderWeightsGrad { clamp: float("clamp")?, eps: float("eps")? },
            "frame_weighted_sum" => Op::FrameWeightedSum,
            "center_last" => Op::CenterLast,
            "cross_entropy" | "cross_entropy_grad" => {
                let ignore_index = match get("ignore_index")? {
                    Attr::Int(i) => *i,
                    other => return Err(format!("`ignore_index` must be an integer, got {other:?}")),
                };
                if name == "cross_entropy" {
                    Op::CrossEntropy { ignore_index }
                } else {
                    Op::CrossEntropyGrad { ignore_index }
                }
            }
            "masked_mean" => Op::MaskedMean,
            "mean" => Op::Mean,
            "zeros_like" => Op::ZerosLike,
            "reduce_like" => Op::ReduceLike,
            "linear_grad_input" => Op::LinearGradInput,
            "linear_grad_weight" => Op::LinearGradWeight,
            "embedding_grad" => Op::EmbeddingGrad,
            "sum_frames" => Op::SumFrames,
            "frame_weighted_sum_grad" => Op::FrameWeightedSumGrad,
            "masked_mean_grad" => Op::MaskedMeanGrad,
            "mean_grad" => Op::MeanGrad,
            "quantize" => Op::Quantize { frac: small_int(name, attrs, "frac")?, bits: small_int(name, attrs, "bits")? },
            "graded_spike" => Op::GradedSpike { bits: small_int(name, attrs, "bits")?, shift: small_int(name, attrs, "shift")? },
            "synapse_linear" => Op::SynapseLinear {
                bias: match ident("bias")?.as_str() {
                    "true" => true,
                    "false" => false,
                    other => return Err(format!("`bias` must be true or false, got `{other}`")),
                },
                shift: small_int(name, attrs, "shift")?,
                bits: small_int(name, attrs, "bits")?,
            },
            "fixed_map" => Op::FixedMap {
                expr: match get("f")? {
                    Attr::Expr(e) => e.clone(),
                    other => return Err(format!("`f` of `fixed_map` must be an expression, got {other:?}")),
                },
                frac: small_int(name, attrs, "frac")?,
                bits: small_int(name, attrs, "bits")?,
            },
            "fixed_scan" => {
                let (neuron, emit, scope) = scan_attrs(name, attrs)?;
                Op::FixedScan { neuron, emit, scope, frac: small_int(name, attrs, "frac")?, bits: small_int(name, attrs, "bits")? }
            }
            "cast" => {
                let t = ident("to")?;
                Op::Cast { to: DType::from_name(&t).ok_or_else(|| format!("unknown dtype `{t}`"))? }
            }
            other => return Err(format!("unknown op `{other}`")),
        };
        let known: Vec<&str> = op.attrs().iter().map(|(k, _)| *k).collect();
        if let Some(extra) = attrs.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("`{name}` has no attribute `{extra}`"));
        }
        Ok(op)
    }

    /// Whether the op's result types are declared rather than inferred (graph sources).
    pub fn is_source(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. })
    }
}

/// An integer attribute of the fixed-point ops (bit counts and shifts: 0..=64).
fn small_int(name: &str, attrs: &BTreeMap<String, Attr>, k: &str) -> Result<u32, String> {
    match attrs.get(k) {
        Some(Attr::Int(i)) if (0..=64).contains(i) => Ok(*i as u32),
        Some(other) => Err(format!("attribute `{k}` of `{name}` must be an integer in 0..=64, got {other:?}")),
        None => Err(format!("`{name}` needs attribute `{k}`")),
    }
}

/// The `neuron`, `emit` and `scope` attributes shared by `scan` and `scan_adjoint`.
fn scan_attrs(name: &str, attrs: &BTreeMap<String, Attr>) -> Result<(String, Vec<String>, StateScope), String> {
    let get = |k: &str| attrs.get(k).ok_or_else(|| format!("`{name}` needs attribute `{k}`"));
    let ident = |k: &str| match get(k)? {
        Attr::Ident(s) => Ok(s.clone()),
        other => Err(format!("attribute `{k}` of `{name}` must be a name, got {other:?}")),
    };
    let emit = match get("emit")? {
        Attr::List(items) => items
            .iter()
            .map(|a| match a {
                Attr::Ident(s) => Ok(s.clone()),
                other => Err(format!("`emit` of `{name}` lists output names, got {other:?}")),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("`emit` of `{name}` must be a list, got {other:?}")),
    };
    let scope = match ident("scope")?.as_str() {
        "sequence" => StateScope::Sequence,
        "token" => StateScope::Token,
        other => return Err(format!("`scope` must be sequence or token, got `{other}`")),
    };
    Ok((ident("neuron")?, emit, scope))
}

/// Where the neuron models of a graph are looked up while typing.
pub type NeuronTable = BTreeMap<String, NeuronModel>;

struct Ctx<'a> {
    op: &'a Op,
    dims: &'a DimBindings,
}

impl Ctx<'_> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, String> {
        Err(msg.into())
    }

    fn same(&self, a: &Dim, b: &Dim) -> bool {
        resolve_dim(a, self.dims) == resolve_dim(b, self.dims)
    }

    fn same_shape(&self, a: &Shape, b: &Shape) -> bool {
        a.rank() == b.rank() && a.dims().iter().zip(b.dims()).all(|(x, y)| self.same(x, y))
    }

    fn rank(&self, t: &ValueType, r: usize, what: &str) -> Result<(), String> {
        if t.shape.rank() != r {
            return self.err(format!("{what} must have rank {r}, got {t}"));
        }
        Ok(())
    }

    fn float(&self, t: &ValueType, what: &str) -> Result<(), String> {
        if !t.dtype.is_float() {
            return self.err(format!("{what} must be a float tensor, got {t}"));
        }
        Ok(())
    }

    fn int(&self, t: &ValueType, what: &str) -> Result<(), String> {
        if !t.dtype.is_int() {
            return self.err(format!("{what} must be an integer tensor, got {t}"));
        }
        Ok(())
    }

    /// A fixed-point format the integer kernels can hold: products of two values fit in i128.
    fn fixed_format(&self, frac: u32, bits: u32) -> Result<(), String> {
        if !(2..=48).contains(&bits) || frac > 40 {
            return self.err(format!("fixed-point format needs 2 <= bits <= 48 and frac <= 40, got bits={bits} frac={frac}"));
        }
        Ok(())
    }

    fn arity(&self, ins: &[ValueType], n: usize) -> Result<(), String> {
        if ins.len() != n {
            return self.err(format!("`{}` takes {n} operands, got {}", self.op.name(), ins.len()));
        }
        Ok(())
    }
}

/// NumPy-style broadcast of trailing dims; `None` when they do not agree. Dims are compared
/// with `dims` applied but kept as written (`K` stays `K`, like every other op's result).
pub fn broadcast_shapes(shapes: &[&Shape], dims: &DimBindings) -> Option<Shape> {
    let rank = shapes.iter().map(|s| s.rank()).max().unwrap_or(0);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        // (resolved, as written)
        let mut d: Option<(Dim, Dim)> = None;
        for s in shapes {
            let off = rank - s.rank();
            if i < off {
                continue;
            }
            let written = &s.0[i - off];
            let x = resolve_dim(written, dims);
            d = match d {
                None | Some((Dim::Const(1), _)) => Some((x, written.clone())),
                Some(cur) if x == Dim::Const(1) || cur.0 == x => Some(cur),
                Some(_) => return None,
            };
        }
        out.push(d.map_or(Dim::Const(1), |(_, written)| written));
    }
    Some(Shape(out))
}

/// The result types of `op` applied to operands of types `ins`; the message says what is wrong.
pub fn infer_types(
    op: &Op,
    ins: &[ValueType],
    neurons: &NeuronTable,
    dims: &DimBindings,
) -> Result<Vec<ValueType>, String> {
    let cx = Ctx { op, dims };
    let f32 = |shape: Shape| ValueType::new(DType::F32, shape);
    match op {
        Op::Input { .. } | Op::Param { .. } => cx.err("sources have declared types"),
        Op::Embedding => {
            cx.arity(ins, 2)?;
            cx.rank(&ins[0], 2, "embedding table")?;
            cx.float(&ins[0], "embedding table")?;
            if !ins[1].dtype.is_int() {
                return cx.err(format!("token ids must be integers, got {}", ins[1]));
            }
            let mut s = ins[1].shape.0.clone();
            s.push(ins[0].shape.0[1].clone());
            Ok(vec![ValueType::new(ins[0].dtype, Shape(s))])
        }
        Op::RepeatFrames { frames } => {
            cx.arity(ins, 1)?;
            // The text form writes a constant count as a positive integer.
            if frames.as_const().is_some_and(|n| n == 0 || n > i64::MAX as u64) {
                return cx.err(format!("`frames` must be a positive size, got {frames}"));
            }
            cx.rank(&ins[0], 3, "repeat_frames input")?;
            let s = &ins[0].shape.0;
            Ok(vec![ValueType::new(
                ins[0].dtype,
                Shape(vec![s[0].clone(), s[1].clone(), frames.clone(), s[2].clone()]),
            )])
        }
        Op::MeanFrames => {
            cx.arity(ins, 1)?;
            cx.rank(&ins[0], 4, "mean_frames input")?;
            let s = &ins[0].shape.0;
            Ok(vec![ValueType::new(ins[0].dtype, Shape(vec![s[0].clone(), s[1].clone(), s[3].clone()]))])
        }
        Op::Linear { bias } => {
            cx.arity(ins, if *bias { 3 } else { 2 })?;
            cx.float(&ins[0], "linear input")?;
            cx.rank(&ins[1], 2, "linear weight")?;
            let (x, w) = (&ins[0].shape, &ins[1].shape);
            let Some(i) = x.last() else { return cx.err("linear input must have rank >= 1") };
            if !cx.same(i, &w.0[1]) {
                return cx.err(format!("input features {i} do not match weight {}", ins[1]));
            }
            if *bias {
                cx.rank(&ins[2], 1, "linear bias")?;
                if !cx.same(&ins[2].shape.0[0], &w.0[0]) {
                    return cx.err(format!("bias {} does not match weight {}", ins[2], ins[1]));
                }
            }
            let mut s = x.0.clone();
            *s.last_mut().expect("rank checked") = w.0[0].clone();
            Ok(vec![f32(Shape(s))])
        }
        Op::RmsNorm { .. } | Op::LateralInhibition { .. } => {
            cx.arity(ins, 2)?;
            cx.float(&ins[0], "norm input")?;
            cx.rank(&ins[1], 1, "norm weight")?;
            let Some(d) = ins[0].shape.last() else { return cx.err("norm input must have rank >= 1") };
            if !cx.same(d, &ins[1].shape.0[0]) {
                return cx.err(format!("norm weight {} does not match input {}", ins[1], ins[0]));
            }
            Ok(vec![ins[0].clone()])
        }
        Op::Map { expr } => {
            if ins.is_empty() {
                return cx.err("`map` needs at least one operand");
            }
            for v in expr.vars() {
                // Backends bind operands as exactly `x0`, `x1`, ...: `x01` or `x+1` name none.
                let idx = v
                    .strip_prefix('x')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|i| format!("x{i}") == v);
                match idx {
                    Some(i) if i < ins.len() => {}
                    _ => return cx.err(format!("`map` expression reads `{v}`; operands are x0..x{}", ins.len() - 1)),
                }
            }
            for (i, t) in ins.iter().enumerate() {
                cx.float(t, &format!("map operand x{i}"))?;
            }
            let shapes: Vec<&Shape> = ins.iter().map(|t| &t.shape).collect();
            let s = broadcast_shapes(&shapes, dims)
                .ok_or_else(|| format!("operands do not broadcast: {}", ins.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")))?;
            Ok(vec![f32(s)])
        }
        Op::Scan { neuron, emit, .. } => {
            let m = neurons.get(neuron).ok_or_else(|| format!("unknown neuron model `{neuron}`"))?;
            let (ni, np, ns) = (m.inputs.len(), m.params.len(), m.state.len());
            cx.arity(ins, ni + np + ns)?;
            if emit.is_empty() {
                return cx.err("a scan must emit at least one output");
            }
            for e in emit {
                if m.output(e).is_none() {
                    let known: Vec<&str> = m.outputs.iter().map(|o| o.name.as_str()).collect();
                    return cx.err(format!("neuron `{neuron}` has no output `{e}` (it has {})", known.join(", ")));
                }
            }
            let frames: Shape = if ni > 0 {
                ins[0].shape.clone()
            } else {
                return cx.err(format!("neuron `{neuron}` has no per-step input"));
            };
            cx.rank(&ins[0], 4, &format!("scan input `{}`", m.inputs[0]))?;
            let c = frames.0[3].clone();
            let b = frames.0[0].clone();
            for (k, t) in ins[..ni].iter().enumerate() {
                cx.float(t, &format!("scan input `{}`", m.inputs[k]))?;
                if !cx.same_shape(&t.shape, &frames) {
                    return cx.err(format!("scan input `{}` is {t}, expected shape {frames}", m.inputs[k]));
                }
            }
            for (k, t) in ins[ni..ni + np].iter().enumerate() {
                if t.shape.rank() != 1 || !cx.same(&t.shape.0[0], &c) {
                    return cx.err(format!("scan parameter `{}` is {t}, expected [{c}]", m.params[k]));
                }
            }
            for (k, t) in ins[ni + np..].iter().enumerate() {
                let want = Shape(vec![b.clone(), c.clone()]);
                if !cx.same_shape(&t.shape, &want) {
                    return cx.err(format!("initial state `{}` is {t}, expected {want}", m.state[k].name));
                }
            }
            let mut out: Vec<ValueType> = emit.iter().map(|_| f32(frames.clone())).collect();
            out.extend(m.state.iter().map(|_| f32(Shape(vec![b.clone(), c.clone()]))));
            Ok(out)
        }
        Op::PonderWeights { .. } => {
            cx.arity(ins, 1)?;
            cx.rank(&ins[0], 4, "halt logits")?;
            let s = &ins[0].shape.0;
            if !cx.same(&s[3], &Dim::Const(1)) {
                return cx.err(format!("halt logits must end in 1, got {}", ins[0]));
            }
            Ok(vec![f32(ins[0].shape.clone()), f32(Shape(vec![s[0].clone(), s[1].clone(), Dim::Const(1)]))])
        }
        Op::FrameWeightedSum => {
            cx.arity(ins, 2)?;
            cx.rank(&ins[0], 4, "frames")?;
            cx.rank(&ins[1], 4, "frame weights")?;
            let (f, w) = (&ins[0].shape.0, &ins[1].shape.0);
            if !(0..3).all(|i| cx.same(&f[i], &w[i])) || !cx.same(&w[3], &Dim::Const(1)) {
                return cx.err(format!("weights {} do not fit frames {}", ins[1], ins[0]));
            }
            Ok(vec![f32(Shape(vec![f[0].clone(), f[1].clone(), f[3].clone()]))])
        }
        Op::CenterLast => {
            cx.arity(ins, 1)?;
            cx.float(&ins[0], "center_last input")?;
            Ok(vec![ins[0].clone()])
        }
        Op::CrossEntropy { .. } => {
            cx.arity(ins, 2)?;
            cx.float(&ins[0], "logits")?;
            if !ins[1].dtype.is_int() {
                return cx.err(format!("targets must be integers, got {}", ins[1]));
            }
            let l = &ins[0].shape;
            if l.rank() != ins[1].shape.rank() + 1 || !cx.same_shape(&Shape(l.0[..l.rank() - 1].to_vec()), &ins[1].shape) {
                return cx.err(format!("targets {} do not fit logits {}", ins[1], ins[0]));
            }
            Ok(vec![f32(ins[1].shape.clone())])
        }
        Op::MaskedMean => {
            cx.arity(ins, 2)?;
            cx.float(&ins[0], "masked_mean input")?;
            if !cx.same_shape(&ins[0].shape, &ins[1].shape) {
                return cx.err(format!("mask {} does not match {}", ins[1], ins[0]));
            }
            Ok(vec![f32(Shape::scalar())])
        }
        Op::Mean => {
            cx.arity(ins, 1)?;
            cx.float(&ins[0], "mean input")?;
            Ok(vec![f32(Shape::scalar())])
        }
        Op::ZerosLike => {
            cx.arity(ins, 1)?;
            Ok(vec![ins[0].clone()])
        }
        Op::ReduceLike => {
            cx.arity(ins, 2)?;
            cx.float(&ins[0], "reduce_like input")?;
            if broadcast_shapes(&[&ins[0].shape, &ins[1].shape], dims).map(|s| s.resolve(dims)) != Some(ins[0].shape.resolve(dims)) {
                return cx.err(format!("{} does not broadcast to {}", ins[1], ins[0]));
            }
            Ok(vec![f32(ins[1].shape.clone())])
        }
        Op::LinearGradInput => {
            cx.arity(ins, 2)?;
            cx.rank(&ins[1], 2, "linear weight")?;
            let Some(o) = ins[0].shape.last() else { return cx.err("gradient must have rank >= 1") };
            if !cx.same(o, &ins[1].shape.0[0]) {
                return cx.err(format!("gradient {} does not match weight {}", ins[0], ins[1]));
            }
            let mut s = ins[0].shape.0.clone();
            *s.last_mut().expect("rank checked") = ins[1].shape.0[1].clone();
            Ok(vec![f32(Shape(s))])
        }
        Op::LinearGradWeight => {
            cx.arity(ins, 2)?;
            let (dy, x) = (&ins[0].shape, &ins[1].shape);
            if dy.rank() == 0 || dy.rank() != x.rank() || !(0..dy.rank() - 1).all(|i| cx.same(&dy.0[i], &x.0[i])) {
                return cx.err(format!("gradient {} and input {} must share their leading dims", ins[0], ins[1]));
            }
            Ok(vec![f32(Shape(vec![dy.0[dy.rank() - 1].clone(), x.0[x.rank() - 1].clone()]))])
        }
        Op::EmbeddingGrad => {
            cx.arity(ins, 3)?;
            cx.rank(&ins[2], 2, "embedding table")?;
            if !ins[1].dtype.is_int() {
                return cx.err(format!("token ids must be integers, got {}", ins[1]));
            }
            Ok(vec![f32(ins[2].shape.clone())])
        }
        Op::SumFrames => {
            cx.arity(ins, 1)?;
            cx.rank(&ins[0], 4, "sum_frames input")?;
            let s = &ins[0].shape.0;
            Ok(vec![f32(Shape(vec![s[0].clone(), s[1].clone(), s[3].clone()]))])
        }
        Op::RmsNormGrad { .. } => {
            cx.arity(ins, 3)?;
            if !cx.same_shape(&ins[0].shape, &ins[1].shape) {
                return cx.err(format!("gradient {} does not match input {}", ins[0], ins[1]));
            }
            cx.rank(&ins[2], 1, "norm weight")?;
            Ok(vec![f32(ins[1].shape.clone()), f32(ins[2].shape.clone())])
        }
        Op::ScanAdjoint { neuron, emit, scope } => {
            let m = neurons.get(neuron).ok_or_else(|| format!("unknown neuron model `{neuron}`"))?;
            let n_fwd = m.inputs.len() + m.params.len() + m.state.len();
            if ins.len() != n_fwd + emit.len() + m.state.len() {
                return cx.err(format!(
                    "`scan_adjoint` of `{neuron}` takes {} operands (forward operands, then gradients of {} outputs and {} final states), got {}",
                    n_fwd + emit.len() + m.state.len(),
                    emit.len(),
                    m.state.len(),
                    ins.len()
                ));
            }
            let fwd_op = Op::Scan { neuron: neuron.clone(), emit: emit.clone(), scope: *scope };
            let fwd = infer_types(&fwd_op, &ins[..n_fwd], neurons, dims)?;
            for (i, (g, want)) in ins[n_fwd..].iter().zip(&fwd).enumerate() {
                if !cx.same_shape(&g.shape, &want.shape) {
                    return cx.err(format!("upstream gradient {i} is {g}, expected {want}"));
                }
            }
            Ok(ins[..n_fwd].iter().map(|t| f32(t.shape.clone())).collect())
        }
        Op::PonderWeightsGrad { .. } => {
            cx.arity(ins, 3)?;
            cx.rank(&ins[2], 4, "halt logits")?;
            if !cx.same_shape(&ins[0].shape, &ins[2].shape) {
                return cx.err(format!("gradient {} does not match logits {}", ins[0], ins[2]));
            }
            Ok(vec![f32(ins[2].shape.clone())])
        }
        Op::FrameWeightedSumGrad => {
            cx.arity(ins, 3)?;
            let fwd = infer_types(&Op::FrameWeightedSum, &ins[1..], neurons, dims)?;
            if !cx.same_shape(&ins[0].shape, &fwd[0].shape) {
                return cx.err(format!("gradient {} does not match the sum {}", ins[0], fwd[0]));
            }
            Ok(vec![f32(ins[1].shape.clone()), f32(ins[2].shape.clone())])
        }
        Op::CrossEntropyGrad { ignore_index } => {
            cx.arity(ins, 3)?;
            let fwd = infer_types(&Op::CrossEntropy { ignore_index: *ignore_index }, &ins[1..], neurons, dims)?;
            if !cx.same_shape(&ins[0].shape, &fwd[0].shape) {
                return cx.err(format!("gradient {} does not match the loss {}", ins[0], fwd[0]));
            }
            Ok(vec![f32(ins[1].shape.clone())])
        }
        Op::MaskedMeanGrad | Op::MeanGrad => {
            cx.arity(ins, 2)?;
            cx.rank(&ins[0], 0, "upstream gradient")?;
            Ok(vec![f32(ins[1].shape.clone())])
        }
        Op::Cast { to } => {
            cx.arity(ins, 1)?;
            if *to == DType::Spike {
                return cx.err("cannot cast to spike; use a scan output");
            }
            Ok(vec![ValueType::new(*to, ins[0].shape.clone())])
        }
        Op::Quantize { frac, bits } => {
            cx.arity(ins, 1)?;
            cx.fixed_format(*frac, *bits)?;
            cx.float(&ins[0], "quantize input")?;
            Ok(vec![ValueType::new(DType::I64, ins[0].shape.clone())])
        }
        Op::GradedSpike { bits, shift } => {
            cx.arity(ins, 2)?;
            if !(1..=32).contains(bits) || *shift > 62 {
                return cx.err(format!("payload bits must be 1..=32 and the shift at most 62, got bits={bits} shift={shift}"));
            }
            cx.int(&ins[0], "graded_spike input")?;
            let Some(c) = ins[0].shape.last() else { return cx.err("graded_spike input must have rank >= 1") };
            if ins[1].shape.rank() != 1 || !cx.same(&ins[1].shape.0[0], c) {
                return cx.err(format!("multipliers {} do not match channels of {}", ins[1], ins[0]));
            }
            Ok(vec![ValueType::new(DType::I64, ins[0].shape.clone())])
        }
        Op::SynapseLinear { bias, shift, bits } => {
            cx.arity(ins, if *bias { 4 } else { 3 })?;
            cx.fixed_format(0, *bits)?;
            if *shift > 62 {
                return cx.err(format!("the shift must be at most 62, got {shift}"));
            }
            cx.int(&ins[0], "synapse_linear payloads")?;
            cx.rank(&ins[1], 2, "synapse_linear weight")?;
            let w = &ins[1].shape;
            let Some(i) = ins[0].shape.last() else { return cx.err("synapse_linear payloads must have rank >= 1") };
            if !cx.same(i, &w.0[1]) {
                return cx.err(format!("input channels {i} do not match weight {}", ins[1]));
            }
            for (k, what) in [(2, "multipliers"), (3, "bias")].into_iter().take(ins.len() - 2) {
                if ins[k].shape.rank() != 1 || !cx.same(&ins[k].shape.0[0], &w.0[0]) {
                    return cx.err(format!("{what} {} do not match weight {}", ins[k], ins[1]));
                }
            }
            let mut s = ins[0].shape.0.clone();
            *s.last_mut().expect("rank checked") = w.0[0].clone();
            Ok(vec![ValueType::new(DType::I64, Shape(s))])
        }
        Op::FixedMap { expr, frac, bits } => {
            cx.fixed_format(*frac, *bits)?;
            // The same operand and broadcast rules as `map`, over integer values.
            let as_float: Vec<ValueType> = ins.iter().map(|t| f32(t.shape.clone())).collect();
            let out = infer_types(&Op::Map { expr: expr.clone() }, &as_float, neurons, dims)?;
            Ok(out.into_iter().map(|t| ValueType::new(DType::I64, t.shape)).collect())
        }
        Op::FixedScan { neuron, emit, scope, frac, bits } => {
            cx.fixed_format(*frac, *bits)?;
            let m = neurons.get(neuron).ok_or_else(|| format!("unknown neuron model `{neuron}`"))?;
            let np = m.params.len();
            for (k, t) in ins.iter().enumerate().take(m.inputs.len()) {
                cx.int(t, &format!("fixed_scan input `{}`", m.inputs[k]))?;
            }
            for (k, t) in ins.iter().enumerate().skip(m.inputs.len() + np) {
                cx.int(t, &format!("fixed_scan initial state {}", k - m.inputs.len() - np))?;
            }
            let as_float: Vec<ValueType> = ins.iter().map(|t| f32(t.shape.clone())).collect();
            let fwd = Op::Scan { neuron: neuron.clone(), emit: emit.clone(), scope: *scope };
            let out = infer_types(&fwd, &as_float, neurons, dims)?;
            Ok(out.into_iter().map(|t| ValueType::new(DType::I64, t.shape)).collect())
        }
    }
}
