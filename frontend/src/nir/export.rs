//! IR graph + parameters → NIR.
//!
//! What NIR can express is written as NIR nodes: `linear` → Affine / Linear, `x0 * p` → Scale,
//! `x0 > p` → Threshold, sums of values → several edges into one node, and scans of
//! single-state neurons whose step is affine in (v, x) with constant parameters → LIF (LI when
//! they never fire). A neuron is recognised either as one of the models the importer makes
//! (exact round trip, all six neuron types) or by evaluating its step: v' = β v + g x + c per
//! channel gives τ from β under the chosen scheme and dt, R = g / (1 − β) and
//! v_leak = c / (1 − β). So the NeuronSpark PLIF (β = sigmoid(w), charge β v + (1 − β) x)
//! becomes τ = −dt / ln β (exact) or dt / (1 − β) (Euler) with R = 1; a neuron that adds x
//! unscaled gets R = 1 / (1 − β).
//!
//! dt, the scheme and each neuron's reset and fire modes are written under `metadata/`. What
//! NIR cannot express gets a diagnostic naming the node; with `partial`, the rest is written,
//! and each cut edge becomes a NIR `Input` (standing for a value that could not be written) or
//! `Output` (for a value that an omitted node reads), whose `metadata/sparkc_omitted` says so.

use super::discretize::{neuron_model, tau_from_decay, Convention, Discretisation, NeuronKind, ResetForm, Scheme};
use super::error::{Diagnostic, NirError, Severity};
use super::model::{Array, MetaValue, Metadata, NirFile, NirGraph, NirNode, NodeKind, NIR_VERSION};
use crate::neuronspark::STATE_PREFIX;
use petgraph::stable_graph::NodeIndex;
use sparkc_ir::expr::{BinOp, Expr};
use sparkc_ir::neuron::{FireCmp, NeuronModel, Reset, SPIKE};
use sparkc_ir::{Graph, Op, Tensor, Value};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The time one IR frame stands for, in NIR time units.
    pub dt: f64,
    /// Which discretisation the NIR reader is assumed to apply.
    pub scheme: Scheme,
    /// Write what NIR can express even when some nodes cannot be.
    pub partial: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { dt: Convention::Nir.default_dt(), scheme: Scheme::Euler, partial: false }
    }
}

#[derive(Clone, Debug)]
pub struct Exported {
    pub file: NirFile,
    /// Approximations, and with `partial` the nodes left out.
    pub diagnostics: Vec<Diagnostic>,
}

/// How one IR value appears in NIR.
#[derive(Clone, Debug)]
enum Rep {
    /// The output of these NIR nodes, summed.
    Nodes(Vec<String>),
    /// Not expressible (the diagnostic is recorded); `channels` when it is a frame value.
    Omitted { channels: Option<u64> },
}

fn meta_str(m: &mut Metadata, k: &str, v: &str) {
    m.insert(k.to_string(), MetaValue::Str(v.to_string()));
}

fn meta_f64(m: &mut Metadata, k: &str, v: f64) {
    m.insert(k.to_string(), MetaValue::Array(Array::scalar_f64(v)));
}

/// The channel count of a frame value `[B,T,K,C]` or `[B,T,C]`.
fn channels(graph: &Graph, v: Value) -> Option<u64> {
    let t = graph.value_type(v);
    let r = t.shape.rank();
    if (r == 3 || r == 4) && t.dtype.is_float() {
        t.shape.last()?.as_const()
    } else {
        None
    }
}

/// Why an op has no NIR counterpart.
fn op_reason(op: &Op) -> String {
    match op {
        Op::Embedding => "a table lookup of integer token ids; NIR nodes map real-valued signals".into(),
        Op::RepeatFrames { .. } | Op::MeanFrames | Op::FrameWeightedSum => {
            "changes the frame rate (frames per token); a NIR graph runs every node at one time step".into()
        }
        Op::RmsNorm { .. } => "RMS normalisation divides by a norm over channels; NIR has no normalisation primitive".into(),
        Op::LateralInhibition { .. } => "divisive normalisation across channels; NIR has no normalisation primitive".into(),
        Op::PonderWeights { .. } => "PonderNet halting weights (adaptive computation over frames) have no NIR primitive".into(),
        Op::CenterLast => "subtracting the mean over channels has no NIR primitive".into(),
        Op::CrossEntropy { .. } | Op::MaskedMean | Op::Mean => "a loss or reduction, not part of a NIR network".into(),
        Op::Cast { .. } => "NIR has no dtypes to convert between".into(),
        Op::Map { expr } => format!("the element-wise expression `{expr}` is not a sum, a Scale (x · p) or a Threshold (x > p)"),
        _ => "has no NIR counterpart".into(),
    }
}

/// One channel's step of a single-state neuron: v' = beta·v + gain·x + offset.
#[derive(Clone, Copy, Debug)]
struct AffineStep {
    beta: f64,
    gain: f64,
    offset: f64,
    threshold: f64,
}

/// Evaluate a neuron's lets, charge and threshold for one channel at (v, x).
fn eval_step(m: &NeuronModel, params: &[f64], v: f64, x: f64) -> Option<(f64, f64)> {
    let mut env: BTreeMap<String, f64> = m.params.iter().cloned().zip(params.iter().copied()).collect();
    env.insert(m.inputs[0].clone(), x);
    env.insert(m.membrane.clone(), v);
    let eval = |e: &Expr, env: &BTreeMap<String, f64>| e.eval(&|n| env.get(n).copied().unwrap_or(f64::NAN));
    for b in &m.lets {
        let val = eval(&b.expr, &env);
        env.insert(b.name.clone(), val);
    }
    let [b] = m.charge.as_slice() else { return None };
    let v1 = eval(&b.expr, &env);
    env.insert(m.membrane.clone(), v1);
    let th = eval(&m.threshold, &env);
    (v1.is_finite() && th.is_finite()).then_some((v1, th))
}

/// The per-channel affine form of a neuron, if its step is one.
fn affine_step(m: &NeuronModel, params: &[f64]) -> Option<AffineStep> {
    let (c, th0) = eval_step(m, params, 0.0, 0.0)?;
    let (a1, th1) = eval_step(m, params, 1.0, 0.0)?;
    let (b1, th2) = eval_step(m, params, 0.0, 1.0)?;
    let (beta, gain) = (a1 - c, b1 - c);
    // A fourth point tells an affine step from a non-linear one (gates, comparisons).
    let (p, q) = (0.37, -1.3);
    let (z, th3) = eval_step(m, params, p, q)?;
    let want = c + beta * p + gain * q;
    let tol = 1e-9 * (1.0 + c.abs() + beta.abs() + gain.abs());
    let th_const = [th1, th2, th3].iter().all(|t| (t - th0).abs() <= 1e-12 * (1.0 + th0.abs()));
    ((z - want).abs() <= tol && th_const).then_some(AffineStep { beta, gain, offset: c, threshold: th0 })
}

struct Exporter<'a> {
    graph: &'a Graph,
    params: &'a BTreeMap<String, Tensor>,
    opts: &'a ExportOptions,
    nodes: BTreeMap<String, NirNode>,
    edges: Vec<(String, String)>,
    diags: Vec<Diagnostic>,
    reps: BTreeMap<Value, Rep>,
    /// NIR Inputs standing for omitted values.
    cut_inputs: BTreeMap<Value, String>,
    used: BTreeSet<String>,
}

impl Exporter<'_> {
    fn label(&self, n: NodeIndex) -> String {
        let node = self.graph.node(n);
        if node.name.is_empty() {
            format!("{}#{}", node.op.name(), n.index())
        } else {
            node.name.clone()
        }
    }

    fn diag(&mut self, n: NodeIndex, severity: Severity, msg: impl Into<String>) {
        let node = self.label(n);
        let kind = self.graph.node(n).op.name().to_string();
        self.diags.push(Diagnostic { node, kind, severity, message: msg.into() });
    }

    fn omit(&mut self, n: NodeIndex, why: impl Into<String>) {
        self.diag(n, Severity::Unsupported, why);
        self.omit_quietly(n);
    }

    /// Omit a node only because an input is omitted: the cause has its own diagnostic.
    fn omit_quietly(&mut self, n: NodeIndex) {
        for port in 0..self.graph.node(n).results.len() as u32 {
            let v = Value { node: n, port };
            let c = channels(self.graph, v);
            self.reps.insert(v, Rep::Omitted { channels: c });
        }
    }

    /// A unique, valid NIR node name.
    fn fresh(&mut self, base: &str) -> String {
        let clean: String = base.chars().map(|c| if c == '/' || c == '\0' { '_' } else { c }).collect();
        let clean = if clean.is_empty() || clean == "." || clean == ".." { "node".to_string() } else { clean };
        let mut name = clean.clone();
        let mut k = 2;
        while !self.used.insert(name.clone()) {
            name = format!("{clean}_{k}");
            k += 1;
        }
        name
    }

    fn add(&mut self, n: NodeIndex, node: NirNode) -> String {
        let name = self.fresh(&self.label(n));
        self.nodes.insert(name.clone(), node);
        self.reps.insert(Value { node: n, port: 0 }, Rep::Nodes(vec![name.clone()]));
        name
    }

    /// The NIR nodes whose summed output is `v`; in partial mode an omitted frame value gets a
    /// stand-in Input.
    fn sources(&mut self, v: Value) -> Option<Vec<String>> {
        match self.reps.get(&v).cloned()? {
            Rep::Nodes(ns) => Some(ns),
            Rep::Omitted { channels: Some(c) } if self.opts.partial => {
                if let Some(name) = self.cut_inputs.get(&v) {
                    return Some(vec![name.clone()]);
                }
                let base = if v.port == 0 { self.label(v.node) } else { format!("{}.{}", self.label(v.node), v.port) };
                let name = self.fresh(&base);
                let mut node = NirNode::new(NodeKind::Input { shape: vec![c as i64] });
                let op = self.graph.node(v.node).op.name();
                meta_str(&mut node.metadata, "sparkc_omitted", &format!("stands for the output of IR op `{op}`, which NIR cannot express"));
                self.nodes.insert(name.clone(), node);
                self.cut_inputs.insert(v, name.clone());
                Some(vec![name])
            }
            Rep::Omitted { .. } => None,
        }
    }

    fn param_name(&self, v: Value) -> Option<&str> {
        match &self.graph.node(v.node).op {
            Op::Param { name } => Some(name),
            _ => None,
        }
    }

    /// The f32 data of a parameter operand, checked against its declared element count.
    fn param_data(&self, v: Value) -> Result<Option<(String, &Tensor)>, NirError> {
        let Some(name) = self.param_name(v) else { return Ok(None) };
        let t = self.params.get(name).ok_or_else(|| NirError::Invalid(format!("parameter `{name}` is missing from the parameters")))?;
        let declared = self.graph.value_type(v).shape.concrete(&self.graph.dims).map_err(|s| NirError::Invalid(format!("parameter `{name}` has symbolic dimension {s}")))?;
        if t.shape != declared || t.as_f32().is_none() {
            return Err(NirError::Invalid(format!("parameter `{name}` is {:?} {:?}, declared {:?}", t.dtype(), t.shape, declared)));
        }
        Ok(Some((name.to_string(), t)))
    }

    fn linear(&mut self, n: NodeIndex, bias: bool) -> Result<(), NirError> {
        let ops = self.graph.operands(n);
        let Some((_, w)) = self.param_data(ops[1])? else {
            self.omit(n, "the weight is computed in the graph; NIR weights are constants");
            return Ok(());
        };
        let weight = Array::f32(w.shape.clone(), w.to_f32_vec()).expect("tensor fills its shape");
        let kind = if bias {
            let Some((_, b)) = self.param_data(ops[2])? else {
                self.omit(n, "the bias is computed in the graph; NIR biases are constants");
                return Ok(());
            };
            NodeKind::Affine { weight, bias: Array::vec_f32(b.to_f32_vec()) }
        } else {
            NodeKind::Linear { weight }
        };
        self.emit_node(n, NirNode::new(kind), &ops[..1]);
        Ok(())
    }

    /// Add `node` for IR node `n` fed by `inputs`, or omit it when an input is missing.
    fn emit_node(&mut self, n: NodeIndex, node: NirNode, inputs: &[Value]) {
        let mut srcs = Vec::new();
        for &v in inputs {
            match self.sources(v) {
                Some(s) => srcs.extend(s),
                None => {
                    self.omit_quietly(n);
                    return;
                }
            }
        }
        let name = self.add(n, node);
        for s in srcs {
            self.edges.push((s, name.clone()));
        }
    }

    fn map(&mut self, n: NodeIndex, expr: &Expr) -> Result<(), NirError> {
        let ops = self.graph.operands(n);
        let is_param: Vec<bool> = ops.iter().map(|&v| self.param_name(v).is_some()).collect();
        // A plain sum of values: NIR sums the edges into a node.
        let mut terms = Vec::new();
        if sum_terms(expr, &mut terms) && !is_param.iter().any(|&p| p) {
            let mut idx: Vec<usize> = terms.iter().filter_map(|t| t.strip_prefix('x').and_then(|i| i.parse().ok())).collect();
            idx.sort_unstable();
            if idx == (0..ops.len()).collect::<Vec<_>>() {
                let mut all = Vec::new();
                for &v in &ops {
                    match self.sources(v) {
                        Some(s) => all.extend(s),
                        None => {
                            self.omit_quietly(n);
                            return Ok(());
                        }
                    }
                }
                self.reps.insert(Value { node: n, port: 0 }, Rep::Nodes(all));
                return Ok(());
            }
        }
        // x · p (Scale) and x > p (Threshold), p a per-channel parameter.
        if let (Expr::Bin(op @ (BinOp::Mul | BinOp::Gt), a, b), 2) = (expr, ops.len()) {
            let (ia, ib) = (var_index(a), var_index(b));
            let pair = match (ia, ib) {
                (Some(i), Some(j)) if i != j && !is_param[i] && is_param[j] => Some((ops[i], ops[j])),
                // x · p is symmetric; x > p is not.
                (Some(i), Some(j)) if i != j && *op == BinOp::Mul && is_param[i] && !is_param[j] => Some((ops[j], ops[i])),
                _ => None,
            };
            if let Some((x, p)) = pair {
                if let (Some((_, t)), Some(c)) = (self.param_data(p)?, channels(self.graph, x)) {
                    if t.shape == vec![c as usize] {
                        let a = Array::vec_f32(t.to_f32_vec());
                        let kind = if *op == BinOp::Mul { NodeKind::Scale { scale: a } } else { NodeKind::Threshold { threshold: a } };
                        self.emit_node(n, NirNode::new(kind), &[x]);
                        return Ok(());
                    }
                }
            }
        }
        self.omit(n, op_reason(&self.graph.node(n).op));
        Ok(())
    }

    fn scan(&mut self, n: NodeIndex, neuron: &str, emit: &[String]) -> Result<(), NirError> {
        let model = self.graph.neurons.get(neuron).cloned().ok_or_else(|| NirError::Invalid(format!("unknown neuron model `{neuron}`")))?;
        let ops = self.graph.operands(n);
        let (ni, np) = (model.inputs.len(), model.params.len());
        // State results (ports ≥ 1) are carried state: implicit in NIR.
        if ni != 1 {
            let list = model.inputs.join(", ");
            self.omit(n, format!("neuron `{neuron}` takes {ni} per-step inputs ({list}); a NIR neuron has one input and constant parameters (time-varying β(t), θ(t) cannot be written)"));
            return Ok(());
        }
        if emit.len() != 1 {
            self.omit(n, "a scan emitting several outputs has no NIR counterpart");
            return Ok(());
        }
        let mut pvals: Vec<Vec<f64>> = Vec::new();
        let mut pnames = Vec::new();
        for &v in &ops[ni..ni + np] {
            match self.param_data(v)? {
                Some((name, t)) => {
                    pvals.push(t.to_f32_vec().into_iter().map(f64::from).collect());
                    pnames.push(name);
                }
                None => {
                    self.omit(n, "a neuron parameter is computed in the graph; NIR neuron parameters are constants");
                    return Ok(());
                }
            }
        }
        let c = pvals.first().map(|p| p.len()).or_else(|| channels(self.graph, ops[0]).map(|c| c as usize)).unwrap_or(0);
        if let Some(kind) = self.recognise(&model, &emit[0]) {
            let node = own_node(kind, &model, &pvals, c);
            let mut node = NirNode::new(node);
            self.neuron_meta(&mut node.metadata, &model);
            self.emit_node(n, node, &ops[..1]);
            return Ok(());
        }
        self.affine_neuron(n, &model, &emit[0], &pvals, c, &ops[..1])
    }

    /// Whether `model` is the importer's model of a NIR type under this dt and scheme.
    fn recognise(&self, model: &NeuronModel, emit: &str) -> Option<NeuronKind> {
        let d = Discretisation { dt: self.opts.dt, scheme: self.opts.scheme, convention: Convention::Nir };
        let reset = match model.reset {
            Reset::ToValue(c) => ResetForm::Uniform(c),
            _ => ResetForm::Uniform(0.0),
        };
        let kinds = [NeuronKind::I, NeuronKind::IF, NeuronKind::LI, NeuronKind::LIF, NeuronKind::CubaLI, NeuronKind::CubaLIF];
        for kind in kinds {
            for form in [reset, ResetForm::PerChannel] {
                let Ok(dn) = neuron_model(kind, &d, form) else { continue };
                let mut m = dn.model.clone();
                m.name = model.name.clone();
                if m == *model && dn.emit == emit {
                    return Some(kind);
                }
            }
        }
        None
    }

    fn neuron_meta(&self, m: &mut Metadata, model: &NeuronModel) {
        meta_f64(m, "dt", self.opts.dt);
        meta_str(m, "discretisation", self.opts.scheme.name());
        let reset = match model.reset {
            Reset::Subtract => "subtract".to_string(),
            Reset::ToValue(c) => format!("to_value({c:?})"),
            Reset::None => "none".to_string(),
        };
        meta_str(m, "reset", &reset);
        meta_str(m, "fire", if model.fire == FireCmp::Ge { ">=" } else { ">" });
        meta_str(m, "sparkc_neuron", &model.name);
    }

    /// A single-state neuron whose step is affine in (v, x): LIF, or LI when it never fires.
    fn affine_neuron(&mut self, n: NodeIndex, model: &NeuronModel, emit: &str, pvals: &[Vec<f64>], c: usize, input: &[Value]) -> Result<(), NirError> {
        let name = &model.name;
        if model.state.len() != 1 || model.charge.len() != 1 {
            self.omit(n, format!("neuron `{name}` has {} state variables; only one-state neurons whose step is affine in (v, x) map to NIR LIF / LI", model.state.len()));
            return Ok(());
        }
        let mut steps = Vec::with_capacity(c);
        for ch in 0..c {
            let p: Vec<f64> = pvals.iter().map(|v| v.get(ch).copied().unwrap_or(f64::NAN)).collect();
            match affine_step(model, &p) {
                Some(s) => steps.push(s),
                None => {
                    self.omit(n, format!("the step of neuron `{name}` is not v' = β·v + g·x + c with a constant threshold (channel {ch}); NIR LIF cannot express it"));
                    return Ok(());
                }
            }
        }
        let (dt, scheme) = (self.opts.dt, self.opts.scheme);
        let mut tau = Vec::with_capacity(c);
        let (mut r, mut v_leak, mut th) = (Vec::new(), Vec::new(), Vec::new());
        for (ch, s) in steps.iter().enumerate() {
            let Some(t) = tau_from_decay(scheme, dt, s.beta) else {
                self.omit(n, format!("channel {ch} decays by β = {} per step, which no positive τ gives under the {} scheme", s.beta, scheme.name()));
                return Ok(());
            };
            tau.push(t);
            r.push(s.gain / (1.0 - s.beta));
            v_leak.push(s.offset / (1.0 - s.beta));
            th.push(s.threshold);
        }
        let out_expr = model.output(emit).map(|b| b.expr.clone());
        let spikes = matches!(&out_expr, Some(Expr::Var(v)) if v == SPIKE);
        let membrane = matches!(&out_expr, Some(Expr::Var(v)) if *v == model.membrane);
        let mut meta = Metadata::new();
        self.neuron_meta(&mut meta, model);
        let f32v = |v: Vec<f64>| Array::vec_f32(v.into_iter().map(|x| x as f32).collect());
        let kind = match (model.reset, spikes, membrane) {
            // Never reset and emits the membrane: exactly a leaky integrator.
            (Reset::None, false, true) => NodeKind::LI { tau: f32v(tau), r: f32v(r), v_leak: f32v(v_leak) },
            (Reset::None, _, _) => {
                self.omit(n, format!("neuron `{name}` has no reset and emits `{emit}`; NIR LI emits the membrane, LIF resets"));
                return Ok(());
            }
            (reset, _, _) => {
                let v_reset = match reset {
                    Reset::ToValue(x) => x,
                    _ => 0.0,
                };
                if reset == Reset::Subtract {
                    self.diag(n, Severity::Approximation, format!("neuron `{name}` resets by subtracting θ; NIR LIF resets to v_reset = 0 (`metadata/reset` = \"subtract\")"));
                }
                if model.fire == FireCmp::Ge {
                    self.diag(n, Severity::Approximation, format!("neuron `{name}` fires on v >= θ; NIR LIF fires on v > θ (`metadata/fire` = \">=\")"));
                }
                if !spikes {
                    let e = out_expr.map(|e| e.to_string()).unwrap_or_default();
                    meta_str(&mut meta, "output", &format!("{emit} = {e}"));
                    self.diag(n, Severity::Approximation, format!("the scan emits `{emit}` = {e}, not the spikes a NIR LIF outputs (`metadata/output`)"));
                }
                NodeKind::LIF { tau: f32v(tau), r: f32v(r), v_leak: f32v(v_leak), v_threshold: f32v(th), v_reset: f32v(vec![v_reset; c]) }
            }
        };
        let mut node = NirNode::new(kind);
        node.metadata = meta;
        self.emit_node(n, node, input);
        Ok(())
    }
}

/// Whether `e` is a sum of variables; collects them.
fn sum_terms(e: &Expr, out: &mut Vec<String>) -> bool {
    match e {
        Expr::Var(v) => {
            out.push(v.clone());
            true
        }
        Expr::Bin(BinOp::Add, a, b) => sum_terms(a, out) && sum_terms(b, out),
        _ => false,
    }
}

fn var_index(e: &Expr) -> Option<usize> {
    match e {
        Expr::Var(v) => v.strip_prefix('x')?.parse().ok(),
        _ => None,
    }
}

/// The NIR node of one of the importer's own models, from its parameters (named by field).
fn own_node(kind: NeuronKind, model: &NeuronModel, pvals: &[Vec<f64>], c: usize) -> NodeKind {
    let field = |f: &str| -> Array {
        let v = model.params.iter().position(|p| p == f).map(|i| pvals[i].clone());
        let v = v.unwrap_or_else(|| {
            // Fields the model folded into constants: the reset value, or NIR's defaults.
            let fill = match (f, model.reset) {
                ("v_reset", Reset::ToValue(x)) => x,
                ("w_in", _) => 1.0,
                _ => 0.0,
            };
            vec![fill; c]
        });
        Array::vec_f32(v.into_iter().map(|x| x as f32).collect())
    };
    match kind {
        NeuronKind::I => NodeKind::I { r: field("r") },
        NeuronKind::IF => NodeKind::IF { r: field("r"), v_threshold: field("v_threshold"), v_reset: field("v_reset") },
        NeuronKind::LI => NodeKind::LI { tau: field("tau"), r: field("r"), v_leak: field("v_leak") },
        NeuronKind::LIF => NodeKind::LIF { tau: field("tau"), r: field("r"), v_leak: field("v_leak"), v_threshold: field("v_threshold"), v_reset: field("v_reset") },
        NeuronKind::CubaLI => NodeKind::CubaLI { tau_syn: field("tau_syn"), tau_mem: field("tau_mem"), r: field("r"), v_leak: field("v_leak"), w_in: field("w_in") },
        NeuronKind::CubaLIF => NodeKind::CubaLIF {
            tau_syn: field("tau_syn"),
            tau_mem: field("tau_mem"),
            r: field("r"),
            v_leak: field("v_leak"),
            v_threshold: field("v_threshold"),
            v_reset: field("v_reset"),
            w_in: field("w_in"),
        },
    }
}

/// Export `graph` with `params` to a NIR file.
pub fn export_graph(graph: &Graph, params: &BTreeMap<String, Tensor>, opts: &ExportOptions) -> Result<Exported, NirError> {
    if !(opts.dt.is_finite() && opts.dt > 0.0) {
        return Err(NirError::Invalid(format!("dt must be a positive number, got {}", opts.dt)));
    }
    sparkc_ir::verify::verify(graph)?;
    let mut ex = Exporter {
        graph,
        params,
        opts,
        nodes: BTreeMap::new(),
        edges: Vec::new(),
        diags: Vec::new(),
        reps: BTreeMap::new(),
        cut_inputs: BTreeMap::new(),
        used: BTreeSet::new(),
    };
    // Graph output names first, so that ports keep their IR names.
    for (name, _) in &graph.outputs {
        if !name.starts_with(STATE_PREFIX) {
            ex.used.insert(name.clone());
        }
    }
    for n in graph.topo_order()? {
        let node = graph.node(n);
        match &node.op {
            Op::Param { .. } => {}
            Op::Input { name } if name.starts_with(STATE_PREFIX) => {}
            Op::Input { name } => match channels(graph, Value { node: n, port: 0 }) {
                Some(c) => {
                    let nir_name = ex.fresh(name);
                    ex.nodes.insert(nir_name.clone(), NirNode::new(NodeKind::Input { shape: vec![c as i64] }));
                    ex.reps.insert(Value { node: n, port: 0 }, Rep::Nodes(vec![nir_name]));
                }
                None => {
                    let t = graph.value_type(Value { node: n, port: 0 }).to_string();
                    ex.omit(n, format!("graph input `{name}` is {t}; a NIR input is a real-valued signal [.., channels] per time step"));
                }
            },
            Op::Linear { bias } => ex.linear(n, *bias)?,
            Op::Map { expr } => ex.map(n, expr)?,
            Op::Scan { neuron, emit, .. } => ex.scan(n, neuron, emit)?,
            op => {
                let why = op_reason(op);
                ex.omit(n, why);
            }
        }
    }
    // Graph outputs, then cut edges into omitted nodes (partial mode).
    for (name, v) in &graph.outputs {
        if name.starts_with(STATE_PREFIX) {
            continue;
        }
        if let (Some(Rep::Nodes(srcs)), Some(c)) = (ex.reps.get(v).cloned(), channels(graph, *v)) {
            ex.nodes.insert(name.clone(), NirNode::new(NodeKind::Output { shape: vec![c as i64] }));
            for s in srcs {
                ex.edges.push((s, name.clone()));
            }
        }
    }
    let unsupported = ex.diags.iter().any(|d| d.severity == Severity::Unsupported);
    if unsupported && !opts.partial {
        return Err(NirError::Export(ex.diags));
    }
    if unsupported {
        let omitted: Vec<NodeIndex> = graph.g.node_indices().filter(|&n| matches!(ex.reps.get(&Value { node: n, port: 0 }), Some(Rep::Omitted { .. }))).collect();
        for n in omitted {
            for (slot, v) in graph.operands(n).into_iter().enumerate() {
                let (Some(Rep::Nodes(srcs)), Some(c)) = (ex.reps.get(&v).cloned(), channels(graph, v)) else { continue };
                let name = ex.fresh(&format!("{}.in{slot}", ex.label(n)));
                let mut node = NirNode::new(NodeKind::Output { shape: vec![c as i64] });
                let op = graph.node(n).op.name();
                meta_str(&mut node.metadata, "sparkc_omitted", &format!("feeds IR op `{op}` (`{}`), which NIR cannot express", ex.label(n)));
                ex.nodes.insert(name.clone(), node);
                for s in srcs {
                    ex.edges.push((s, name.clone()));
                }
            }
        }
    }
    if ex.nodes.is_empty() {
        return Err(NirError::Export(ex.diags));
    }
    let mut metadata = Metadata::new();
    meta_str(&mut metadata, "source", &format!("sparkc {} (graph `{}`)", env!("CARGO_PKG_VERSION"), graph.name));
    meta_f64(&mut metadata, "dt", opts.dt);
    meta_str(&mut metadata, "discretisation", opts.scheme.name());
    let file = NirFile { version: NIR_VERSION.to_string(), graph: NirGraph { nodes: ex.nodes, edges: ex.edges, metadata } };
    Ok(Exported { file, diagnostics: ex.diags })
}
