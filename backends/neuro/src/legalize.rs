//! Legalization: what a target cannot hold or run, as diagnostics that name the layer and the
//! limit. Placement adds the fan-in, memory and fan-out findings (`place`).

use crate::microcode::op_name;
use crate::program::{Group, SynapseLayer, SynapseSource};
use crate::target::Target;
use std::collections::BTreeSet;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The program cannot run on the target.
    Error,
    /// Something the compiler did to fit the target (a split), for the record.
    Note,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The layer (node name) concerned.
    pub layer: String,
    /// The target field whose limit applies, e.g. `core.max_fan_in`.
    pub limit: String,
    pub message: String,
}

impl Diagnostic {
    pub fn error(layer: &str, limit: &str, message: String) -> Diagnostic {
        Diagnostic { severity: Severity::Error, layer: layer.into(), limit: limit.into(), message }
    }

    pub fn note(layer: &str, limit: &str, message: String) -> Diagnostic {
        Diagnostic { severity: Severity::Note, layer: layer.into(), limit: limit.into(), message }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.severity {
            Severity::Error => "error",
            Severity::Note => "note",
        };
        write!(f, "{s}: layer `{}` [{}]: {}", self.layer, self.limit, self.message)
    }
}

/// Check what each group runs and sends, and each synapse layer's formats.
pub fn check(groups: &[Group], synapses: &[SynapseLayer], state_bits: u32, target: &Target) -> Vec<Diagnostic> {
    let mut d = Vec::new();
    let t = &target.name;
    let supported: BTreeSet<&str> = target.core.microcode_ops.iter().map(|s| s.as_str()).collect();
    if state_bits > target.numerics.state_bits {
        d.push(Diagnostic::error("(program)", "numerics.state_bits", format!("fixed-point values have {state_bits} bits; target `{t}` holds {}", target.numerics.state_bits)));
    }
    for g in groups {
        let used: BTreeSet<&str> = g.microcode.instrs.iter().map(op_name).collect();
        let missing: Vec<&str> = used.difference(&supported).copied().collect();
        if !missing.is_empty() {
            d.push(Diagnostic::error(
                &g.name,
                "core.microcode_ops",
                format!(
                    "the neuron program needs {} which target `{t}` cores do not support (they support: {})",
                    missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
                    target.core.microcode_ops.join(", ")
                ),
            ));
        }
        if g.microcode.instrs.len() as u32 > target.core.max_microcode {
            d.push(Diagnostic::error(
                &g.name,
                "core.max_microcode",
                format!("the neuron program has {} instructions; target `{t}` runs at most {}", g.microcode.instrs.len(), target.core.max_microcode),
            ));
        }
        if g.inputs.len() as u32 > target.core.max_dendrites {
            d.push(Diagnostic::error(
                &g.name,
                "core.max_dendrites",
                format!("each neuron has {} inputs (dendrites); target `{t}` allows {}", g.inputs.len(), target.core.max_dendrites),
            ));
        }
        for o in &g.outputs {
            if o.bits > target.numerics.graded_spike_bits {
                let what = if target.numerics.graded_spike_bits == 1 { "binary spikes only".to_string() } else { format!("at most {}-bit payloads", target.numerics.graded_spike_bits) };
                d.push(Diagnostic::error(
                    &g.name,
                    "numerics.graded_spike_bits",
                    format!("output `{}` sends {}-bit graded spikes; target `{t}` carries {what}", o.name, o.bits),
                ));
            }
        }
    }
    for s in synapses {
        if s.weight_bits > target.numerics.weight_bits {
            d.push(Diagnostic::error(&s.name, "numerics.weight_bits", format!("weights need {} bits; target `{t}` stores {}", s.weight_bits, target.numerics.weight_bits)));
        }
        // Payloads from groups are checked at the group; these come from a management core.
        if matches!(s.source, SynapseSource::Buffer(_)) && s.payload_bits > target.numerics.graded_spike_bits {
            d.push(Diagnostic::error(
                &s.name,
                "numerics.graded_spike_bits",
                format!("receives {}-bit graded spikes; target `{t}` carries at most {}-bit payloads", s.payload_bits, target.numerics.graded_spike_bits),
            ));
        }
    }
    d
}
