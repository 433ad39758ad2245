//! The order executors run a graph in: the topological order, with recomputed nodes placed late.
//!
//! A recomputed copy of a forward node (activation checkpointing) saves memory only if it runs
//! right before the backward node that reads it: then what it recomputes is live only briefly,
//! while run in plain topological order it would be as long-lived as the original.

use crate::error::IrError;
use crate::graph::{Graph, Value};
use crate::op::{Op, StateScope};
use petgraph::stable_graph::NodeIndex;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

/// What pairs a `scan_adjoint` with the forward `scan` it reverses: the same neuron, emitted
/// outputs and scope, and the scan's operands (inputs, params, initial state) as the adjoint's
/// first operands. Backends that keep a forward scan's checkpoints for its adjoint pair them so.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScanPairKey {
    pub neuron: String,
    pub emit: Vec<String>,
    pub scope: StateScope,
    pub operands: Vec<Value>,
}

impl Graph {
    /// The pairing key of a `scan` or `scan_adjoint` node; `None` for other nodes.
    pub fn scan_pair_key(&self, n: NodeIndex) -> Option<ScanPairKey> {
        let key = |neuron: &String, emit: &Vec<String>, scope: &StateScope, operands: Vec<Value>| ScanPairKey {
            neuron: neuron.clone(),
            emit: emit.clone(),
            scope: *scope,
            operands,
        };
        match &self.g.node_weight(n)?.op {
            Op::Scan { neuron, emit, scope } => Some(key(neuron, emit, scope, self.operands(n))),
            Op::ScanAdjoint { neuron, emit, scope } => {
                let m = self.neurons.get(neuron)?;
                let mut ops = self.operands(n);
                ops.truncate(m.inputs.len() + m.params.len() + m.state.len());
                Some(key(neuron, emit, scope, ops))
            }
            _ => None,
        }
    }

    /// The order executors run nodes in: [`topo_order`](Self::topo_order) of the nodes not
    /// marked `recompute`, with each recompute node inserted (depth first over its recompute
    /// operands) immediately before the first node that needs it. A `scan_adjoint` also needs
    /// the recompute `scan` it pairs with (see [`ScanPairKey`]), so that the scan's
    /// checkpoints are made just before they are used. Recompute nodes nothing needs come
    /// last. Without recompute nodes this is exactly `topo_order()`.
    pub fn execution_order(&self) -> Result<Vec<NodeIndex>, IrError> {
        let topo = self.topo_order()?;
        if !self.g.node_weights().any(|n| n.recompute) {
            return Ok(topo);
        }
        let is_rc = |n: NodeIndex| self.g[n].recompute;

        // Frontier of a recompute node: the plain nodes it reads through chains of recompute
        // nodes. It must have run before the recompute node can.
        // The plain nodes `n` reads directly or through recompute nodes already in `frontier`.
        let reads = |n: NodeIndex, frontier: &HashMap<NodeIndex, BTreeSet<NodeIndex>>| -> BTreeSet<NodeIndex> {
            let mut f = BTreeSet::new();
            for v in self.operands(n) {
                match frontier.get(&v.node) {
                    Some(up) => f.extend(up.iter().copied()),
                    None => {
                        f.insert(v.node);
                    }
                }
            }
            f
        };
        let mut frontier: HashMap<NodeIndex, BTreeSet<NodeIndex>> = HashMap::new();
        for &n in topo.iter().filter(|&&n| is_rc(n)) {
            let f = reads(n, &frontier);
            frontier.insert(n, f);
        }

        // Kahn over the plain nodes, with the dependencies that run through recompute nodes
        // contracted, and the same min-index tie break as `topo_order`.
        let mut deps: HashMap<NodeIndex, BTreeSet<NodeIndex>> = HashMap::new();
        let mut dependents: HashMap<NodeIndex, Vec<NodeIndex>> = HashMap::new();
        for &n in topo.iter().filter(|&&n| !is_rc(n)) {
            let d = reads(n, &frontier);
            for &p in &d {
                dependents.entry(p).or_default().push(n);
            }
            deps.insert(n, d);
        }
        let mut indeg: HashMap<NodeIndex, usize> = deps.iter().map(|(&n, d)| (n, d.len())).collect();
        let mut ready: BinaryHeap<Reverse<NodeIndex>> = indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| Reverse(n)).collect();
        let mut base = Vec::with_capacity(deps.len());
        while let Some(Reverse(n)) = ready.pop() {
            base.push(n);
            for &m in dependents.get(&n).map(Vec::as_slice).unwrap_or_default() {
                let d = indeg.get_mut(&m).expect("every plain node has an in-degree");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(m));
                }
            }
        }
        if base.len() != deps.len() {
            // Cannot happen for an acyclic graph (checked above); report rather than panic.
            return Err(IrError::Graph("recompute nodes make the execution order cyclic".into()));
        }

        // The recompute scan each key pairs with: the last one in index order, as backends pair.
        let mut scans: HashMap<ScanPairKey, NodeIndex> = HashMap::new();
        for n in self.g.node_indices() {
            if matches!(self.g[n].op, Op::Scan { .. }) {
                if let Some(k) = self.scan_pair_key(n) {
                    scans.insert(k, n);
                }
            }
        }
        let paired = |n: NodeIndex| -> Option<NodeIndex> {
            if !matches!(self.g[n].op, Op::ScanAdjoint { .. }) {
                return None;
            }
            self.scan_pair_key(n).and_then(|k| scans.get(&k).copied()).filter(|&s| is_rc(s))
        };

        let mut order = Vec::with_capacity(topo.len());
        let mut placed: HashSet<NodeIndex> = HashSet::with_capacity(topo.len());
        // Post-order over recompute operands (iterative: a region may be deep).
        let place = |c: NodeIndex, order: &mut Vec<NodeIndex>, placed: &mut HashSet<NodeIndex>| {
            let mut stack = vec![(c, false)];
            while let Some((x, expanded)) = stack.pop() {
                if placed.contains(&x) {
                    continue;
                }
                if expanded {
                    placed.insert(x);
                    order.push(x);
                    continue;
                }
                stack.push((x, true));
                for v in self.operands(x).iter().rev() {
                    if is_rc(v.node) && !placed.contains(&v.node) {
                        stack.push((v.node, false));
                    }
                }
            }
        };
        for n in base {
            for v in self.operands(n) {
                if is_rc(v.node) {
                    place(v.node, &mut order, &mut placed);
                }
            }
            // The paired scan goes in only when everything it reads has run (it reads the
            // adjoint's own first operands, so in practice it always has).
            if let Some(s) = paired(n) {
                if frontier.get(&s).is_some_and(|f| f.iter().all(|p| placed.contains(p))) {
                    place(s, &mut order, &mut placed);
                }
            }
            placed.insert(n);
            order.push(n);
        }
        for &n in topo.iter().filter(|&&n| is_rc(n)) {
            place(n, &mut order, &mut placed);
        }
        Ok(order)
    }
}
