//! Lowering-time fusion: chains of small row ops that an inference step runs once per
//! sub-layer become one kernel each. At decode (one token, 16 frames) every kernel of such a
//! chain moves a few kilobytes, so the step's time is their count, not their bytes.
//!
//! A chain fuses only where its intermediate values have no other reader, so a training graph
//! (whose backward reads the PonderNet weights) keeps its separate nodes there.

use petgraph::visit::EdgeRef;
use sparkc_ir::{BinOp, Expr, Graph, NodeIndex, Op, Value};
use std::collections::{HashMap, HashSet};

/// One fused chain, run at its last node (the anchor).
/// The most frames the fused PonderNet kernel takes (`PONDER_FRAMES` in the library).
const PONDER_FRAMES: u64 = 32;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Fused {
    /// halt linear → ponder_weights → frame_weighted_sum: y = Σ_k λ̂_k F_k, with the halt
    /// logits computed from the frames F themselves.
    PonderAggregate { frames: Value, weight: Value, bias: Value, clamp: f64, eps: f64 },
    /// center_last → repeat_frames → `x0 + x1`: h + broadcast(u − mean u) over the frames.
    CenteredResidual { residual: Value, update: Value },
}

impl Fused {
    /// The values the fused kernel reads, in place of the anchor's own operands.
    pub(crate) fn inputs(&self) -> Vec<Value> {
        match self {
            Fused::PonderAggregate { frames, weight, bias, .. } => vec![*frames, *weight, *bias],
            Fused::CenteredResidual { residual, update } => vec![*residual, *update],
        }
    }

    pub(crate) fn label(&self) -> &'static str {
        match self {
            Fused::PonderAggregate { .. } => "ponder_aggregate (fused)",
            Fused::CenteredResidual { .. } => "centered_residual (fused)",
        }
    }
}

#[derive(Default, Debug)]
pub(crate) struct FusionPlan {
    pub anchors: HashMap<NodeIndex, Fused>,
    /// Nodes that run inside an anchor's kernel and produce nothing themselves.
    pub absorbed: HashSet<NodeIndex>,
}

impl FusionPlan {
    /// What node `n` reads when it runs: a fused chain's inputs at its anchor, nothing for an
    /// absorbed node, its operands otherwise.
    pub(crate) fn inputs_of(&self, g: &Graph, n: NodeIndex) -> Vec<Value> {
        if self.absorbed.contains(&n) {
            return Vec::new();
        }
        match self.anchors.get(&n) {
            Some(f) => f.inputs(),
            None => g.operands(n),
        }
    }
}

/// Find the fusable chains of `g`. `is_f32` says which values are stored as f32: the fused
/// kernels read f32 (the frames and the residual stream are) and the residual update writes it.
pub(crate) fn plan(g: &Graph, is_f32: impl Fn(Value) -> bool) -> FusionPlan {
    let outputs: HashSet<Value> = g.outputs.iter().map(|(_, v)| *v).collect();
    // The one reader of v (and v is not a graph output), if it has exactly one.
    let sole_reader = |v: Value| -> Option<NodeIndex> {
        if outputs.contains(&v) {
            return None;
        }
        let mut readers = g.g.edges_directed(v.node, petgraph::Direction::Outgoing).filter(|e| e.weight().src == v.port);
        let first = readers.next()?;
        readers.next().is_none().then(|| first.target())
    };
    let unread = |v: Value| !outputs.contains(&v) && g.g.edges_directed(v.node, petgraph::Direction::Outgoing).all(|e| e.weight().src != v.port);
    let mut plan = FusionPlan::default();
    for n in g.g.node_indices() {
        let fused = match &g.node(n).op {
            Op::FrameWeightedSum => ponder_chain(g, n, &sole_reader, &unread),
            Op::Map { expr } if is_sum_of_operands(expr) => residual_chain(g, n, &sole_reader),
            _ => None,
        };
        let Some((fused, absorbed)) = fused else { continue };
        // The aggregate is written in whatever its reader wants; the residual stream is f32.
        let out_ok = matches!(fused, Fused::PonderAggregate { .. }) || is_f32(Value { node: n, port: 0 });
        if out_ok && fused.inputs().iter().all(|&v| is_f32(v)) {
            plan.absorbed.extend(absorbed);
            plan.anchors.insert(n, fused);
        }
    }
    plan
}

/// `x0 + x1`, in either order.
fn is_sum_of_operands(e: &Expr) -> bool {
    match e {
        Expr::Bin(BinOp::Add, a, b) => matches!((&**a, &**b), (Expr::Var(x), Expr::Var(y)) if (x == "x0" && y == "x1") || (x == "x1" && y == "x0")),
        _ => false,
    }
}

fn ponder_chain(
    g: &Graph,
    fws: NodeIndex,
    sole_reader: &dyn Fn(Value) -> Option<NodeIndex>,
    unread: &dyn Fn(Value) -> bool,
) -> Option<(Fused, Vec<NodeIndex>)> {
    let [frames, weights] = g.operands(fws)[..] else { return None };
    let Op::PonderWeights { clamp, eps } = g.node(weights.node).op else { return None };
    if weights.port != 0 || sole_reader(weights)? != fws || !unread(Value { node: weights.node, port: 1 }) {
        return None;
    }
    let [logits] = g.operands(weights.node)[..] else { return None };
    let halt = logits.node;
    if !matches!(g.node(halt).op, Op::Linear { bias: true }) || sole_reader(logits)? != weights.node {
        return None;
    }
    let [x, weight, bias] = g.operands(halt)[..] else { return None };
    // One halt logit per frame, computed from the frames being aggregated; the kernel keeps
    // up to PONDER_FRAMES frames in registers.
    let one_output = g.value_type(weight).shape.dims().first().and_then(|d| d.as_const()) == Some(1);
    let frames_fit = g.value_type(frames).shape.resolve(&g.dims).dims().get(2).and_then(|d| d.as_const()).is_some_and(|k| k <= PONDER_FRAMES);
    (x == frames && one_output && frames_fit).then(|| (Fused::PonderAggregate { frames, weight, bias, clamp, eps }, vec![halt, weights.node]))
}

fn residual_chain(g: &Graph, add: NodeIndex, sole_reader: &dyn Fn(Value) -> Option<NodeIndex>) -> Option<(Fused, Vec<NodeIndex>)> {
    let ops = g.operands(add);
    // Either operand may be the broadcast update (the other can be a broadcast too: layer 0's
    // residual stream is the repeated embedding).
    [(ops[0], ops[1]), (ops[1], ops[0])].into_iter().find_map(|(residual, repeated)| {
        if !matches!(g.node(repeated.node).op, Op::RepeatFrames { .. }) || sole_reader(repeated)? != add {
            return None;
        }
        if g.value_type(residual).shape != g.value_type(Value { node: add, port: 0 }).shape {
            return None;
        }
        let [centered] = g.operands(repeated.node)[..] else { return None };
        if !matches!(g.node(centered.node).op, Op::CenterLast) || sole_reader(centered)? != repeated.node {
            return None;
        }
        let [update] = g.operands(centered.node)[..] else { return None };
        Some((Fused::CenteredResidual { residual, update }, vec![repeated.node, centered.node]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkc_frontend::neuronspark::{build_graph, GraphOptions};

    fn count(plan: &FusionPlan, pick: fn(&Fused) -> bool) -> usize {
        plan.anchors.values().filter(|f| pick(f)).count()
    }

    /// Every absorbed node's results are read only inside its chain.
    fn assert_closed(g: &Graph, plan: &FusionPlan) {
        for &n in &plan.absorbed {
            for e in g.g.edges_directed(n, petgraph::Direction::Outgoing) {
                assert!(plan.absorbed.contains(&e.target()) || plan.anchors.contains_key(&e.target()), "{}", g.node(e.target()).name);
            }
        }
    }

    #[test]
    fn generation_graph_fuses_every_sub_layer_and_training_keeps_what_its_backward_reads() {
        let cfg = sparkc_frontend::NeuronSparkConfig::tiny();
        let layers = cfg.num_layers;
        let generation = sparkc_passes::prune::for_generation(&build_graph(&cfg, &GraphOptions::default()).unwrap());
        let plan = plan(&generation, |_| true);
        // Two sub-layers per layer, each with one PonderNet aggregate and one residual update.
        assert_eq!(count(&plan, |f| matches!(f, Fused::PonderAggregate { .. })), 2 * layers);
        assert_eq!(count(&plan, |f| matches!(f, Fused::CenteredResidual { .. })), 2 * layers);
        assert_eq!(plan.absorbed.len(), 8 * layers);
        assert_closed(&generation, &plan);
        // Nothing fuses where a fused kernel would have to read bf16.
        assert!(super::plan(&generation, |_| false).anchors.is_empty());

        // Training: the backward reads the PonderNet weights, so the aggregate stays unfused.
        let built = build_graph(&cfg, &GraphOptions { with_loss: true, ..Default::default() }).unwrap();
        let train = sparkc_passes::autodiff::differentiate(&built, "total_loss", &[]).unwrap();
        let plan = super::plan(&train, |_| true);
        assert_eq!(count(&plan, |f| matches!(f, Fused::PonderAggregate { .. })), 0);
        assert_closed(&train, &plan);
    }
}
