//! Activation recompute (per-layer checkpointing) of a training graph.
//!
//! A graph from [`differentiate`](crate::autodiff::differentiate) keeps every forward value that
//! its backward reads alive from the forward until the backward gets there: for a deep model
//! that is most of the memory. This pass makes the backward read recomputed copies instead. A
//! layer is the set of forward nodes named `layers.<i>.…`; a copy recomputes its node from the
//! layer's boundary values (what the layer reads from outside itself: the residual stream
//! entering it), the parameters and the inputs, copying the layer's own intermediates on the
//! way. So only the boundary values and the values outside any layer stay live through the
//! forward. Copies are marked `recompute`, so that [`Graph::execution_order`] runs each just
//! before the backward node that reads it.

use crate::autodiff::GRAD_PREFIX;
use sparkc_ir::types::DimBindings;
use sparkc_ir::{Graph, IrError, NodeIndex, Op, ScanPairKey, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

/// Suffix of a copy's name: `<original name>.recompute`.
pub const RECOMPUTE_SUFFIX: &str = ".recompute";

/// What [`recompute_layers`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecomputeReport {
    /// Copies made, per layer index.
    pub copied: BTreeMap<usize, usize>,
    /// The forward values the backward still reads directly, which therefore stay live through
    /// the forward: layer boundaries and values outside any layer (`name` or `name:port`).
    /// Graph outputs, live to the end anyway, are not listed.
    pub live: Vec<String>,
}

impl RecomputeReport {
    /// Copies made in all.
    pub fn total(&self) -> usize {
        self.copied.values().sum()
    }
}

impl fmt::Display for RecomputeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "recompute: {} copies in {} layers; {} forward values stay live", self.total(), self.copied.len(), self.live.len())?;
        for (layer, n) in &self.copied {
            writeln!(f, "  layers.{layer}: {n} copies")?;
        }
        for v in &self.live {
            writeln!(f, "  live: {v}")?;
        }
        Ok(())
    }
}

/// The layer of a node named `layers.<i>.…`.
pub fn layer_of(name: &str) -> Option<usize> {
    let (index, _) = name.strip_prefix("layers.")?.split_once('.')?;
    index.parse().ok()
}

/// The forward nodes of a training graph: the ancestors of its outputs that are not gradients.
/// The backward only reads the forward, never the other way round, and earlier copies are not
/// ancestors of any output, so this holds after this pass too.
fn forward_nodes(g: &Graph) -> HashSet<NodeIndex> {
    let mut seen = HashSet::new();
    let mut stack: Vec<NodeIndex> = g.outputs.iter().filter(|(name, _)| !name.starts_with(GRAD_PREFIX)).map(|(_, v)| v.node).collect();
    while let Some(n) = stack.pop() {
        if g.node(n).recompute || !seen.insert(n) {
            continue;
        }
        stack.extend(g.operands(n).into_iter().map(|v| v.node));
    }
    seen
}

fn value_name(g: &Graph, v: Value) -> String {
    let node = g.node(v.node);
    if node.results.len() == 1 {
        node.name.clone()
    } else {
        format!("{}:{}", node.name, v.port)
    }
}

/// Make the backward of `train` (a graph from `differentiate`, optionally fused) read
/// recomputed copies of each layer's intermediates; see the module documentation.
///
/// A forward value is read directly (not copied) when it is a parameter, an input or a
/// `zeros_like`, lies outside every layer, is read by the forward of another layer or of no
/// layer (a boundary), or is a graph output (live to the end anyway). There is one copy per
/// original node. A `scan_adjoint` whose scan operands are rewired gets a copy of its forward
/// `scan` with exactly those operands, so that backends can still pair the two (the scan keeps
/// checkpoints for its adjoint). Graph outputs keep reading the originals. Running the pass on
/// its own result changes nothing.
pub fn recompute_layers(train: &Graph) -> Result<(Graph, RecomputeReport), IrError> {
    recompute_layers_where(train, &|_| true)
}

/// [`recompute_layers`] for the layers `recompute` picks: the other layers' values are read
/// directly and stay live from the forward to the backward, trading memory for their forward
/// work.
pub fn recompute_layers_where(train: &Graph, recompute: &dyn Fn(usize) -> bool) -> Result<(Graph, RecomputeReport), IrError> {
    let forward = forward_nodes(train);
    let layer = |n: NodeIndex| layer_of(&train.node(n).name);
    let outputs: HashSet<Value> = train.outputs.iter().map(|(_, v)| *v).collect();
    let edges: Vec<(NodeIndex, NodeIndex, sparkc_ir::Port)> = train
        .g
        .edge_indices()
        .filter_map(|e| train.g.edge_endpoints(e).map(|(s, d)| (s, d, train.g[e])))
        .collect();
    let boundary: HashSet<Value> = edges
        .iter()
        .filter(|(s, d, _)| forward.contains(s) && forward.contains(d) && layer(*s) != layer(*d))
        .map(|&(s, _, p)| Value { node: s, port: p.src })
        .collect();
    let keep = |v: Value| {
        !forward.contains(&v.node)
            || matches!(train.node(v.node).op, Op::Param { .. } | Op::Input { .. } | Op::ZerosLike)
            || layer(v.node).is_none_or(|l| !recompute(l))
            || outputs.contains(&v)
            || boundary.contains(&v)
    };

    // Forward nodes to copy: those the backward reads, the scans whose adjoints are rewired,
    // and (transitively) what those copies read inside their layer.
    let mut wanted: BTreeSet<NodeIndex> = edges
        .iter()
        .filter(|(s, d, p)| !forward.contains(d) && !keep(Value { node: *s, port: p.src }))
        .map(|&(s, _, _)| s)
        .collect();
    let mut scans: HashMap<ScanPairKey, NodeIndex> = HashMap::new();
    for n in train.g.node_indices() {
        if forward.contains(&n) && matches!(train.node(n).op, Op::Scan { .. }) {
            if let Some(k) = train.scan_pair_key(n) {
                scans.insert(k, n);
            }
        }
    }
    let mut adjoints = Vec::new();
    for n in train.g.node_indices() {
        if forward.contains(&n) || !matches!(train.node(n).op, Op::ScanAdjoint { .. }) {
            continue;
        }
        let Some(key) = train.scan_pair_key(n) else { continue };
        if key.operands.iter().all(|&v| keep(v)) {
            continue;
        }
        if let Some(&scan) = scans.get(&key) {
            wanted.insert(scan);
            adjoints.push((n, scan));
        }
    }
    let mut stack: Vec<NodeIndex> = wanted.iter().copied().collect();
    while let Some(n) = stack.pop() {
        for u in train.operands(n) {
            if !keep(u) && wanted.insert(u.node) {
                stack.push(u.node);
            }
        }
    }

    // Copy in topological order, so that a copy's operands are copied first.
    let mut g = train.clone();
    let mut copy: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut report = RecomputeReport::default();
    let resolve = |v: Value, copy: &HashMap<NodeIndex, NodeIndex>| -> Result<Value, IrError> {
        if keep(v) {
            return Ok(v);
        }
        let node = copy.get(&v.node).ok_or_else(|| IrError::Graph(format!("recompute: `{}` was not copied before its reader", train.node(v.node).name)))?;
        Ok(Value { node: *node, port: v.port })
    };
    for n in train.topo_order()? {
        if !wanted.contains(&n) {
            continue;
        }
        let node = train.node(n);
        let ops = train.operands(n).into_iter().map(|v| resolve(v, &copy)).collect::<Result<Vec<_>, _>>()?;
        let results = g.add_recompute(node.op.clone(), &ops, &format!("{}{RECOMPUTE_SUFFIX}", node.name))?;
        let first = results.first().ok_or_else(|| IrError::Graph(format!("recompute: `{}` has no results", node.name)))?;
        copy.insert(n, first.node);
        if let Some(l) = layer(n) {
            *report.copied.entry(l).or_default() += 1;
        }
    }

    // Rewire the backward's reads. Edge indices are the same in the clone.
    for e in train.g.edge_indices() {
        let Some((s, d)) = train.g.edge_endpoints(e) else { continue };
        let port = train.g[e];
        let v = Value { node: s, port: port.src };
        if forward.contains(&d) || keep(v) {
            continue;
        }
        let to = resolve(v, &copy)?;
        g.g.remove_edge(e);
        g.g.add_edge(to.node, d, port);
    }
    for (adjoint, scan) in adjoints {
        let paired = copy.get(&scan).is_some_and(|&c| g.scan_pair_key(c) == g.scan_pair_key(adjoint));
        if !paired {
            return Err(IrError::Graph(format!("recompute: `{}` no longer pairs with its forward scan", train.node(adjoint).name)));
        }
    }

    let mut live = BTreeSet::new();
    for e in g.g.edge_indices() {
        let Some((s, d)) = g.g.edge_endpoints(e) else { continue };
        let source = matches!(g.node(s).op, Op::Param { .. } | Op::Input { .. } | Op::ZerosLike);
        let v = Value { node: s, port: g.g[e].src };
        if forward.contains(&s) && !forward.contains(&d) && !source && !outputs.contains(&v) {
            live.insert(value_name(&g, v));
        }
    }
    report.live = live.into_iter().collect();
    sparkc_ir::verify::verify(&g)?;
    Ok((g, report))
}

/// The most bytes of intermediate values alive at once when `graph` runs in its
/// [`execution_order`](Graph::execution_order) and every value is freed after its last reader,
/// as the executors do. A value nothing reads is counted while its node runs; graph outputs
/// live to the end; parameters and inputs belong to the caller and are not counted. `dims`
/// binds the free dimensions (B, T, …).
pub fn peak_live_bytes(graph: &Graph, dims: &DimBindings) -> Result<u64, IrError> {
    let order = graph.execution_order()?;
    let mut env = graph.dims.clone();
    env.extend(dims.iter().map(|(k, v)| (k.clone(), *v)));
    let mut last_use: HashMap<Value, usize> = HashMap::new();
    for (pos, &n) in order.iter().enumerate() {
        for v in graph.operands(n) {
            last_use.insert(v, pos);
        }
    }
    for (_, v) in &graph.outputs {
        last_use.insert(*v, usize::MAX);
    }
    let overflow = || IrError::Graph("peak_live_bytes: the byte count overflows".into());
    let bytes = |v: Value| -> Result<u64, IrError> {
        let ty = graph.value_type(v);
        let shape = ty.shape.concrete(&env).map_err(|s| {
            IrError::Graph(format!("peak_live_bytes: dimension {s} of `{}` is not bound", graph.node(v.node).name))
        })?;
        let elems = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)).ok_or_else(overflow)?;
        Ok(elems.checked_mul(ty.dtype.bits() as u64).ok_or_else(overflow)?.div_ceil(8))
    };
    let (mut live, mut peak) = (0u64, 0u64);
    for (pos, &n) in order.iter().enumerate() {
        let node = graph.node(n);
        if !node.op.is_source() {
            let results: Vec<Value> = (0..node.results.len() as u32).map(|port| Value { node: n, port }).collect();
            for &v in &results {
                live = live.checked_add(bytes(v)?).ok_or_else(overflow)?;
            }
            peak = peak.max(live);
            for &v in results.iter().filter(|v| !last_use.contains_key(v)) {
                live -= bytes(v)?;
            }
        }
        let freed: BTreeSet<Value> = graph.operands(n).into_iter().filter(|v| last_use.get(v) == Some(&pos)).collect();
        for v in freed {
            if !graph.node(v.node).op.is_source() {
                live -= bytes(v)?;
            }
        }
    }
    Ok(peak)
}
