//! Lowering: the quantized IR into the groups, synapse layers, buffers and stages of a spike
//! program (placement and routing come after, in `place`).
//!
//! - Element-wise fixed-point ops (`fixed_scan`, `fixed_map`) that feed each other directly fuse
//!   into one neuron group with one microcode program.
//! - A `synapse_linear` becomes a synapse layer into the group that reads its sum.
//! - A `graded_spike` of a group value is that group's output encoding: its payloads are the
//!   events.
//! - Everything else runs on a management core (it feeds the chip) or the host (input
//!   encoding and what follows the last neuromorphic op: the vocabulary head), as IR subgraphs.

use crate::microcode::{check_program, Fuser};
use crate::program::*;
use crate::NeuroError;
use sparkc_backend_cpu::kernels::fixed::{compile_map, compile_step, Fx, Lut, LutKind};
use sparkc_ir::{Graph, NodeIndex, Op, Tensor, Value};
use rayon::prelude::*;
use sparkc_passes::users::all_readers;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Who runs a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Where {
    Host,
    Management,
    Neuro(RateKey),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RateKey {
    Frame,
    Token,
}

/// What lowering produces.
pub struct Lowered {
    pub fx: Fx,
    pub frames_per_token: u32,
    pub luts: Vec<(LutKind, Lut)>,
    pub buffers: Vec<Buffer>,
    pub groups: Vec<Group>,
    pub synapses: Vec<SynapseLayer>,
    pub stages: Vec<Stage>,
    pub inputs: Vec<(String, u32)>,
    pub outputs: Vec<(String, u32)>,
    pub host_params: BTreeMap<String, Tensor>,
}

fn lerr(q: &Graph, n: NodeIndex, msg: impl Into<String>) -> NeuroError {
    NeuroError::Lower { layer: q.node(n).name.clone(), msg: msg.into() }
}

fn is_member(op: &Op) -> bool {
    matches!(op, Op::FixedMap { .. } | Op::FixedScan { .. })
}

/// Whether a node runs on neuromorphic cores.
pub fn is_neuro(q: &Graph, n: NodeIndex) -> bool {
    match &q.node(n).op {
        Op::FixedMap { .. } | Op::FixedScan { .. } | Op::SynapseLinear { .. } => true,
        Op::GradedSpike { .. } => is_member(&q.node(q.operands(n)[0].node).op),
        _ => false,
    }
}

/// Where every non-source node runs.
pub fn assign(q: &Graph) -> Result<BTreeMap<NodeIndex, Where>, NeuroError> {
    let neuro: BTreeSet<NodeIndex> = q.g.node_indices().filter(|&n| is_neuro(q, n)).collect();
    // Ancestors of neuromorphic nodes feed the chip; the rest (after the chip) is the host's.
    let mut feeds = HashSet::new();
    let mut stack: Vec<NodeIndex> = neuro.iter().copied().collect();
    while let Some(n) = stack.pop() {
        for v in q.operands(n) {
            if feeds.insert(v.node) {
                stack.push(v.node);
            }
        }
    }
    let mut out = BTreeMap::new();
    for n in q.topo_order()? {
        let op = &q.node(n).op;
        if op.is_source() {
            continue;
        }
        let w = if neuro.contains(&n) {
            let rank = q.node(n).results[0].shape.rank();
            Where::Neuro(if rank == 3 { RateKey::Token } else { RateKey::Frame })
        } else if matches!(op, Op::Embedding) || !feeds.contains(&n) {
            Where::Host
        } else {
            Where::Management
        };
        out.insert(n, w);
    }
    Ok(out)
}

struct Lowerer<'a> {
    q: &'a Graph,
    params: &'a BTreeMap<String, Tensor>,
    fx: Fx,
    buffers: Vec<Buffer>,
    buffer_of: HashMap<Value, u32>,
    readers: HashMap<NodeIndex, Vec<(NodeIndex, sparkc_ir::Port)>>,
}

impl Lowerer<'_> {
    fn buffer_name(&self, v: Value) -> String {
        match &self.q.node(v.node).op {
            Op::Input { name } => name.clone(),
            _ => format!("%{}.{}", v.node.index(), v.port),
        }
    }

    fn buffer(&mut self, v: Value) -> u32 {
        if let Some(&b) = self.buffer_of.get(&v) {
            return b;
        }
        let ty = if self.q.value_type(v).dtype.is_int() { BufferType::I64 } else { BufferType::F32 };
        let id = self.buffers.len() as u32;
        self.buffers.push(Buffer { name: self.buffer_name(v), ty });
        self.buffer_of.insert(v, id);
        id
    }

    fn readers_of(&self, v: Value) -> Vec<NodeIndex> {
        self.readers.get(&v.node).into_iter().flatten().filter(|(_, p)| p.src == v.port).map(|(r, _)| *r).collect()
    }

    fn is_graph_output(&self, v: Value) -> bool {
        self.q.outputs.iter().any(|(_, o)| *o == v)
    }

    /// A constant parameter as integers, one per channel (a scalar is broadcast).
    fn int_param(&self, v: Value, channels: usize) -> Result<(String, Vec<i64>), NeuroError> {
        let n = v.node;
        let Op::Param { name } = &self.q.node(n).op else { return Err(lerr(self.q, n, "expected a parameter")) };
        let t = self.params.get(name).ok_or_else(|| lerr(self.q, n, format!("missing parameter `{name}`")))?;
        let d = t.as_f32().ok_or_else(|| lerr(self.q, n, format!("parameter `{name}` must be f32")))?;
        let vals: Vec<i64> = match d.len() {
            1 => vec![d[0] as i64; channels],
            l if l == channels => d.iter().map(|&x| x as i64).collect(),
            l => return Err(lerr(self.q, n, format!("parameter `{name}` has {l} values for {channels} neurons"))),
        };
        Ok((name.clone(), vals))
    }
}

/// Disjoint sets over the fusable nodes.
fn find(parent: &mut HashMap<NodeIndex, NodeIndex>, n: NodeIndex) -> NodeIndex {
    let p = parent[&n];
    if p == n {
        return n;
    }
    let r = find(parent, p);
    parent.insert(n, r);
    r
}

pub fn lower(q: &Graph, params: &BTreeMap<String, Tensor>, state_bits: u32) -> Result<Lowered, NeuroError> {
    let order = q.topo_order()?;
    // One fixed-point format for the whole program.
    let mut fx: Option<Fx> = None;
    for &n in &order {
        if let Op::FixedMap { frac, bits, .. } | Op::FixedScan { frac, bits, .. } = q.node(n).op {
            let f = Fx::new(frac, bits);
            match fx {
                None => fx = Some(f),
                Some(g) if g != f => return Err(lerr(q, n, format!("fixed-point format frac={frac} bits={bits} differs from frac={} bits={} elsewhere", g.frac, g.bits))),
                _ => {}
            }
        }
    }
    let fx = fx.unwrap_or(Fx::new(0, state_bits));
    let frames_per_token = q.dims.get("K").copied().unwrap_or(1) as u32;
    let mut lw = Lowerer { q, params, fx, buffers: Vec::new(), buffer_of: HashMap::new(), readers: all_readers(q) };
    let inputs: Vec<(String, u32)> = q.inputs().into_iter().map(|(n, name, _)| (name.to_string(), lw.buffer(Value { node: n, port: 0 }))).collect();

    // ---- groups: fuse element-wise neuron ops connected directly.
    let members: Vec<NodeIndex> = order.iter().copied().filter(|&n| is_member(&q.node(n).op)).collect();
    let mut parent: HashMap<NodeIndex, NodeIndex> = members.iter().map(|&n| (n, n)).collect();
    for &n in &members {
        for v in q.operands(n) {
            if is_member(&q.node(v.node).op) {
                let (a, b) = (find(&mut parent, n), find(&mut parent, v.node));
                if a != b {
                    parent.insert(a, b);
                }
            }
        }
    }
    let mut group_members: BTreeMap<NodeIndex, Vec<NodeIndex>> = BTreeMap::new();
    for &n in &members {
        let r = find(&mut parent, n);
        group_members.entry(r).or_default().push(n);
    }
    // Groups in the order of their first member.
    let mut group_list: Vec<Vec<NodeIndex>> = group_members.into_values().collect();
    group_list.sort_by_key(|m| order.iter().position(|x| *x == m[0]));
    let group_of: HashMap<NodeIndex, u32> = group_list.iter().enumerate().flat_map(|(g, m)| m.iter().map(move |&n| (n, g as u32))).collect();
    let synapse_nodes: Vec<NodeIndex> = order.iter().copied().filter(|&n| matches!(q.node(n).op, Op::SynapseLinear { .. })).collect();
    let synapse_of: HashMap<NodeIndex, u32> = synapse_nodes.iter().enumerate().map(|(i, &n)| (n, i as u32)).collect();

    let mut groups = Vec::new();
    // (group, output index) of each native graded_spike node.
    let mut spike_output: HashMap<NodeIndex, (u32, u32)> = HashMap::new();
    for (gi, mem) in group_list.iter().enumerate() {
        groups.push(build_group(&mut lw, gi as u32, mem, &group_of, &synapse_of, &mut spike_output)?);
    }

    // ---- synapse layers.
    let mut synapses = Vec::new();
    for &n in &synapse_nodes {
        let Op::SynapseLinear { bias, shift, bits } = q.node(n).op else { unreachable!("filtered") };
        let ops = q.operands(n);
        let src = ops[0];
        let (source, payload_bits) = match spike_output.get(&src.node) {
            Some(&(group, output)) => (SynapseSource::Group { group, output }, groups[group as usize].outputs[output as usize].bits),
            None => {
                let bits = match q.node(src.node).op {
                    Op::GradedSpike { bits, .. } => bits,
                    _ => fx.bits,
                };
                (SynapseSource::Buffer(lw.buffer(src)), bits)
            }
        };
        let out = Value { node: n, port: 0 };
        let dests: BTreeSet<u32> = lw.readers_of(out).iter().filter_map(|r| group_of.get(r).copied()).collect();
        if dests.len() != 1 || lw.readers_of(out).iter().any(|r| !group_of.contains_key(r)) || lw.is_graph_output(out) {
            return Err(lerr(q, n, "a synapse layer's sums must be read by exactly one neuron group and nothing else"));
        }
        let dest_group = *dests.iter().next().expect("one");
        let sid = synapse_of[&n];
        let dest_input = groups[dest_group as usize]
            .inputs
            .iter()
            .position(|i: &GroupInput| i.source == InputSource::Dendrite { synapse: sid })
            .ok_or_else(|| lerr(q, n, "the destination group does not read this synapse layer"))? as u32;
        let wt = q.node(ops[1].node);
        let Op::Param { name: wname } = &wt.op else { return Err(lerr(q, n, "weights must be a parameter")) };
        let w = params.get(wname).and_then(|t| t.as_f32().map(|d| (t.shape.clone(), d))).ok_or_else(|| lerr(q, n, format!("missing f32 weights `{wname}`")))?;
        let (o, i) = (w.0[0], w.0[1]);
        let wmax = w.1.par_iter().map(|x| x.abs()).reduce(|| 0f32, f32::max) as i64;
        let weight_bits = (64 - wmax.leading_zeros() + 1).max(2);
        // Source-major: an event on axon a reads row a. Transposed in blocks of 64 axons so
        // that both sides stay in cache.
        fn transpose<T: Send + Copy + Default>(w: &[f32], o: usize, i: usize, cast: fn(f32) -> T) -> Vec<T> {
            let mut v = vec![T::default(); o * i];
            if o == 0 {
                return v;
            }
            v.par_chunks_mut(64 * o).enumerate().for_each(|(blk, chunk)| {
                let a0 = blk * 64;
                let na = chunk.len() / o;
                for r in 0..o {
                    for (da, &x) in w[r * i + a0..r * i + a0 + na].iter().enumerate() {
                        chunk[da * o + r] = cast(x);
                    }
                }
            });
            v
        }
        let weights = if weight_bits <= 8 {
            Weights::I8(transpose(w.1, o, i, |x| x as i8))
        } else if weight_bits <= 16 {
            Weights::I16(transpose(w.1, o, i, |x| x as i16))
        } else {
            return Err(lerr(q, n, format!("weights need {weight_bits} bits; at most 16 are supported")));
        };
        let (_, mult) = lw.int_param(ops[2], o)?;
        let bias_v = if bias { lw.int_param(ops[3], o)?.1 } else { vec![0; o] };
        synapses.push(SynapseLayer {
            name: q.node(n).name.clone(),
            source,
            payload_bits,
            dest_group,
            dest_input,
            inputs: i as u32,
            outputs: o as u32,
            weight_bits,
            weights,
            mult,
            shift,
            bias: bias_v,
            bits,
        });
    }

    // ---- stages.
    let places = assign(q)?;
    let stage_nodes = partition(q, &places)?;
    let mut stages = Vec::new();
    let mut host_params = BTreeMap::new();
    let mut stage_of_group: HashMap<u32, usize> = HashMap::new();
    for (si, (w, nodes)) in stage_nodes.iter().enumerate() {
        let set: BTreeSet<NodeIndex> = nodes.iter().copied().collect();
        let first = q.node(nodes[0]).name.clone();
        match w {
            Where::Neuro(_) => {
                let mut gs: Vec<u32> = nodes.iter().filter_map(|n| group_of.get(n).copied()).collect();
                gs.dedup();
                let mut uniq = Vec::new();
                for g in gs {
                    if !uniq.contains(&g) {
                        uniq.push(g);
                    }
                }
                for &g in &uniq {
                    if group_list[g as usize].iter().any(|m| !set.contains(m)) {
                        return Err(lerr(q, group_list[g as usize][0], "a neuron group would span two stages (it reads a management result computed from itself in the same frame)"));
                    }
                    stage_of_group.insert(g, si);
                }
                let mut ins = BTreeSet::new();
                let mut outs = BTreeSet::new();
                for &g in &uniq {
                    let grp = &groups[g as usize];
                    for i in &grp.inputs {
                        match i.source {
                            InputSource::Injection { buffer } => {
                                ins.insert(buffer);
                            }
                            InputSource::Dendrite { synapse } => {
                                if let SynapseSource::Buffer(b) = synapses[synapse as usize].source {
                                    ins.insert(b);
                                }
                            }
                        }
                    }
                    for s in &grp.state {
                        if let StateInit::Buffer(b) = s.init {
                            ins.insert(b);
                        }
                        if let Some(b) = s.export {
                            outs.insert(b);
                        }
                    }
                    for o in &grp.outputs {
                        if let Some(b) = o.buffer {
                            outs.insert(b);
                        }
                    }
                }
                stages.push(Stage {
                    name: format!("neuro.{si} ({first})"),
                    kind: StageKind::Neuro { groups: uniq },
                    ir: String::new(),
                    inputs: ins.into_iter().collect(),
                    outputs: outs.into_iter().collect(),
                });
            }
            Where::Management | Where::Host => {
                let (ir, ins, outs, used) = subgraph(&mut lw, &format!("stage{si}"), nodes, &set)?;
                for p in used {
                    let t = params.get(&p).ok_or_else(|| NeuroError::Lower { layer: first.clone(), msg: format!("missing parameter `{p}`") })?;
                    host_params.insert(p, t.clone());
                }
                let (kind, label) = if *w == Where::Host { (StageKind::Host, "host") } else { (StageKind::Management { chip: 0 }, "mgmt") };
                stages.push(Stage { name: format!("{label}.{si} ({first})"), kind, ir, inputs: ins, outputs: outs });
            }
        }
    }
    let outputs: Vec<(String, u32)> = q.outputs.iter().map(|(name, v)| (name.clone(), lw.buffer(*v))).collect();
    let mut used_luts: BTreeSet<LutKind> = BTreeSet::new();
    for g in &groups {
        used_luts.extend(g.microcode.luts_used());
    }
    let luts = used_luts.into_iter().map(|k| (k, Lut::build(k, fx))).collect();
    Ok(Lowered { fx, frames_per_token, luts, buffers: lw.buffers, groups, synapses, stages, inputs, outputs, host_params })
}

/// One neuron group: fuse the members' programs, find its inputs, parameters, state and outputs.
fn build_group(
    lw: &mut Lowerer,
    gi: u32,
    members: &[NodeIndex],
    group_of: &HashMap<NodeIndex, u32>,
    synapse_of: &HashMap<NodeIndex, u32>,
    spike_output: &mut HashMap<NodeIndex, (u32, u32)>,
) -> Result<Group, NeuroError> {
    let q = lw.q;
    let first = members[0];
    let shape = q.node(first).results[0].shape.resolve(&q.dims);
    let rate = match shape.rank() {
        4 => Rate::Frame,
        3 => Rate::Token,
        _ => return Err(lerr(q, first, format!("neuron values must be [B,T,K,C] or [B,T,C], got {shape}"))),
    };
    let channels = shape.last().and_then(|d| d.as_const()).ok_or_else(|| lerr(q, first, "the number of neurons must be a fixed size"))? as usize;
    for &m in members {
        let s = q.node(m).results[0].shape.resolve(&q.dims);
        if s != shape {
            return Err(lerr(q, m, format!("fused with `{}` but shaped {s} instead of {shape}", q.node(first).name)));
        }
    }
    let fx = lw.fx;
    let mut fuser = Fuser::default();
    let mut value_reg: HashMap<Value, u16> = HashMap::new();
    let mut inputs: Vec<GroupInput> = Vec::new();
    let mut params: Vec<GroupParam> = Vec::new();
    let mut state: Vec<StateSlot> = Vec::new();
    let mut final_slot: HashMap<Value, usize> = HashMap::new();
    let mut preloaded = Vec::new();

    // The group register holding value `v` (loading it as an input or parameter if new).
    let operand_reg = |v: Value, fuser: &mut Fuser, lw: &mut Lowerer, value_reg: &mut HashMap<Value, u16>, inputs: &mut Vec<GroupInput>, params: &mut Vec<GroupParam>, preloaded: &mut Vec<u16>| -> Result<u16, NeuroError> {
        if let Some(&r) = value_reg.get(&v) {
            return Ok(r);
        }
        let reg = fuser.alloc().map_err(|e| lerr(q, first, e))?;
        match &q.node(v.node).op {
            Op::SynapseLinear { .. } => inputs.push(GroupInput { reg, source: InputSource::Dendrite { synapse: synapse_of[&v.node] } }),
            Op::Param { .. } => {
                let (name, values) = lw.int_param(v, channels)?;
                params.push(GroupParam { name, reg, values });
            }
            op if is_member(op) => {
                return Err(lerr(q, v.node, format!("read by group `{}` without spikes", q.node(first).name)));
            }
            _ => {
                let b = lw.buffer(v);
                inputs.push(GroupInput { reg, source: InputSource::Injection { buffer: b } });
            }
        }
        preloaded.push(reg);
        value_reg.insert(v, reg);
        Ok(reg)
    };

    for &m in members {
        let node = q.node(m);
        let ops = q.operands(m);
        match &node.op {
            Op::FixedMap { expr, .. } => {
                let fm = compile_map(expr, ops.len(), fx).map_err(|e| lerr(q, m, e))?;
                let mut bound = Vec::new();
                for (i, &v) in ops.iter().enumerate() {
                    let r = operand_reg(v, &mut fuser, lw, &mut value_reg, &mut inputs, &mut params, &mut preloaded)?;
                    bound.push((fm.inputs[i], r));
                }
                let map = fuser.append(&fm.prog, &bound).map_err(|e| lerr(q, m, e))?;
                value_reg.insert(Value { node: m, port: 0 }, map[fm.out as usize]);
            }
            Op::FixedScan { neuron, emit, scope, .. } => {
                let model = q.neurons.get(neuron).ok_or_else(|| lerr(q, m, format!("unknown neuron model `{neuron}`")))?;
                let step = compile_step(model, emit, *scope, fx).map_err(|e| lerr(q, m, e))?;
                let (ni, np) = (model.inputs.len(), model.params.len());
                let mut bound = Vec::new();
                for (i, &v) in ops[..ni + np].iter().enumerate() {
                    let r = operand_reg(v, &mut fuser, lw, &mut value_reg, &mut inputs, &mut params, &mut preloaded)?;
                    let local = if i < ni { step.inputs[i] } else { step.params[i - ni] };
                    bound.push((local, r));
                }
                let map = fuser.append(&step.prog, &bound).map_err(|e| lerr(q, m, e))?;
                for (k, s) in model.state.iter().enumerate() {
                    let init_v = ops[ni + np + k];
                    let init = StateInit::Buffer(lw.buffer(init_v));
                    let reg = map[step.state[k] as usize];
                    preloaded.push(reg);
                    final_slot.insert(Value { node: m, port: (emit.len() + k) as u32 }, state.len());
                    state.push(StateSlot {
                        name: format!("{}.{}", node.name, s.name),
                        reg,
                        next: map[step.state_out[k] as usize],
                        init,
                        token_reset: *scope == sparkc_ir::StateScope::Token,
                        reset_value: step.init[k],
                        export: None,
                    });
                }
                for (o, &r) in step.outputs.iter().enumerate() {
                    value_reg.insert(Value { node: m, port: o as u32 }, map[r as usize]);
                }
            }
            _ => unreachable!("members are fixed maps and scans"),
        }
    }
    let microcode = fuser.finish();
    check_program(&microcode, &preloaded).map_err(|e| lerr(q, first, format!("microcode: {e}")))?;

    // Values that leave the group: payloads (events), exported state.
    let mut outputs: Vec<GroupOutput> = Vec::new();
    for &m in members {
        for port in 0..q.node(m).results.len() as u32 {
            let v = Value { node: m, port };
            let readers = lw.readers_of(v);
            for r in readers.iter().filter(|r| group_of.get(r) != Some(&gi)) {
                let rn = q.node(*r);
                match &rn.op {
                    Op::GradedSpike { bits, shift } => {
                        let (_, mult) = lw.int_param(q.operands(*r)[1], channels)?;
                        let gs = Value { node: *r, port: 0 };
                        let synapses: Vec<u32> = lw.readers_of(gs).iter().filter_map(|x| synapse_of.get(x).copied()).collect();
                        let others = lw.readers_of(gs).iter().any(|x| !synapse_of.contains_key(x)) || lw.is_graph_output(gs);
                        let buffer = if others { Some(lw.buffer(gs)) } else { None };
                        spike_output.insert(*r, (gi, outputs.len() as u32));
                        outputs.push(GroupOutput {
                            name: q.node(m).name.clone() + &format!(".{port}"),
                            reg: value_reg[&v],
                            bits: *bits,
                            shift: *shift,
                            mult,
                            synapses,
                            buffer,
                        });
                    }
                    _ if final_slot.contains_key(&v) => {
                        let b = lw.buffer(v);
                        state[final_slot[&v]].export = Some(b);
                    }
                    _ => return Err(lerr(q, m, format!("its value leaves the neuron group (to `{}`) without a graded-spike encoding", rn.name))),
                }
            }
            if lw.is_graph_output(v) {
                match final_slot.get(&v) {
                    Some(&k) => state[k].export = Some(lw.buffer(v)),
                    None => return Err(lerr(q, m, "a neuron value is a graph output without a graded-spike encoding")),
                }
            }
        }
    }
    // Named after its neurons (the scans), or after the value it computes.
    let scans: Vec<&str> = members.iter().filter(|&&m| matches!(q.node(m).op, Op::FixedScan { .. })).map(|&m| q.node(m).name.as_str()).collect();
    let name = if scans.is_empty() { q.node(*members.last().expect("non-empty")).name.clone() } else { scans.join("+") };
    Ok(Group { name, channels: channels as u32, rate, microcode, inputs, params, state, outputs })
}

/// Order the non-source nodes into stages: maximal runs of nodes that run in the same place,
/// taken in dependency order (Kahn's algorithm, staying with one place while it has ready work).
fn partition(q: &Graph, places: &BTreeMap<NodeIndex, Where>) -> Result<Vec<(Where, Vec<NodeIndex>)>, NeuroError> {
    let readers = all_readers(q);
    let mut indeg: BTreeMap<NodeIndex, usize> = places.keys().map(|&n| (n, 0)).collect();
    for &n in places.keys() {
        for v in q.operands(n) {
            if places.contains_key(&v.node) {
                *indeg.get_mut(&n).expect("listed") += 1;
            }
        }
    }
    let mut ready: BTreeMap<Where, BTreeSet<NodeIndex>> = BTreeMap::new();
    for (&n, &d) in &indeg {
        if d == 0 {
            ready.entry(places[&n]).or_default().insert(n);
        }
    }
    let mut stages = Vec::new();
    // Next: the place whose earliest ready node comes first.
    while let Some(cur) = ready.iter().filter(|(_, s)| !s.is_empty()).min_by_key(|(_, s)| *s.iter().next().expect("non-empty")).map(|(w, _)| *w) {
        let mut nodes = Vec::new();
        while let Some(n) = ready.get_mut(&cur).and_then(|s| s.pop_first()) {
            nodes.push(n);
            let mut seen = HashSet::new();
            for (r, _) in readers.get(&n).into_iter().flatten() {
                if !places.contains_key(r) || !seen.insert(*r) {
                    continue;
                }
                let d = indeg.get_mut(r).expect("listed");
                // Count each edge: a reader may read several results of n.
                let edges = readers[&n].iter().filter(|(x, _)| x == r).count();
                *d -= edges;
                if *d == 0 {
                    ready.entry(places[r]).or_default().insert(*r);
                }
            }
        }
        stages.push((cur, nodes));
    }
    let placed: usize = stages.iter().map(|(_, n)| n.len()).sum();
    if placed != places.len() {
        return Err(NeuroError::Lower { layer: q.name.clone(), msg: "the graph has a cycle".into() });
    }
    Ok(stages)
}

/// The IR subgraph of a management or host stage: external operands become inputs named after
/// their buffers, values read later become outputs. Returns (text, input buffers, output
/// buffers, parameter names).
/// A stage subgraph: its text, input buffers, output buffers and parameter names.
type Subgraph = (String, Vec<u32>, Vec<u32>, Vec<String>);

fn subgraph(lw: &mut Lowerer, name: &str, nodes: &[NodeIndex], set: &BTreeSet<NodeIndex>) -> Result<Subgraph, NeuroError> {
    let q = lw.q;
    let mut sg = Graph::new(name);
    sg.dims = q.dims.clone();
    let mut map: HashMap<Value, Value> = HashMap::new();
    let mut ins = Vec::new();
    let mut used = Vec::new();
    for &n in nodes {
        let mut operands = Vec::new();
        for v in q.operands(n) {
            let nv = match map.get(&v) {
                Some(&x) => x,
                None => {
                    let x = match &q.node(v.node).op {
                        Op::Param { name } => {
                            if !used.contains(name) {
                                used.push(name.clone());
                            }
                            sg.param(name, q.value_type(v).clone())?
                        }
                        _ => {
                            let b = lw.buffer(v);
                            ins.push(b);
                            let bname = lw.buffers[b as usize].name.clone();
                            sg.input(&bname, q.value_type(v).clone())
                        }
                    };
                    map.insert(v, x);
                    x
                }
            };
            operands.push(nv);
        }
        let node = q.node(n);
        let results = sg.add(node.op.clone(), &operands, &node.name)?;
        for (port, r) in results.into_iter().enumerate() {
            map.insert(Value { node: n, port: port as u32 }, r);
        }
    }
    let mut outs = Vec::new();
    for &n in nodes {
        for port in 0..q.node(n).results.len() as u32 {
            let v = Value { node: n, port };
            let read_outside = lw.readers_of(v).iter().any(|r| !set.contains(r));
            if read_outside || lw.is_graph_output(v) {
                let b = lw.buffer(v);
                outs.push(b);
                let bname = lw.buffers[b as usize].name.clone();
                sg.set_output(&bname, map[&v]);
            }
        }
    }
    if sg.outputs.is_empty() {
        return Err(NeuroError::Lower { layer: q.node(nodes[0]).name.clone(), msg: "a management/host stage computes nothing that is used".into() });
    }
    let text = sparkc_ir::text::print(&sg)?;
    Ok((text, ins, outs, used))
}
