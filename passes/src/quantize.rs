//! Quantize a float graph into integer mode for a fixed-point neuromorphic target.
//!
//! What runs on neuromorphic cores ("native") becomes fixed point: scans → `fixed_scan`,
//! element-wise maps over neuron values → `fixed_map`, linear layers → `synapse_linear`. Every
//! value that travels between cores becomes a graded spike (`graded_spike`): an integer payload
//! with a per-channel scale calibrated on sample data, where zero means no event. Neuron
//! outputs (the leak currents) get `leak_bits` payloads, other activations `act_bits`, spikes
//! one bit. Weights, decays and thresholds are rounded into the target's formats. Everything
//! else (normalisation, PonderNet, the head) stays in floating point for management cores or
//! the host, reading and writing the chip through the same payloads.
//!
//! The pass reports, per quantized layer, the error of the quantization on the calibration data
//! (max / mean absolute error, SNR) and the fraction of payloads that are zero (suppressed).

use crate::users::all_readers;
use sparkc_ir::neuron::{NeuronModel, SPIKE};
use sparkc_ir::{parse_expr, BinOp, DType, Expr, Graph, IrError, NodeIndex, Op, Shape, Tensor, Value, ValueType};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// How weights are scaled into `weight_bits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightScale {
    /// One scale per output neuron (a programmable dendrite multiplies by it).
    PerChannel,
    /// One power-of-two scale per layer (a shared weight exponent, as in Loihi 1).
    PerLayerPow2,
}

#[derive(Clone, Debug)]
pub struct QuantConfig {
    /// Payload bits of neuron outputs (the leak currents).
    pub leak_bits: u32,
    /// Payload bits of other values that travel as events.
    pub act_bits: u32,
    pub weight_bits: u32,
    pub weight_scale: WeightScale,
    /// Fixed-point state width (values saturate to it).
    pub state_bits: u32,
    /// Fractional bits of decays (e.g. 12: a decay is k/4096).
    pub decay_bits: u32,
    /// Bits of a threshold's mantissa (aligned to the state's top bits).
    pub threshold_bits: u32,
    /// Whether thresholds may be negative (a programmable compare) or are unsigned.
    pub threshold_signed: bool,
    /// Fractional bits of the fixed-point format; `None` chooses them from the calibration.
    pub frac: Option<u32>,
    /// Payload ranges are the calibrated clipping ranges times this, for values the sample
    /// data did not show (2: one bit of range) ...
    pub headroom: f64,
    /// ... for payloads of at least this many bits (narrower ones need all their resolution).
    pub headroom_min_bits: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error("quantize: {0}")]
    Msg(String),
    #[error("quantize: `{node}`: {msg}")]
    Node { node: String, msg: String },
}

/// What the calibration collected for one value: per-channel max |x| and, where the value is
/// encoded as a payload, the samples themselves ([rows, channels] row-major).
#[derive(Clone, Debug, Default)]
pub struct ChannelStats {
    pub channels: usize,
    pub max_abs: Vec<f64>,
    pub samples: Vec<f32>,
}

/// Calibration statistics keyed by the value of the float graph.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    pub values: BTreeMap<Value, ChannelStats>,
}

/// Prefix of the extra outputs [`probe_graph`] adds.
pub const PROBE_PREFIX: &str = "calib.";

fn probe_name(v: Value) -> String {
    format!("{PROBE_PREFIX}{}.{}", v.node.index(), v.port)
}

/// Which nodes run natively on neuromorphic cores: scans; element-wise maps whose operands are
/// native values or per-channel parameters; linear layers that read a native value or feed,
/// through anything, a native node (the rest — the head — runs on the host).
pub fn native_nodes(g: &Graph) -> Result<BTreeSet<NodeIndex>, IrError> {
    let order = g.topo_order()?;
    let mut native: BTreeSet<NodeIndex> = order.iter().copied().filter(|&n| matches!(g.node(n).op, Op::Scan { .. })).collect();
    loop {
        let before = native.len();
        let ancestors = ancestors_of(g, &native);
        for &n in &order {
            if native.contains(&n) {
                continue;
            }
            let ops = g.operands(n);
            let yes = match &g.node(n).op {
                Op::Linear { .. } => native.contains(&ops[0].node) || ancestors.contains(&n),
                Op::Map { .. } => {
                    let out = g.node(n).results[0].shape.resolve(&g.dims);
                    let mut any = false;
                    let ok = ops.iter().all(|v| {
                        let ty = g.value_type(*v);
                        if native.contains(&v.node) {
                            any = true;
                            ty.shape.resolve(&g.dims) == out
                        } else {
                            matches!(g.node(v.node).op, Op::Param { .. }) && ty.shape.rank() <= 1
                        }
                    });
                    ok && any
                }
                _ => false,
            };
            if yes {
                native.insert(n);
            }
        }
        if native.len() == before {
            return Ok(native);
        }
    }
}

/// Nodes with a path to some node of `targets` (excluding the targets themselves unless they
/// reach another one).
fn ancestors_of(g: &Graph, targets: &BTreeSet<NodeIndex>) -> HashSet<NodeIndex> {
    let mut seen = HashSet::new();
    let mut stack: Vec<NodeIndex> = targets.iter().copied().collect();
    while let Some(n) = stack.pop() {
        for v in g.operands(n) {
            if seen.insert(v.node) {
                stack.push(v.node);
            }
        }
    }
    seen
}

/// The values whose float data the calibration needs: every result of a native node and every
/// non-parameter operand of one. The second list names those that become payloads.
fn probed_values(g: &Graph, native: &BTreeSet<NodeIndex>) -> (BTreeSet<Value>, BTreeSet<Value>) {
    let readers = all_readers(g);
    let mut all = BTreeSet::new();
    let mut encoded = BTreeSet::new();
    for &n in native {
        let node = g.node(n);
        for port in 0..node.results.len() as u32 {
            let v = Value { node: n, port };
            all.insert(v);
            // Read by a linear or by a non-native node: it travels as events.
            let leaves = readers.get(&n).into_iter().flatten().any(|(r, p)| {
                p.src == port && (!native.contains(r) || matches!(g.node(*r).op, Op::Linear { .. }))
            }) || g.outputs.iter().any(|(_, o)| *o == v);
            if leaves && !is_final_state(g, v) {
                encoded.insert(v);
            }
        }
        for (slot, v) in g.operands(n).into_iter().enumerate() {
            if native.contains(&v.node) || matches!(g.node(v.node).op, Op::Param { .. }) {
                continue;
            }
            all.insert(v);
            if matches!(node.op, Op::Linear { .. }) && slot == 0 {
                encoded.insert(v);
            }
        }
    }
    (all, encoded)
}

fn is_final_state(g: &Graph, v: Value) -> bool {
    match &g.node(v.node).op {
        Op::Scan { emit, .. } => v.port as usize >= emit.len(),
        _ => false,
    }
}

/// A copy of `g` whose extra outputs are the values the calibration needs.
pub fn probe_graph(g: &Graph) -> Result<Graph, IrError> {
    let native = native_nodes(g)?;
    let (all, _) = probed_values(g, &native);
    let mut p = g.clone();
    for v in all {
        p.set_output(&probe_name(v), v);
    }
    Ok(p)
}

/// Collect statistics from the outputs of a run of [`probe_graph`] (taken: the samples kept
/// are the run's own buffers, not copies — the 0.9B model probes ~1,000 values).
pub fn calibrate(g: &Graph, mut outputs: BTreeMap<String, Tensor>) -> Result<Calibration, IrError> {
    let native = native_nodes(g)?;
    let (all, encoded) = probed_values(g, &native);
    let mut cal = Calibration::default();
    for v in all {
        let name = probe_name(v);
        let t = outputs.remove(&name).ok_or_else(|| IrError::Graph(format!("calibration run has no output `{name}`")))?;
        let c = t.shape.last().copied().unwrap_or(1).max(1);
        let data = match t.data {
            sparkc_ir::tensor::TensorData::F32(d) => d,
            sparkc_ir::tensor::TensorData::I64(d) => d.into_iter().map(|x| x as f32).collect(),
        };
        let mut max_abs = vec![0f64; c];
        for (i, &x) in data.iter().enumerate() {
            let a = (x as f64).abs();
            if a.is_finite() && a > max_abs[i % c] {
                max_abs[i % c] = a;
            }
        }
        let samples = if encoded.contains(&v) { data } else { Vec::new() };
        cal.values.insert(v, ChannelStats { channels: c, max_abs, samples });
    }
    Ok(cal)
}

/// The quantization error of one layer on the calibration data.
#[derive(Clone, Debug)]
pub struct LayerError {
    /// The node that produces the value (or the linear, for weights).
    pub name: String,
    /// `leak` (neuron output payload), `activation`, `spike`, `input` (payload from a
    /// management core) or `weights`.
    pub kind: &'static str,
    pub bits: u32,
    pub channels: usize,
    pub max_abs_error: f64,
    pub mean_abs_error: f64,
    pub snr_db: f64,
    /// Fraction of zero payloads (events that are not sent); `None` for weights.
    pub suppressed: Option<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct QuantReport {
    pub frac: u32,
    pub state_bits: u32,
    pub layers: Vec<LayerError>,
    /// Parameters whose values did not fit their format and were saturated.
    pub saturated: Vec<String>,
}

/// The quantized graph and its parameters (integer constants as integer-valued f32).
pub struct Quantized {
    pub graph: Graph,
    pub params: BTreeMap<String, Tensor>,
    pub report: QuantReport,
}

/// How a native value is carried as events: the payload value and the float size of one unit
/// per channel (exactly what the encoding multiplier implies).
#[derive(Clone)]
struct Payload {
    value: Value,
    scale: Vec<f64>,
}

struct Rewriter<'a> {
    src: &'a Graph,
    /// The float parameters; a native layer's weights are taken out and quantized in place.
    params: BTreeMap<String, Tensor>,
    /// How many operands read each parameter (a weight read once can be taken).
    param_uses: HashMap<String, usize>,
    cal: &'a Calibration,
    cfg: &'a QuantConfig,
    native: BTreeSet<NodeIndex>,
    frac: u32,
    out: Graph,
    qparams: BTreeMap<String, Tensor>,
    float_of: HashMap<Value, Value>,
    fixed_of: HashMap<Value, Value>,
    payload_of: HashMap<Value, Payload>,
    qparam_of: HashMap<String, Value>,
    /// Native values computed from a neuron's state (their payloads are leak currents).
    from_scan: HashSet<Value>,
    /// Unique names of the source nodes, for the names of what the pass creates.
    labels: HashMap<NodeIndex, String>,
    report: QuantReport,
}

/// Quantize `g`. The parameters are taken: weights that only one layer reads are rounded in
/// place (a large model is not copied).
pub fn quantize(g: &Graph, params: BTreeMap<String, Tensor>, cal: &Calibration, cfg: &QuantConfig) -> Result<Quantized, QuantError> {
    if !(2..=48).contains(&cfg.state_bits) || !(2..=16).contains(&cfg.weight_bits) {
        return Err(QuantError::Msg(format!("state bits must be 2..=48 and weight bits 2..=16, got {} and {}", cfg.state_bits, cfg.weight_bits)));
    }
    for (what, b) in [("leak", cfg.leak_bits), ("activation", cfg.act_bits)] {
        if !(2..=32).contains(&b) {
            return Err(QuantError::Msg(format!("{what} payload bits must be 2..=32, got {b}")));
        }
    }
    let native = native_nodes(g)?;
    let frac = match cfg.frac {
        Some(f) => f,
        None => choose_frac(cal, cfg.state_bits),
    };
    let mut out = Graph::new(&format!("{}_q", g.name));
    out.dims = g.dims.clone();
    let mut param_uses: HashMap<String, usize> = HashMap::new();
    for n in g.g.node_indices() {
        for v in g.operands(n) {
            if let Op::Param { name } = &g.node(v.node).op {
                *param_uses.entry(name.clone()).or_default() += 1;
            }
        }
    }
    let mut rw = Rewriter {
        src: g,
        params,
        param_uses,
        cal,
        cfg,
        native,
        frac,
        out,
        qparams: BTreeMap::new(),
        float_of: HashMap::new(),
        fixed_of: HashMap::new(),
        payload_of: HashMap::new(),
        qparam_of: HashMap::new(),
        from_scan: HashSet::new(),
        labels: unique_labels(g),
        report: QuantReport { frac, state_bits: cfg.state_bits, ..Default::default() },
    };
    for n in g.topo_order()? {
        rw.node(n)?;
    }
    for (name, v) in &g.outputs {
        let f = rw.float(*v)?;
        rw.out.set_output(name, f);
    }
    sparkc_ir::verify::verify(&rw.out)?;
    Ok(Quantized { graph: rw.out, params: rw.qparams, report: rw.report })
}

/// The largest fractional width at which every calibrated value (what native nodes compute or
/// read) fits the state width with one bit of headroom.
fn choose_frac(cal: &Calibration, state_bits: u32) -> u32 {
    let m = cal.values.values().flat_map(|st| st.max_abs.iter().copied()).fold(1e-3f64, f64::max);
    let int_bits = m.log2().ceil().max(0.0) as i64 + 2;
    (state_bits as i64 - int_bits).clamp(0, 40) as u32
}

/// Node names, made unique (`name#index`) where empty or repeated.
fn unique_labels(g: &Graph) -> HashMap<NodeIndex, String> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for n in g.g.node_indices() {
        *count.entry(g.node(n).name.as_str()).or_default() += 1;
    }
    g.g.node_indices()
        .map(|n| {
            let name = &g.node(n).name;
            let l = if name.is_empty() || count[name.as_str()] > 1 { format!("{name}#{}", n.index()) } else { name.clone() };
            (n, l)
        })
        .collect()
}

fn err_node(node: &str, msg: impl Into<String>) -> QuantError {
    QuantError::Node { node: node.to_string(), msg: msg.into() }
}

impl Rewriter<'_> {
    fn fx_max(&self) -> f64 {
        ((1i64 << (self.cfg.state_bits - 1)) - 1) as f64
    }

    /// round(x·2^frac) saturated to the state width (the same rule as `quantize`).
    fn q(&self, x: f64) -> f64 {
        let m = self.fx_max();
        (x * (self.frac as f64).exp2()).clamp(-m, m).round()
    }

    /// A parameter's tensor to rewrite: moved out when this is its last reader, else copied.
    fn take_param(&mut self, v: Value) -> Result<Tensor, QuantError> {
        let (name, _) = self.src_param(v)?;
        let name = name.to_string();
        let uses = self.param_uses.get_mut(&name).expect("counted");
        *uses -= 1;
        Ok(if *uses == 0 { self.params.remove(&name).expect("checked") } else { self.params[&name].clone() })
    }

    fn src_param(&self, v: Value) -> Result<(&str, &Tensor), QuantError> {
        let node = self.src.node(v.node);
        let Op::Param { name } = &node.op else {
            return Err(err_node(&node.name, "expected a parameter"));
        };
        let t = self.params.get(name).ok_or_else(|| QuantError::Msg(format!("missing parameter `{name}`")))?;
        if t.as_f32().is_none() {
            return Err(QuantError::Msg(format!("parameter `{name}` must be f32")));
        }
        Ok((name, t))
    }

    /// A new parameter from a tensor.
    fn const_tensor(&mut self, name: &str, t: Tensor) -> Result<Value, QuantError> {
        let v = self.out.param(name, ValueType::f32(t.shape.clone()))?;
        self.qparams.insert(name.to_string(), t);
        self.qparam_of.insert(name.to_string(), v);
        Ok(v)
    }

    /// A new f32 parameter of integer values.
    fn const_param(&mut self, name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<Value, QuantError> {
        if let Some(&v) = self.qparam_of.get(name) {
            return Ok(v);
        }
        let v = self.out.param(name, ValueType::f32(shape.clone()))?;
        self.qparams.insert(name.to_string(), Tensor::f32(shape, data));
        self.qparam_of.insert(name.to_string(), v);
        Ok(v)
    }

    /// A float value of the new graph for source value `v` (decoding native values).
    fn float(&mut self, v: Value) -> Result<Value, QuantError> {
        if let Some(&f) = self.float_of.get(&v) {
            return Ok(f);
        }
        let node = self.src.node(v.node).clone();
        let f = match &node.op {
            Op::Param { name } => {
                let t = self.params.get(name).ok_or_else(|| QuantError::Msg(format!("missing parameter `{name}`")))?.clone();
                let nv = self.out.param(name, node.results[0].clone())?;
                self.qparams.insert(name.clone(), t);
                nv
            }
            _ if self.native.contains(&v.node) => {
                if is_final_state(self.src, v) {
                    // Carried state is read out exactly (it is not an event).
                    let fixed = self.fixed_of[&v];
                    let cast = self.out.add1(Op::Cast { to: DType::F32 }, &[fixed], &format!("{}.state_out", node.name))?;
                    let e = Expr::bin(BinOp::Mul, Expr::var("x0"), Expr::c((-(self.frac as f64)).exp2()));
                    self.out.add1(Op::Map { expr: e }, &[cast], &format!("{}.state_out.scale", node.name))?
                } else {
                    let p = self.payload(v)?;
                    let c = p.scale.len();
                    let scale = self.const_param(&format!("{}.{}.scale", self.labels[&v.node], v.port), vec![c], p.scale.iter().map(|&s| s as f32).collect())?;
                    let cast = self.out.add1(Op::Cast { to: DType::F32 }, &[p.value], &format!("{}.decode", node.name))?;
                    self.out.add1(Op::Map { expr: parse_expr("x0 * x1").expect("valid") }, &[cast, scale], &format!("{}.decode.scale", node.name))?
                }
            }
            _ => return Err(err_node(&node.name, format!("value {v:?} is used before it is defined"))),
        };
        self.float_of.insert(v, f);
        Ok(f)
    }

    /// A fixed-point value for source value `v` (quantizing float values: a management core
    /// or the host writing into neuron state).
    fn fixed(&mut self, v: Value) -> Result<Value, QuantError> {
        if let Some(&f) = self.fixed_of.get(&v) {
            return Ok(f);
        }
        let fl = self.float(v)?;
        let name = format!("{}.quantize", self.src.node(v.node).name);
        let q = self.out.add1(Op::Quantize { frac: self.frac, bits: self.cfg.state_bits }, &[fl], &name)?;
        self.fixed_of.insert(v, q);
        Ok(q)
    }

    /// A fixed-point per-channel parameter (operand of a fixed map).
    fn fixed_param(&mut self, v: Value) -> Result<Value, QuantError> {
        let (name, t) = self.src_param(v)?;
        let qname = format!("{name}.q");
        let data: Vec<f32> = t.as_f32().expect("checked").iter().map(|&x| self.q(x as f64) as f32).collect();
        let shape = t.shape.clone();
        self.const_param(&qname, shape, data)
    }

    /// The payload through which `v` travels as events (created once, shared by all readers).
    fn payload(&mut self, v: Value) -> Result<Payload, QuantError> {
        if let Some(p) = self.payload_of.get(&v) {
            return Ok(p.clone());
        }
        let node = self.src.node(v.node).clone();
        let native = self.native.contains(&v.node);
        let mut fixed = self.fixed(v)?;
        // A synapse layer's sum leaves its neurons through an identity compartment.
        if native && matches!(self.out.node(fixed.node).op, Op::SynapseLinear { .. }) {
            let e = Expr::var("x0");
            fixed = self.out.add1(Op::FixedMap { expr: e, frac: self.frac, bits: self.cfg.state_bits }, &[fixed], &format!("{}.relay", node.name))?;
        }
        let spike = match &node.op {
            Op::Scan { neuron, emit, .. } => {
                let m = &self.src.neurons[neuron];
                m.output(&emit[v.port as usize]).is_some_and(|o| o.expr == Expr::var(SPIKE))
            }
            _ => false,
        };
        let stats = self.cal.values.get(&v).cloned().unwrap_or_default();
        let c = self.src.value_type(v).shape.last().and_then(|d| d.resolve_const(&self.src.dims)).unwrap_or(stats.channels.max(1));
        let (bits, kind, mult, shift, scale) = if spike {
            // z is exactly 1.0: payload 1, no scale.
            (1, "spike", vec![1.0; c], self.frac, vec![1.0; c])
        } else {
            let (bits, kind) = if !native {
                (self.cfg.act_bits, "input")
            } else if self.from_scan.contains(&v) {
                (self.cfg.leak_bits, "leak")
            } else {
                (self.cfg.act_bits, "activation")
            };
            let mut clip = clip_per_channel(&stats, c, bits);
            // Room for values the calibration did not see, where the payload has the bits.
            if bits >= self.cfg.headroom_min_bits {
                clip.iter_mut().for_each(|x| *x *= self.cfg.headroom);
            }
            let qmax = ((1i64 << (bits - 1)) - 1) as f64;
            let unit: Vec<f64> = clip.iter().map(|&m| if m > 0.0 { m / qmax } else { 1.0 }).collect();
            // payload = x_q·mult / 2^shift with mult/2^shift = 1 / (unit·2^frac), mult < 2^24.
            let two_f = (self.frac as f64).exp2();
            let min_unit = unit.iter().copied().fold(f64::INFINITY, f64::min);
            let shift = (23.0 + (min_unit * two_f).log2()).floor().clamp(0.0, 62.0) as u32;
            let mult: Vec<f64> = unit.iter().map(|&u| (shift as f64).exp2() / (u * two_f)).map(|m| m.round().clamp(1.0, (1u64 << 24) as f64 - 1.0)).collect();
            let scale: Vec<f64> = mult.iter().map(|&m| (shift as f64).exp2() / (m * two_f)).collect();
            (bits, kind, mult, shift, scale)
        };
        let mp = self.const_param(&format!("{}.{}.payload_mult", self.labels[&v.node], v.port), vec![c], mult.iter().map(|&m| m as f32).collect())?;
        let value = self.out.add1(Op::GradedSpike { bits, shift }, &[fixed, mp], &format!("{}.spikes", node.name))?;
        self.report_payload(&node.name, kind, bits, &stats, &scale);
        let p = Payload { value, scale };
        self.payload_of.insert(v, p.clone());
        Ok(p)
    }

    fn report_payload(&mut self, name: &str, kind: &'static str, bits: u32, st: &ChannelStats, scale: &[f64]) {
        let c = scale.len().max(1);
        let (lo, hi) = if bits == 1 { (0.0, 1.0) } else {
            let q = ((1i64 << (bits - 1)) - 1) as f64;
            (-q, q)
        };
        let mut e = ErrAcc::default();
        let mut zeros = 0usize;
        for (i, &x) in st.samples.iter().enumerate() {
            let s = scale[i % c];
            let p = ((x as f64) / s).round().clamp(lo, hi);
            zeros += (p == 0.0) as usize;
            e.add(x as f64, p * s);
        }
        let n = st.samples.len();
        let mut l = e.finish(name, kind, bits, c);
        l.suppressed = Some(if n == 0 { 0.0 } else { zeros as f64 / n as f64 });
        self.report.layers.push(l);
    }

    fn node(&mut self, n: NodeIndex) -> Result<(), QuantError> {
        let node = self.src.node(n).clone();
        let ops = self.src.operands(n);
        if !self.native.contains(&n) {
            return match &node.op {
                Op::Param { .. } => Ok(()), // created when read
                Op::Input { name } => {
                    let v = self.out.input(name, node.results[0].clone());
                    self.float_of.insert(Value { node: n, port: 0 }, v);
                    Ok(())
                }
                op => {
                    let operands: Vec<Value> = ops.iter().map(|&v| self.float(v)).collect::<Result<_, _>>()?;
                    let results = self.out.add(op.clone(), &operands, &node.name)?;
                    for (port, r) in results.into_iter().enumerate() {
                        self.float_of.insert(Value { node: n, port: port as u32 }, r);
                    }
                    Ok(())
                }
            };
        }
        let (fr, bits) = (self.frac, self.cfg.state_bits);
        match &node.op {
            Op::Scan { neuron, emit, scope } => {
                let model = &self.src.neurons[neuron];
                let (qmodel, sources) = hoist(model);
                self.out.add_neuron(qmodel.clone())?;
                let (ni, np) = (model.inputs.len(), model.params.len());
                let mut operands = Vec::new();
                for &v in &ops[..ni] {
                    operands.push(self.fixed(v)?);
                }
                let decays = decay_params(&qmodel);
                let thresholds: BTreeSet<String> = qmodel.threshold.vars().into_iter().filter(|v| qmodel.params.contains(v)).collect();
                let channels = node.results[0].shape.last().and_then(|d| d.resolve_const(&self.src.dims)).ok_or_else(|| err_node(&node.name, "channels must be a fixed size"))?;
                // Per channel: the original parameters, then the hoisted lets in order.
                let mut env: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); channels];
                for (k, &v) in ops[ni..ni + np].iter().enumerate() {
                    let (_, t) = self.src_param(v)?;
                    let d = t.as_f32().expect("checked");
                    if d.len() != channels {
                        return Err(err_node(&node.name, format!("parameter `{}` has {} values for {channels} channels", model.params[k], d.len())));
                    }
                    for (c, e) in env.iter_mut().enumerate() {
                        e.insert(model.params[k].clone(), d[c] as f64);
                    }
                }
                for (name, src) in &sources {
                    if let ParamSource::Let(expr) = src {
                        for e in env.iter_mut() {
                            let x = expr.eval(&|v| e.get(v).copied().unwrap_or(f64::NAN));
                            e.insert(name.clone(), x);
                        }
                    }
                }
                let db = (self.cfg.decay_bits as f64).exp2();
                // A threshold is a `threshold_bits` mantissa shifted to the state's top bits
                // (Loihi: 17 bits << 6 in a 24-bit state): its low bits are zero.
                let tshift = (self.cfg.state_bits - 1).saturating_sub(self.cfg.threshold_bits);
                let tstep = (tshift as f64).exp2();
                let mant = if self.cfg.threshold_signed { self.cfg.threshold_bits.saturating_sub(1) } else { self.cfg.threshold_bits };
                let tmax = ((1u64 << mant.min(47)) - 1) as f64 * tstep;
                let tmin = if self.cfg.threshold_signed { -tmax } else { 0.0 };
                for p in &qmodel.params {
                    let mut saturated = false;
                    let data: Vec<f32> = env
                        .iter()
                        .map(|e| {
                            let mut x = e[p];
                            if decays.contains(p) {
                                x = (x * db).round() / db;
                            }
                            let mut q = self.q(x);
                            if thresholds.contains(p) {
                                q = (q / tstep).round() * tstep;
                                if q < tmin || q > tmax {
                                    saturated = true;
                                    q = q.clamp(tmin, tmax);
                                }
                            }
                            q as f32
                        })
                        .collect();
                    let pname = format!("{}.{p}.q", self.labels[&n]);
                    if saturated {
                        self.report.saturated.push(pname.clone());
                    }
                    let v = self.const_param(&pname, vec![channels], data)?;
                    operands.push(v);
                }
                for &v in &ops[ni + np..] {
                    operands.push(self.fixed(v)?);
                }
                let op = Op::FixedScan { neuron: qmodel.name.clone(), emit: emit.clone(), scope: *scope, frac: fr, bits };
                let results = self.out.add(op, &operands, &node.name)?;
                for (port, r) in results.into_iter().enumerate() {
                    let v = Value { node: n, port: port as u32 };
                    self.fixed_of.insert(v, r);
                    if port < emit.len() {
                        self.from_scan.insert(v);
                    }
                }
            }
            Op::Map { expr } => {
                let mut operands = Vec::new();
                let mut derived = false;
                for &v in &ops {
                    if self.native.contains(&v.node) {
                        derived |= self.from_scan.contains(&v);
                        operands.push(self.fixed(v)?);
                    } else {
                        operands.push(self.fixed_param(v)?);
                    }
                }
                let r = self.out.add1(Op::FixedMap { expr: expr.clone(), frac: fr, bits }, &operands, &node.name)?;
                let v = Value { node: n, port: 0 };
                self.fixed_of.insert(v, r);
                if derived {
                    self.from_scan.insert(v);
                }
            }
            Op::Linear { bias } => {
                let p = self.payload(ops[0])?;
                let mut wt = self.take_param(ops[1])?;
                let (o, i) = (wt.shape[0], wt.shape[1]);
                let w = wt.as_f32_mut().expect("checked");
                let wmax = ((1i64 << (self.cfg.weight_bits - 1)) - 1) as f64;
                // The effective weight w·(input unit) is what the integer sum multiplies.
                let scale = &p.scale;
                let row_max: Vec<f64> = {
                    let w: &[f32] = w;
                    par_rows(o, |rows| {
                        rows.map(|r| row_abs_max(&w[r * i..(r + 1) * i], scale)).collect::<Vec<_>>()
                    })
                    .concat()
                };
                let unit: Vec<f64> = match self.cfg.weight_scale {
                    WeightScale::PerChannel => row_max.iter().map(|&m| if m > 0.0 { m / wmax } else { 1.0 }).collect(),
                    WeightScale::PerLayerPow2 => {
                        let m = row_max.iter().copied().fold(0f64, f64::max);
                        let u = if m > 0.0 { (m / wmax).log2().ceil().exp2() } else { 1.0 };
                        vec![u; o]
                    }
                };
                let e = quantize_rows(w, scale, &unit, wmax, i);
                self.report.layers.push(e.finish(&node.name, "weights", self.cfg.weight_bits, o));
                // y_q = acc·unit·2^frac = acc·mult / 2^shift, mult < 2^24.
                let two_f = (fr as f64).exp2();
                let max_r = unit.iter().map(|&u| u * two_f).fold(0f64, f64::max);
                let shift = (23.0 - max_r.log2()).floor().clamp(0.0, 62.0) as u32;
                let mult: Vec<f32> = unit.iter().map(|&u| (u * two_f * (shift as f64).exp2()).round().min((1u64 << 24) as f64 - 1.0) as f32).collect();
                let wv = self.const_tensor(&format!("{}.weight.q", self.labels[&n]), wt)?;
                let mv = self.const_param(&format!("{}.dendrite_mult", self.labels[&n]), vec![o], mult)?;
                let mut operands = vec![p.value, wv, mv];
                if *bias {
                    let (_, bt) = self.src_param(ops[2])?;
                    let b: Vec<f32> = bt.as_f32().expect("checked").iter().map(|&x| self.q(x as f64) as f32).collect();
                    operands.push(self.const_param(&format!("{}.bias.q", self.labels[&n]), vec![o], b)?);
                }
                let r = self.out.add1(Op::SynapseLinear { bias: *bias, shift, bits }, &operands, &node.name)?;
                self.fixed_of.insert(Value { node: n, port: 0 }, r);
            }
            other => return Err(err_node(&node.name, format!("`{}` cannot run natively", other.name()))),
        }
        Ok(())
    }
}

/// Run `f` over `n` rows split into one contiguous range per available core.
fn par_rows<T: Send>(n: usize, f: impl Fn(std::ops::Range<usize>) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.max(1));
    let per = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n.div_ceil(per)).map(|t| {
            let f = &f;
            s.spawn(move || f(t * per..((t + 1) * per).min(n)))
        }).collect();
        handles.into_iter().map(|h| h.join().expect("a quantization thread panicked")).collect()
    })
}

/// Round each row of w·scale to its unit, clamped to ±wmax, in place; the error of the
/// weights (in their own units) is returned.
fn quantize_rows(w: &mut [f32], scale: &[f64], unit: &[f64], wmax: f64, i: usize) -> ErrAcc {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows = unit.len();
    let per = rows.div_ceil(threads.max(1)).max(1);
    let inv_scale: Vec<f64> = scale.iter().map(|&s| 1.0 / s).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = w
            .chunks_mut(per * i.max(1))
            .enumerate()
            .map(|(t, chunk)| {
                let inv_scale = &inv_scale;
                s.spawn(move || {
                    let mut e = ErrAcc::default();
                    #[cfg(target_arch = "x86_64")]
                    let wide = std::arch::is_x86_feature_detected!("avx2");
                    for (rr, row) in chunk.chunks_mut(i.max(1)).enumerate() {
                        let u = unit[t * per + rr];
                        #[cfg(target_arch = "x86_64")]
                        if wide {
                            // SAFETY: the CPU has AVX2 (checked above).
                            e = e.merge(&unsafe { quantize_row_avx2(row, scale, inv_scale, u, wmax) });
                            continue;
                        }
                        e = e.merge(&quantize_row(row, scale, inv_scale, u, wmax));
                    }
                    e
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a quantization thread panicked")).fold(ErrAcc::default(), |a, b| a.merge(&b))
    })
}

/// [`quantize_row`] compiled for AVX2 (4 f64 lanes instead of baseline SSE2's 2); same
/// arithmetic, same results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(row: &mut [f32], scale: &[f64], inv_scale: &[f64], u: f64, wmax: f64) -> ErrAcc {
    quantize_row(row, scale, inv_scale, u, wmax)
}

/// One row of [`quantize_rows`], in `LANES` independent accumulators so that the compiler
/// vectorises it (874 M weights in the 0.9B model); the lane order is fixed, so results are
/// deterministic.
#[inline(always)]
fn quantize_row(row: &mut [f32], scale: &[f64], inv_scale: &[f64], u: f64, wmax: f64) -> ErrAcc {
    const LANES: usize = 8;
    // 2^52: adding and subtracting it rounds an f64 below 2^52 to an integer without a libm call.
    const MAGIC: f64 = 4_503_599_627_370_496.0;
    let inv_u = 1.0 / u;
    let (mut max, mut sum, mut sig, mut noise) = ([0f64; LANES], [0f64; LANES], [0f64; LANES], [0f64; LANES]);
    let mut one = |q: &mut f32, s: f64, is: f64, l: usize| {
        let x = *q as f64;
        let y = (x * s * inv_u).clamp(-wmax, wmax);
        // Half away from zero, as `round`: floor(|y| + 0.5) with the sign put back.
        let t = y.abs() + 0.5;
        let r = (t + MAGIC) - MAGIC;
        let fl = if r > t { r - 1.0 } else { r };
        let v = fl.copysign(y);
        *q = v as f32;
        let d = (x - v * u * is).abs();
        max[l] = if d > max[l] { d } else { max[l] };
        sum[l] += d;
        sig[l] += x * x;
        noise[l] += d * d;
    };
    let n = row.len();
    let full = n / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        for l in 0..LANES {
            one(&mut row[c + l], scale[c + l], inv_scale[c + l], l);
        }
    }
    for k in full..n {
        one(&mut row[k], scale[k], inv_scale[k], 0);
    }
    let mut e = ErrAcc { n, ..ErrAcc::default() };
    for l in 0..LANES {
        e.max = e.max.max(max[l]);
        e.sum += sum[l];
        e.sig += sig[l];
        e.noise += noise[l];
    }
    e
}

/// max_k |w[k]·scale[k]| in lanes (vectorised, exact: max does not depend on order).
fn row_abs_max(w: &[f32], scale: &[f64]) -> f64 {
    const LANES: usize = 8;
    let mut m = [0f64; LANES];
    let (cw, cs) = (w.chunks_exact(LANES), scale.chunks_exact(LANES));
    let tail = cw.remainder().iter().zip(cs.remainder()).fold(0f64, |a, (&x, &s)| a.max((x as f64 * s).abs()));
    for (xw, xs) in cw.zip(cs) {
        for l in 0..LANES {
            let v = (xw[l] as f64 * xs[l]).abs();
            m[l] = if v > m[l] { v } else { m[l] };
        }
    }
    m.iter().fold(tail, |a, &b| a.max(b))
}

/// Per-channel clipping magnitudes that minimise the squared quantization error of the samples
/// at `bits` (searching fractions of the channel's max |x|); the max |x| without samples.
fn clip_per_channel(st: &ChannelStats, c: usize, bits: u32) -> Vec<f64> {
    let mut clip: Vec<f64> = (0..c).map(|k| st.max_abs.get(k).copied().unwrap_or(0.0)).collect();
    if st.samples.is_empty() || st.channels != c {
        return clip;
    }
    let qmax = ((1i64 << (bits - 1)) - 1) as f64;
    let rows = st.samples.len() / c;
    for (k, m) in clip.iter_mut().enumerate() {
        if *m <= 0.0 {
            continue;
        }
        let xs: Vec<f64> = (0..rows).map(|r| st.samples[r * c + k] as f64).collect();
        let mut best = (f64::INFINITY, *m);
        for step in 0..12 {
            let cand = *m * (1.0 - 0.06 * step as f64);
            let s = cand / qmax;
            let err: f64 = xs.iter().map(|&x| {
                let y = (x / s).round().clamp(-qmax, qmax) * s;
                (x - y) * (x - y)
            }).sum();
            if err < best.0 {
                best = (err, cand);
            }
        }
        *m = best.1;
    }
    clip
}

#[derive(Default)]
struct ErrAcc {
    n: usize,
    max: f64,
    sum: f64,
    sig: f64,
    noise: f64,
}

impl ErrAcc {
    fn add(&mut self, x: f64, y: f64) {
        let d = (x - y).abs();
        self.n += 1;
        self.max = self.max.max(d);
        self.sum += d;
        self.sig += x * x;
        self.noise += d * d;
    }

    fn merge(mut self, o: &ErrAcc) -> ErrAcc {
        self.n += o.n;
        self.max = self.max.max(o.max);
        self.sum += o.sum;
        self.sig += o.sig;
        self.noise += o.noise;
        self
    }

    fn finish(&self, name: &str, kind: &'static str, bits: u32, channels: usize) -> LayerError {
        let snr = if self.noise == 0.0 { f64::INFINITY } else { 10.0 * (self.sig / self.noise).log10() };
        LayerError {
            name: name.to_string(),
            kind,
            bits,
            channels,
            max_abs_error: self.max,
            mean_abs_error: if self.n == 0 { 0.0 } else { self.sum / self.n as f64 },
            snr_db: snr,
            suppressed: None,
        }
    }
}

/// Where a parameter of a hoisted model comes from.
#[derive(Clone, Debug)]
enum ParamSource {
    Original,
    Let(Expr),
}

/// Move the lets that read only parameters out of the step: they become per-channel
/// parameters computed once at compile time (β = σ(w) is a constant decay, not a per-step
/// sigmoid). Returns the model (named `<model>_q`) and the source of each new parameter.
fn hoist(model: &NeuronModel) -> (NeuronModel, Vec<(String, ParamSource)>) {
    let mut constant: BTreeSet<String> = model.params.iter().cloned().collect();
    let mut hoisted = Vec::new();
    let mut lets = Vec::new();
    for b in &model.lets {
        if b.expr.vars().iter().all(|v| constant.contains(v)) {
            constant.insert(b.name.clone());
            hoisted.push((b.name.clone(), ParamSource::Let(b.expr.clone())));
        } else {
            lets.push(b.clone());
        }
    }
    let mut used: BTreeSet<String> = BTreeSet::new();
    for e in lets.iter().chain(&model.charge).chain(&model.outputs).map(|b| &b.expr).chain(std::iter::once(&model.threshold)) {
        used.extend(e.vars());
    }
    let mut sources: Vec<(String, ParamSource)> = model.params.iter().filter(|p| used.contains(*p)).map(|p| (p.clone(), ParamSource::Original)).collect();
    let all_hoisted = hoisted.clone();
    sources.extend(hoisted.into_iter().filter(|(n, _)| used.contains(n)));
    let mut q = model.clone();
    q.name = format!("{}_q", model.name);
    q.params = sources.iter().map(|(n, _)| n.clone()).collect();
    q.lets = lets;
    // Sources must evaluate every hoisted let, used or not, in order.
    let mut full: Vec<(String, ParamSource)> = sources.clone();
    for (n, s) in all_hoisted {
        if !full.iter().any(|(m, _)| *m == n) {
            full.push((n, s));
        }
    }
    full.sort_by_key(|(n, _)| model.lets.iter().position(|b| b.name == *n).map_or(0, |p| p + 1));
    (q, full)
}

/// Parameters that multiply a state variable in its own charge (`β·v`): decays.
fn decay_params(m: &NeuronModel) -> BTreeSet<String> {
    fn walk(e: &Expr, state: &str, params: &[String], out: &mut BTreeSet<String>) {
        match e {
            Expr::Bin(BinOp::Mul, a, b) => {
                for (x, y) in [(a, b), (b, a)] {
                    if let (Expr::Var(p), Expr::Var(s)) = (&**x, &**y) {
                        if s == state && params.contains(p) {
                            out.insert(p.clone());
                        }
                    }
                }
                walk(a, state, params, out);
                walk(b, state, params, out);
            }
            Expr::Bin(_, a, b) => {
                walk(a, state, params, out);
                walk(b, state, params, out);
            }
            Expr::Un(_, a) => walk(a, state, params, out),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for b in &m.charge {
        walk(&b.expr, &b.name, &m.params, &mut out);
    }
    out
}

trait ResolveConst {
    fn resolve_const(&self, dims: &sparkc_ir::types::DimBindings) -> Option<usize>;
}

impl ResolveConst for sparkc_ir::Dim {
    fn resolve_const(&self, dims: &sparkc_ir::types::DimBindings) -> Option<usize> {
        sparkc_ir::types::resolve_dim(self, dims).as_const().map(|c| c as usize)
    }
}

/// The shape of a value with the graph's dims applied.
pub fn resolved_shape(g: &Graph, v: Value) -> Shape {
    g.value_type(v).shape.resolve(&g.dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkc_ir::neuron;

    #[test]
    fn hoists_the_decay_of_plif() {
        let (q, src) = hoist(&neuron::plif());
        assert_eq!(q.params, vec!["v_th".to_string(), "beta".to_string()]);
        assert!(q.lets.is_empty());
        assert!(matches!(src.iter().find(|(n, _)| n == "beta").unwrap().1, ParamSource::Let(_)));
        assert_eq!(decay_params(&q), BTreeSet::from(["beta".to_string()]));
    }

    #[test]
    fn clipping_prefers_the_bulk_over_an_outlier() {
        let mut samples = vec![0.1f32; 999];
        samples.push(10.0);
        let st = ChannelStats { channels: 1, max_abs: vec![10.0], samples };
        let clip = clip_per_channel(&st, 1, 4);
        assert!(clip[0] <= 10.0);
    }
}
