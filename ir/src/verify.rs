//! The verifier: a graph is well formed when every operand exists and is wired once, every
//! result type is what inference gives, names are unique, neuron models are valid and the graph
//! is acyclic. Errors name the op, the node and the value at fault.

use crate::error::IrError;
use crate::graph::Graph;
use crate::neuron::NeuronModel;
use crate::op::{infer_types, Op};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::BTreeSet;

fn describe(graph: &Graph, n: petgraph::stable_graph::NodeIndex) -> String {
    let node = &graph.g[n];
    if node.name.is_empty() {
        format!("`{}` node #{}", node.op.name(), n.index())
    } else {
        format!("`{}` node `{}`", node.op.name(), node.name)
    }
}

/// Names that the text form prints bare must read back as the same names: identifiers that do
/// not start with a digit, and, where an expression reads them, not the literals `inf` / `nan`.
fn check_model_names(model: &NeuronModel) -> Result<(), IrError> {
    let ident = |n: &str, dots: bool| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.'))
    };
    let fail = |msg: String| Err(IrError::Verify(format!("neuron model `{}`: {msg}", model.name)));
    if !ident(&model.name, true) {
        return fail("the model name is not an identifier".into());
    }
    let read = model.params.iter().chain(&model.inputs).chain(model.state.iter().map(|s| &s.name)).chain(model.lets.iter().map(|b| &b.name));
    for n in read {
        if !ident(n, false) || n == "inf" || n == "nan" {
            return fail(format!("`{n}` cannot be a variable name (the text form would read it as a number)"));
        }
    }
    for b in &model.outputs {
        if !ident(&b.name, false) {
            return fail(format!("output `{}` is not an identifier", b.name));
        }
    }
    Ok(())
}

pub fn verify(graph: &Graph) -> Result<(), IrError> {
    let fail = |msg: String| Err(IrError::Verify(msg));
    for model in graph.neurons.values() {
        model.validate()?;
        check_model_names(model)?;
    }
    let order = graph.topo_order().map_err(|e| IrError::Verify(e.to_string()))?;
    let mut input_names = BTreeSet::new();
    let mut param_names = BTreeSet::new();
    for n in order {
        let node = &graph.g[n];
        let mut slots: Vec<u32> = Vec::new();
        for e in graph.g.edges_directed(n, Direction::Incoming) {
            let producer = &graph.g[e.source()];
            if e.weight().src as usize >= producer.results.len() {
                return fail(format!(
                    "{} reads result {} of {}, which has only {}",
                    describe(graph, n),
                    e.weight().src,
                    describe(graph, e.source()),
                    producer.results.len()
                ));
            }
            slots.push(e.weight().dst);
        }
        slots.sort_unstable();
        if slots.iter().enumerate().any(|(i, &s)| s as usize != i) {
            return fail(format!("{} has operand slots {slots:?}; expected 0..{}", describe(graph, n), slots.len()));
        }
        match &node.op {
            Op::Input { name } => {
                if !slots.is_empty() || node.results.len() != 1 {
                    return fail(format!("{} must have no operands and one result", describe(graph, n)));
                }
                if !input_names.insert(name.clone()) {
                    return fail(format!("input `{name}` is declared twice"));
                }
            }
            Op::Param { name } => {
                if !slots.is_empty() || node.results.len() != 1 {
                    return fail(format!("{} must have no operands and one result", describe(graph, n)));
                }
                if !param_names.insert(name.clone()) {
                    return fail(format!("parameter `{name}` is declared twice"));
                }
            }
            op => {
                let tys: Vec<_> = graph.operands(n).iter().map(|&v| graph.value_type(v).clone()).collect();
                let inferred = infer_types(op, &tys, &graph.neurons, &graph.dims)
                    .map_err(|msg| IrError::Verify(format!("{}: {msg}", describe(graph, n))))?;
                if inferred.len() != node.results.len() {
                    return fail(format!(
                        "{} declares {} results; the op has {}",
                        describe(graph, n),
                        node.results.len(),
                        inferred.len()
                    ));
                }
                for (i, (want, got)) in inferred.iter().zip(&node.results).enumerate() {
                    let (w, g) = (want.shape.resolve(&graph.dims), got.shape.resolve(&graph.dims));
                    if want.dtype != got.dtype || w != g {
                        return fail(format!("{} result {i} is declared {got}, but the op gives {want}", describe(graph, n)));
                    }
                }
            }
        }
    }
    let mut out_names = BTreeSet::new();
    for (name, v) in &graph.outputs {
        if !out_names.insert(name) {
            return fail(format!("output `{name}` is declared twice"));
        }
        match graph.g.node_weight(v.node) {
            Some(node) if (v.port as usize) < node.results.len() => {}
            _ => return fail(format!("output `{name}` names a value that does not exist")),
        }
    }
    Ok(())
}
