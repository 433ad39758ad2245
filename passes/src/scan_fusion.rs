//! Scan fusion: fold the element-wise `map`s around a `scan` into a new neuron model.
//!
//! A selective neuron's per-step inputs are usually computed by maps right before its scan
//! (`sigmoid(r + b_beta)`, `softplus(r + b_alpha) * i`, ...), and an emitted output is sometimes
//! only rescaled after it. Each such map is a full pass over a [B,T,K,C] tensor that the scan
//! reads (or writes) again anyway. Because every backend compiles any neuron model generically
//! (CPU bytecode, CUDA codegen) and the backward is derived from the model
//! (`sparkc_ir::adjoint`), the fusion is a pure graph rewrite: the map's expression moves into
//! a new model and the map node disappears.
//!
//! - **Prologue**: a map whose only reader is one per-step input slot of a scan (and which is no
//!   graph output) becomes a `let` of the model named like the input it fed; its [B,T,K,C]
//!   operands become model `inputs`, its [C] operands model `params` (deduplicated, also against
//!   the scan's existing operands). Other operand shapes (scalars, [B,T,1,C], ...) are left alone:
//!   a model has no operand class for them.
//! - **Epilogue**: a map whose operands are one emitted output of the scan (read by nothing
//!   else and no graph output) and otherwise only the scan's own per-step inputs / params
//!   becomes a new model `output`; the scan emits it in place of the old one and the map's
//!   readers (and graph outputs) read the scan's result instead.
//!
//! Both rules are applied to a fixed point per scan, so chains of maps fuse too (a map feeding
//! a fused prologue map, an epilogue of an epilogue, a prologue map whose other reader was an
//! epilogue that fused). The fused model is named `<model>_fused_<n>`; structurally identical
//! fused models (repeated layers) share one entry of the neuron table. The scan node keeps its
//! index and its `@"..."` name, so state keys, parameter / gradient names and profiles stay put.
//!
//! Run it on the forward graph, before `autodiff`: a map read by a `scan_adjoint` as well has two
//! readers and is (correctly) not fused.
//!
//! Evaluation is unchanged up to grouping: the CPU backend computes the fused model with the same
//! f32 operations in the same order, so forward results are bit-identical there.

use crate::users::readers;
use sparkc_ir::neuron::{Binding, NeuronModel, SPIKE};
use sparkc_ir::types::resolve_dim;
use sparkc_ir::{Expr, Graph, IrError, NodeIndex, Op, Port, Value};
use std::collections::BTreeSet;
use std::fmt;

/// Which fusions to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusionOptions {
    pub prologue: bool,
    pub epilogue: bool,
}

impl Default for FusionOptions {
    fn default() -> Self {
        FusionOptions { prologue: true, epilogue: true }
    }
}

/// A prologue map folded into a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrologueFusion {
    /// Node name of the removed map.
    pub map: String,
    /// The model input it fed, now a `let` of the fused model.
    pub input: String,
    /// Model inputs the fusion added (the map's per-step operands not already read by the scan).
    pub new_inputs: Vec<String>,
    /// Model params the fusion added (the map's [C] operands not already read by the scan).
    pub new_params: Vec<String>,
}

/// An epilogue map folded into a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpilogueFusion {
    /// Node name of the removed map.
    pub map: String,
    /// The new model output the scan emits instead of `replaces`.
    pub output: String,
    /// The emitted output the map read.
    pub replaces: String,
}

/// Everything fused into one scan node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanFusion {
    /// Node name of the scan (unchanged by the pass).
    pub scan: String,
    pub node: NodeIndex,
    /// Model before and after.
    pub from_model: String,
    pub to_model: String,
    /// In the order they were applied.
    pub prologue: Vec<PrologueFusion>,
    pub epilogue: Vec<EpilogueFusion>,
}

/// A map next to a scan that was left alone, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedMap {
    pub scan: String,
    pub map: String,
    pub reason: String,
}

/// What [`fuse_scans`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FusionReport {
    /// One entry per scan that fused at least one map, in topological order.
    pub scans: Vec<ScanFusion>,
    /// Maps that feed a scan's per-step input or read an emitted output but were not fused.
    pub skipped: Vec<SkippedMap>,
    /// Fused models added to the neuron table (each listed once, however many scans share it).
    pub new_models: Vec<String>,
    /// Models no node uses any more after the pass (removed from the neuron table).
    pub removed_models: Vec<String>,
}

impl FusionReport {
    pub fn prologue_count(&self) -> usize {
        self.scans.iter().map(|s| s.prologue.len()).sum()
    }

    pub fn epilogue_count(&self) -> usize {
        self.scans.iter().map(|s| s.epilogue.len()).sum()
    }

    /// Map nodes removed from the graph.
    pub fn maps_removed(&self) -> usize {
        self.prologue_count() + self.epilogue_count()
    }

    /// The entry of the scan named `name`, if it fused anything.
    pub fn scan(&self, name: &str) -> Option<&ScanFusion> {
        self.scans.iter().find(|s| s.scan == name)
    }
}

impl fmt::Display for FusionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scan fusion: {} scans, {} prologue maps, {} epilogue maps fused",
            self.scans.len(),
            self.prologue_count(),
            self.epilogue_count()
        )?;
        for s in &self.scans {
            writeln!(f, "  scan `{}`: {} -> {}", s.scan, s.from_model, s.to_model)?;
            for p in &s.prologue {
                write!(f, "    prologue `{}` -> let {}", p.map, p.input)?;
                if !p.new_inputs.is_empty() {
                    write!(f, "; new inputs {}", p.new_inputs.join(", "))?;
                }
                if !p.new_params.is_empty() {
                    write!(f, "; new params {}", p.new_params.join(", "))?;
                }
                writeln!(f)?;
            }
            for e in &s.epilogue {
                writeln!(f, "    epilogue `{}` -> output {} (instead of {})", e.map, e.output, e.replaces)?;
            }
        }
        for k in &self.skipped {
            writeln!(f, "  not fused: `{}` at scan `{}`: {}", k.map, k.scan, k.reason)?;
        }
        if !self.new_models.is_empty() {
            writeln!(f, "  new models: {}", self.new_models.join(", "))?;
        }
        if !self.removed_models.is_empty() {
            writeln!(f, "  removed models: {}", self.removed_models.join(", "))?;
        }
        Ok(())
    }
}

/// [`fuse_scans_with`] with both prologue and epilogue fusion.
pub fn fuse_scans(graph: &Graph) -> Result<(Graph, FusionReport), IrError> {
    fuse_scans_with(graph, &FusionOptions::default())
}

/// Fuse the maps around every `scan` of `graph` (see the module docs). The input must verify;
/// the result is verified before it is returned. `graph` itself is not changed.
pub fn fuse_scans_with(graph: &Graph, opts: &FusionOptions) -> Result<(Graph, FusionReport), IrError> {
    // Everything below relies on well-formed operands (arity, types, known models).
    sparkc_ir::verify::verify(graph)?;
    let mut g = graph.clone();
    let mut report = FusionReport::default();
    let scans: Vec<NodeIndex> =
        graph.topo_order()?.into_iter().filter(|&n| matches!(graph.node(n).op, Op::Scan { .. })).collect();
    for s in scans {
        let (neuron, emit, scope) = match &g.node(s).op {
            Op::Scan { neuron, emit, scope } => (neuron.clone(), emit.clone(), *scope),
            _ => continue,
        };
        let model = g.neurons.get(&neuron).cloned().ok_or_else(|| fail(&g, s, format!("unknown neuron model `{neuron}`")))?;
        let ops = g.operands(s);
        let (ni, np, ns) = (model.inputs.len(), model.params.len(), model.state.len());
        if ops.len() != ni + np + ns || ni == 0 {
            return Err(fail(&g, s, format!("has {} operands; model `{neuron}` needs {}", ops.len(), ni + np + ns)));
        }
        let mut w = Work {
            model,
            inputs: ops[..ni].to_vec(),
            params: ops[ni..ni + np].to_vec(),
            states: ops[ni + np..].to_vec(),
            emit,
        };
        let scan_name = g.node(s).name.clone();
        let mut fusion = ScanFusion {
            scan: scan_name.clone(),
            node: s,
            from_model: neuron.clone(),
            to_model: neuron.clone(),
            prologue: Vec::new(),
            epilogue: Vec::new(),
        };
        // To a fixed point: removing one map can make a neighbour fusable (a prologue map whose
        // other reader was a fused epilogue; the inner link of a chain of maps).
        loop {
            let mut changed = false;
            if opts.epilogue {
                while let Some(plan) = (0..w.emit.len()).find_map(|e| epilogue_candidate(&g, s, &w, e).ok()) {
                    fusion.epilogue.push(apply_epilogue(&mut g, s, &mut w, plan)?);
                    changed = true;
                }
            }
            if opts.prologue {
                while let Some(plan) = (0..w.inputs.len()).find_map(|j| prologue_candidate(&g, s, &w, j).ok()) {
                    fusion.prologue.push(apply_prologue(&mut g, s, &mut w, plan)?);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // Why the remaining neighbouring maps stay.
        let mut skipped = Vec::new();
        if opts.epilogue {
            for e in 0..w.emit.len() {
                if let Err(Some((map, reason))) = epilogue_candidate(&g, s, &w, e) {
                    skipped.push(SkippedMap { scan: scan_name.clone(), map, reason });
                }
            }
        }
        if opts.prologue {
            for j in 0..w.inputs.len() {
                if let Err(Some((map, reason))) = prologue_candidate(&g, s, &w, j) {
                    skipped.push(SkippedMap { scan: scan_name.clone(), map, reason });
                }
            }
        }
        skipped.dedup();
        report.skipped.extend(skipped);
        if fusion.prologue.is_empty() && fusion.epilogue.is_empty() {
            continue;
        }
        w.model.validate()?;
        let (name, is_new) = intern(&mut g, w.model, &neuron)?;
        if is_new {
            report.new_models.push(name.clone());
        }
        fusion.to_model = name.clone();
        g.g[s].op = Op::Scan { neuron: name, emit: w.emit, scope };
        report.scans.push(fusion);
    }
    // Drop the models the pass left unused (not those the input graph already did not use).
    let before = used_models(graph);
    let after = used_models(&g);
    for m in before.difference(&after) {
        g.neurons.remove(m);
        report.removed_models.push(m.clone());
    }
    sparkc_ir::verify::verify(&g)?;
    Ok((g, report))
}

// ------------------------------------------------------------------------------------------

/// A scan being fused: its model so far and its operands by class. The graph edges into the
/// scan are kept equal to `inputs ++ params ++ states` after every step (reader counts rely on
/// them); the node's op is only updated once the final model is registered.
struct Work {
    model: NeuronModel,
    inputs: Vec<Value>,
    params: Vec<Value>,
    states: Vec<Value>,
    emit: Vec<String>,
}

impl Work {
    fn operands(&self) -> Vec<Value> {
        self.inputs.iter().chain(&self.params).chain(&self.states).copied().collect()
    }

    /// Every name an expression of the model can read or that the model defines.
    fn taken(&self) -> BTreeSet<String> {
        let m = &self.model;
        m.params
            .iter()
            .chain(&m.inputs)
            .cloned()
            .chain(m.state.iter().map(|s| s.name.clone()))
            .chain(m.lets.iter().map(|b| b.name.clone()))
            .chain(m.outputs.iter().map(|b| b.name.clone()))
            .chain([SPIKE.to_string()])
            .collect()
    }
}

/// A map operand's model name: existing (the scan already reads the value) or new.
#[derive(Clone, Debug)]
enum Slot {
    Input(Value),
    Param(Value),
}

struct ProloguePlan {
    /// Index into `Work::inputs` of the input the map feeds.
    slot: usize,
    map: NodeIndex,
    /// Per map operand `x<k>`: its class and value.
    operands: Vec<Slot>,
}

struct EpiloguePlan {
    /// Emitted output index (= result port) the map reads.
    port: usize,
    map: NodeIndex,
    /// Per map operand `x<k>`: the expression it stands for in the model.
    operands: Vec<Expr>,
}

/// `Ok(plan)`, `Err(None)` when the slot is not fed by a map, `Err(Some((map, why)))` when a map
/// is there but does not qualify.
type Candidate<T> = Result<T, Option<(String, String)>>;

fn prologue_candidate(g: &Graph, s: NodeIndex, w: &Work, slot: usize) -> Candidate<ProloguePlan> {
    let v = w.inputs[slot];
    let producer = g.node(v.node);
    let Op::Map { .. } = &producer.op else { return Err(None) };
    let skip = |why: String| Err(Some((producer.name.clone(), why)));
    let rs = readers(g, v.node);
    if rs.len() != 1 {
        let distinct: BTreeSet<NodeIndex> = rs.iter().map(|(d, _)| *d).collect();
        return if distinct.len() == 1 {
            skip(format!("feeds {} operand slots of the scan", rs.len()))
        } else {
            skip(format!("is read by {} nodes", distinct.len()))
        };
    }
    if rs[0].0 != s {
        return skip("is not read by the scan".into());
    }
    if let Some((name, _)) = g.outputs.iter().find(|(_, o)| o.node == v.node) {
        return skip(format!("is the graph output `{name}`"));
    }
    let step = g.value_type(v).shape.resolve(&g.dims);
    let Some(c) = step.dims().last().cloned() else { return skip("the scan input has rank 0".into()) };
    let mut operands = Vec::new();
    for (k, u) in g.operands(v.node).into_iter().enumerate() {
        let ty = g.value_type(u);
        let shape = ty.shape.resolve(&g.dims);
        if !ty.dtype.is_float() {
            return skip(format!("operand x{k} is {ty}, not a float"));
        }
        if shape == step {
            operands.push(Slot::Input(u));
        } else if shape.rank() == 1 && resolve_dim(&shape.dims()[0], &g.dims) == c {
            operands.push(Slot::Param(u));
        } else {
            return skip(format!(
                "operand x{k} is {ty}: neither the per-step shape {} nor per-channel [{c}]",
                g.value_type(v).shape
            ));
        }
    }
    if !operands.iter().any(|o| matches!(o, Slot::Input(_))) {
        return skip("has no per-step operand".into());
    }
    Ok(ProloguePlan { slot, map: v.node, operands })
}

fn apply_prologue(g: &mut Graph, s: NodeIndex, w: &mut Work, plan: ProloguePlan) -> Result<PrologueFusion, IrError> {
    let Op::Map { expr } = g.node(plan.map).op.clone() else {
        return Err(fail(g, plan.map, "is no longer a map".into()));
    };
    let input = w.model.inputs[plan.slot].clone();
    let mut taken = w.taken();
    // The fused input's own value leaves the operand list; its name becomes the let.
    let mut new_inputs: Vec<(String, Value)> = Vec::new();
    let mut new_params: Vec<(String, Value)> = Vec::new();
    let mut names = Vec::with_capacity(plan.operands.len());
    for (k, op) in plan.operands.iter().enumerate() {
        let name = match op {
            Slot::Input(u) => {
                let existing = w
                    .inputs
                    .iter()
                    .enumerate()
                    .find(|&(j, x)| j != plan.slot && x == u)
                    .map(|(j, _)| w.model.inputs[j].clone())
                    .or_else(|| new_inputs.iter().find(|(_, x)| x == u).map(|(n, _)| n.clone()));
                match existing {
                    Some(n) => n,
                    None => {
                        let n = fresh(&mut taken, &format!("{input}_x{k}"));
                        new_inputs.push((n.clone(), *u));
                        n
                    }
                }
            }
            Slot::Param(u) => {
                let existing = w
                    .params
                    .iter()
                    .position(|x| x == u)
                    .map(|j| w.model.params[j].clone())
                    .or_else(|| new_params.iter().find(|(_, x)| x == u).map(|(n, _)| n.clone()));
                match existing {
                    Some(n) => n,
                    None => {
                        let n = fresh(&mut taken, &format!("{input}_x{k}"));
                        new_params.push((n.clone(), *u));
                        n
                    }
                }
            }
        };
        names.push(name);
    }
    let vars: Vec<Expr> = names.iter().map(|n| Expr::var(n)).collect();
    let body = substitute_operands(&expr, &vars).map_err(|msg| fail(g, plan.map, msg))?;
    // Inputs: the fused slot is replaced in place by the new per-step operands.
    let m = &mut w.model;
    m.inputs.splice(plan.slot..=plan.slot, new_inputs.iter().map(|(n, _)| n.clone()));
    w.inputs.splice(plan.slot..=plan.slot, new_inputs.iter().map(|(_, v)| *v));
    m.params.extend(new_params.iter().map(|(n, _)| n.clone()));
    w.params.extend(new_params.iter().map(|(_, v)| *v));
    // First: the let reads only inputs and params, and later lets may read the old input.
    m.lets.insert(0, Binding { name: input.clone(), expr: body });
    let map_name = g.node(plan.map).name.clone();
    set_operands(g, s, &w.operands());
    g.g.remove_node(plan.map);
    Ok(PrologueFusion {
        map: map_name,
        input,
        new_inputs: new_inputs.into_iter().map(|(n, _)| n).collect(),
        new_params: new_params.into_iter().map(|(n, _)| n).collect(),
    })
}

fn epilogue_candidate(g: &Graph, s: NodeIndex, w: &Work, port: usize) -> Candidate<EpiloguePlan> {
    let out = Value { node: s, port: port as u32 };
    let rs: Vec<(NodeIndex, Port)> = readers(g, s).into_iter().filter(|(_, p)| p.src == out.port).collect();
    let maps: BTreeSet<NodeIndex> = rs.iter().map(|(d, _)| *d).filter(|&d| matches!(g.node(d).op, Op::Map { .. })).collect();
    let Some(&map) = maps.iter().next() else { return Err(None) };
    let emitted = &w.emit[port];
    let skip = |why: String| Err(Some((g.node(map).name.clone(), why)));
    let distinct: BTreeSet<NodeIndex> = rs.iter().map(|(d, _)| *d).collect();
    if distinct.len() != 1 {
        return skip(format!("emitted output `{emitted}` is read by {} nodes", distinct.len()));
    }
    if let Some((name, _)) = g.outputs.iter().find(|(_, o)| *o == out) {
        return skip(format!("emitted output `{emitted}` is the graph output `{name}`"));
    }
    let Op::Map { .. } = &g.node(map).op else { return Err(None) };
    let step = g.value_type(out).shape.resolve(&g.dims);
    if g.node(map).results.len() != 1 || g.node(map).results[0].shape.resolve(&g.dims) != step {
        return skip(format!("its result is not the per-step shape {}", g.value_type(out).shape));
    }
    let Some(binding) = w.model.output(emitted) else {
        return skip(format!("model `{}` has no output `{emitted}`", w.model.name));
    };
    let mut operands = Vec::new();
    for (k, u) in g.operands(map).into_iter().enumerate() {
        let e = if u == out {
            binding.expr.clone()
        } else if let Some(j) = w.inputs.iter().position(|&x| x == u) {
            Expr::var(&w.model.inputs[j])
        } else if let Some(j) = w.params.iter().position(|&x| x == u) {
            Expr::var(&w.model.params[j])
        } else {
            return skip(format!("operand x{k} is neither `{emitted}` nor a per-step input / param of the scan"));
        };
        operands.push(e);
    }
    Ok(EpiloguePlan { port, map, operands })
}

fn apply_epilogue(g: &mut Graph, s: NodeIndex, w: &mut Work, plan: EpiloguePlan) -> Result<EpilogueFusion, IrError> {
    let Op::Map { expr } = g.node(plan.map).op.clone() else {
        return Err(fail(g, plan.map, "is no longer a map".into()));
    };
    let body = substitute_operands(&expr, &plan.operands).map_err(|msg| fail(g, plan.map, msg))?;
    let replaces = w.emit[plan.port].clone();
    let mut taken = w.taken();
    let output = fresh(&mut taken, &format!("{}_epi", strip_counter(&replaces, "_epi")));
    w.model.outputs.push(Binding { name: output.clone(), expr: body });
    w.emit[plan.port] = output.clone();
    let result = Value { node: s, port: plan.port as u32 };
    for (dst, p) in readers(g, plan.map) {
        g.g.add_edge(s, dst, Port { src: result.port, dst: p.dst });
    }
    for (_, v) in g.outputs.iter_mut() {
        if v.node == plan.map {
            *v = result;
        }
    }
    let map_name = g.node(plan.map).name.clone();
    g.g.remove_node(plan.map);
    Ok(EpilogueFusion { map: map_name, output, replaces })
}

// ------------------------------------------------------------------------------------------

/// `x<i>` → `i` when `i < arity` (the names `map` operands are bound to).
fn operand_index(v: &str, arity: usize) -> Result<usize, String> {
    v.strip_prefix('x')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&i| format!("x{i}") == v && i < arity)
        .ok_or_else(|| format!("map expression reads `{v}`; operands are x0..x{}", arity.saturating_sub(1)))
}

/// The map expression with `x<i>` replaced by `with[i]`.
fn substitute_operands(expr: &Expr, with: &[Expr]) -> Result<Expr, String> {
    for v in expr.vars() {
        operand_index(&v, with.len())?;
    }
    Ok(expr.substitute(&|v| operand_index(v, with.len()).ok().map(|i| with[i].clone())))
}

/// Names the backends and the adjoint derivation bind next to the model's own (`f<i>` tape
/// entries, `d_*` adjoints, `g_*` / `a_*` upstream gradients, `grad_*` results, `__*` temps) or
/// that the text form reads as numbers; a new name must not be one of them.
fn reserved(n: &str) -> bool {
    let tape = n.strip_prefix('f').is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    tape || n == "inf"
        || n == "nan"
        || n == SPIKE
        || ["__", "g_", "a_", "d_", "grad_"].iter().any(|p| n.starts_with(p))
}

/// A new identifier based on `base` that is neither taken nor reserved; it is marked taken.
fn fresh(taken: &mut BTreeSet<String>, base: &str) -> String {
    let mut base: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if base.is_empty() || base.starts_with(|c: char| c.is_ascii_digit()) || reserved(&base) {
        base = format!("m_{base}");
    }
    let mut name = base.clone();
    let mut i = 1;
    while taken.contains(&name) || reserved(&name) {
        name = format!("{base}{i}");
        i += 1;
    }
    taken.insert(name.clone());
    name
}

/// `name` without a trailing `<tag>` or `<tag><digits>` (so repeated fusion does not grow names).
fn strip_counter<'a>(name: &'a str, tag: &str) -> &'a str {
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
    trimmed.strip_suffix(tag).filter(|s| !s.is_empty()).unwrap_or(name)
}

/// Register `model` under a fresh `<base>_fused_<n>` name, or return the name of a model already
/// in the table that is identical up to its name (so repeated layers share one model).
fn intern(g: &mut Graph, mut model: NeuronModel, original: &str) -> Result<(String, bool), IrError> {
    for (name, existing) in &g.neurons {
        model.name = name.clone();
        if *existing == model {
            return Ok((name.clone(), false));
        }
    }
    let base = {
        let trimmed = original.trim_end_matches(|c: char| c.is_ascii_digit());
        match trimmed.strip_suffix("_fused_") {
            Some(b) if trimmed.len() < original.len() && !b.is_empty() => b,
            _ => original,
        }
    };
    let name = (0..).map(|n| format!("{base}_fused_{n}")).find(|n| !g.neurons.contains_key(n)).expect("unbounded range");
    model.name = name.clone();
    g.add_neuron(model)?;
    Ok((name, true))
}

/// Models referenced by some node.
fn used_models(g: &Graph) -> BTreeSet<String> {
    g.g.node_indices()
        .filter_map(|n| match &g.node(n).op {
            Op::Scan { neuron, .. } | Op::ScanAdjoint { neuron, .. } | Op::FixedScan { neuron, .. } => Some(neuron.clone()),
            _ => None,
        })
        .collect()
}

/// Replace the operand edges of `n` by `ops` (slot order).
fn set_operands(g: &mut Graph, n: NodeIndex, ops: &[Value]) {
    let incoming: Vec<_> = g.g.edge_indices().filter(|&e| g.g.edge_endpoints(e).is_some_and(|(_, dst)| dst == n)).collect();
    for e in incoming {
        g.g.remove_edge(e);
    }
    for (slot, v) in ops.iter().enumerate() {
        g.g.add_edge(v.node, n, Port { src: v.port, dst: slot as u32 });
    }
}

fn fail(g: &Graph, n: NodeIndex, msg: String) -> IrError {
    let node = g.node(n);
    IrError::Graph(format!("scan fusion: `{}` node `{}` {msg}", node.op.name(), node.name))
}
