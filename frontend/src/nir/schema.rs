//! The on-disk schema: [`H5Group`] tree ↔ NIR model, field by field as `nir.write` /
//! `nir.read` (nir 1.0.8) store them, accepting what older releases wrote (no `v_reset`, no
//! `w_in`, empty edge lists stored as float arrays, ints stored as 1-element arrays).
//!
//! Strict mode refuses what the reference reader refuses (unknown types, unknown fields);
//! lenient mode keeps going and reports each deviation as a warning.

use super::error::NirError;
use super::h5::{H5Entry, H5Group, H5Value, MAX_DEPTH};
use super::model::*;

/// Whether to refuse (strict) or warn about (lenient) what the reference reader refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Strict,
    Lenient,
}

struct Reader<'a> {
    origin: &'a str,
    mode: Mode,
    warnings: Vec<String>,
}

/// Fields of one node group, consumed as they are read so that leftovers are unknown fields.
struct Fields<'a> {
    node: String,
    type_name: String,
    entries: Vec<(&'a str, &'a H5Entry)>,
}

impl<'a> Fields<'a> {
    fn take(&mut self, name: &str) -> Option<&'a H5Entry> {
        let i = self.entries.iter().position(|(k, _)| *k == name)?;
        Some(self.entries.remove(i).1)
    }
}

impl Reader<'_> {
    fn node_err(&self, node: &str, msg: impl Into<String>) -> NirError {
        NirError::Node { origin: self.origin.to_string(), node: node.to_string(), msg: msg.into() }
    }

    fn format_err(&self, msg: impl Into<String>) -> NirError {
        NirError::Format { origin: self.origin.to_string(), msg: msg.into() }
    }

    /// A deviation from the reference schema: an error in strict mode, a warning otherwise.
    fn deviation(&mut self, node: &str, msg: String) -> Result<(), NirError> {
        match self.mode {
            Mode::Strict => Err(self.node_err(node, format!("{msg} (read in lenient mode to continue)"))),
            Mode::Lenient => {
                self.warnings.push(format!("node `{node}`: {msg}"));
                Ok(())
            }
        }
    }

    fn array(&self, f: &mut Fields, name: &str) -> Result<Array, NirError> {
        match f.take(name) {
            Some(H5Entry::Dataset(H5Value::Array(a))) => Ok(a.clone()),
            Some(H5Entry::Dataset(_)) => {
                Err(self.node_err(&f.node, format!("{} field `{name}` must be a numeric array, found a string", f.type_name)))
            }
            Some(H5Entry::Group(_)) => {
                Err(self.node_err(&f.node, format!("{} field `{name}` must be a numeric array, found a group", f.type_name)))
            }
            None => Err(self.node_err(&f.node, format!("{} is missing required field `{name}`", f.type_name))),
        }
    }

    fn opt_array(&self, f: &mut Fields, name: &str) -> Result<Option<Array>, NirError> {
        if f.entries.iter().any(|(k, _)| *k == name) {
            self.array(f, name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A float parameter array (ints are accepted and kept as ints, as numpy would).
    fn param(&self, f: &mut Fields, name: &str) -> Result<Array, NirError> {
        let a = self.array(f, name)?;
        check_finite(&a).map_err(|i| self.node_err(&f.node, format!("{} field `{name}` has a non-finite value at flat index {i}", f.type_name)))?;
        Ok(a)
    }

    fn ints(&self, f: &mut Fields, name: &str) -> Result<Vec<i64>, NirError> {
        let a = self.array(f, name)?;
        a.to_i64_vec().ok_or_else(|| self.node_err(&f.node, format!("{} field `{name}` must hold integers", f.type_name)))
    }

    fn opt_ints(&self, f: &mut Fields, name: &str) -> Result<Option<Vec<i64>>, NirError> {
        if f.entries.iter().any(|(k, _)| *k == name) {
            self.ints(f, name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An int stored as a scalar or a 1-element array.
    fn int(&self, f: &mut Fields, name: &str) -> Result<i64, NirError> {
        let v = self.ints(f, name)?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => Err(self.node_err(&f.node, format!("{} field `{name}` must be one integer, found {} values", f.type_name, v.len()))),
        }
    }

    fn opt_int(&self, f: &mut Fields, name: &str, default: i64) -> Result<i64, NirError> {
        if f.entries.iter().any(|(k, _)| *k == name) {
            self.int(f, name)
        } else {
            Ok(default)
        }
    }

    /// An int or a pair of ints (PyTorch style), as a pair.
    fn pair(&self, f: &mut Fields, name: &str) -> Result<[i64; 2], NirError> {
        let v = self.ints(f, name)?;
        match v.as_slice() {
            [x] => Ok([*x, *x]),
            [x, y] => Ok([*x, *y]),
            _ => Err(self.node_err(&f.node, format!("{} field `{name}` must be one or two integers, found {}", f.type_name, v.len()))),
        }
    }

    fn padding(&self, f: &mut Fields, name: &str, dims: usize) -> Result<Padding, NirError> {
        match f.take(name) {
            Some(H5Entry::Dataset(H5Value::Str(s))) => match s.as_str() {
                "same" => Ok(Padding::Same),
                "valid" => Ok(Padding::Valid),
                other => Err(self.node_err(&f.node, format!("padding must be 'same', 'valid' or integers, got '{other}'"))),
            },
            Some(H5Entry::Dataset(H5Value::Array(a))) => {
                let v = a.to_i64_vec().ok_or_else(|| self.node_err(&f.node, "padding must hold integers"))?;
                match (v.len(), dims) {
                    (1, _) => Ok(Padding::Explicit(vec![v[0]; dims])),
                    (n, d) if n == d => Ok(Padding::Explicit(v)),
                    (n, d) => Err(self.node_err(&f.node, format!("padding has {n} values for {d} spatial dims"))),
                }
            }
            Some(_) => Err(self.node_err(&f.node, "padding must be a string or integers")),
            None => Err(self.node_err(&f.node, format!("{} is missing required field `{name}`", f.type_name))),
        }
    }

    fn same_shapes(&self, node: &str, type_name: &str, fields: &[(&str, &Array)]) -> Result<(), NirError> {
        let (first, a0) = fields[0];
        for (name, a) in &fields[1..] {
            if a.shape != a0.shape {
                return Err(self.node_err(
                    node,
                    format!("{type_name} parameters must all have one shape: `{first}` is {:?} but `{name}` is {:?}", a0.shape, a.shape),
                ));
            }
        }
        Ok(())
    }

    fn metadata(&mut self, node: &str, entry: Option<&H5Entry>, depth: usize) -> Result<Metadata, NirError> {
        match entry {
            None => Ok(Metadata::new()),
            Some(H5Entry::Group(g)) => self.meta_group(node, g, depth),
            Some(H5Entry::Dataset(_)) => {
                self.deviation(node, "`metadata` is a dataset, expected a group; ignored".into())?;
                Ok(Metadata::new())
            }
        }
    }

    fn meta_group(&mut self, node: &str, g: &H5Group, depth: usize) -> Result<Metadata, NirError> {
        if depth > MAX_DEPTH {
            return Err(self.node_err(node, "metadata nested too deeply"));
        }
        let mut out = Metadata::new();
        for (k, e) in g {
            let v = match e {
                H5Entry::Group(sub) => MetaValue::Group(self.meta_group(node, sub, depth + 1)?),
                H5Entry::Dataset(H5Value::Str(s)) => MetaValue::Str(s.clone()),
                H5Entry::Dataset(H5Value::Strings { shape, values }) => MetaValue::Strings { shape: shape.clone(), values: values.clone() },
                H5Entry::Dataset(H5Value::Array(a)) => MetaValue::Array(a.clone()),
            };
            out.insert(k.clone(), v);
        }
        Ok(out)
    }

    fn graph(&mut self, name: &str, g: &H5Group, depth: usize) -> Result<NirGraph, NirError> {
        if depth > MAX_DEPTH {
            return Err(self.node_err(name, format!("graphs nested deeper than {MAX_DEPTH}")));
        }
        let mut f = Fields { node: name.to_string(), type_name: "NIRGraph".into(), entries: g.iter().map(|(k, v)| (k.as_str(), v)).collect() };
        f.take("type");
        let metadata = self.metadata(name, f.take("metadata"), 0)?;
        let nodes_group = match f.take("nodes") {
            Some(H5Entry::Group(n)) => n,
            Some(_) => return Err(self.node_err(name, "NIRGraph field `nodes` must be a group")),
            None => return Err(self.node_err(name, "NIRGraph is missing required field `nodes`")),
        };
        let edges = match f.take("edges") {
            Some(H5Entry::Dataset(H5Value::Strings { shape, values })) => {
                if shape.len() != 2 || shape[1] != 2 {
                    return Err(self.node_err(name, format!("`edges` must have shape (E, 2), found {shape:?}")));
                }
                values.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect()
            }
            // h5py stores an empty edge list as a float array of shape (0,).
            Some(H5Entry::Dataset(H5Value::Array(a))) if a.numel() == 0 => Vec::new(),
            Some(_) => return Err(self.node_err(name, "`edges` must be an (E, 2) array of strings")),
            None => return Err(self.node_err(name, "NIRGraph is missing required field `edges`")),
        };
        for (k, _) in std::mem::take(&mut f.entries) {
            self.deviation(name, format!("NIRGraph has no field `{k}`; it is ignored"))?;
        }
        let mut nodes = std::collections::BTreeMap::new();
        for (child, entry) in nodes_group {
            let full = if depth == 0 { child.clone() } else { format!("{name}.{child}") };
            match entry {
                H5Entry::Group(cg) => {
                    if let Some(n) = self.node(&full, cg, depth + 1)? {
                        nodes.insert(child.clone(), n);
                    }
                }
                H5Entry::Dataset(_) => self.deviation(&full, "is a dataset inside `nodes/`, expected a node group; ignored".into())?,
            }
        }
        Ok(NirGraph { nodes, edges, metadata })
    }

    /// One node group; `None` for what lenient mode drops.
    fn node(&mut self, name: &str, g: &H5Group, depth: usize) -> Result<Option<NirNode>, NirError> {
        let type_name = match g.get("type") {
            Some(H5Entry::Dataset(H5Value::Str(s))) => s.clone(),
            Some(_) => return Err(self.node_err(name, "`type` must be a scalar string")),
            None => return Err(self.node_err(name, "has no `type` dataset")),
        };
        if type_name == "NIRGraph" {
            let mut graph = self.graph(name, g, depth)?;
            // A nested graph's metadata belongs to its node (see `NirGraph::metadata`).
            let metadata = std::mem::take(&mut graph.metadata);
            return Ok(Some(NirNode { kind: NodeKind::Graph(graph), metadata }));
        }
        let mut f = Fields { node: name.to_string(), type_name: type_name.clone(), entries: g.iter().map(|(k, v)| (k.as_str(), v)).collect() };
        f.take("type");
        let meta_entry = f.take("metadata");
        let kind = match type_name.as_str() {
            "Input" => NodeKind::Input { shape: self.ints(&mut f, "shape")? },
            "Output" => NodeKind::Output { shape: self.ints(&mut f, "shape")? },
            "Affine" => NodeKind::Affine { weight: self.param(&mut f, "weight")?, bias: self.param(&mut f, "bias")? },
            "Linear" => NodeKind::Linear { weight: self.param(&mut f, "weight")? },
            "Scale" => NodeKind::Scale { scale: self.param(&mut f, "scale")? },
            "Conv1d" => {
                let input_shape = match self.opt_ints(&mut f, "input_shape")? {
                    None => None,
                    Some(v) if v.len() == 1 => Some(v[0]),
                    Some(v) => return Err(self.node_err(name, format!("Conv1d `input_shape` must be one integer, found {v:?}"))),
                };
                NodeKind::Conv1d {
                    input_shape,
                    weight: self.param(&mut f, "weight")?,
                    stride: self.int(&mut f, "stride")?,
                    padding: self.padding(&mut f, "padding", 1)?,
                    dilation: self.int(&mut f, "dilation")?,
                    groups: self.int(&mut f, "groups")?,
                    bias: self.param(&mut f, "bias")?,
                }
            }
            "Conv2d" => {
                let input_shape = match self.opt_ints(&mut f, "input_shape")? {
                    None => None,
                    Some(v) if v.len() == 2 => Some([v[0], v[1]]),
                    Some(v) => return Err(self.node_err(name, format!("Conv2d `input_shape` must be two integers, found {v:?}"))),
                };
                NodeKind::Conv2d {
                    input_shape,
                    weight: self.param(&mut f, "weight")?,
                    stride: self.pair(&mut f, "stride")?,
                    padding: self.padding(&mut f, "padding", 2)?,
                    dilation: self.pair(&mut f, "dilation")?,
                    groups: self.int(&mut f, "groups")?,
                    bias: self.param(&mut f, "bias")?,
                }
            }
            "SumPool2d" | "AvgPool2d" => {
                let kernel_size = self.pair(&mut f, "kernel_size")?;
                let stride = self.pair(&mut f, "stride")?;
                let padding = self.pair(&mut f, "padding")?;
                if type_name == "SumPool2d" {
                    NodeKind::SumPool2d { kernel_size, stride, padding }
                } else {
                    NodeKind::AvgPool2d { kernel_size, stride, padding }
                }
            }
            "Flatten" => NodeKind::Flatten {
                input_type: self.opt_ints(&mut f, "input_type")?,
                start_dim: self.opt_int(&mut f, "start_dim", 1)?,
                end_dim: self.opt_int(&mut f, "end_dim", -1)?,
            },
            "Delay" => NodeKind::Delay { delay: self.param(&mut f, "delay")? },
            "Threshold" => NodeKind::Threshold { threshold: self.param(&mut f, "threshold")? },
            "I" => NodeKind::I { r: self.param(&mut f, "r")? },
            "IF" => {
                let r = self.param(&mut f, "r")?;
                let v_threshold = self.param(&mut f, "v_threshold")?;
                // Files before nir 1.0.6 have no v_reset; the reference reads zeros.
                let v_reset = self.opt_array(&mut f, "v_reset")?.unwrap_or_else(|| v_threshold.filled_like(0.0));
                self.same_shapes(name, "IF", &[("r", &r), ("v_threshold", &v_threshold), ("v_reset", &v_reset)])?;
                NodeKind::IF { r, v_threshold, v_reset }
            }
            "LI" => {
                let (tau, r, v_leak) = (self.param(&mut f, "tau")?, self.param(&mut f, "r")?, self.param(&mut f, "v_leak")?);
                self.same_shapes(name, "LI", &[("tau", &tau), ("r", &r), ("v_leak", &v_leak)])?;
                NodeKind::LI { tau, r, v_leak }
            }
            "LIF" => {
                let (tau, r, v_leak) = (self.param(&mut f, "tau")?, self.param(&mut f, "r")?, self.param(&mut f, "v_leak")?);
                let v_threshold = self.param(&mut f, "v_threshold")?;
                let v_reset = self.opt_array(&mut f, "v_reset")?.unwrap_or_else(|| v_threshold.filled_like(0.0));
                self.same_shapes(name, "LIF", &[("tau", &tau), ("r", &r), ("v_leak", &v_leak), ("v_threshold", &v_threshold), ("v_reset", &v_reset)])?;
                NodeKind::LIF { tau, r, v_leak, v_threshold, v_reset }
            }
            "CubaLI" => {
                let (tau_syn, tau_mem) = (self.param(&mut f, "tau_syn")?, self.param(&mut f, "tau_mem")?);
                let (r, v_leak) = (self.param(&mut f, "r")?, self.param(&mut f, "v_leak")?);
                let w_in = self.w_in(&mut f, &v_leak)?;
                self.same_shapes(name, "CubaLI", &[("tau_syn", &tau_syn), ("tau_mem", &tau_mem), ("r", &r), ("v_leak", &v_leak), ("w_in", &w_in)])?;
                NodeKind::CubaLI { tau_syn, tau_mem, r, v_leak, w_in }
            }
            "CubaLIF" => {
                let (tau_syn, tau_mem) = (self.param(&mut f, "tau_syn")?, self.param(&mut f, "tau_mem")?);
                let (r, v_leak) = (self.param(&mut f, "r")?, self.param(&mut f, "v_leak")?);
                let v_threshold = self.param(&mut f, "v_threshold")?;
                let v_reset = self.opt_array(&mut f, "v_reset")?.unwrap_or_else(|| v_threshold.filled_like(0.0));
                let w_in = self.w_in(&mut f, &v_threshold)?;
                self.same_shapes(
                    name,
                    "CubaLIF",
                    &[("tau_syn", &tau_syn), ("tau_mem", &tau_mem), ("r", &r), ("v_leak", &v_leak), ("v_threshold", &v_threshold), ("v_reset", &v_reset), ("w_in", &w_in)],
                )?;
                NodeKind::CubaLIF { tau_syn, tau_mem, r, v_leak, v_threshold, v_reset, w_in }
            }
            other => {
                let known = TYPE_NAMES.join(", ");
                self.deviation(name, format!("unknown node type `{other}` (known: {known})"))?;
                // Lenient: keep the node so that the import can name it if it is used.
                f.entries.clear();
                NodeKind::Unknown { type_name: other.to_string() }
            }
        };
        for (k, _) in std::mem::take(&mut f.entries) {
            self.deviation(name, format!("{type_name} has no field `{k}`; it is ignored"))?;
        }
        let metadata = self.metadata(name, meta_entry, 0)?;
        Ok(Some(NirNode { kind, metadata }))
    }

    /// `w_in`: absent means 1 and a scalar is broadcast, as in the reference.
    fn w_in(&self, f: &mut Fields, like: &Array) -> Result<Array, NirError> {
        match self.opt_array(f, "w_in")? {
            None => Ok(like.filled_like(1.0)),
            Some(a) if a.numel() == 1 && like.numel() != 1 => Ok(like.filled_like(a.to_f64_vec()[0])),
            Some(a) => Ok(a),
        }
    }
}

fn check_finite(a: &Array) -> Result<(), usize> {
    match a.to_f64_vec().iter().position(|x| !x.is_finite()) {
        Some(i) => Err(i),
        None => Ok(()),
    }
}

/// Tree → model. The root must hold `version` and a `node` group (a `NIRGraph`; lenient mode
/// wraps a bare node into a graph).
pub fn from_tree(tree: &H5Group, origin: &str, mode: Mode) -> Result<(NirFile, Vec<String>), NirError> {
    let mut r = Reader { origin, mode, warnings: Vec::new() };
    let node = match tree.get("node") {
        Some(H5Entry::Group(g)) => g,
        Some(_) => return Err(r.format_err("`node` must be a group")),
        None => return Err(r.format_err("the file has no `node` group (is this a NIR model file?)")),
    };
    let version = match tree.get("version") {
        Some(H5Entry::Dataset(H5Value::Str(s))) => s.clone(),
        Some(_) => return Err(r.format_err("`version` must be a scalar string")),
        None => {
            // nir.read ignores the version; only say that it is missing.
            r.deviation("/", "the file has no `version` dataset".into())?;
            String::new()
        }
    };
    for k in tree.keys().filter(|k| *k != "version" && *k != "node") {
        r.deviation("/", format!("unexpected top-level member `{k}`; ignored"))?;
    }
    let type_name = match node.get("type") {
        Some(H5Entry::Dataset(H5Value::Str(s))) => s.clone(),
        _ => return Err(r.format_err("`node/type` is missing or not a string")),
    };
    let graph = if type_name == "NIRGraph" {
        r.graph("", node, 0)?
    } else {
        r.deviation("/", format!("the root node is a `{type_name}`, not a NIRGraph (the reference reader refuses it); wrapped into a graph"))?;
        let n = r.node("node", node, 1)?.ok_or_else(|| r.format_err("the root node could not be read"))?;
        let mut g = NirGraph::default();
        g.nodes.insert("node".into(), n);
        g
    };
    Ok((NirFile { version, graph }, r.warnings))
}

fn arr(a: &Array) -> H5Entry {
    H5Entry::Dataset(H5Value::Array(a.clone()))
}

fn ints(v: &[i64]) -> H5Entry {
    arr(&Array::vec_i64(v.to_vec()))
}

fn int(v: i64) -> H5Entry {
    arr(&Array::scalar_i64(v))
}

fn meta_tree(m: &Metadata) -> H5Group {
    m.iter()
        .filter_map(|(k, v)| {
            let e = match v {
                MetaValue::Str(s) => H5Entry::Dataset(H5Value::Str(s.clone())),
                MetaValue::Strings { shape, values } => H5Entry::Dataset(H5Value::Strings { shape: shape.clone(), values: values.clone() }),
                MetaValue::Array(a) => arr(a),
                // Empty groups cannot be written (see h5write); nir skips empty metadata too.
                MetaValue::Group(g) if g.is_empty() => return None,
                MetaValue::Group(g) => H5Entry::Group(meta_tree(g)),
            };
            Some((k.clone(), e))
        })
        .collect()
}

fn padding_entry(p: &Padding) -> H5Entry {
    match p {
        Padding::Same => H5Entry::Dataset(H5Value::Str("same".into())),
        Padding::Valid => H5Entry::Dataset(H5Value::Str("valid".into())),
        Padding::Explicit(v) if v.len() == 1 => int(v[0]),
        Padding::Explicit(v) => ints(v),
    }
}

fn node_tree(n: &NirNode) -> Result<H5Group, NirError> {
    let mut g = H5Group::new();
    let mut put = |k: &str, e: H5Entry| {
        g.insert(k.to_string(), e);
    };
    put("type", H5Entry::Dataset(H5Value::Str(n.kind.type_name().to_string())));
    match &n.kind {
        NodeKind::Input { shape } | NodeKind::Output { shape } => put("shape", ints(shape)),
        NodeKind::Affine { weight, bias } => {
            put("weight", arr(weight));
            put("bias", arr(bias));
        }
        NodeKind::Linear { weight } => put("weight", arr(weight)),
        NodeKind::Scale { scale } => put("scale", arr(scale)),
        NodeKind::Conv1d { input_shape, weight, stride, padding, dilation, groups, bias } => {
            if let Some(s) = input_shape {
                put("input_shape", int(*s));
            }
            put("weight", arr(weight));
            put("stride", int(*stride));
            put("padding", padding_entry(padding));
            put("dilation", int(*dilation));
            put("groups", int(*groups));
            put("bias", arr(bias));
        }
        NodeKind::Conv2d { input_shape, weight, stride, padding, dilation, groups, bias } => {
            if let Some(s) = input_shape {
                put("input_shape", ints(s));
            }
            put("weight", arr(weight));
            put("stride", ints(stride));
            // After the reference's __post_init__ an int padding is a pair.
            put("padding", match padding {
                Padding::Explicit(v) if v.len() == 1 => ints(&[v[0], v[0]]),
                p => padding_entry(p),
            });
            put("dilation", ints(dilation));
            put("groups", int(*groups));
            put("bias", arr(bias));
        }
        NodeKind::SumPool2d { kernel_size, stride, padding } | NodeKind::AvgPool2d { kernel_size, stride, padding } => {
            put("kernel_size", ints(kernel_size));
            put("stride", ints(stride));
            put("padding", ints(padding));
        }
        NodeKind::Flatten { input_type, start_dim, end_dim } => {
            if let Some(t) = input_type {
                put("input_type", ints(t));
            }
            put("start_dim", int(*start_dim));
            put("end_dim", int(*end_dim));
        }
        NodeKind::Delay { delay } => put("delay", arr(delay)),
        NodeKind::Threshold { threshold } => put("threshold", arr(threshold)),
        NodeKind::I { r } => put("r", arr(r)),
        NodeKind::IF { r, v_threshold, v_reset } => {
            put("r", arr(r));
            put("v_threshold", arr(v_threshold));
            put("v_reset", arr(v_reset));
        }
        NodeKind::LI { tau, r, v_leak } => {
            put("tau", arr(tau));
            put("r", arr(r));
            put("v_leak", arr(v_leak));
        }
        NodeKind::LIF { tau, r, v_leak, v_threshold, v_reset } => {
            put("tau", arr(tau));
            put("r", arr(r));
            put("v_leak", arr(v_leak));
            put("v_threshold", arr(v_threshold));
            put("v_reset", arr(v_reset));
        }
        NodeKind::CubaLI { tau_syn, tau_mem, r, v_leak, w_in } => {
            put("tau_syn", arr(tau_syn));
            put("tau_mem", arr(tau_mem));
            put("r", arr(r));
            put("v_leak", arr(v_leak));
            put("w_in", arr(w_in));
        }
        NodeKind::CubaLIF { tau_syn, tau_mem, r, v_leak, v_threshold, v_reset, w_in } => {
            put("tau_syn", arr(tau_syn));
            put("tau_mem", arr(tau_mem));
            put("r", arr(r));
            put("v_leak", arr(v_leak));
            put("v_threshold", arr(v_threshold));
            put("v_reset", arr(v_reset));
            put("w_in", arr(w_in));
        }
        NodeKind::Graph(graph) => {
            let mut sub = graph_tree(graph)?;
            // A nested graph's metadata is the node's; the graph's own is used only if the
            // node has none.
            if !n.metadata.is_empty() {
                sub.remove("metadata");
            }
            g.extend(sub);
        }
        NodeKind::Unknown { type_name } => {
            return Err(NirError::Invalid(format!("cannot write a node of unknown type `{type_name}`")));
        }
    }
    let meta = meta_tree(&n.metadata);
    if !meta.is_empty() {
        g.insert("metadata".into(), H5Entry::Group(meta));
    }
    Ok(g)
}

fn graph_tree(graph: &NirGraph) -> Result<H5Group, NirError> {
    let mut g = H5Group::new();
    g.insert("type".into(), H5Entry::Dataset(H5Value::Str("NIRGraph".into())));
    if graph.nodes.is_empty() {
        return Err(NirError::Invalid("cannot write a NIRGraph without nodes".into()));
    }
    let mut nodes = H5Group::new();
    for (name, n) in &graph.nodes {
        nodes.insert(name.clone(), H5Entry::Group(node_tree(n)?));
    }
    g.insert("nodes".into(), H5Entry::Group(nodes));
    let edges = if graph.edges.is_empty() {
        // What h5py writes for `[]`.
        H5Entry::Dataset(H5Value::Array(Array::f64(vec![0], vec![]).expect("empty array")))
    } else {
        let values = graph.edges.iter().flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
        H5Entry::Dataset(H5Value::Strings { shape: vec![graph.edges.len(), 2], values })
    };
    g.insert("edges".into(), edges);
    let meta = meta_tree(&graph.metadata);
    if !meta.is_empty() {
        g.insert("metadata".into(), H5Entry::Group(meta));
    }
    Ok(g)
}

/// Model → tree.
pub fn to_tree(file: &NirFile) -> Result<H5Group, NirError> {
    let mut root = H5Group::new();
    root.insert("version".into(), H5Entry::Dataset(H5Value::Str(file.version.clone())));
    root.insert("node".into(), H5Entry::Group(graph_tree(&file.graph)?));
    Ok(root)
}
