//! The event-driven chip simulator.
//!
//! Stages run in program order. A management or host stage runs its IR subgraph on the CPU
//! backend. A neuromorphic stage runs frame by frame (K frames per token, state carried
//! across tokens and calls): in each frame, every group in dependency order first receives
//! the events that exist — only non-zero payloads, each fanned out over its synapse row into
//! integer dendritic sums — then updates every neuron with its microcode and sends the
//! non-zero payloads of its outputs as events. Everything on the neuromorphic cores is integer
//! arithmetic with the same rounding as the CPU backend's integer mode, so the two agree bit
//! for bit. Every synaptic operation, neuron update, event, hop and partial sum is counted on
//! the core that does it.

use super::cost::op_count;
use super::report::*;
use sparkc_backend_cpu::kernels::fixed::{dendrite, payload, Luts};
use sparkc_backend_cpu::CpuProgram;
use sparkc_backend_neuro::place::{part_of_axon, CoreSite, Geometry};
use sparkc_backend_neuro::program::*;
use sparkc_ir::tensor::TensorData;
use sparkc_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("the program's source IR does not parse: {0}")]
    Ir(#[from] sparkc_ir::IrError),
    #[error("stage `{stage}`: {source}")]
    Stage { stage: String, source: sparkc_backend_cpu::CpuError },
    #[error("input error: {0}")]
    Input(String),
    #[error("invalid program: {0}")]
    Program(String),
}

/// A management or host stage, compiled for the CPU.
struct StageExec {
    prog: CpuProgram,
    /// (op, operand types, result types) of every node, for the operation counts.
    ops: Vec<(Op, Vec<ValueType>, Vec<ValueType>)>,
}

/// Where one synapse layer's rows live: the input part of each axon, and per chunk of
/// destination neurons the core holding each part.
struct SynRoute {
    part: Vec<u32>,
    chunks: Vec<Chunk>,
}

struct Chunk {
    lo: usize,
    hi: usize,
    cores: Vec<u32>,
}

#[derive(Clone, Default)]
struct CoreCount {
    synops: u64,
    updates: u64,
    active: u64,
    events: u64,
    packets: u64,
    hops: u64,
    chip_hops: u64,
    routing_pj: f64,
    busy_s: f64,
}

#[derive(Clone, Default)]
struct GroupCount {
    synops: u64,
    updates: u64,
    active: u64,
    events: u64,
    payloads: u64,
    partial: u64,
    hops: u64,
    chip_hops: u64,
    routing_pj: f64,
}

#[derive(Clone, Default)]
struct StageCount {
    ops: u64,
    time_s: f64,
}

#[derive(Clone, Default)]
struct Counters {
    cores: Vec<CoreCount>,
    groups: Vec<GroupCount>,
    stages: Vec<StageCount>,
    time_s: f64,
    tokens: u64,
    frames: u64,
    calls: u64,
    wall_s: f64,
}

/// Events of a group output, per (batch row, step), kept for groups of later stages.
type Kept = HashMap<(u32, u32), Vec<Vec<(u32, i64)>>>;

/// Events of batch row 0 for the raster and the activity plot.
#[derive(Clone, Debug, Default)]
pub struct Recording {
    /// (frame, neuron row in the raster, group).
    pub events: Vec<(u32, u32, u32)>,
    /// Per group: (frame, events) for every frame the group updated in.
    pub activity: Vec<Vec<(u32, u32)>>,
    /// Per group: first raster row and neuron count.
    pub rows: Vec<(u32, u32)>,
    pub names: Vec<String>,
    pub frames_per_token: u32,
}

/// Most events kept for the raster.
const MAX_RECORDED: usize = 400_000;

pub struct ChipSimulator {
    prog: SpikeProgram,
    signature: Graph,
    stages: Vec<Option<StageExec>>,
    /// Per neuro stage: its groups in dependency order.
    order: Vec<Vec<u32>>,
    stage_of_group: Vec<usize>,
    luts: Luts,
    geo: Geometry,
    /// Per group, per neuron: the core that holds it (part 0).
    soma: Vec<Vec<u32>>,
    /// Per group, per neuron: its chunk.
    chunk_of: Vec<Vec<u32>>,
    routes: Vec<SynRoute>,
    /// The chip whose management core writes a buffer (the host counts as chip 0 plus a link).
    buffer_src: HashMap<u32, (u32, bool)>,
    counters: Counters,
    recording: Recording,
}

impl ChipSimulator {
    pub fn new(prog: SpikeProgram) -> Result<ChipSimulator, SimError> {
        let signature = sparkc_ir::text::parse(&prog.source_ir)?;
        let mut stages = Vec::new();
        let mut order = Vec::new();
        let mut stage_of_group = vec![usize::MAX; prog.groups.len()];
        let mut buffer_src = HashMap::new();
        for (si, st) in prog.stages.iter().enumerate() {
            match &st.kind {
                StageKind::Neuro { groups } => {
                    for &g in groups {
                        stage_of_group[g as usize] = si;
                    }
                    stages.push(None);
                    order.push(dependency_order(&prog, groups)?);
                }
                kind => {
                    let g = sparkc_ir::text::parse(&st.ir)?;
                    let prog_cpu = CpuProgram::compile(&g).map_err(|source| SimError::Stage { stage: st.name.clone(), source })?;
                    let ops = g
                        .topo_order()?
                        .into_iter()
                        .filter(|&n| !g.node(n).op.is_source())
                        .map(|n| {
                            let ins = g.operands(n).iter().map(|&v| g.value_type(v).clone()).collect();
                            (g.node(n).op.clone(), ins, g.node(n).results.clone())
                        })
                        .collect();
                    let src = match kind {
                        StageKind::Management { chip } => (*chip, false),
                        _ => (0, true),
                    };
                    for &b in &st.outputs {
                        buffer_src.insert(b, src);
                    }
                    stages.push(Some(StageExec { prog: prog_cpu, ops }));
                    order.push(Vec::new());
                }
            }
        }
        if let Some(g) = stage_of_group.iter().position(|&s| s == usize::MAX) {
            return Err(SimError::Program(format!("group `{}` is in no stage", prog.groups[g].name)));
        }
        let geo = Geometry::new(&prog.target, prog.placement.chips);
        let pl = &prog.placement;
        let mut soma = Vec::new();
        let mut chunk_of = Vec::new();
        for (gi, g) in prog.groups.iter().enumerate() {
            let gp = &pl.groups[gi];
            let mut s = vec![0u32; g.channels as usize];
            let mut ch = vec![0u32; g.channels as usize];
            for (j, cores) in gp.cores.chunks(gp.parts.max(1) as usize).enumerate() {
                let c0 = &pl.cores[cores[0] as usize];
                for n in c0.lo..c0.hi {
                    s[n as usize] = cores[0];
                    ch[n as usize] = j as u32;
                }
            }
            soma.push(s);
            chunk_of.push(ch);
        }
        let routes = (0..prog.synapses.len())
            .map(|si| {
                let s = &prog.synapses[si];
                let gp = &pl.groups[s.dest_group as usize];
                let part = (0..s.inputs).map(|a| part_of_axon(&prog.synapses, si as u32, a, gp.parts)).collect();
                let chunks = gp
                    .cores
                    .chunks(gp.parts.max(1) as usize)
                    .map(|cores| {
                        let c0 = &pl.cores[cores[0] as usize];
                        Chunk { lo: c0.lo as usize, hi: c0.hi as usize, cores: cores.to_vec() }
                    })
                    .collect();
                SynRoute { part, chunks }
            })
            .collect();
        let mut rows = Vec::new();
        let mut row = 0u32;
        for g in &prog.groups {
            rows.push((row, g.channels));
            row += g.channels;
        }
        let recording = Recording {
            events: Vec::new(),
            activity: vec![Vec::new(); prog.groups.len()],
            rows,
            names: prog.groups.iter().map(|g| g.name.clone()).collect(),
            frames_per_token: prog.frames_per_token,
        };
        let counters = Counters {
            cores: vec![CoreCount::default(); pl.cores.len()],
            groups: vec![GroupCount::default(); prog.groups.len()],
            stages: vec![StageCount::default(); prog.stages.len()],
            ..Default::default()
        };
        Ok(ChipSimulator { luts: Luts::new(prog.fx), prog, signature, stages, order, stage_of_group, geo, soma, chunk_of, routes, buffer_src, counters, recording })
    }

    pub fn program(&self) -> &SpikeProgram {
        &self.prog
    }

    /// The quantized IR the program came from (its inputs and outputs are the program's).
    pub fn signature(&self) -> &Graph {
        &self.signature
    }

    pub fn recording(&self) -> &Recording {
        &self.recording
    }

    /// Forget the counts and recorded events.
    pub fn reset_counters(&mut self) {
        let c = &mut self.counters;
        c.cores.iter_mut().for_each(|x| *x = CoreCount::default());
        c.groups.iter_mut().for_each(|x| *x = GroupCount::default());
        c.stages.iter_mut().for_each(|x| *x = StageCount::default());
        c.time_s = 0.0;
        c.tokens = 0;
        c.frames = 0;
        c.calls = 0;
        c.wall_s = 0.0;
        self.recording.events.clear();
        self.recording.activity.iter_mut().for_each(|a| a.clear());
    }

    /// B and T from the inputs whose declared shape starts with [B, T].
    fn batch_and_tokens(&self, inputs: &BTreeMap<String, Tensor>) -> Result<(usize, usize), SimError> {
        let (mut b, mut t) = (None, None);
        for (_, name, ty) in self.signature.inputs() {
            let Some(x) = inputs.get(name) else { continue };
            let d = ty.shape.dims();
            if d.first() == Some(&Dim::sym("B")) {
                b = b.or(x.shape.first().copied());
            }
            if d.get(1) == Some(&Dim::sym("T")) {
                t = t.or(x.shape.get(1).copied());
            }
        }
        match (b, t) {
            (Some(b), Some(t)) if b > 0 && t > 0 => Ok((b, t)),
            _ => Err(SimError::Input("the inputs do not fix a positive batch B and token count T".into())),
        }
    }

    /// Run one call: the same inputs and outputs as the quantized graph on the CPU.
    pub fn run(&mut self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, SimError> {
        let start = Instant::now();
        let mut bufs: Vec<Option<Tensor>> = vec![None; self.prog.buffers.len()];
        for (_, name, ty) in self.signature.inputs() {
            let t = inputs.get(name).ok_or_else(|| SimError::Input(format!("missing input `{name}`")))?;
            if t.shape.len() != ty.shape.rank() {
                return Err(SimError::Input(format!("`{name}` has shape {:?}, expected {}", t.shape, ty.shape)));
            }
            let t = match (ty.dtype, &t.data) {
                (DType::F32, TensorData::I64(v)) => Tensor::f32(t.shape.clone(), v.iter().map(|&x| x as f32).collect()),
                (DType::I64 | DType::I32, TensorData::F32(_)) => return Err(SimError::Input(format!("`{name}` must be an integer tensor"))),
                _ => t.clone(),
            };
            let b = self.prog.buffer_id(name).ok_or_else(|| SimError::Program(format!("no buffer for input `{name}`")))?;
            bufs[b as usize] = Some(t);
        }
        let (bsz, tokens) = self.batch_and_tokens(inputs)?;
        let mut counters = std::mem::take(&mut self.counters);
        let mut recording = std::mem::take(&mut self.recording);
        let result = self.run_stages(&mut bufs, bsz, tokens, &mut counters, &mut recording);
        self.counters = counters;
        self.recording = recording;
        result?;
        let k = self.prog.frames_per_token as u64;
        self.counters.tokens += (bsz * tokens) as u64;
        self.counters.frames += (bsz * tokens) as u64 * k;
        self.counters.calls += 1;
        self.counters.wall_s += start.elapsed().as_secs_f64();
        let mut out = BTreeMap::new();
        for (name, b) in &self.prog.outputs {
            let t = bufs[*b as usize].clone().ok_or_else(|| SimError::Program(format!("output `{name}` was never written")))?;
            out.insert(name.clone(), t);
        }
        Ok(out)
    }

    fn run_stages(&self, bufs: &mut [Option<Tensor>], bsz: usize, tokens: usize, cnt: &mut Counters, rec: &mut Recording) -> Result<(), SimError> {
        let t = &self.prog.target.timing;
        let mut kept = Kept::new();
        for (si, st) in self.prog.stages.iter().enumerate() {
            match &self.stages[si] {
                Some(exec) => {
                    let mut feed = BTreeMap::new();
                    for &b in &st.inputs {
                        let name = self.prog.buffers[b as usize].name.clone();
                        let x = bufs[b as usize].take().ok_or_else(|| SimError::Program(format!("stage `{}` reads buffer `{name}` before it is written", st.name)))?;
                        feed.insert(name, x);
                    }
                    let out = exec.prog.run(&feed, &self.prog.host_params).map_err(|source| SimError::Stage { stage: st.name.clone(), source });
                    for &b in &st.inputs {
                        bufs[b as usize] = feed.remove(&self.prog.buffers[b as usize].name);
                    }
                    let mut out = out?;
                    for &b in &st.outputs {
                        let name = &self.prog.buffers[b as usize].name;
                        bufs[b as usize] = Some(out.remove(name).ok_or_else(|| SimError::Program(format!("stage `{}` does not write `{name}`", st.name)))?);
                    }
                    let mut env = exec.prog.graph().dims.clone();
                    env.insert("B".into(), bsz as u64);
                    env.insert("T".into(), tokens as u64);
                    let ops: u64 = exec
                        .ops
                        .iter()
                        .map(|(op, ins, outs)| {
                            let c = |tys: &Vec<ValueType>| tys.iter().map(|ty| ty.shape.concrete(&env).unwrap_or_default()).collect::<Vec<_>>();
                            op_count(op, &c(ins), &c(outs))
                        })
                        .sum();
                    let per_op = if matches!(st.kind, StageKind::Host) { t.host_op_ns } else { t.management_op_ns };
                    let time = ops as f64 * per_op * 1e-9;
                    cnt.stages[si].ops += ops;
                    cnt.stages[si].time_s += time;
                    cnt.time_s += time;
                }
                None => self.run_neuro(si, bufs, &mut kept, bsz, tokens, cnt, rec)?,
            }
        }
        Ok(())
    }

    /// Energy (pJ), latency (ns), tile hops and chip hops of a packet from `a` to `b`.
    fn packet(&self, a: CoreSite, b: CoreSite, extra_chip_hops: u32) -> (f64, f64, u64, u64) {
        let e = &self.prog.target.energy;
        let t = &self.prog.target.timing;
        if a == b && extra_chip_hops == 0 {
            return (e.spike_within_tile.pj, 0.0, 0, 0);
        }
        let h = self.geo.hop(a, b, 0);
        let chips = (h.chip_hops + extra_chip_hops) as f64;
        let pj = h.east_west as f64 * e.hop_east_west.pj + h.north_south as f64 * e.hop_north_south.pj + chips * e.chip_hop.pj;
        let pj = if h.east_west + h.north_south == 0 && chips == 0.0 { e.spike_within_tile.pj } else { pj };
        let ns = (h.east_west + h.north_south) as f64 * t.hop_ns + chips * t.chip_hop_ns;
        (pj, ns, (h.east_west + h.north_south) as u64, chips as u64)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_neuro(&self, si: usize, bufs: &mut [Option<Tensor>], kept: &mut Kept, bsz: usize, tokens: usize, cnt: &mut Counters, rec: &mut Recording) -> Result<(), SimError> {
        let p = &self.prog;
        let groups = &self.order[si];
        let k = p.frames_per_token as usize;
        let rate = p.groups[groups[0] as usize].rate;
        let steps = match rate {
            Rate::Frame => tokens * k,
            Rate::Token => tokens,
        };
        let timing = &p.target.timing;
        let int_buf = |b: u32, want: usize, what: &str| -> Result<&[i64], SimError> {
            let t = bufs[b as usize].as_ref().ok_or_else(|| SimError::Program(format!("{what} reads buffer `{}` before it is written", p.buffers[b as usize].name)))?;
            let v = t.as_i64().ok_or_else(|| SimError::Program(format!("buffer `{}` must hold integers", p.buffers[b as usize].name)))?;
            if v.len() != want {
                return Err(SimError::Input(format!("buffer `{}` has {} values, expected {want}", p.buffers[b as usize].name, v.len())));
            }
            Ok(v)
        };
        // Per group: state [B, C, slots], initialised from buffers or constants.
        let mut state: HashMap<u32, Vec<i64>> = HashMap::new();
        for &g in groups {
            let grp = &p.groups[g as usize];
            let (c, ns) = (grp.channels as usize, grp.state.len());
            let mut s = vec![0i64; bsz * c * ns];
            for (i, slot) in grp.state.iter().enumerate() {
                match slot.init {
                    StateInit::Const(v) => (0..bsz * c).for_each(|x| s[x * ns + i] = v),
                    StateInit::Buffer(b) => {
                        let v = int_buf(b, bsz * c, &grp.name)?;
                        (0..bsz * c).for_each(|x| s[x * ns + i] = v[x]);
                    }
                }
            }
            state.insert(g, s);
        }
        // Payloads that management cores read, and events kept for later stages.
        let mut out_bufs: HashMap<u32, Vec<i64>> = HashMap::new();
        let mut stored: Kept = HashMap::new();
        for &g in groups {
            let grp = &p.groups[g as usize];
            for (oi, o) in grp.outputs.iter().enumerate() {
                if let Some(b) = o.buffer {
                    out_bufs.insert(b, vec![0; bsz * steps * grp.channels as usize]);
                }
                if o.synapses.iter().any(|&s| self.stage_of_group[p.synapses[s as usize].dest_group as usize] != si) {
                    stored.insert((g, oi as u32), vec![Vec::new(); bsz * steps]);
                }
            }
        }
        let mut acc: HashMap<u32, Vec<i64>> = HashMap::new();
        for &g in groups {
            for i in &p.groups[g as usize].inputs {
                if let InputSource::Dendrite { synapse } = i.source {
                    acc.insert(synapse, vec![0; p.synapses[synapse as usize].outputs as usize]);
                }
            }
        }
        let mut regs: HashMap<u32, Vec<i64>> = groups.iter().map(|&g| (g, p.groups[g as usize].microcode.registers())).collect();
        let mut cur: HashMap<u32, Vec<Vec<(u32, i64)>>> = groups.iter().map(|&g| (g, vec![Vec::new(); p.groups[g as usize].outputs.len()])).collect();
        let mut step_busy = vec![0f64; p.placement.cores.len()];
        let mut touched: Vec<u32> = Vec::new();
        let mut scratch: Vec<(u32, i64)> = Vec::new();
        let mut next_vals: Vec<i64> = Vec::new();
        for b in 0..bsz {
            for step in 0..steps {
                let token_start = rate == Rate::Token || step % k == 0;
                let frame = match rate {
                    Rate::Frame => step,
                    Rate::Token => step * k + k - 1,
                };
                let mut max_hop_ns = 0f64;
                for &g in groups {
                    let grp = &p.groups[g as usize];
                    let c = grp.channels as usize;
                    let gp = &p.placement.groups[g as usize];
                    let nchunks = gp.cores.len() / gp.parts.max(1) as usize;
                    let mut chunk_hit = vec![false; nchunks];
                    // 1. Events into the dendrites: only the non-zero payloads that exist.
                    for inp in &grp.inputs {
                        let InputSource::Dendrite { synapse } = inp.source else { continue };
                        let layer = &p.synapses[synapse as usize];
                        let (events, src): (&[(u32, i64)], Option<u32>) = match layer.source {
                            SynapseSource::Group { group, output } => {
                                if self.stage_of_group[group as usize] == si {
                                    (&cur[&group][output as usize], Some(group))
                                } else {
                                    let v = kept.get(&(group, output)).ok_or_else(|| SimError::Program(format!("events of `{}` are read before they are computed", p.groups[group as usize].name)))?;
                                    (&v[b * steps + step], Some(group))
                                }
                            }
                            SynapseSource::Buffer(buf) => {
                                let v = int_buf(buf, bsz * steps * layer.inputs as usize, &layer.name)?;
                                let i = layer.inputs as usize;
                                scratch.clear();
                                let row = &v[(b * steps + step) * i..(b * steps + step + 1) * i];
                                scratch.extend(row.iter().enumerate().filter(|(_, &x)| x != 0).map(|(a, &x)| (a as u32, x)));
                                (scratch.as_slice(), None)
                            }
                        };
                        let a = acc.get_mut(&synapse).expect("allocated");
                        let buffer_site = match layer.source {
                            SynapseSource::Buffer(buf) => Some(self.buffer_src.get(&buf).copied().unwrap_or((0, true))),
                            _ => None,
                        };
                        for &(axon, pay) in events {
                            let o = layer.outputs as usize;
                            let base = axon as usize * o;
                            match &layer.weights {
                                Weights::I8(w) => a.iter_mut().zip(&w[base..base + o]).for_each(|(x, &wv)| *x = x.wrapping_add((wv as i64).wrapping_mul(pay))),
                                Weights::I16(w) => a.iter_mut().zip(&w[base..base + o]).for_each(|(x, &wv)| *x = x.wrapping_add((wv as i64).wrapping_mul(pay))),
                            }
                            let (src_site, extra) = match (src, buffer_site) {
                                (Some(sg), _) => (self.geo.site(self.soma[sg as usize][axon as usize]), 0),
                                (None, Some((chip, host))) => (self.geo.management_site(chip), host as u32),
                                (None, None) => (self.geo.management_site(0), 0),
                            };
                            let route = &self.routes[synapse as usize];
                            let part = route.part[axon as usize] as usize;
                            for (j, ch) in route.chunks.iter().enumerate() {
                                let core = ch.cores[part];
                                let n = (ch.hi - ch.lo) as u64;
                                let (pj, ns, hops, chips) = self.packet(src_site, self.geo.site(core), extra);
                                let cc = &mut cnt.cores[core as usize];
                                cc.synops += n;
                                cc.packets += 1;
                                cc.hops += hops;
                                cc.chip_hops += chips;
                                cc.routing_pj += pj;
                                let busy = n as f64 * timing.synop_ns * 1e-9;
                                cc.busy_s += busy;
                                if step_busy[core as usize] == 0.0 {
                                    touched.push(core);
                                }
                                step_busy[core as usize] += busy;
                                max_hop_ns = max_hop_ns.max(ns);
                                let gc = &mut cnt.groups[g as usize];
                                gc.synops += n;
                                gc.hops += hops;
                                gc.chip_hops += chips;
                                gc.routing_pj += pj;
                                chunk_hit[j] = true;
                            }
                        }
                    }
                    // Partial sums of split neurons travel to the neuron's core.
                    if gp.parts > 1 {
                        for (j, cores) in gp.cores.chunks(gp.parts as usize).enumerate() {
                            if !chunk_hit[j] {
                                continue;
                            }
                            let n = (p.placement.cores[cores[0] as usize].hi - p.placement.cores[cores[0] as usize].lo) as u64;
                            for &pc in &cores[1..] {
                                let (pj, ns, hops, chips) = self.packet(self.geo.site(pc), self.geo.site(cores[0]), 0);
                                let gc = &mut cnt.groups[g as usize];
                                gc.partial += n;
                                gc.routing_pj += pj * n as f64;
                                gc.hops += hops * n;
                                gc.chip_hops += chips * n;
                                cnt.cores[cores[0] as usize].routing_pj += pj * n as f64;
                                max_hop_ns = max_hop_ns.max(ns);
                            }
                        }
                    }
                    // 2. Every neuron's step.
                    let r = regs.get_mut(&g).expect("allocated");
                    let st = state.get_mut(&g).expect("allocated");
                    let ns = grp.state.len();
                    let outs = cur.get_mut(&g).expect("allocated");
                    outs.iter_mut().for_each(|v| v.clear());
                    let mut injections: Vec<(u16, &[i64])> = Vec::new();
                    for inp in &grp.inputs {
                        if let InputSource::Injection { buffer } = inp.source {
                            injections.push((inp.reg, int_buf(buffer, bsz * steps * c, &grp.name)?));
                        }
                    }
                    let row_off = (b * steps + step) * c;
                    for n in 0..c {
                        let mut active = chunk_hit[self.chunk_of[g as usize][n] as usize];
                        for inp in &grp.inputs {
                            if let InputSource::Dendrite { synapse } = inp.source {
                                let l = &p.synapses[synapse as usize];
                                r[inp.reg as usize] = dendrite(acc[&synapse][n], l.mult[n], l.shift, l.bias[n], l.bits);
                            }
                        }
                        for (reg, v) in &injections {
                            let x = v[row_off + n];
                            active |= x != 0;
                            r[*reg as usize] = x;
                        }
                        for prm in &grp.params {
                            r[prm.reg as usize] = prm.values[n];
                        }
                        let sb = (b * c + n) * ns;
                        for (i, slot) in grp.state.iter().enumerate() {
                            r[slot.reg as usize] = if token_start && slot.token_reset { slot.reset_value } else { st[sb + i] };
                        }
                        grp.microcode.run(r, p.fx, &self.luts);
                        // Read every new state before writing any (a state may be another's old value).
                        next_vals.clear();
                        next_vals.extend(grp.state.iter().map(|slot| r[slot.next as usize]));
                        st[sb..sb + ns].copy_from_slice(&next_vals);
                        for (oi, o) in grp.outputs.iter().enumerate() {
                            let pay = payload(r[o.reg as usize], o.mult[n], o.shift, o.bits);
                            if pay != 0 {
                                active = true;
                                outs[oi].push((n as u32, pay));
                                if let Some(buf) = o.buffer {
                                    out_bufs.get_mut(&buf).expect("allocated")[row_off + n] = pay;
                                }
                            }
                        }
                        let core = self.soma[g as usize][n];
                        let cc = &mut cnt.cores[core as usize];
                        cc.updates += 1;
                        cc.active += active as u64;
                        let busy = timing.neuron_update_ns * 1e-9;
                        cc.busy_s += busy;
                        if step_busy[core as usize] == 0.0 {
                            touched.push(core);
                        }
                        step_busy[core as usize] += busy;
                        let gc = &mut cnt.groups[g as usize];
                        gc.updates += 1;
                        gc.active += active as u64;
                    }
                    // 3. Outputs: count, record, keep for later stages, and send to management.
                    for (oi, o) in grp.outputs.iter().enumerate() {
                        let events = &outs[oi];
                        let gc = &mut cnt.groups[g as usize];
                        gc.payloads += c as u64;
                        gc.events += events.len() as u64;
                        for &(n, _) in events {
                            let core = self.soma[g as usize][n as usize];
                            cnt.cores[core as usize].events += 1;
                            if o.buffer.is_some() {
                                // One packet to the management core of the neuron's chip.
                                let site = self.geo.site(core);
                                let (pj, _, _, _) = self.packet(site, self.geo.management_site(site.chip), 0);
                                cnt.cores[core as usize].routing_pj += pj;
                                cnt.groups[g as usize].routing_pj += pj;
                            }
                        }
                        if b == 0 {
                            let (row0, _) = rec.rows[g as usize];
                            let act = &mut rec.activity[g as usize];
                            match act.last_mut() {
                                Some((f, n)) if *f == frame as u32 => *n += events.len() as u32,
                                _ => act.push((frame as u32, events.len() as u32)),
                            }
                            for &(n, _) in events {
                                if rec.events.len() < MAX_RECORDED {
                                    rec.events.push((frame as u32, row0 + n, g));
                                }
                            }
                        }
                        if let Some(v) = stored.get_mut(&(g, oi as u32)) {
                            v[b * steps + step] = events.clone();
                        }
                    }
                    for inp in &grp.inputs {
                        if let InputSource::Dendrite { synapse } = inp.source {
                            acc.get_mut(&synapse).expect("allocated").iter_mut().for_each(|x| *x = 0);
                        }
                    }
                }
                // The frame takes as long as the busiest core plus the longest route.
                let busiest = touched.iter().map(|&c| step_busy[c as usize]).fold(0f64, f64::max);
                for &c in &touched {
                    step_busy[c as usize] = 0.0;
                }
                touched.clear();
                let frame_time = busiest + max_hop_ns * 1e-9;
                cnt.stages[si].time_s += frame_time;
                cnt.time_s += frame_time;
            }
        }
        for &g in groups {
            let grp = &p.groups[g as usize];
            let (c, ns) = (grp.channels as usize, grp.state.len());
            let st = &state[&g];
            for (i, slot) in grp.state.iter().enumerate() {
                if let Some(b) = slot.export {
                    let v: Vec<i64> = (0..bsz * c).map(|x| st[x * ns + i]).collect();
                    bufs[b as usize] = Some(Tensor::i64(vec![bsz, c], v));
                }
            }
            for o in &grp.outputs {
                if let Some(buf) = o.buffer {
                    let data = out_bufs.remove(&buf).expect("allocated");
                    let shape = match rate {
                        Rate::Frame => vec![bsz, tokens, k, c],
                        Rate::Token => vec![bsz, tokens, c],
                    };
                    bufs[buf as usize] = Some(Tensor::i64(shape, data));
                }
            }
        }
        // Events for groups of later stages of this call.
        kept.extend(stored);
        Ok(())
    }

    /// The report of everything simulated since the last reset.
    pub fn report(&self) -> SimReport {
        build_report(&self.prog, &self.counters)
    }

}

/// Groups of a neuro stage in dependency order (an event source before its destinations).
fn dependency_order(p: &SpikeProgram, groups: &[u32]) -> Result<Vec<u32>, SimError> {
    let mut left: Vec<u32> = groups.to_vec();
    let mut out = Vec::new();
    while !left.is_empty() {
        let pos = left.iter().position(|&g| {
            p.groups[g as usize].inputs.iter().all(|i| match i.source {
                InputSource::Dendrite { synapse } => match p.synapses[synapse as usize].source {
                    SynapseSource::Group { group, .. } => group == g || !left.contains(&group),
                    SynapseSource::Buffer(_) => true,
                },
                InputSource::Injection { .. } => true,
            })
        });
        let Some(pos) = pos else {
            return Err(SimError::Program(format!("groups {:?} feed each other within one frame (a loop without delay)", left)));
        };
        out.push(left.remove(pos));
    }
    Ok(out)
}

fn build_report(p: &SpikeProgram, c: &Counters) -> SimReport {
    let e = &p.target.energy;
    let t = &p.target;
    let pl = &p.placement;
    let mut layers = Vec::new();
    let mut total = Totals::default();
    for (gi, g) in p.groups.iter().enumerate() {
        let gc = &c.groups[gi];
        let inactive = gc.updates - gc.active;
        let energy = gc.synops as f64 * e.synop.pj + gc.active as f64 * e.neuron_update_active.pj + inactive as f64 * e.neuron_update_inactive.pj + gc.routing_pj;
        let rate = if gc.payloads == 0 { 0.0 } else { gc.events as f64 / gc.payloads as f64 };
        layers.push(LayerStats {
            name: g.name.clone(),
            neurons: g.channels as u64,
            cores: pl.groups[gi].cores.len() as u64,
            synops: gc.synops,
            neuron_updates: gc.updates,
            active_updates: gc.active,
            events: gc.events,
            payloads: gc.payloads,
            event_rate: rate,
            suppressed_fraction: if gc.payloads == 0 { 0.0 } else { 1.0 - rate },
            partial_sums: gc.partial,
            hops: gc.hops,
            chip_hops: gc.chip_hops,
            energy_pj: energy,
            busy_s: 0.0,
        });
        total.synops += gc.synops;
        total.neuron_updates += gc.updates;
        total.active_updates += gc.active;
        total.events += gc.events;
        total.payloads += gc.payloads;
        total.partial_sums += gc.partial;
        total.hops += gc.hops;
        total.chip_hops += gc.chip_hops;
        total.energy.synops_pj += gc.synops as f64 * e.synop.pj;
        total.energy.neuron_updates_pj += gc.active as f64 * e.neuron_update_active.pj + inactive as f64 * e.neuron_update_inactive.pj;
        total.energy.routing_pj += gc.routing_pj;
    }
    let mut cores_detail = Vec::new();
    let mut chips: Vec<ChipStats> = (0..pl.chips).map(|chip| ChipStats { chip, ..Default::default() }).collect();
    for (ci, core) in pl.cores.iter().enumerate() {
        let cc = &c.cores[ci];
        if let Some(l) = layers.get_mut(core.group as usize) {
            l.busy_s = l.busy_s.max(cc.busy_s);
        }
        let energy = cc.synops as f64 * e.synop.pj + cc.active as f64 * e.neuron_update_active.pj + (cc.updates - cc.active) as f64 * e.neuron_update_inactive.pj + cc.routing_pj;
        let neurons = if core.part == 0 { core.hi - core.lo } else { 0 };
        let nu = neurons as f64 / t.core.neurons as f64;
        let su = core.synapse_bits as f64 / t.core.synapse_memory_bits as f64;
        cores_detail.push(CoreStats {
            core: ci as u32,
            chip: core.chip,
            layer: p.groups[core.group as usize].name.clone(),
            neurons,
            synops: cc.synops,
            neuron_updates: cc.updates,
            events_sent: cc.events,
            packets_received: cc.packets,
            hops_in: cc.hops,
            chip_hops_in: cc.chip_hops,
            energy_pj: energy,
            busy_s: cc.busy_s,
            neuron_utilisation: nu,
            synapse_utilisation: su,
        });
        if let Some(ch) = chips.get_mut(core.chip as usize) {
            ch.cores_used += 1;
            ch.neuron_utilisation += nu;
            ch.synapse_utilisation += su;
            ch.synops += cc.synops;
            ch.neuron_updates += cc.updates;
            ch.events += cc.events;
            ch.hops += cc.hops;
            ch.chip_hops += cc.chip_hops;
            ch.busy_s = ch.busy_s.max(cc.busy_s);
            ch.energy_pj += energy;
        }
    }
    let (mut management, mut host) = (Vec::new(), Vec::new());
    for (si, st) in p.stages.iter().enumerate() {
        let sc = &c.stages[si];
        match st.kind {
            StageKind::Management { chip } => {
                let energy = sc.ops as f64 * e.management_op.pj;
                total.management_ops += sc.ops;
                total.energy.management_pj += energy;
                if let Some(ch) = chips.get_mut(chip as usize) {
                    ch.management_ops += sc.ops;
                    ch.energy_pj += energy;
                }
                management.push(StageStats { name: st.name.clone(), chip: Some(chip), ops: sc.ops, energy_pj: energy, time_s: sc.time_s });
            }
            StageKind::Host => {
                let energy = sc.ops as f64 * e.host_op.pj;
                total.host_ops += sc.ops;
                total.energy.host_pj += energy;
                host.push(StageStats { name: st.name.clone(), chip: None, ops: sc.ops, energy_pj: energy, time_s: sc.time_s });
            }
            StageKind::Neuro { .. } => {}
        }
    }
    for ch in chips.iter_mut() {
        let cap = t.chip.cores as f64;
        ch.core_utilisation = ch.cores_used as f64 / cap;
        ch.neuron_utilisation /= cap;
        ch.synapse_utilisation /= cap;
    }
    let en = &mut total.energy;
    en.total_pj = en.synops_pj + en.neuron_updates_pj + en.routing_pj + en.management_pj + en.host_pj;
    let tokens = c.tokens.max(1) as f64;
    total.energy_per_token_pj = en.total_pj / tokens;
    total.chip_energy_per_token_pj = (en.total_pj - en.host_pj) / tokens;
    total.time_s = c.time_s;
    total.time_per_token_s = c.time_s / tokens;
    total.wall_s = c.wall_s;
    total.synops_per_second = if c.wall_s > 0.0 { total.synops as f64 / c.wall_s } else { 0.0 };
    SimReport {
        target: t.name.clone(),
        chips: pl.chips,
        cores: pl.cores.len() as u32,
        calls: c.calls,
        tokens: c.tokens,
        frames: c.frames,
        totals: total,
        layers,
        cores_detail,
        chips_detail: chips,
        management,
        host,
        energy_sources: e.entries().iter().map(|(k, v)| (k.to_string(), v.pj, v.source.clone())).collect(),
    }
}
