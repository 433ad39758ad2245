//! Target descriptions: a neuromorphic chip, its boards, numeric formats, timing and energy per
//! operation, read from TOML. Every energy constant carries the source it was taken from;
//! a description without one is rejected.

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot read target {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("target {origin} is not valid TOML for a target description: {msg}")]
    Parse { origin: String, msg: String },
    #[error("target {origin}: {msg}")]
    Invalid { origin: String, msg: String },
}

/// Cores and their arrangement on one chip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chip {
    /// Neuromorphic cores per chip.
    pub cores: u32,
    /// The mesh of tiles [x, y]; cores are spread evenly over the tiles.
    pub tile_mesh: [u32; 2],
    /// Embedded management (general-purpose) cores per chip.
    pub management_cores: u32,
}

/// Chips per board and their mesh; boards are added as needed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    pub chips: u32,
    pub chip_mesh: [u32; 2],
}

/// What one neuromorphic core holds and runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Core {
    /// Neurons (compartments) per core.
    pub neurons: u32,
    /// Synapse memory per core, in bits.
    pub synapse_memory_bits: u64,
    /// Most input axons one neuron may read on one core.
    pub max_fan_in: u32,
    /// Most destination cores one neuron's spikes may be routed to.
    pub max_fan_out: u32,
    /// Most cores a neuron's inputs may be split over (partial sums sent to the neuron's core).
    pub max_fan_in_split: u32,
    /// Most dendritic inputs (synapse layers or injected currents) of one neuron.
    pub max_dendrites: u32,
    /// Most microcode instructions of one neuron program.
    pub max_microcode: u32,
    /// Microcode operations the core supports (see `microcode::op_name`).
    pub microcode_ops: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightScaleMode {
    PerChannel,
    PerLayerPow2,
}

/// Number formats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Numerics {
    pub weight_bits: u32,
    pub weight_scale: WeightScaleMode,
    pub state_bits: u32,
    pub decay_bits: u32,
    pub threshold_bits: u32,
    /// Whether a threshold may be negative (a programmable compare) or is unsigned.
    pub threshold_signed: bool,
    /// Payload bits of a graded spike; 1 means binary spikes only.
    pub graded_spike_bits: u32,
}

/// Time per operation, for the latency estimate (nanoseconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    pub synop_ns: f64,
    pub neuron_update_ns: f64,
    pub hop_ns: f64,
    pub chip_hop_ns: f64,
    pub management_op_ns: f64,
    pub host_op_ns: f64,
    /// Where these numbers come from.
    pub source: String,
}

/// An energy constant and where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyEntry {
    pub pj: f64,
    pub source: String,
}

/// Energy per operation, picojoules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Energy {
    pub synop: EnergyEntry,
    pub neuron_update_active: EnergyEntry,
    pub neuron_update_inactive: EnergyEntry,
    /// A spike delivered to a core on the same tile.
    pub spike_within_tile: EnergyEntry,
    pub hop_east_west: EnergyEntry,
    pub hop_north_south: EnergyEntry,
    /// One chip-to-chip link traversal.
    pub chip_hop: EnergyEntry,
    /// One operation on an embedded management core.
    pub management_op: EnergyEntry,
    /// One operation on the host.
    pub host_op: EnergyEntry,
}

impl Energy {
    pub fn entries(&self) -> [(&'static str, &EnergyEntry); 9] {
        [
            ("synop", &self.synop),
            ("neuron_update_active", &self.neuron_update_active),
            ("neuron_update_inactive", &self.neuron_update_inactive),
            ("spike_within_tile", &self.spike_within_tile),
            ("hop_east_west", &self.hop_east_west),
            ("hop_north_south", &self.hop_north_south),
            ("chip_hop", &self.chip_hop),
            ("management_op", &self.management_op),
            ("host_op", &self.host_op),
        ]
    }
}

/// A target description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    pub description: String,
    pub chip: Chip,
    pub board: Board,
    pub core: Core,
    pub numerics: Numerics,
    pub timing: Timing,
    pub energy: Energy,
}

/// Every microcode operation a core may list.
pub const MICROCODE_OPS: &[&str] = &[
    "add", "sub", "mul", "div", "min", "max", "ge", "gt", "neg", "abs", "sign", "sqrt", "exp", "log", "log1p", "sigmoid", "tanh",
    "atan", "softplus", "select",
];

impl Target {
    pub fn from_toml(text: &str, origin: &str) -> Result<Target, TargetError> {
        let t: Target = toml::from_str(text).map_err(|e| TargetError::Parse { origin: origin.to_string(), msg: e.to_string() })?;
        t.validate().map_err(|msg| TargetError::Invalid { origin: origin.to_string(), msg })?;
        Ok(t)
    }

    pub fn load(path: &Path) -> Result<Target, TargetError> {
        let text = std::fs::read_to_string(path).map_err(|source| TargetError::Io { path: path.display().to_string(), source })?;
        Target::from_toml(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a target serialises")
    }

    pub fn cores_per_tile(&self) -> u32 {
        self.chip.cores / (self.chip.tile_mesh[0] * self.chip.tile_mesh[1]).max(1)
    }

    pub fn validate(&self) -> Result<(), String> {
        let pos = |name: &str, v: u64| if v == 0 { Err(format!("`{name}` must be positive")) } else { Ok(()) };
        pos("chip.cores", self.chip.cores as u64)?;
        pos("chip.tile_mesh", (self.chip.tile_mesh[0] * self.chip.tile_mesh[1]) as u64)?;
        if !self.chip.cores.is_multiple_of(self.chip.tile_mesh[0] * self.chip.tile_mesh[1]) {
            return Err(format!("chip.cores ({}) must spread evenly over the {}x{} tiles", self.chip.cores, self.chip.tile_mesh[0], self.chip.tile_mesh[1]));
        }
        pos("board.chips", self.board.chips as u64)?;
        if self.board.chip_mesh[0] * self.board.chip_mesh[1] != self.board.chips {
            return Err(format!("board.chip_mesh {:?} does not hold board.chips = {}", self.board.chip_mesh, self.board.chips));
        }
        pos("core.neurons", self.core.neurons as u64)?;
        pos("core.synapse_memory_bits", self.core.synapse_memory_bits)?;
        pos("core.max_fan_in", self.core.max_fan_in as u64)?;
        pos("core.max_fan_out", self.core.max_fan_out as u64)?;
        pos("core.max_fan_in_split", self.core.max_fan_in_split as u64)?;
        pos("core.max_dendrites", self.core.max_dendrites as u64)?;
        pos("core.max_microcode", self.core.max_microcode as u64)?;
        for op in &self.core.microcode_ops {
            if !MICROCODE_OPS.contains(&op.as_str()) {
                return Err(format!("unknown microcode op `{op}` (known: {})", MICROCODE_OPS.join(", ")));
            }
        }
        let n = &self.numerics;
        if !(2..=16).contains(&n.weight_bits) {
            return Err(format!("numerics.weight_bits must be 2..=16, got {}", n.weight_bits));
        }
        if !(8..=48).contains(&n.state_bits) {
            return Err(format!("numerics.state_bits must be 8..=48, got {}", n.state_bits));
        }
        if n.decay_bits == 0 || n.decay_bits > 24 || n.threshold_bits == 0 || n.threshold_bits > 48 {
            return Err("numerics.decay_bits must be 1..=24 and threshold_bits 1..=48".into());
        }
        if !(1..=32).contains(&n.graded_spike_bits) {
            return Err(format!("numerics.graded_spike_bits must be 1..=32, got {}", n.graded_spike_bits));
        }
        let t = &self.timing;
        for (k, v) in [("synop_ns", t.synop_ns), ("neuron_update_ns", t.neuron_update_ns), ("hop_ns", t.hop_ns), ("chip_hop_ns", t.chip_hop_ns), ("management_op_ns", t.management_op_ns), ("host_op_ns", t.host_op_ns)] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("timing.{k} must be a non-negative number, got {v}"));
            }
        }
        if t.source.trim().is_empty() {
            return Err("timing.source must say where the timing numbers come from".into());
        }
        for (k, e) in self.energy.entries() {
            if !e.pj.is_finite() || e.pj < 0.0 {
                return Err(format!("energy.{k}.pj must be a non-negative number, got {}", e.pj));
            }
            if e.source.trim().is_empty() {
                return Err(format!("energy.{k} has no source: every energy constant must say where it comes from"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> String {
        std::fs::read_to_string(format!("{}/../../targets/{name}.toml", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn shipped_targets_parse_and_round_trip() {
        for name in ["loihi1", "loihi2"] {
            let t = Target::from_toml(&shipped(name), name).unwrap();
            assert_eq!(t.name, name);
            assert_eq!(Target::from_toml(&t.to_toml(), "again").unwrap(), t);
        }
    }

    #[test]
    fn an_energy_constant_without_a_source_is_rejected() {
        let text = shipped("loihi2").replace("source = \"Davies et al. 2018", "source = \"\" #");
        let err = Target::from_toml(&text, "edited").unwrap_err().to_string();
        assert!(err.contains("no source"), "{err}");
    }
}
