//! What a simulation counted, per layer (neuron group), core and chip, plus the management
//! cores and the host; energy from the target's per-operation table, time from its timing.

use serde::Serialize;

/// Energy by what spent it, picojoules.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EnergyBreakdown {
    pub synops_pj: f64,
    pub neuron_updates_pj: f64,
    pub routing_pj: f64,
    pub management_pj: f64,
    pub host_pj: f64,
    pub total_pj: f64,
}

/// One neuron group (a layer of the model).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerStats {
    pub name: String,
    pub neurons: u64,
    pub cores: u64,
    /// Synaptic operations into this layer (each event times the synapses it reaches).
    pub synops: u64,
    pub neuron_updates: u64,
    pub active_updates: u64,
    /// Events (non-zero payloads) the layer sent.
    pub events: u64,
    /// Payloads computed (neurons × steps × outputs); the rest of `events` were suppressed.
    pub payloads: u64,
    /// events / payloads: how often a neuron sends.
    pub event_rate: f64,
    /// 1 − event_rate: the fraction of zero payloads that were not sent.
    pub suppressed_fraction: f64,
    /// Partial sums sent between the cores of a split neuron.
    pub partial_sums: u64,
    pub hops: u64,
    pub chip_hops: u64,
    pub energy_pj: f64,
    /// Busy time of the layer's busiest core over the run, seconds.
    pub busy_s: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CoreStats {
    pub core: u32,
    pub chip: u32,
    pub layer: String,
    pub neurons: u32,
    pub synops: u64,
    pub neuron_updates: u64,
    pub events_sent: u64,
    pub packets_received: u64,
    /// Tile and chip-to-chip hops of the packets this core received.
    pub hops_in: u64,
    pub chip_hops_in: u64,
    pub energy_pj: f64,
    /// Busy time over the run (synops and updates at the target's timing), seconds.
    pub busy_s: f64,
    /// Neurons held / neurons per core.
    pub neuron_utilisation: f64,
    /// Synapse memory used / synapse memory per core.
    pub synapse_utilisation: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChipStats {
    pub chip: u32,
    pub cores_used: u32,
    pub core_utilisation: f64,
    pub neuron_utilisation: f64,
    pub synapse_utilisation: f64,
    pub synops: u64,
    pub neuron_updates: u64,
    pub events: u64,
    pub hops: u64,
    pub chip_hops: u64,
    pub management_ops: u64,
    pub energy_pj: f64,
    /// Busy time of the chip's busiest core over the run, seconds.
    pub busy_s: f64,
}

/// A management or host stage.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageStats {
    pub name: String,
    pub chip: Option<u32>,
    pub ops: u64,
    pub energy_pj: f64,
    pub time_s: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub synops: u64,
    pub neuron_updates: u64,
    pub active_updates: u64,
    pub events: u64,
    pub payloads: u64,
    pub partial_sums: u64,
    pub hops: u64,
    pub chip_hops: u64,
    pub management_ops: u64,
    pub host_ops: u64,
    pub energy: EnergyBreakdown,
    pub energy_per_token_pj: f64,
    /// Energy per token without the host (chip and management cores).
    pub chip_energy_per_token_pj: f64,
    /// Estimated time on the target (stages one after another), seconds.
    pub time_s: f64,
    pub time_per_token_s: f64,
    /// Simulator wall time, seconds, and synaptic events (synops) simulated per second.
    pub wall_s: f64,
    pub synops_per_second: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SimReport {
    pub target: String,
    pub chips: u32,
    pub cores: u32,
    pub calls: u64,
    pub tokens: u64,
    pub frames: u64,
    pub totals: Totals,
    pub layers: Vec<LayerStats>,
    pub cores_detail: Vec<CoreStats>,
    pub chips_detail: Vec<ChipStats>,
    pub management: Vec<StageStats>,
    pub host: Vec<StageStats>,
    /// Where each energy constant comes from.
    pub energy_sources: Vec<(String, f64, String)>,
}

impl SimReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serialises")
    }
}
