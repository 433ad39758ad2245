//! Dead-code elimination for a chosen set of outputs: generation needs the logits and the
//! carried state, not the training-only outputs (the ponder cost costs two kernels per
//! sub-layer, every token).

use sparkc_ir::{Graph, NodeIndex};
use std::collections::HashSet;

/// `graph` with only the outputs `keep` accepts, and without the nodes none of them needs.
/// Inputs and parameters stay (the graph's interface does not change).
pub fn keep_outputs(graph: &Graph, keep: &dyn Fn(&str) -> bool) -> Graph {
    let mut g = graph.clone();
    g.outputs.retain(|(name, _)| keep(name));
    let mut live: HashSet<NodeIndex> = HashSet::new();
    let mut stack: Vec<NodeIndex> = g.outputs.iter().map(|(_, v)| v.node).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.operands(n).into_iter().map(|v| v.node));
        }
    }
    let dead: Vec<NodeIndex> = g.g.node_indices().filter(|n| !live.contains(n) && !g.node(*n).op.is_source()).collect();
    for n in dead {
        g.g.remove_node(n);
    }
    g
}

/// The outputs an inference session uses: `logits` and the carried state (outputs named like
/// an input).
pub fn for_generation(graph: &Graph) -> Graph {
    let inputs: HashSet<String> = graph.inputs().into_iter().map(|(_, name, _)| name.to_string()).collect();
    keep_outputs(graph, &|name| name == "logits" || inputs.contains(name))
}
