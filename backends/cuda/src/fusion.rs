//! Lowering-time fusion: chains of small row ops that an inference step runs once per
//! sub-layer become one kernel each, and linear layers that share their input become one
//! batched GEMM. At decode (one token, 16 frames) every kernel of such a chain moves a few
//! kilobytes, so the step's time is their count, not their bytes.
//!
//! A chain fuses only where its intermediate values have no other reader, so a training graph
//! (whose backward reads the PonderNet weights) keeps its separate nodes there.

use sparkc_ir::{BinOp, Expr, Graph, NodeIndex, Op, Value};
use std::collections::{HashMap, HashSet};

/// The most linear layers one batched GEMM runs.
pub(crate) const MAX_GROUP: usize = 4;

/// The most frames the fused PonderNet kernel takes (`PONDER_FRAMES` in the kernel prelude).
const PONDER_FRAMES: u64 = 32;

/// One fused chain, run at its anchor: the chain's last node, or a linear group's first.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Fused {
    /// [map →] halt linear → ponder_weights → frame_weighted_sum: y = Σ_k λ̂_k F_k, with the
    /// halt logits computed from the frames F themselves. F = `expr` over `operands`: the
    /// element-wise map that makes the frames, when nothing else reads them, or `x0` of the
    /// frames.
    PonderAggregate { expr: Expr, operands: Vec<Value>, weight: Value, bias: Value, clamp: f64, eps: f64 },
    /// center_last → repeat_frames → `x0 + x1`: h + broadcast(u − mean u) over the frames.
    CenteredResidual { residual: Value, update: Value },
    /// Bias-free linear layers of one input and equal weight shapes (the SNNBlock's four
    /// D→DN projections): one batched GEMM. The anchor is the first of `members` to run; each
    /// member's result is its own value.
    LinearGroup { input: Value, weights: Vec<Value>, members: Vec<NodeIndex> },
    /// linear_grad_input(dy, weight) → `x0 + x1` with a gradient `into` that nothing else
    /// reads: the GEMM adds its product to `into` in place (β = 1), whose buffer becomes the
    /// sum. The backward sums gradient contributions this way at every residual branch.
    AccumulatedGradInput { dy: Value, weight: Value, into: Value, grad_input: NodeIndex },
}

impl Fused {
    /// The values the fused kernel reads, in place of the anchor's own operands.
    pub(crate) fn inputs(&self) -> Vec<Value> {
        match self {
            Fused::PonderAggregate { operands, weight, bias, .. } => operands.iter().copied().chain([*weight, *bias]).collect(),
            Fused::CenteredResidual { residual, update } => vec![*residual, *update],
            Fused::LinearGroup { input, weights, .. } => std::iter::once(*input).chain(weights.iter().copied()).collect(),
            Fused::AccumulatedGradInput { dy, weight, into, .. } => vec![*dy, *weight, *into],
        }
    }

    /// The values the fused kernel produces, in the order it returns them.
    pub(crate) fn results(&self, anchor: NodeIndex) -> Vec<Value> {
        match self {
            Fused::LinearGroup { members, .. } => members.iter().map(|&m| Value { node: m, port: 0 }).collect(),
            _ => vec![Value { node: anchor, port: 0 }],
        }
    }

    pub(crate) fn label(&self) -> &'static str {
        match self {
            Fused::PonderAggregate { .. } => "ponder_aggregate (fused)",
            Fused::CenteredResidual { .. } => "centered_residual (fused)",
            Fused::LinearGroup { .. } => "linear group (batched)",
            Fused::AccumulatedGradInput { .. } => "linear_grad_input + accumulate (fused)",
        }
    }
}

#[derive(Default, Debug)]
pub(crate) struct FusionPlan {
    pub anchors: HashMap<NodeIndex, Fused>,
    /// Nodes whose work an anchor's kernel does: they run nothing themselves, and a linear
    /// group's members get their results from the anchor.
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

/// Find the fusable chains of `g`. `is_f32` says which values are stored as f32: the residual
/// kernel reads and writes f32 (as the residual stream is), and a linear group's outputs are
/// stored alike.
/// `order` is the execution order; with `group_linears`, linear layers that share their input
/// and weight shape are batched (inference in bf16, where every weight has a bf16 copy).
pub(crate) fn plan(g: &Graph, order: &[NodeIndex], group_linears: bool, is_f32: impl Fn(Value) -> bool) -> FusionPlan {
    let outputs: HashSet<Value> = g.outputs.iter().map(|(_, v)| *v).collect();
    // The one reader of v (and v is not a graph output), if it has exactly one.
    let sole_reader = |v: Value| -> Option<NodeIndex> {
        match g.readers_of(v)[..] {
            [r] if !outputs.contains(&v) => Some(r),
            _ => None,
        }
    };
    let unread = |v: Value| !outputs.contains(&v) && g.readers_of(v).is_empty();
    let mut plan = FusionPlan::default();
    for n in g.g.node_indices() {
        let fused = match &g.node(n).op {
            Op::FrameWeightedSum => ponder_chain(g, n, &sole_reader, &unread),
            Op::Map { expr } if is_sum_of_operands(expr) => residual_chain(g, n, &sole_reader).or_else(|| accumulated_grad_input(g, n, &sole_reader)),
            _ => None,
        };
        let Some((fused, absorbed)) = fused else { continue };
        // The PonderNet kernel is generated for its operands' storage and writes what its reader
        // wants; the residual kernel reads and writes f32 (as the residual stream is). An
        // accumulated gradient's sum is its addend's buffer, so the two must be stored alike
        // (the GEMM adds its product in f32 and rounds once).
        let typed = matches!(fused, Fused::PonderAggregate { .. });
        if let Fused::AccumulatedGradInput { into, .. } = fused {
            if is_f32(Value { node: n, port: 0 }) != is_f32(into) {
                continue;
            }
            plan.absorbed.extend(absorbed);
            plan.anchors.insert(n, fused);
            continue;
        }
        if typed || (is_f32(Value { node: n, port: 0 }) && fused.inputs().iter().all(|&v| is_f32(v))) {
            plan.absorbed.extend(absorbed);
            plan.anchors.insert(n, fused);
        }
    }
    if group_linears {
        for (anchor, group) in linear_groups(g, order, &is_f32) {
            if let Fused::LinearGroup { members, .. } = &group {
                plan.absorbed.extend(members.iter().copied().filter(|&m| m != anchor));
            }
            plan.anchors.insert(anchor, group);
        }
    }
    plan
}

/// Groups of at least two `linear{bias=false}` nodes with the same input, parameter weights of
/// one shape (more outputs than a narrow linear has) and outputs stored alike, keyed by the
/// member that runs first.
fn linear_groups(g: &Graph, order: &[NodeIndex], is_f32: &dyn Fn(Value) -> bool) -> Vec<(NodeIndex, Fused)> {
    // Keyed by (input, weight shape, whether the output is f32).
    type GroupKey = (Value, Vec<Option<u64>>, bool);
    let mut groups: HashMap<GroupKey, Vec<NodeIndex>> = HashMap::new();
    for &n in order {
        if !matches!(g.node(n).op, Op::Linear { bias: false }) {
            continue;
        }
        let [x, w] = g.operands(n)[..] else { continue };
        if !matches!(g.node(w.node).op, Op::Param { .. }) {
            continue;
        }
        let shape: Vec<Option<u64>> = g.value_type(w).shape.dims().iter().map(|d| d.as_const()).collect();
        if shape.first().copied().flatten().is_none_or(|o| o <= 4) {
            continue;
        }
        groups.entry((x, shape, is_f32(Value { node: n, port: 0 }))).or_default().push(n);
    }
    // At most MAX_GROUP per batched call (its pointer table is written by one small kernel).
    let mut out: Vec<(NodeIndex, Fused)> = groups
        .into_iter()
        .flat_map(|((input, _, _), members)| members.chunks(MAX_GROUP).map(|c| (input, c.to_vec())).collect::<Vec<_>>())
        .filter(|(_, members)| members.len() >= 2)
        .map(|(input, members)| {
            let weights = members.iter().map(|&m| g.operands(m)[1]).collect();
            (members[0], Fused::LinearGroup { input, weights, members })
        })
        .collect();
    out.sort_by_key(|(anchor, _)| anchor.index());
    out
}

/// `add` = `x0 + x1` of a linear layer's input gradient and another gradient, each read only
/// by `add`, of the same shape; the other is computed (not an input, a parameter or zeros).
fn accumulated_grad_input(g: &Graph, add: NodeIndex, sole_reader: &dyn Fn(Value) -> Option<NodeIndex>) -> Option<(Fused, Vec<NodeIndex>)> {
    let [a, b] = g.operands(add)[..] else { return None };
    let is_grad_input = |v: Value| v.port == 0 && matches!(g.node(v.node).op, Op::LinearGradInput) && sole_reader(v) == Some(add);
    let (gi, into) = if is_grad_input(a) { (a, b) } else if is_grad_input(b) { (b, a) } else { return None };
    let computed = !matches!(g.node(into.node).op, Op::Input { .. } | Op::Param { .. } | Op::ZerosLike);
    let shape = |v: Value| g.value_type(v).shape.resolve(&g.dims);
    if gi.node == into.node || !computed || sole_reader(into) != Some(add) || shape(into) != shape(Value { node: add, port: 0 }) {
        return None;
    }
    let [dy, weight] = g.operands(gi.node)[..] else { return None };
    Some((Fused::AccumulatedGradInput { dy, weight, into, grad_input: gi.node }, vec![gi.node]))
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
    if x != frames || !one_output || !frames_fit {
        return None;
    }
    let mut absorbed = vec![halt, weights.node];
    // The map that makes the frames runs inside the kernel when only this chain reads them.
    let readers = g.readers_of(frames);
    let frame_shape = &g.value_type(frames).shape;
    let (expr, operands) = match &g.node(frames.node).op {
        Op::Map { expr }
            if readers.len() == 2
                && readers.contains(&halt)
                && readers.contains(&fws)
                && !g.outputs.iter().any(|(_, v)| *v == frames)
                && g.operands(frames.node).iter().all(|&v| &g.value_type(v).shape == frame_shape) =>
        {
            absorbed.push(frames.node);
            (expr.clone(), g.operands(frames.node))
        }
        _ => (Expr::var("x0"), vec![frames]),
    };
    Some((Fused::PonderAggregate { expr, operands, weight, bias, clamp, eps }, absorbed))
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
    use petgraph::visit::EdgeRef;
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
        let order = generation.execution_order().unwrap();
        let plan = plan(&generation, &order, false, |_| true);
        // Two sub-layers per layer, each with one PonderNet aggregate and one residual update.
        assert_eq!(count(&plan, |f| matches!(f, Fused::PonderAggregate { .. })), 2 * layers);
        assert_eq!(count(&plan, |f| matches!(f, Fused::CenteredResidual { .. })), 2 * layers);
        // Halt, ponder weights, the map making the frames; centering and broadcast.
        assert_eq!(plan.absorbed.len(), 10 * layers);
        assert_closed(&generation, &plan);
        // Only the PonderNet kernel (generated for its operands' storage) fuses over bf16.
        let bf16 = super::plan(&generation, &order, false, |_| false);
        assert_eq!(bf16.anchors.len(), 2 * layers);
        assert!(bf16.anchors.values().all(|f| matches!(f, Fused::PonderAggregate { .. })));
        // Batched: per layer the four D→DN projections, W_gate with W_skip, gate_proj with up_proj.
        let grouped = super::plan(&generation, &order, true, |_| true);
        assert_eq!(count(&grouped, |f| matches!(f, Fused::LinearGroup { members, .. } if members.len() == 4)), layers);
        assert_eq!(count(&grouped, |f| matches!(f, Fused::LinearGroup { members, .. } if members.len() == 2)), 2 * layers);
        for (&anchor, f) in &grouped.anchors {
            if let Fused::LinearGroup { members, weights, input } = f {
                assert_eq!(members[0], anchor);
                assert_eq!(f.results(anchor).len(), members.len());
                assert!(members.iter().zip(weights).all(|(&m, &w)| generation.operands(m) == vec![*input, w]));
            }
        }

        // Training: the backward reads the PonderNet weights, so the aggregate stays unfused.
        let built = build_graph(&cfg, &GraphOptions { with_loss: true, ..Default::default() }).unwrap();
        let train = sparkc_passes::autodiff::differentiate(&built, "total_loss", &[]).unwrap();
        let plan = super::plan(&train, &train.execution_order().unwrap(), false, |_| true);
        assert_eq!(count(&plan, |f| matches!(f, Fused::PonderAggregate { .. })), 0);
        assert_closed(&train, &plan);
        // Gradient sums with a linear layer's input gradient accumulate in its GEMM, into a
        // computed gradient that only the sum reads.
        let accumulated = count(&plan, |f| matches!(f, Fused::AccumulatedGradInput { .. }));
        assert!(accumulated >= 4 * layers, "{accumulated} accumulated input gradients");
        for (&anchor, f) in &plan.anchors {
            if let Fused::AccumulatedGradInput { dy, weight, into, grad_input } = f {
                assert_eq!(train.operands(*grad_input), vec![*dy, *weight]);
                assert!(plan.absorbed.contains(grad_input));
                assert_eq!(train.readers_of(*into), vec![anchor]);
                assert!(train.operands(anchor).contains(into));
            }
        }
        // Over bf16 storage too, where sum and addend are stored alike.
        let bf16 = super::plan(&train, &train.execution_order().unwrap(), false, |_| false);
        assert_eq!(count(&bf16, |f| matches!(f, Fused::AccumulatedGradInput { .. })), accumulated);
    }
}
