//! NIR graph → IR graph and parameters.
//!
//! Time: one IR frame per NIR time step (K = 1), so every value is `f32[B,T,1,N]` with N the
//! number of elements of the NIR shape in row-major order (this makes `Flatten` the identity).
//! Nested graphs are inlined (`<graph>.<node>`), several edges into one node are summed.
//! Affine / Linear become `linear` ops with parameters `<node>.weight` / `<node>.bias`; Scale
//! and Threshold element-wise maps; neurons scans of a model from [`discretize`] whose
//! state is carried through graph inputs / outputs `state.<node>.<var>` (zeros start a
//! sequence). Root `Input` nodes become graph inputs and root `Output` nodes graph outputs,
//! under their NIR names.

use super::discretize::{neuron_model, Discretisation, NeuronKind, ResetForm, Scheme};
use super::error::{Diagnostic, NirError, Severity};
use super::model::{Array, NirFile, NirGraph, NodeKind};
use super::schema::Mode;
use super::types::{join, GraphTypes};
use crate::neuronspark::STATE_PREFIX;
use sparkc_ir::{parse_expr, DType, Dim, Graph, Op, Shape, StateScope, Tensor, Value, ValueType};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub disc: Discretisation,
    /// Lenient also broadcasts one-element neuron parameters (snnTorch's 0-d `beta` exports)
    /// and accepts edges whose shapes differ but hold as many elements.
    pub mode: Mode,
    /// Name of the IR graph.
    pub name: String,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { disc: Discretisation::default(), mode: Mode::Strict, name: "nir".into() }
    }
}

/// The imported network.
#[derive(Clone, Debug)]
pub struct Imported {
    pub graph: Graph,
    pub params: BTreeMap<String, Tensor>,
    pub disc: Discretisation,
    /// Graph inputs and outputs (without the carried state) with their channel counts.
    pub inputs: Vec<(String, usize)>,
    pub outputs: Vec<(String, usize)>,
    /// What the import decided that a reader should know (e.g. Euler instability).
    pub notes: Vec<String>,
}

/// One node of the inlined graph.
struct Flat<'a> {
    kind: &'a NodeKind,
    /// Whether it is the root graph's Input / Output (a graph port) rather than a nested one.
    root: bool,
    input: Option<Vec<i64>>,
    output: Option<Vec<i64>>,
}

struct Flattener<'a> {
    nodes: BTreeMap<String, Flat<'a>>,
    edges: Vec<(String, String)>,
    diags: Vec<Diagnostic>,
}

impl<'a> Flattener<'a> {
    /// Inline `graph` under `prefix`; returns the (entry, exit) node of a nested graph.
    fn add_graph(&mut self, graph: &'a NirGraph, types: &GraphTypes, prefix: &str) -> Option<(String, String)> {
        let root = prefix.is_empty();
        let mut entry = Vec::new();
        let mut exit = Vec::new();
        // Where an edge to or from a nested graph node really goes.
        let mut ports: BTreeMap<&str, (String, String)> = BTreeMap::new();
        for (name, n) in &graph.nodes {
            let path = join(prefix, name);
            if self.nodes.contains_key(&path) {
                self.diags.push(diag(&path, n.kind.type_name(), "two nodes have this name once nested graphs are inlined"));
                continue;
            }
            match &n.kind {
                NodeKind::Graph(sub) => {
                    let st = types.subgraphs.get(name).cloned().unwrap_or_default();
                    if let Some(p) = self.add_graph(sub, &st, &path) {
                        ports.insert(name, p);
                    }
                }
                kind => {
                    let t = types.nodes.get(name).cloned().unwrap_or_default();
                    match kind {
                        NodeKind::Input { .. } => entry.push(path.clone()),
                        NodeKind::Output { .. } => exit.push(path.clone()),
                        _ => {}
                    }
                    self.nodes.insert(path, Flat { kind, root, input: t.input, output: t.output });
                }
            }
        }
        for (a, b) in &graph.edges {
            let src = ports.get(a.as_str()).map(|p| p.1.clone()).unwrap_or_else(|| join(prefix, a));
            let dst = ports.get(b.as_str()).map(|p| p.0.clone()).unwrap_or_else(|| join(prefix, b));
            self.edges.push((src, dst));
        }
        if root {
            return None;
        }
        if entry.len() != 1 || exit.len() != 1 {
            self.diags.push(diag(
                prefix,
                "NIRGraph",
                &format!("a nested graph must have exactly one Input and one Output to be connected by name; it has {} and {}", entry.len(), exit.len()),
            ));
            return None;
        }
        Some((entry.remove(0), exit.remove(0)))
    }
}

fn diag(node: &str, kind: &str, msg: &str) -> Diagnostic {
    Diagnostic { node: node.to_string(), kind: kind.to_string(), severity: Severity::Unsupported, message: msg.to_string() }
}

/// Why a node kind cannot be imported yet, and what the IR would need.
fn unsupported_reason(kind: &NodeKind) -> Option<String> {
    Some(match kind {
        NodeKind::Conv1d { .. } | NodeKind::Conv2d { .. } => {
            "convolutions are not expressible in the IR yet (needs a `conv` op over [B,T,K,C,H,W] frames)".into()
        }
        NodeKind::SumPool2d { .. } | NodeKind::AvgPool2d { .. } => {
            "2-D pooling is not expressible in the IR yet (needs a `pool2d` op with sum/avg over spatial windows)".into()
        }
        NodeKind::Delay { .. } => {
            "a per-channel delay y(t) = x(t − τ) is not expressible in the IR yet (needs a `delay` op shifting frames by round(τ/dt) steps)".into()
        }
        NodeKind::Unknown { type_name } => format!("`{type_name}` is not a NIR primitive"),
        _ => return None,
    })
}

fn numel(s: &[i64]) -> Option<usize> {
    s.iter().try_fold(1usize, |a, &d| usize::try_from(d).ok().and_then(|d| a.checked_mul(d)))
}

/// Strongly connected components with more than one node or a self-loop (Tarjan).
fn cycles(names: &[String], succ: &BTreeMap<String, Vec<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        succ: &'a BTreeMap<String, Vec<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    // Iterative, so that a long chain cannot overflow the stack.
    fn visit<'a>(t: &mut T<'a>, start: &'a str) {
        let mut work: Vec<(&'a str, usize)> = vec![(start, 0)];
        t.index.insert(start, t.next);
        t.low.insert(start, t.next);
        t.next += 1;
        t.stack.push(start);
        t.on.insert(start);
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            let ws = t.succ.get(v).map(|s| s.as_slice()).unwrap_or(&[]);
            if *i < ws.len() {
                let w = ws[*i].as_str();
                *i += 1;
                if !t.index.contains_key(w) {
                    t.index.insert(w, t.next);
                    t.low.insert(w, t.next);
                    t.next += 1;
                    t.stack.push(w);
                    t.on.insert(w);
                    work.push((w, 0));
                } else if t.on.contains(w) {
                    let lw = t.index[w].min(t.low[v]);
                    t.low.insert(v, lw);
                }
            } else {
                work.pop();
                if let Some(&(p, _)) = work.last() {
                    let lp = t.low[p].min(t.low[v]);
                    t.low.insert(p, lp);
                }
                if t.low[v] == t.index[v] {
                    let mut comp = Vec::new();
                    while let Some(w) = t.stack.pop() {
                        t.on.remove(w);
                        comp.push(w.to_string());
                        if w == v {
                            break;
                        }
                    }
                    let self_loop = t.succ.get(v).is_some_and(|s| s.iter().any(|x| x == v));
                    if comp.len() > 1 || self_loop {
                        comp.sort();
                        t.out.push(comp);
                    }
                }
            }
        }
    }
    let mut t = T { succ, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), next: 0, out: Vec::new() };
    for n in names {
        if !t.index.contains_key(n.as_str()) {
            visit(&mut t, n.as_str());
        }
    }
    t.out
}

struct Builder<'o> {
    g: Graph,
    params: BTreeMap<String, Tensor>,
    notes: Vec<String>,
    opts: &'o ImportOptions,
}

fn frames(n: usize) -> ValueType {
    ValueType::new(DType::F32, Shape(vec![Dim::sym("B"), Dim::sym("T"), Dim::Const(1), Dim::from(n)]))
}

impl Builder<'_> {
    fn param(&mut self, key: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<Value, NirError> {
        let v = self.g.param(key, ValueType::f32(shape.iter().copied()))?;
        self.params.insert(key.to_string(), Tensor::f32(shape, data));
        Ok(v)
    }

    /// A per-channel parameter of `n` values (one value is broadcast in lenient mode).
    fn channel_param(&mut self, node: &str, field: &str, a: &Array, n: usize) -> Result<Vec<f32>, Diagnostic> {
        let v = a.to_f32_vec();
        if v.len() == n {
            return Ok(v);
        }
        if v.len() == 1 && self.opts.mode == Mode::Lenient {
            self.notes.push(format!("node `{node}`: `{field}` has one value, broadcast to {n} channels"));
            return Ok(vec![v[0]; n]);
        }
        Err(diag(node, "neuron", &format!("`{field}` has {} values but the node has {n} channels", v.len())))
    }

    fn map(&mut self, expr: &str, operands: &[Value], name: &str) -> Result<Value, NirError> {
        let e = parse_expr(expr).map_err(sparkc_ir::IrError::from)?;
        Ok(self.g.add1(Op::Map { expr: e }, operands, name)?)
    }

    /// A model name for `model`, reusing an identical registered one.
    fn register(&mut self, mut model: sparkc_ir::NeuronModel) -> Result<String, NirError> {
        let base = model.name.clone();
        for k in 1.. {
            let name = if k == 1 { base.clone() } else { format!("{base}_{k}") };
            model.name = name.clone();
            match self.g.neurons.get(&name) {
                Some(existing) if *existing == model => return Ok(name),
                Some(_) => continue,
                None => {
                    self.g.add_neuron(model)?;
                    return Ok(name);
                }
            }
        }
        unreachable!("the loop returns")
    }

    fn neuron(&mut self, path: &str, kind: &NodeKind, x: Value, n: usize) -> Result<Result<Value, Diagnostic>, NirError> {
        let (nk, fields): (NeuronKind, Vec<(&str, &Array)>) = match kind {
            NodeKind::I { r } => (NeuronKind::I, vec![("r", r)]),
            NodeKind::IF { r, v_threshold, v_reset } => (NeuronKind::IF, vec![("r", r), ("v_threshold", v_threshold), ("v_reset", v_reset)]),
            NodeKind::LI { tau, r, v_leak } => (NeuronKind::LI, vec![("tau", tau), ("r", r), ("v_leak", v_leak)]),
            NodeKind::LIF { tau, r, v_leak, v_threshold, v_reset } => {
                (NeuronKind::LIF, vec![("tau", tau), ("r", r), ("v_leak", v_leak), ("v_threshold", v_threshold), ("v_reset", v_reset)])
            }
            NodeKind::CubaLI { tau_syn, tau_mem, r, v_leak, w_in } => {
                (NeuronKind::CubaLI, vec![("tau_syn", tau_syn), ("tau_mem", tau_mem), ("r", r), ("v_leak", v_leak), ("w_in", w_in)])
            }
            NodeKind::CubaLIF { tau_syn, tau_mem, r, v_leak, v_threshold, v_reset, w_in } => (
                NeuronKind::CubaLIF,
                vec![
                    ("tau_syn", tau_syn),
                    ("tau_mem", tau_mem),
                    ("r", r),
                    ("v_leak", v_leak),
                    ("v_threshold", v_threshold),
                    ("v_reset", v_reset),
                    ("w_in", w_in),
                ],
            ),
            _ => unreachable!("called for neuron kinds only"),
        };
        let mut values: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
        for (field, a) in &fields {
            match self.channel_param(path, field, a, n) {
                Ok(v) => {
                    values.insert(field, v);
                }
                Err(d) => return Ok(Err(Diagnostic { kind: nk.name().into(), ..d })),
            }
        }
        let dt = self.opts.disc.dt;
        for field in ["tau", "tau_syn", "tau_mem"] {
            if let Some(v) = values.get(field) {
                if let Some((i, t)) = v.iter().enumerate().find(|(_, t)| t.is_nan() || **t <= 0.0) {
                    return Ok(Err(diag(path, nk.name(), &format!("`{field}` must be positive, channel {i} is {t}"))));
                }
                let fastest = v.iter().copied().fold(f32::INFINITY, f32::min) as f64;
                if self.opts.disc.scheme == Scheme::Euler && dt / fastest > 1.0 {
                    self.notes.push(format!(
                        "node `{path}`: dt / {field} reaches {:.3} > 1: forward Euler overshoots (decay {:.3}); choose a smaller dt or the exact scheme",
                        dt / fastest,
                        1.0 - dt / fastest
                    ));
                }
            }
        }
        let reset = match values.get("v_reset") {
            Some(v) if v.iter().all(|&x| x == v[0]) => ResetForm::Uniform(v.first().copied().unwrap_or(0.0) as f64),
            Some(_) => {
                self.notes.push(format!("node `{path}`: per-channel v_reset: the carried state is u = v − v_reset, so zero state starts v at v_reset"));
                ResetForm::PerChannel
            }
            None => ResetForm::Uniform(0.0),
        };
        let dn = match neuron_model(nk, &self.opts.disc, reset) {
            Ok(m) => m,
            Err(msg) => return Ok(Err(diag(path, nk.name(), &msg))),
        };
        let model_name = self.register(dn.model.clone())?;
        let mut operands = vec![x];
        for field in &dn.fields {
            let data = values.get(field).cloned().expect("model fields are node fields");
            operands.push(self.param(&format!("{path}.{field}"), vec![n], data)?);
        }
        let state_vars: Vec<String> = dn.model.state.iter().map(|s| s.name.clone()).collect();
        for var in &state_vars {
            let ty = ValueType::new(DType::F32, Shape(vec![Dim::sym("B"), Dim::from(n)]));
            operands.push(self.g.input(&format!("{STATE_PREFIX}{path}.{var}"), ty));
        }
        let op = Op::Scan { neuron: model_name, emit: vec![dn.emit.to_string()], scope: StateScope::Sequence };
        let results = self.g.add(op, &operands, path)?;
        for (i, var) in state_vars.iter().enumerate() {
            self.g.set_output(&format!("{STATE_PREFIX}{path}.{var}"), results[1 + i]);
        }
        Ok(Ok(results[0]))
    }
}

/// Import a NIR file (read with its inferred `types`) into an IR graph with parameters.
pub fn import_graph(file: &NirFile, types: &GraphTypes, opts: &ImportOptions) -> Result<Imported, NirError> {
    let mut fl = Flattener { nodes: BTreeMap::new(), edges: Vec::new(), diags: Vec::new() };
    fl.add_graph(&file.graph, types, "");
    let mut diags = std::mem::take(&mut fl.diags);
    // The reference's implicit ports: root nodes without an Input, leaves without an Output.
    let mut implicit_in: Vec<String> = types.implicit_inputs.clone();
    let implicit_out: Vec<String> = types.implicit_outputs.clone();
    let names: Vec<String> = fl.nodes.keys().cloned().collect();
    let mut preds: BTreeMap<String, Vec<String>> = names.iter().map(|n| (n.clone(), Vec::new())).collect();
    let mut succ: BTreeMap<String, Vec<String>> = names.iter().map(|n| (n.clone(), Vec::new())).collect();
    for (a, b) in &fl.edges {
        if let (true, Some(p)) = (fl.nodes.contains_key(a), preds.get_mut(b)) {
            p.push(a.clone());
            succ.get_mut(a).expect("node exists").push(b.clone());
        }
    }
    for (name, f) in &fl.nodes {
        if let Some(reason) = unsupported_reason(f.kind) {
            diags.push(diag(name, f.kind.type_name(), &reason));
        }
        if let NodeKind::Affine { weight, .. } | NodeKind::Linear { weight } = f.kind {
            if weight.shape.len() != 2 {
                diags.push(diag(name, f.kind.type_name(), &format!("only 2-D weights are supported, got shape {:?}", weight.shape)));
            }
        }
        if let NodeKind::Affine { weight, bias } = f.kind {
            if weight.shape.len() == 2 && bias.shape.iter().product::<usize>() != weight.shape[0] {
                diags.push(diag(name, "Affine", &format!("bias has shape {:?} but the weight has {} outputs", bias.shape, weight.shape[0])));
            }
        }
    }
    for comp in cycles(&names, &succ) {
        let stateful: Vec<&String> = comp.iter().filter(|n| fl.nodes[*n].kind.is_stateful()).collect();
        let list = comp.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        if stateful.is_empty() {
            return Err(NirError::Invalid(format!(
                "the NIR graph has a cycle without state through {list}: its value at a time step depends on itself"
            )));
        }
        diags.push(diag(
            stateful[0],
            fl.nodes[stateful[0]].kind.type_name(),
            &format!(
                "recurrent loop through {list}: a neuron scan cannot read its own output within a step yet (needs a recurrent scan op whose step applies a linear feedback, or a scan over a subgraph)"
            ),
        ));
    }
    if !diags.is_empty() {
        return Err(NirError::Import(diags));
    }
    // Kahn's algorithm, by name, so the IR comes out the same every time.
    let mut indeg: BTreeMap<&str, usize> = preds.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
    let mut ready: BTreeSet<&str> = indeg.iter().filter(|(_, &d)| d == 0).map(|(k, _)| *k).collect();
    let mut order = Vec::new();
    while let Some(n) = ready.pop_first() {
        order.push(n.to_string());
        for s in &succ[n] {
            let d = indeg.get_mut(s.as_str()).expect("node exists");
            *d -= 1;
            if *d == 0 {
                ready.insert(s.as_str());
            }
        }
    }
    let mut b = Builder { g: Graph::new(&opts.name), params: BTreeMap::new(), notes: Vec::new(), opts };
    let mut values: BTreeMap<String, (Value, usize)> = BTreeMap::new();
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut errors = Vec::new();
    implicit_in.sort();
    for name in &order {
        let f = &fl.nodes[name];
        let kind_name = f.kind.type_name();
        let n_in = f.input.as_deref().and_then(numel);
        let n_out = f.output.as_deref().and_then(numel);
        // The node's input: a graph port, or the sum of its sources.
        let srcs: Vec<(Value, usize)> = preds[name].iter().filter_map(|p| values.get(p).copied()).collect();
        let input = if (matches!(f.kind, NodeKind::Input { .. }) && f.root) || (srcs.is_empty() && implicit_in.contains(name)) {
            let Some(n) = n_in.or(n_out) else {
                errors.push(diag(name, kind_name, "the input shape is unknown"));
                continue;
            };
            let port = if matches!(f.kind, NodeKind::Input { .. }) { name.clone() } else { format!("input_{name}") };
            inputs.push((port.clone(), n));
            Some((b.g.input(&port, frames(n)), n))
        } else if srcs.is_empty() {
            if !preds[name].is_empty() {
                continue; // a source failed; its error is reported
            }
            errors.push(diag(name, kind_name, "has no incoming edge and is not an input"));
            continue;
        } else {
            let want = n_in.unwrap_or(srcs[0].1);
            if let Some((p, (_, n))) = preds[name].iter().zip(&srcs).find(|(_, (_, n))| *n != want) {
                errors.push(diag(name, kind_name, &format!("the edge from `{p}` carries {n} elements but `{name}` takes {want}")));
                continue;
            }
            if srcs.len() == 1 {
                Some(srcs[0])
            } else {
                let terms: Vec<String> = (0..srcs.len()).map(|i| format!("x{i}")).collect();
                let ops: Vec<Value> = srcs.iter().map(|s| s.0).collect();
                Some((b.map(&terms.join(" + "), &ops, &format!("{name}.sum"))?, want))
            }
        };
        let Some((x, n)) = input else { continue };
        let out: Result<(Value, usize), Diagnostic> = match f.kind {
            NodeKind::Input { .. } | NodeKind::Output { .. } | NodeKind::Flatten { .. } => Ok((x, n)),
            NodeKind::Affine { weight, .. } | NodeKind::Linear { weight } if weight.shape.len() == 2 => {
                let (o, i) = (weight.shape[0], weight.shape[1]);
                if i != n {
                    Err(diag(name, kind_name, &format!("the weight takes {i} inputs but the node receives {n}")))
                } else {
                    let w = b.param(&format!("{name}.weight"), vec![o, i], weight.to_f32_vec())?;
                    let v = if let NodeKind::Affine { bias, .. } = f.kind {
                        let bv = b.param(&format!("{name}.bias"), vec![o], bias.to_f32_vec())?;
                        b.g.add1(Op::Linear { bias: true }, &[x, w, bv], name)?
                    } else {
                        b.g.add1(Op::Linear { bias: false }, &[x, w], name)?
                    };
                    Ok((v, o))
                }
            }
            NodeKind::Scale { scale: a } | NodeKind::Threshold { threshold: a } => {
                let field = if matches!(f.kind, NodeKind::Scale { .. }) { "scale" } else { "threshold" };
                match b.channel_param(name, field, a, n) {
                    Ok(data) => {
                        let p = b.param(&format!("{name}.{field}"), vec![n], data)?;
                        // Threshold: z = H(x − θ) with NIR's strict comparison.
                        let expr = if field == "scale" { "x0 * x1" } else { "x0 > x1" };
                        Ok((b.map(expr, &[x, p], name)?, n))
                    }
                    Err(d) => Err(Diagnostic { kind: kind_name.into(), ..d }),
                }
            }
            k if k.is_stateful() && !matches!(k, NodeKind::Delay { .. } | NodeKind::Graph(_)) => b.neuron(name, k, x, n)?.map(|v| (v, n)),
            other => Err(diag(name, other.type_name(), "cannot be imported")),
        };
        match out {
            Ok((v, m)) => {
                if let Some(want) = n_out {
                    if want != m {
                        errors.push(diag(name, kind_name, &format!("produces {m} elements but its output type has {want}")));
                        continue;
                    }
                }
                values.insert(name.clone(), (v, m));
                let is_port = matches!(f.kind, NodeKind::Output { .. }) && f.root;
                if is_port || implicit_out.contains(name) {
                    let port = if is_port { name.clone() } else { format!("output_{name}") };
                    let port = if inputs.iter().any(|(i, _)| *i == port) {
                        b.notes.push(format!("output `{port}` has an input's name; it is called `{port}.out`"));
                        format!("{port}.out")
                    } else {
                        port
                    };
                    b.g.set_output(&port, v);
                    outputs.push((port, m));
                }
            }
            Err(d) => errors.push(d),
        }
    }
    if !errors.is_empty() {
        return Err(NirError::Import(errors));
    }
    sparkc_ir::verify::verify(&b.g)?;
    Ok(Imported { graph: b.g, params: b.params, disc: opts.disc, inputs, outputs, notes: b.notes })
}
