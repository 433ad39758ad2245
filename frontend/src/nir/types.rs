//! Type inference and checking, as `NIRGraph.infer_types` / `check_types` do it (nir 1.0.8).
//!
//! A node's type is the shape of its input and of its output (no batch or time dims). Most
//! nodes know both from their parameters; Conv without `input_shape`, pooling and Flatten
//! without `input_type` get them from their inputs. Nodes without incoming edges that are not
//! `Input`s become implicit inputs, nodes without outgoing edges that are not `Output`s
//! implicit outputs, as the reference does. Two deliberate differences: Conv2d uses both
//! kernel dims (the reference uses the first for both) and counts `groups` in its input
//! channels.

use super::error::NirError;
use super::model::{NirGraph, NodeKind, Padding};
use std::collections::{BTreeMap, BTreeSet};

pub type Shape = Vec<i64>;

/// Input and output shape of one node; `None` while unknown.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct NodeType {
    pub input: Option<Shape>,
    pub output: Option<Shape>,
}

/// The inferred types of a graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphTypes {
    pub nodes: BTreeMap<String, NodeType>,
    pub subgraphs: BTreeMap<String, GraphTypes>,
    /// Nodes without incoming edges that are not `Input`s (they read a graph input).
    pub implicit_inputs: Vec<String>,
    /// Nodes without outgoing edges that are not `Output`s (they are graph outputs).
    pub implicit_outputs: Vec<String>,
}

/// A type that does not fit: the reference's `type_check` refuses the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeProblem {
    /// Node path (`graph.node` inside nested graphs).
    pub node: String,
    pub msg: String,
}

fn shape_of(a: &super::model::Array) -> Shape {
    a.shape.iter().map(|&d| d as i64).collect()
}

/// One output dim of a convolution or pooling window (PyTorch's formula).
pub fn conv_out(input: i64, padding: i64, dilation: i64, kernel: i64, stride: i64) -> Option<i64> {
    if stride <= 0 {
        return None;
    }
    let span = input.checked_add(padding.checked_mul(2)?)?.checked_sub(dilation.checked_mul(kernel - 1)?)?.checked_sub(1)?;
    Some(span.div_euclid(stride) + 1)
}

fn conv_output(spatial: &[i64], padding: &Padding, dilation: &[i64], kernel: &[i64], stride: &[i64]) -> Option<Vec<i64>> {
    (0..spatial.len())
        .map(|i| match padding {
            Padding::Same => Some(spatial[i]),
            Padding::Valid => conv_out(spatial[i], 0, dilation[i], kernel[i], stride[i]),
            Padding::Explicit(p) => conv_out(spatial[i], *p.get(i)?, dilation[i], kernel[i], stride[i]),
        })
        .collect()
}

/// Flatten's output shape; negative dims count from the end, as in Python.
pub fn flatten_output(input: &[i64], start_dim: i64, end_dim: i64) -> Option<Shape> {
    let n = input.len() as i64;
    let norm = |d: i64| if d < 0 { d + n } else { d };
    let (s, e) = (norm(start_dim), norm(end_dim));
    if s < 0 || e >= n || s > e {
        return None;
    }
    let (s, e) = (s as usize, e as usize);
    let mut out = input[..s].to_vec();
    out.push(input[s..=e].iter().try_fold(1i64, |a, &d| a.checked_mul(d))?);
    out.extend_from_slice(&input[e + 1..]);
    Some(out)
}

fn conv_kernel(w: &super::model::Array) -> (i64, i64, Vec<i64>) {
    let s = shape_of(w);
    (s.first().copied().unwrap_or(0), s.get(1).copied().unwrap_or(0), s.get(2..).map(|k| k.to_vec()).unwrap_or_default())
}

/// The output of a node whose output depends on its input (conv, pooling, flatten).
fn derived_output(kind: &NodeKind, input: &[i64]) -> Option<Shape> {
    match kind {
        NodeKind::Conv1d { weight, stride, padding, dilation, .. } => {
            let (cout, _, k) = conv_kernel(weight);
            let spatial = input.get(1..2)?;
            let mut out = vec![cout];
            out.extend(conv_output(spatial, padding, &[*dilation], k.get(..1)?, &[*stride])?);
            Some(out)
        }
        NodeKind::Conv2d { weight, stride, padding, dilation, .. } => {
            let (cout, _, k) = conv_kernel(weight);
            let spatial = input.get(1..3)?;
            let mut out = vec![cout];
            out.extend(conv_output(spatial, padding, dilation, k.get(..2)?, stride)?);
            Some(out)
        }
        NodeKind::SumPool2d { kernel_size, stride, padding } | NodeKind::AvgPool2d { kernel_size, stride, padding } => {
            if input.len() != 3 {
                return None;
            }
            let mut out = vec![input[0]];
            out.extend(conv_output(&input[1..], &Padding::Explicit(padding.to_vec()), &[1, 1], kernel_size, stride)?);
            Some(out)
        }
        NodeKind::Flatten { start_dim, end_dim, .. } => flatten_output(input, *start_dim, *end_dim),
        _ => None,
    }
}

/// The types a node knows from its own fields (the reference's `__post_init__`).
pub fn intrinsic(kind: &NodeKind) -> NodeType {
    let same = |s: Shape| NodeType { input: Some(s.clone()), output: Some(s) };
    match kind {
        NodeKind::Input { shape } | NodeKind::Output { shape } => same(shape.clone()),
        NodeKind::Affine { weight, .. } | NodeKind::Linear { weight } => {
            let s = shape_of(weight);
            if s.len() < 2 {
                return NodeType::default();
            }
            let batch = &s[..s.len() - 2];
            let mut i = batch.to_vec();
            i.push(s[s.len() - 1]);
            let mut o = batch.to_vec();
            o.push(s[s.len() - 2]);
            NodeType { input: Some(i), output: Some(o) }
        }
        NodeKind::Scale { scale: a } | NodeKind::Delay { delay: a } | NodeKind::Threshold { threshold: a } => same(shape_of(a)),
        NodeKind::I { r } | NodeKind::IF { r, .. } | NodeKind::LI { r, .. } | NodeKind::LIF { r, .. } => same(shape_of(r)),
        NodeKind::CubaLI { v_leak, .. } => same(shape_of(v_leak)),
        NodeKind::CubaLIF { v_threshold, .. } => same(shape_of(v_threshold)),
        NodeKind::Conv1d { input_shape: Some(n), weight, groups, .. } => {
            let (_, cin, _) = conv_kernel(weight);
            let input = vec![cin * groups, *n];
            NodeType { output: derived_output(kind, &input), input: Some(input) }
        }
        NodeKind::Conv2d { input_shape: Some([h, w]), weight, groups, .. } => {
            let (_, cin, _) = conv_kernel(weight);
            let input = vec![cin * groups, *h, *w];
            NodeType { output: derived_output(kind, &input), input: Some(input) }
        }
        NodeKind::Flatten { input_type: Some(t), .. } => NodeType { input: Some(t.clone()), output: derived_output(kind, t) },
        // Known only from the graph (a nested graph's types come from its own inference).
        _ => NodeType::default(),
    }
}

fn fmt_shape(s: &Option<Shape>) -> String {
    match s {
        Some(s) => format!("{s:?}"),
        None => "unknown".into(),
    }
}

/// Check that every edge names existing nodes and appears once (always an error).
pub fn validate_structure(graph: &NirGraph, path: &str, origin: &str) -> Result<(), NirError> {
    let err = |msg: String| NirError::Graph { origin: origin.to_string(), graph: if path.is_empty() { "<root>".into() } else { path.to_string() }, msg };
    let mut seen = BTreeSet::new();
    for (a, b) in &graph.edges {
        for end in [a, b] {
            if !graph.nodes.contains_key(end) {
                let hint = match end.split_once('.') {
                    Some((g, _)) if matches!(graph.nodes.get(g).map(|n| &n.kind), Some(NodeKind::Graph(_))) => {
                        format!(" (addressing a node inside subgraph `{g}` with a dotted name is not supported, by the reference reader either: connect to `{g}` itself)")
                    }
                    _ => String::new(),
                };
                return Err(err(format!("edge (`{a}`, `{b}`) names node `{end}`, which does not exist{hint}")));
            }
        }
        if !seen.insert((a, b)) {
            return Err(err(format!("duplicate edge (`{a}`, `{b}`)")));
        }
    }
    for (name, n) in &graph.nodes {
        if let NodeKind::Graph(sub) = &n.kind {
            validate_structure(sub, &join(path, name), origin)?;
        }
    }
    Ok(())
}

pub fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// A nested graph seen as a node: its single Input's and single Output's shapes.
fn subgraph_type(sub: &NirGraph, types: &GraphTypes) -> (NodeType, Option<String>) {
    let ins: Vec<&String> = sub.nodes.iter().filter(|(_, n)| matches!(n.kind, NodeKind::Input { .. })).map(|(k, _)| k).collect();
    let outs: Vec<&String> = sub.nodes.iter().filter(|(_, n)| matches!(n.kind, NodeKind::Output { .. })).map(|(k, _)| k).collect();
    let problem = if ins.len() != 1 || outs.len() != 1 {
        Some(format!(
            "a nested graph is connected by its name only when it has one Input and one Output; it has {} and {}",
            ins.len(),
            outs.len()
        ))
    } else {
        None
    };
    let t = NodeType {
        input: ins.first().and_then(|k| types.nodes.get(*k)).and_then(|t| t.output.clone()),
        output: outs.first().and_then(|k| types.nodes.get(*k)).and_then(|t| t.input.clone()),
    };
    (t, problem)
}

/// Infer the types of every node of `graph` (and of nested graphs). Problems are what the
/// reference's type check refuses; the caller decides whether they are errors.
pub fn infer(graph: &NirGraph, path: &str) -> (GraphTypes, Vec<TypeProblem>) {
    let mut problems = Vec::new();
    let mut out = GraphTypes::default();
    for (name, n) in &graph.nodes {
        let t = match &n.kind {
            NodeKind::Graph(sub) => {
                let (st, sp) = infer(sub, &join(path, name));
                problems.extend(sp);
                let (t, p) = subgraph_type(sub, &st);
                if let Some(msg) = p {
                    problems.push(TypeProblem { node: join(path, name), msg });
                }
                out.subgraphs.insert(name.clone(), st);
                t
            }
            kind => intrinsic(kind),
        };
        out.nodes.insert(name.clone(), t);
    }
    let has_in: BTreeSet<&str> = graph.edges.iter().map(|(_, b)| b.as_str()).collect();
    let has_out: BTreeSet<&str> = graph.edges.iter().map(|(a, _)| a.as_str()).collect();
    let mut ready: Vec<&str> = Vec::new();
    for (name, n) in &graph.nodes {
        if matches!(n.kind, NodeKind::Input { .. }) {
            ready.push(name);
        } else if !has_in.contains(name.as_str()) {
            if out.nodes[name].input.is_some() {
                out.implicit_inputs.push(name.clone());
                ready.push(name);
            } else {
                problems.push(TypeProblem {
                    node: join(path, name),
                    msg: format!("{} has no incoming edge and no known input type, so the graph's input cannot be inferred", n.kind.type_name()),
                });
            }
        }
    }
    // Propagate along edges from the inputs, each node once (order: as the edges are listed).
    let mut seen: BTreeSet<&str> = ready.iter().copied().collect();
    let mut i = 0;
    while i < ready.len() {
        let pre = ready[i];
        i += 1;
        for (a, b) in graph.edges.iter().filter(|(a, _)| a == pre) {
            let (Some(pre_t), Some(post_n)) = (out.nodes.get(a).cloned(), graph.nodes.get(b)) else { continue };
            let post_t = out.nodes.get_mut(b.as_str()).expect("edge targets were validated");
            if post_t.input.is_none() {
                post_t.input = pre_t.output.clone();
            }
            if post_t.output.is_none() {
                if let Some(inp) = &post_t.input {
                    post_t.output = derived_output(&post_n.kind, inp);
                }
            }
            if seen.insert(b.as_str()) {
                ready.push(b.as_str());
            }
        }
    }
    for (name, n) in &graph.nodes {
        if !has_out.contains(name.as_str()) && !matches!(n.kind, NodeKind::Output { .. }) {
            out.implicit_outputs.push(name.clone());
            if out.nodes[name].output.is_none() {
                problems.push(TypeProblem {
                    node: join(path, name),
                    msg: format!("{} has no outgoing edge and no known output type, so the graph's output cannot be inferred", n.kind.type_name()),
                });
            }
        }
    }
    for (a, b) in &graph.edges {
        let (Some(ta), Some(tb)) = (out.nodes.get(a), out.nodes.get(b)) else { continue };
        match (&ta.output, &tb.input) {
            (Some(x), Some(y)) if x == y => {}
            (None, _) => problems.push(TypeProblem { node: join(path, a), msg: format!("the output type is unknown (edge to `{b}`)") }),
            (_, None) => problems.push(TypeProblem { node: join(path, b), msg: format!("the input type is unknown (edge from `{a}`)") }),
            (x, y) => problems.push(TypeProblem {
                node: join(path, b),
                msg: format!("type mismatch on edge (`{a}`, `{b}`): `{a}` outputs {} but `{b}` takes {}", fmt_shape(x), fmt_shape(y)),
            }),
        }
    }
    (out, problems)
}
