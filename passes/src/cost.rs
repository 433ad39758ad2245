//! Static cost analysis of a graph: multiply-accumulates per token, element-wise work per token
//! and the bytes of carried state per sequence. Everything is read off the IR, so it holds for
//! any model the IR expresses, not just NeuronSpark.

use sparkc_ir::{Dim, Graph, Op, Shape};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CostReport {
    /// GEMM multiply-accumulates per token (forward).
    pub gemm_macs_per_token: u64,
    /// Element-wise operations per token in maps and scans (each expression node counts one).
    pub elementwise_flops_per_token: u64,
    /// Neuron-step evaluations per token (scan columns × frames).
    pub neuron_steps_per_token: u64,
    /// Per-op breakdown of GEMM MACs: (node name, MACs per token).
    pub gemms: Vec<(String, u64)>,
}

impl CostReport {
    pub fn flops_per_token(&self) -> u64 {
        2 * self.gemm_macs_per_token + self.elementwise_flops_per_token
    }
}

/// Elements per token of a value shaped [B, T, ...]: the product of the dims after B and T.
fn per_token(shape: &Shape, graph: &Graph) -> Option<u64> {
    let dims = shape.resolve(&graph.dims);
    let d = dims.dims();
    if d.len() < 2 || d[0] != Dim::sym("B") || d[1] != Dim::sym("T") {
        return None;
    }
    d[2..].iter().map(|x| x.as_const()).product()
}

pub fn analyze(graph: &Graph) -> CostReport {
    let mut r = CostReport::default();
    for n in graph.g.node_indices() {
        let node = graph.node(n);
        let operands = graph.operands(n);
        match &node.op {
            Op::Linear { .. } => {
                let w = graph.value_type(operands[1]).shape.resolve(&graph.dims);
                let (Some(o), Some(rows)) = (w.dims()[0].as_const(), per_token(&graph.value_type(operands[0]).shape, graph)) else {
                    continue;
                };
                // rows already includes the input features; MACs = (rows / I) · I · O.
                let macs = rows * o;
                r.gemm_macs_per_token += macs;
                r.gemms.push((node.name.clone(), macs));
            }
            Op::Map { expr } => {
                if let Some(e) = per_token(&node.results[0].shape, graph) {
                    r.elementwise_flops_per_token += e * expr.size() as u64;
                }
            }
            Op::Scan { neuron, emit, .. } => {
                let Some(m) = graph.neurons.get(neuron) else { continue };
                let Some(e) = per_token(&node.results[0].shape, graph) else { continue };
                let step_ops: usize = m.lets.iter().chain(&m.charge).map(|b| b.expr.size()).sum::<usize>()
                    + m.threshold.size()
                    + 3 // fire comparison and reset
                    + emit.iter().filter_map(|o| m.output(o)).map(|b| b.expr.size()).sum::<usize>();
                r.neuron_steps_per_token += e;
                r.elementwise_flops_per_token += e * step_ops as u64;
            }
            _ => {}
        }
    }
    r
}

/// Bytes of carried state per sequence: graph inputs that are also graph outputs (state in,
/// state out), per batch row.
pub fn state_bytes_per_sequence(graph: &Graph) -> u64 {
    graph
        .inputs()
        .into_iter()
        .filter(|(_, name, _)| graph.output(name).is_some())
        .map(|(_, _, ty)| {
            let row: u64 = ty.shape.resolve(&graph.dims).dims()[1..].iter().map(|d| d.as_const().unwrap_or(0)).product();
            row * (ty.dtype.bits() as u64).div_ceil(8)
        })
        .sum()
}
