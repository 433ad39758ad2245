//! Placement and routing.
//!
//! Each group is cut into chunks of neurons that fit a core (neuron count and synapse memory);
//! when one neuron's inputs exceed a core (fan-in or memory), its inputs are split over several
//! cores that send partial sums to the neuron's core. Groups are placed in dataflow order
//! (a petgraph topological sort) onto consecutive cores, chip after chip. Routes between cores
//! follow the tile mesh inside a chip and the shortest path between chips (petgraph Dijkstra
//! over the board meshes).

use crate::legalize::Diagnostic;
use crate::program::*;
use crate::target::Target;
use petgraph::algo::{dijkstra, toposort};
use petgraph::graph::{DiGraph, NodeIndex, UnGraph};
use std::collections::BTreeSet;

/// Where a core sits: chip, and tile coordinates on that chip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreSite {
    pub chip: u32,
    pub tile_x: u32,
    pub tile_y: u32,
    pub tile: u32,
}

/// Distances on a placed program's chips.
#[derive(Clone, Debug)]
pub struct Geometry {
    cores_per_chip: u32,
    cores_per_tile: u32,
    tile_mesh: [u32; 2],
    /// chip_hops[a][b]: chip-to-chip links on the shortest route.
    chip_hops: Vec<Vec<u32>>,
}

impl Geometry {
    pub fn new(target: &Target, chips: u32) -> Geometry {
        let chips = chips.max(1);
        // Chips of a board form its mesh; boards sit side by side in x.
        let mx = target.board.chip_mesh[0];
        let per_board = target.board.chips;
        let coord = |c: u32| {
            let (b, k) = (c / per_board, c % per_board);
            (b * mx + k % mx, k / mx)
        };
        let mut g: UnGraph<u32, u32> = UnGraph::new_undirected();
        let nodes: Vec<NodeIndex> = (0..chips).map(|c| g.add_node(c)).collect();
        for a in 0..chips {
            for b in a + 1..chips {
                let (pa, pb) = (coord(a), coord(b));
                if pa.0.abs_diff(pb.0) + pa.1.abs_diff(pb.1) == 1 {
                    g.add_edge(nodes[a as usize], nodes[b as usize], 1);
                }
            }
        }
        let chip_hops = (0..chips)
            .map(|a| {
                let d = dijkstra(&g, nodes[a as usize], None, |e| *e.weight());
                (0..chips).map(|b| d.get(&nodes[b as usize]).copied().unwrap_or(u32::MAX / 2)).collect()
            })
            .collect();
        Geometry { cores_per_chip: target.chip.cores, cores_per_tile: target.cores_per_tile(), tile_mesh: target.chip.tile_mesh, chip_hops }
    }

    pub fn site(&self, core: u32) -> CoreSite {
        let chip = core / self.cores_per_chip;
        let tile = (core % self.cores_per_chip) / self.cores_per_tile;
        CoreSite { chip, tile, tile_x: tile % self.tile_mesh[0], tile_y: tile / self.tile_mesh[0] }
    }

    /// The management core of a chip sits at tile (0, 0).
    pub fn management_site(&self, chip: u32) -> CoreSite {
        CoreSite { chip, tile: 0, tile_x: 0, tile_y: 0 }
    }

    /// The route between two sites: tile hops east-west and north-south inside chips, and chip
    /// links. Crossing chips, a spike leaves through the nearest edge and enters at the same
    /// tile position on the next chip (dimension-ordered, so the tile hops are the in-chip
    /// distance).
    pub fn hop(&self, a: CoreSite, b: CoreSite, core: u32) -> Hop {
        let chip_hops = self.chip_hops.get(a.chip as usize).and_then(|r| r.get(b.chip as usize)).copied().unwrap_or(0);
        Hop { core, east_west: a.tile_x.abs_diff(b.tile_x), north_south: a.tile_y.abs_diff(b.tile_y), chip_hops }
    }
}

/// How one group's neurons and inputs split over cores.
struct Split {
    bits_per_neuron: u64,
    parts: u32,
    per_core: u32,
}

fn split_of(group: u32, groups: &[Group], synapses: &[SynapseLayer], target: &Target, diags: &mut Vec<Diagnostic>) -> Split {
    let g = &groups[group as usize];
    let fan_in: u64 = synapses.iter().filter(|s| s.dest_group == group).map(|s| s.inputs as u64).sum();
    let wbits = target.numerics.weight_bits as u64;
    let bits_per_neuron = fan_in * wbits;
    let c = &target.core;
    let mut parts = 1u64;
    while fan_in.div_ceil(parts) > c.max_fan_in as u64 || bits_per_neuron.div_ceil(parts) > c.synapse_memory_bits {
        parts += 1;
    }
    if parts > c.max_fan_in_split as u64 {
        diags.push(Diagnostic::error(
            &g.name,
            "core.max_fan_in_split",
            format!(
                "each neuron reads {fan_in} inputs ({bits_per_neuron} bits of synapses); split under core.max_fan_in = {} and core.synapse_memory_bits = {} that needs {parts} cores per neuron, more than core.max_fan_in_split = {}",
                c.max_fan_in, c.synapse_memory_bits, c.max_fan_in_split
            ),
        ));
    } else if parts > 1 {
        diags.push(Diagnostic::note(
            &g.name,
            "core.max_fan_in",
            format!("each neuron reads {fan_in} inputs ({bits_per_neuron} synapse bits): inputs split over {parts} cores (limits: max_fan_in {}, synapse memory {} bits per core); partial sums go to the neuron's core", c.max_fan_in, c.synapse_memory_bits),
        ));
    }
    let share = bits_per_neuron.div_ceil(parts).max(1);
    let per_core = (c.synapse_memory_bits / share).clamp(1, c.neurons as u64) as u32;
    let per_core = if fan_in == 0 { c.neurons } else { per_core };
    Split { bits_per_neuron, parts: parts as u32, per_core }
}

/// The order groups are placed in: stage by stage (execution order, so that consecutive
/// layers and their management core sit together), each stage in the dataflow order of its
/// synapse graph (a petgraph topological sort).
fn placement_order(groups: &[Group], synapses: &[SynapseLayer], stages: &[Stage]) -> Vec<u32> {
    let mut order = Vec::new();
    for st in stages {
        let StageKind::Neuro { groups: members } = &st.kind else { continue };
        let mut g: DiGraph<u32, ()> = DiGraph::new();
        let nodes: Vec<NodeIndex> = members.iter().map(|&m| g.add_node(m)).collect();
        let pos = |m: u32| members.iter().position(|&x| x == m);
        for s in synapses {
            if let (SynapseSource::Group { group, .. }, Some(d)) = (&s.source, pos(s.dest_group)) {
                if let Some(a) = pos(*group) {
                    g.add_edge(nodes[a], nodes[d], ());
                }
            }
        }
        match toposort(&g, None) {
            Ok(sorted) => order.extend(sorted.into_iter().map(|n| g[n])),
            Err(_) => order.extend(members.iter().copied()),
        }
    }
    // Anything no stage lists (nothing, for a lowered program) still gets cores.
    for gi in 0..groups.len() as u32 {
        if !order.contains(&gi) {
            order.push(gi);
        }
    }
    order
}

/// Place groups on cores and chips, assign management stages to chips, and build the routing
/// tables. Diagnostics name the layer and the limit.
pub fn place(groups: &[Group], synapses: &[SynapseLayer], stages: &mut [Stage], target: &Target, diags: &mut Vec<Diagnostic>) -> (Placement, Vec<Route>) {
    let mut p = Placement { chips: 0, cores: Vec::new(), groups: vec![GroupPlacement { neurons_per_core: 0, parts: 1, cores: Vec::new() }; groups.len()] };
    for gi in placement_order(groups, synapses, stages) {
        let g = &groups[gi as usize];
        let sp = split_of(gi, groups, synapses, target, diags);
        let chunks = g.channels.div_ceil(sp.per_core).max(1);
        let mut cores = Vec::new();
        for j in 0..chunks {
            let lo = j * sp.per_core;
            let hi = ((j + 1) * sp.per_core).min(g.channels);
            for part in 0..sp.parts {
                let id = p.cores.len() as u32;
                let share = sp.bits_per_neuron.div_ceil(sp.parts as u64);
                p.cores.push(CoreAlloc {
                    chip: id / target.chip.cores,
                    index: id % target.chip.cores,
                    group: gi,
                    lo,
                    hi,
                    part,
                    synapse_bits: share * (hi - lo) as u64,
                });
                cores.push(id);
            }
        }
        let first_chip = p.cores[cores[0] as usize].chip;
        let last_chip = p.cores[*cores.last().expect("non-empty") as usize].chip;
        if last_chip != first_chip {
            diags.push(Diagnostic::note(&g.name, "chip.cores", format!("{} neurons on {} cores span chips {first_chip}..={last_chip} (chip.cores = {})", g.channels, cores.len(), target.chip.cores)));
        }
        p.groups[gi as usize] = GroupPlacement { neurons_per_core: sp.per_core, parts: sp.parts, cores };
    }
    p.chips = (p.cores.len() as u32).div_ceil(target.chip.cores).max(1);

    // Management stages run on the chip of the neurons they feed (or that feed them).
    let reader_chip = |buf: u32| -> Option<u32> {
        for (gi, g) in groups.iter().enumerate() {
            let reads = g.inputs.iter().any(|i| match i.source {
                InputSource::Injection { buffer } => buffer == buf,
                InputSource::Dendrite { synapse } => synapses[synapse as usize].source == SynapseSource::Buffer(buf),
            }) || g.state.iter().any(|s| s.init == StateInit::Buffer(buf));
            if reads {
                return p.groups[gi].cores.first().map(|&c| p.cores[c as usize].chip);
            }
        }
        None
    };
    let writer_chip = |buf: u32| -> Option<u32> {
        for (gi, g) in groups.iter().enumerate() {
            if g.outputs.iter().any(|o| o.buffer == Some(buf)) || g.state.iter().any(|s| s.export == Some(buf)) {
                return p.groups[gi].cores.first().map(|&c| p.cores[c as usize].chip);
            }
        }
        None
    };
    for st in stages.iter_mut() {
        if let StageKind::Management { chip } = &mut st.kind {
            *chip = st.outputs.iter().find_map(|&b| reader_chip(b)).or_else(|| st.inputs.iter().find_map(|&b| writer_chip(b))).unwrap_or(0);
        }
    }

    // Routing tables and the fan-out limit.
    let geo = Geometry::new(target, p.chips);
    let mut routes = Vec::new();
    let mut fan_out: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); groups.len()];
    for (si, s) in synapses.iter().enumerate() {
        let dest = &p.groups[s.dest_group as usize];
        let dst_cores: Vec<u32> = dest.cores.clone();
        let sources: Vec<Option<u32>> = match s.source {
            SynapseSource::Group { group, .. } => {
                let gp = &p.groups[group as usize];
                gp.cores.iter().copied().filter(|&c| p.cores[c as usize].part == 0).map(Some).collect()
            }
            SynapseSource::Buffer(_) => vec![None],
        };
        for src in sources {
            let site = match src {
                Some(c) => geo.site(c),
                None => geo.management_site(p.cores[dst_cores[0] as usize].chip),
            };
            let dst = dst_cores.iter().map(|&c| geo.hop(site, geo.site(c), c)).collect();
            routes.push(Route { synapse: si as u32, src_core: src, dst });
        }
        if let SynapseSource::Group { group, .. } = s.source {
            // An axon reaches one core per destination chunk (the part holding that axon).
            let chunks = dest.cores.len() as u32 / dest.parts.max(1);
            for k in 0..chunks {
                fan_out[group as usize].insert(dest.cores[(k * dest.parts) as usize]);
            }
        }
    }
    for (gi, f) in fan_out.iter().enumerate() {
        if f.len() as u32 > target.core.max_fan_out {
            diags.push(Diagnostic::error(
                &groups[gi].name,
                "core.max_fan_out",
                format!("each neuron's spikes go to {} cores, more than core.max_fan_out = {}", f.len(), target.core.max_fan_out),
            ));
        }
    }
    (p, routes)
}

/// The input part (fan-in split) that axon `axon` of synapse layer `syn` belongs to.
pub fn part_of_axon(synapses: &[SynapseLayer], syn: u32, axon: u32, parts: u32) -> u32 {
    if parts <= 1 {
        return 0;
    }
    let s = &synapses[syn as usize];
    // The group's inputs, concatenated in synapse order, are split evenly into parts.
    let mut offset = 0u64;
    let mut total = 0u64;
    for (i, t) in synapses.iter().enumerate() {
        if t.dest_group == s.dest_group {
            if (i as u32) < syn {
                offset += t.inputs as u64;
            }
            total += t.inputs as u64;
        }
    }
    (((offset + axon as u64) * parts as u64) / total.max(1)) as u32
}
