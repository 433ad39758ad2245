//! A readable text dump of a spike program: stages (with the management and host subgraphs),
//! per-group microcode and configuration, synapse tables, placement, routing and the I/O map.

use crate::program::*;
use sparkc_backend_cpu::kernels::fixed::FxInstr;
use std::fmt::Write;

fn preview(v: &[i64]) -> String {
    let head: Vec<String> = v.iter().take(6).map(|x| x.to_string()).collect();
    if v.len() > 6 {
        format!("[{}, … ({} values)]", head.join(", "), v.len())
    } else {
        format!("[{}]", head.join(", "))
    }
}

fn instr(i: &FxInstr) -> String {
    match *i {
        FxInstr::Un { op, dst, a } => format!("r{dst} = {} r{a}", op.name()),
        FxInstr::Bin { dst, a, b, .. } => format!("r{dst} = {} r{a} r{b}", crate::microcode::op_name(i)),
        FxInstr::Select { dst, cond, a, b } => format!("r{dst} = select r{cond} ? r{a} : r{b}"),
    }
}

pub fn dump(p: &SpikeProgram) -> String {
    let mut o = String::new();
    let buf = |b: u32| p.buffers.get(b as usize).map_or("?".to_string(), |x| x.name.clone());
    let t = &p.target;
    writeln!(o, "spike program for target `{}` ({})", t.name, t.description).ok();
    writeln!(o, "fixed point: {} fractional bits, {}-bit values; {} frames per token", p.fx.frac, p.fx.bits, p.frames_per_token).ok();
    writeln!(
        o,
        "size: {} neuron groups, {} neurons, {} synapse layers, {} synapses; {} cores on {} chip(s)",
        p.groups.len(),
        p.neuron_count(),
        p.synapses.len(),
        p.synapse_count(),
        p.placement.cores.len(),
        p.placement.chips
    )
    .ok();
    let luts: Vec<String> = p.luts.iter().map(|(k, l)| format!("{} ({} entries)", k.name(), l.values.len())).collect();
    writeln!(o, "lookup tables: {}", if luts.is_empty() { "none".into() } else { luts.join(", ") }).ok();

    writeln!(o, "\n== I/O map").ok();
    for (name, b) in &p.inputs {
        writeln!(o, "  input  {name} -> buffer {}", buf(*b)).ok();
    }
    for (name, b) in &p.outputs {
        writeln!(o, "  output {name} <- buffer {}", buf(*b)).ok();
    }

    writeln!(o, "\n== stages (in execution order)").ok();
    for (i, st) in p.stages.iter().enumerate() {
        let ins: Vec<String> = st.inputs.iter().map(|&b| buf(b)).collect();
        let outs: Vec<String> = st.outputs.iter().map(|&b| buf(b)).collect();
        match &st.kind {
            StageKind::Neuro { groups } => {
                let gs: Vec<String> = groups.iter().map(|&g| format!("g{g} `{}`", p.groups[g as usize].name)).collect();
                writeln!(o, "[{i}] {} on neuromorphic cores: {}", st.name, gs.join(", ")).ok();
            }
            StageKind::Management { chip } => {
                writeln!(o, "[{i}] {} on the management core of chip {chip} (not native: costed separately)", st.name).ok();
            }
            StageKind::Host => {
                writeln!(o, "[{i}] {} on the host (not native: costed separately)", st.name).ok();
            }
        }
        writeln!(o, "    reads {}; writes {}", if ins.is_empty() { "-".into() } else { ins.join(", ") }, if outs.is_empty() { "-".into() } else { outs.join(", ") }).ok();
        for line in st.ir.lines() {
            writeln!(o, "    | {line}").ok();
        }
    }

    writeln!(o, "\n== neuron groups").ok();
    for (gi, g) in p.groups.iter().enumerate() {
        let gp = &p.placement.groups[gi];
        let rate = match g.rate {
            Rate::Frame => "every frame",
            Rate::Token => "once per token",
        };
        writeln!(
            o,
            "g{gi} `{}`: {} neurons, updated {rate}; {} cores ({} neurons per core, inputs split over {} part(s))",
            g.name,
            g.channels,
            gp.cores.len(),
            gp.neurons_per_core,
            gp.parts
        )
        .ok();
        for i in &g.inputs {
            let src = match i.source {
                InputSource::Dendrite { synapse } => format!("dendrite of synapse layer s{synapse} `{}`", p.synapses[synapse as usize].name),
                InputSource::Injection { buffer } => format!("injected from buffer {}", buf(buffer)),
            };
            writeln!(o, "  input r{} <- {src}", i.reg).ok();
        }
        for prm in &g.params {
            writeln!(o, "  param r{} = {} {}", prm.reg, prm.name, preview(&prm.values)).ok();
        }
        for s in &g.state {
            let init = match s.init {
                StateInit::Buffer(b) => format!("from buffer {}", buf(b)),
                StateInit::Const(v) => format!("= {v}"),
            };
            let reset = if s.token_reset { format!(", restarts at {} every token", s.reset_value) } else { String::new() };
            let export = s.export.map(|b| format!(", final value -> {}", buf(b))).unwrap_or_default();
            writeln!(o, "  state {}: r{} -> r{} after the step, initial {init}{reset}{export}", s.name, s.reg, s.next).ok();
        }
        writeln!(o, "  microcode ({} instructions, {} registers):", g.microcode.instrs.len(), g.microcode.n_regs).ok();
        for &(r, v) in &g.microcode.consts {
            writeln!(o, "    r{r} = const {v}").ok();
        }
        for ins in &g.microcode.instrs {
            writeln!(o, "    {}", instr(ins)).ok();
        }
        for out in &g.outputs {
            let syn: Vec<String> = out.synapses.iter().map(|s| format!("s{s}")).collect();
            writeln!(
                o,
                "  output `{}` r{}: {}-bit payload = round(value * mult >> {}), mult {}; events to {}{}",
                out.name,
                out.reg,
                out.bits,
                out.shift,
                preview(&out.mult),
                if syn.is_empty() { "no synapses".into() } else { syn.join(", ") },
                out.buffer.map(|b| format!("; payloads -> buffer {}", buf(b))).unwrap_or_default()
            )
            .ok();
        }
    }

    writeln!(o, "\n== synapse layers").ok();
    for (si, s) in p.synapses.iter().enumerate() {
        let src = match s.source {
            SynapseSource::Group { group, output } => format!("g{group}.{}", p.groups[group as usize].outputs[output as usize].name),
            SynapseSource::Buffer(b) => format!("buffer {}", buf(b)),
        };
        let first: Vec<i64> = (0..s.weights.len().min(8)).map(|i| s.weights.get(i)).collect();
        writeln!(
            o,
            "s{si} `{}`: {src} ({}-bit payloads) -> g{} input {}; {} x {} synapses, {}-bit weights (axon-major) {}; dendrite: round(sum * mult >> {}) + bias, {}-bit, mult {}, bias {}",
            s.name,
            s.payload_bits,
            s.dest_group,
            s.dest_input,
            s.inputs,
            s.outputs,
            s.weight_bits,
            preview(&first),
            s.shift,
            s.bits,
            preview(&s.mult),
            preview(&s.bias)
        )
        .ok();
    }

    writeln!(o, "\n== placement ({} chip(s))", p.placement.chips).ok();
    for (ci, c) in p.placement.cores.iter().enumerate() {
        writeln!(
            o,
            "  core {ci} (chip {} core {}): g{} neurons {}..{} part {}, {} synapse bits",
            c.chip, c.index, c.group, c.lo, c.hi, c.part, c.synapse_bits
        )
        .ok();
    }

    writeln!(o, "\n== routing tables").ok();
    for r in &p.routes {
        let src = r.src_core.map_or("management core/host".to_string(), |c| format!("core {c}"));
        let dst: Vec<String> = r
            .dst
            .iter()
            .map(|h| format!("core {} ({} E-W, {} N-S, {} chip hops)", h.core, h.east_west, h.north_south, h.chip_hops))
            .collect();
        writeln!(o, "  s{} from {src} -> {}", r.synapse, dst.join("; ")).ok();
    }

    writeln!(o, "\n== host and management parameters").ok();
    for (name, t) in &p.host_params {
        writeln!(o, "  {name} {:?}", t.shape).ok();
    }
    o
}
