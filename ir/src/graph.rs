//! The graph: ops as petgraph nodes, operands as edges that name the producer's result port
//! and the consumer's operand slot.

use crate::error::IrError;
use crate::neuron::NeuronModel;
use crate::op::{infer_types, NeuronTable, Op};
use crate::types::{DimBindings, ValueType};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::collections::{BinaryHeap, BTreeMap};
use std::cmp::Reverse;

/// An operation instance with its result types and an optional descriptive name
/// (e.g. `layers.0.input_neuron1`) used in diagnostics and by backends for state keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub results: Vec<ValueType>,
    pub name: String,
    /// A recomputed copy of a forward node (activation checkpointing): executors run it late,
    /// just before its first reader (see [`Graph::execution_order`]).
    #[serde(default)]
    pub recompute: bool,
}

/// Edge weight: result `src` of the producer feeds operand slot `dst` of the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub src: u32,
    pub dst: u32,
}

/// One result of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Value {
    pub node: NodeIndex,
    pub port: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    /// Symbolic dimensions this graph fixes, e.g. `K = 4`.
    pub dims: DimBindings,
    pub neurons: NeuronTable,
    pub g: StableDiGraph<Node, Port>,
    /// Named graph results, in order.
    pub outputs: Vec<(String, Value)>,
}

impl Graph {
    pub fn new(name: &str) -> Graph {
        Graph {
            name: name.to_string(),
            dims: BTreeMap::new(),
            neurons: BTreeMap::new(),
            g: StableDiGraph::new(),
            outputs: Vec::new(),
        }
    }

    pub fn bind_dim(&mut self, sym: &str, size: u64) {
        self.dims.insert(sym.to_string(), size);
    }

    /// Register a neuron model (validated); re-adding an identical model is a no-op.
    pub fn add_neuron(&mut self, model: NeuronModel) -> Result<(), IrError> {
        model.validate()?;
        match self.neurons.get(&model.name) {
            Some(existing) if *existing != model => Err(IrError::Graph(format!(
                "a different neuron model named `{}` is already registered",
                model.name
            ))),
            _ => {
                self.neurons.insert(model.name.clone(), model);
                Ok(())
            }
        }
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.g[n]
    }

    pub fn value_type(&self, v: Value) -> &ValueType {
        &self.g[v.node].results[v.port as usize]
    }

    /// A graph input with a declared type.
    pub fn input(&mut self, name: &str, ty: ValueType) -> Value {
        let n = self.g.add_node(Node { op: Op::Input { name: name.into() }, results: vec![ty], name: name.into(), recompute: false });
        Value { node: n, port: 0 }
    }

    /// A parameter with a declared type; asking twice for the same key returns the same value
    /// (this is how the head is tied to the embedding).
    pub fn param(&mut self, name: &str, ty: ValueType) -> Result<Value, IrError> {
        if let Some(n) = self.g.node_indices().find(|&n| matches!(&self.g[n].op, Op::Param { name: p } if p == name)) {
            if self.g[n].results[0] != ty {
                return Err(IrError::Graph(format!(
                    "parameter `{name}` declared as {} and as {ty}",
                    self.g[n].results[0]
                )));
            }
            return Ok(Value { node: n, port: 0 });
        }
        let n = self.g.add_node(Node { op: Op::Param { name: name.into() }, results: vec![ty], name: name.into(), recompute: false });
        Ok(Value { node: n, port: 0 })
    }

    /// Add an op, inferring its result types; the error names the op and the node.
    pub fn add(&mut self, op: Op, operands: &[Value], name: &str) -> Result<Vec<Value>, IrError> {
        self.add_node(op, operands, name, false)
    }

    /// [`add`](Self::add) for a recomputed copy of a forward node: the node is marked, so that
    /// [`execution_order`](Self::execution_order) runs it just before its first reader.
    pub fn add_recompute(&mut self, op: Op, operands: &[Value], name: &str) -> Result<Vec<Value>, IrError> {
        self.add_node(op, operands, name, true)
    }

    fn add_node(&mut self, op: Op, operands: &[Value], name: &str, recompute: bool) -> Result<Vec<Value>, IrError> {
        if op.is_source() {
            return Err(IrError::Graph("inputs and params are added with `input` / `param`".into()));
        }
        let tys: Vec<ValueType> = operands.iter().map(|&v| self.value_type(v).clone()).collect();
        let results = infer_types(&op, &tys, &self.neurons, &self.dims).map_err(|msg| IrError::Type {
            op: op.name().to_string(),
            node: name.to_string(),
            msg,
        })?;
        let count = results.len();
        let n = self.g.add_node(Node { op, results, name: name.to_string(), recompute });
        for (slot, v) in operands.iter().enumerate() {
            self.g.add_edge(v.node, n, Port { src: v.port, dst: slot as u32 });
        }
        Ok((0..count as u32).map(|port| Value { node: n, port }).collect())
    }

    /// Add a single-result op.
    pub fn add1(&mut self, op: Op, operands: &[Value], name: &str) -> Result<Value, IrError> {
        Ok(self.add(op, operands, name)?[0])
    }

    pub fn set_output(&mut self, name: &str, v: Value) {
        self.outputs.retain(|(n, _)| n != name);
        self.outputs.push((name.to_string(), v));
    }

    pub fn output(&self, name: &str) -> Option<Value> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Operands of a node, in slot order.
    pub fn operands(&self, n: NodeIndex) -> Vec<Value> {
        let mut ins: Vec<(u32, Value)> = self
            .g
            .edges_directed(n, Direction::Incoming)
            .map(|e| (e.weight().dst, Value { node: e.source(), port: e.weight().src }))
            .collect();
        ins.sort_by_key(|(slot, _)| *slot);
        ins.into_iter().map(|(_, v)| v).collect()
    }

    /// The nodes that read value `v`, once per operand slot that reads it.
    pub fn readers_of(&self, v: Value) -> Vec<NodeIndex> {
        self.g.edges_directed(v.node, Direction::Outgoing).filter(|e| e.weight().src == v.port).map(|e| e.target()).collect()
    }

    /// Graph inputs (node, name, type), in creation order.
    pub fn inputs(&self) -> Vec<(NodeIndex, &str, &ValueType)> {
        self.g
            .node_indices()
            .filter_map(|n| match &self.g[n].op {
                Op::Input { name } => Some((n, name.as_str(), &self.g[n].results[0])),
                _ => None,
            })
            .collect()
    }

    /// Parameters (node, key, type), in creation order.
    pub fn params(&self) -> Vec<(NodeIndex, &str, &ValueType)> {
        self.g
            .node_indices()
            .filter_map(|n| match &self.g[n].op {
                Op::Param { name } => Some((n, name.as_str(), &self.g[n].results[0])),
                _ => None,
            })
            .collect()
    }

    /// A deterministic topological order that keeps creation order where dependencies allow.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>, IrError> {
        let mut indeg: BTreeMap<NodeIndex, usize> = self.g.node_indices().map(|n| (n, 0)).collect();
        for e in self.g.edge_references() {
            *indeg.get_mut(&e.target()).expect("edge target is a node") += 1;
        }
        let mut ready: BinaryHeap<Reverse<NodeIndex>> =
            indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| Reverse(n)).collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() != indeg.len() {
            let stuck = indeg.keys().find(|n| !order.contains(n)).expect("some node is left");
            return Err(IrError::Graph(format!(
                "the graph has a cycle through node `{}` ({})",
                self.g[*stuck].name,
                self.g[*stuck].op.name()
            )));
        }
        Ok(order)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }
}

impl Graph {
    /// Fix the free dims (B, T, ...) from the shapes of the fed inputs: each input's rank and
    /// constant dims must match its declaration and a symbol must have one size everywhere.
    /// Inputs `shape_of` does not know are skipped (callers report them as missing). The error
    /// names the input and, for a conflict, the input that fixed the symbol first.
    pub fn bind_input_dims<'a>(&self, shape_of: impl Fn(&str) -> Option<&'a [usize]>) -> Result<DimBindings, String> {
        let mut env = self.dims.clone();
        let mut bound_by: BTreeMap<String, String> = BTreeMap::new();
        for (_, name, ty) in self.inputs() {
            let Some(shape) = shape_of(name) else { continue };
            let mismatch = || format!("`{name}` has shape {shape:?}, expected {}", ty.shape);
            if shape.len() != ty.shape.rank() {
                return Err(mismatch());
            }
            for (d, &size) in ty.shape.dims().iter().zip(shape) {
                match d {
                    crate::types::Dim::Const(c) if *c as usize != size => return Err(mismatch()),
                    crate::types::Dim::Sym(s) => match env.get(s) {
                        Some(&v) if v as usize != size => {
                            let origin = bound_by.get(s).map(|o| format!(" (from `{o}`)")).unwrap_or_default();
                            return Err(format!("`{name}` has shape {shape:?}: dimension {s} is {size}, but {s} = {v}{origin}"));
                        }
                        Some(_) => {}
                        None => {
                            env.insert(s.clone(), size as u64);
                            bound_by.insert(s.clone(), name.to_string());
                        }
                    },
                    _ => {}
                }
            }
        }
        Ok(env)
    }
}
