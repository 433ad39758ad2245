//! The spike program: everything a simulated (or real) chip needs to run a model, in memory.
//! `format` writes and reads it as a versioned binary; `dump` prints it as text.

use crate::target::Target;
use sparkc_backend_cpu::kernels::fixed::{Fx, FxProgram, Lut, LutKind};
use sparkc_ir::Tensor;
use std::collections::BTreeMap;

/// Element type of a buffer passed between stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferType {
    F32,
    I64,
}

/// A named tensor that one stage writes and later stages read; graph inputs and outputs are
/// buffers too (under their graph names).
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub name: String,
    pub ty: BufferType,
}

/// How often a neuron group updates: every frame, or once per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    Frame,
    Token,
}

/// Where a group input comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum InputSource {
    /// The dendritic sum of a synapse layer (index into `SpikeProgram::synapses`).
    Dendrite { synapse: u32 },
    /// Fixed-point values a management core or the host writes into the neurons (a buffer).
    Injection { buffer: u32 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupInput {
    pub reg: u16,
    pub source: InputSource,
}

/// A per-neuron constant (a decay, a threshold, a bias).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupParam {
    pub name: String,
    pub reg: u16,
    pub values: Vec<i64>,
}

/// How a state variable starts.
#[derive(Clone, Debug, PartialEq)]
pub enum StateInit {
    /// From a buffer [B, C] (the carried state a session feeds in).
    Buffer(u32),
    Const(i64),
}

/// One state variable of every neuron of a group.
#[derive(Clone, Debug, PartialEq)]
pub struct StateSlot {
    pub name: String,
    /// Register the step reads the previous value from.
    pub reg: u16,
    /// Register that holds the new value after the step.
    pub next: u16,
    pub init: StateInit,
    /// Token scope: restart from `reset_value` at every token's first frame.
    pub token_reset: bool,
    pub reset_value: i64,
    /// Buffer [B, C] that receives the final value (the state a session carries on).
    pub export: Option<u32>,
}

/// Where the payloads of a group output go.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupOutput {
    pub name: String,
    pub reg: u16,
    /// Payload encoding: round_shift(value·mult[c], shift) saturated to `bits` (1: unsigned).
    pub bits: u32,
    pub shift: u32,
    pub mult: Vec<i64>,
    /// Synapse layers that receive the events.
    pub synapses: Vec<u32>,
    /// Buffer a management core or the host reads the payloads from.
    pub buffer: Option<u32>,
}

/// A population of identical programmable neurons: one microcode program, run per neuron per
/// frame (or token). Fused from the quantized IR's element-wise neuron ops.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub name: String,
    pub channels: u32,
    pub rate: Rate,
    pub microcode: FxProgram,
    pub inputs: Vec<GroupInput>,
    pub params: Vec<GroupParam>,
    pub state: Vec<StateSlot>,
    pub outputs: Vec<GroupOutput>,
}

/// Weights of a synapse layer, source-major: row i holds the weights from input axon i to
/// every output neuron (the order in which an event fans out).
#[derive(Clone, Debug, PartialEq)]
pub enum Weights {
    I8(Vec<i8>),
    I16(Vec<i16>),
}

impl Weights {
    pub fn len(&self) -> usize {
        match self {
            Weights::I8(v) => v.len(),
            Weights::I16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> i64 {
        match self {
            Weights::I8(v) => v[i] as i64,
            Weights::I16(v) => v[i] as i64,
        }
    }
}

/// Where a synapse layer's events come from.
#[derive(Clone, Debug, PartialEq)]
pub enum SynapseSource {
    /// Output `output` of group `group`.
    Group { group: u32, output: u32 },
    /// Payloads written by a management core or the host (a buffer).
    Buffer(u32),
}

/// A synapse layer and the dendrite that scales its sum: input axons → neurons of one group.
#[derive(Clone, Debug, PartialEq)]
pub struct SynapseLayer {
    pub name: String,
    pub source: SynapseSource,
    /// Bits of the payloads arriving on the input axons.
    pub payload_bits: u32,
    pub dest_group: u32,
    /// Index into the destination group's `inputs`.
    pub dest_input: u32,
    pub inputs: u32,
    pub outputs: u32,
    pub weight_bits: u32,
    pub weights: Weights,
    /// Dendrite: round_shift(sum·mult[o], shift) + bias[o], saturated to `bits`.
    pub mult: Vec<i64>,
    pub shift: u32,
    pub bias: Vec<i64>,
    pub bits: u32,
}

/// Who runs a stage.
#[derive(Clone, Debug, PartialEq)]
pub enum StageKind {
    /// Neuromorphic cores: the listed groups, in order, every frame.
    Neuro { groups: Vec<u32> },
    /// An embedded management core of `chip`: what a neuromorphic core cannot do (norms,
    /// PonderNet weighting), as an IR subgraph in floating point.
    Management { chip: u32 },
    /// The host: input encoding and the vocabulary head, as an IR subgraph.
    Host,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub name: String,
    pub kind: StageKind,
    /// The subgraph (IR text) of a management or host stage; empty for neuro stages. Its
    /// inputs and outputs are named after buffers.
    pub ir: String,
    pub inputs: Vec<u32>,
    pub outputs: Vec<u32>,
}

/// One core's contents after placement.
#[derive(Clone, Debug, PartialEq)]
pub struct CoreAlloc {
    pub chip: u32,
    /// Core index within the chip.
    pub index: u32,
    pub group: u32,
    /// Neurons [lo, hi) of the group.
    pub lo: u32,
    pub hi: u32,
    /// Which part of the neurons' inputs this core holds (0 = the neurons' own core; parts
    /// ≥ 1 send partial sums to part 0).
    pub part: u32,
    pub synapse_bits: u64,
}

/// How a group is spread over cores.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupPlacement {
    pub neurons_per_core: u32,
    /// Cores each chunk of neurons' inputs are split over (fan-in split).
    pub parts: u32,
    /// Core ids (indices into `cores`), chunk-major: chunk j part k is `cores[j·parts + k]`.
    pub cores: Vec<u32>,
}

/// Placement of the program on chips.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Placement {
    pub chips: u32,
    pub cores: Vec<CoreAlloc>,
    pub groups: Vec<GroupPlacement>,
}

/// One routing-table entry: events of a synapse layer from a source core reach these cores.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub synapse: u32,
    /// Source core id, or `None` for a management core / the host.
    pub src_core: Option<u32>,
    pub dst: Vec<Hop>,
}

/// The path to one destination core.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hop {
    pub core: u32,
    pub east_west: u32,
    pub north_south: u32,
    pub chip_hops: u32,
}

/// A compiled model for a neuromorphic target.
#[derive(Clone, Debug, PartialEq)]
pub struct SpikeProgram {
    pub target: Target,
    /// The quantized IR this program was generated from (text form).
    pub source_ir: String,
    pub fx: Fx,
    /// Frames per token of frame-rate groups.
    pub frames_per_token: u32,
    /// The lookup tables the microcode reads.
    pub luts: Vec<(LutKind, Lut)>,
    pub buffers: Vec<Buffer>,
    pub groups: Vec<Group>,
    pub synapses: Vec<SynapseLayer>,
    pub stages: Vec<Stage>,
    pub placement: Placement,
    pub routes: Vec<Route>,
    /// Graph inputs and outputs: (graph name, buffer).
    pub inputs: Vec<(String, u32)>,
    pub outputs: Vec<(String, u32)>,
    /// Parameters of the management and host stages (f32).
    pub host_params: BTreeMap<String, Tensor>,
}

impl SpikeProgram {
    pub fn buffer_id(&self, name: &str) -> Option<u32> {
        self.buffers.iter().position(|b| b.name == name).map(|i| i as u32)
    }

    pub fn synapse_count(&self) -> u64 {
        self.synapses.iter().map(|s| s.weights.len() as u64).sum()
    }

    pub fn neuron_count(&self) -> u64 {
        self.groups.iter().map(|g| g.channels as u64).sum()
    }
}
