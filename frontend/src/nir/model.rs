//! The NIR graph as data: the 18 primitives, `NIRGraph` (nested graphs included) and metadata,
//! mirroring the dataclasses of the reference implementation (`nir/ir/*.py`, nir 1.0.8).
//!
//! Arrays keep the dtype they were read with (f32, f64 or i64), so that a file read and written
//! again keeps its dtypes. Optional fields that the reference fills in on reading (`v_reset`,
//! `w_in`) are filled in the same way, so the model always holds every field.

use std::collections::BTreeMap;

/// The element data of an array.
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

/// A dense row-major array; shape `[]` is a scalar.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: ArrayData,
}

impl Array {
    /// `None` when the data does not fill the shape.
    pub fn new(shape: Vec<usize>, data: ArrayData) -> Option<Array> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        let len = match &data {
            ArrayData::F32(v) => v.len(),
            ArrayData::F64(v) => v.len(),
            ArrayData::I64(v) => v.len(),
        };
        (n == len).then_some(Array { shape, data })
    }

    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Option<Array> {
        Array::new(shape, ArrayData::F32(data))
    }

    pub fn f64(shape: Vec<usize>, data: Vec<f64>) -> Option<Array> {
        Array::new(shape, ArrayData::F64(data))
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Option<Array> {
        Array::new(shape, ArrayData::I64(data))
    }

    /// A 1-D f32 array.
    pub fn vec_f32(data: Vec<f32>) -> Array {
        Array { shape: vec![data.len()], data: ArrayData::F32(data) }
    }

    /// A 1-D i64 array.
    pub fn vec_i64(data: Vec<i64>) -> Array {
        Array { shape: vec![data.len()], data: ArrayData::I64(data) }
    }

    pub fn scalar_i64(v: i64) -> Array {
        Array { shape: vec![], data: ArrayData::I64(vec![v]) }
    }

    pub fn scalar_f64(v: f64) -> Array {
        Array { shape: vec![], data: ArrayData::F64(vec![v]) }
    }

    pub fn numel(&self) -> usize {
        match &self.data {
            ArrayData::F32(v) => v.len(),
            ArrayData::F64(v) => v.len(),
            ArrayData::I64(v) => v.len(),
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            ArrayData::F32(_) => "float32",
            ArrayData::F64(_) => "float64",
            ArrayData::I64(_) => "int64",
        }
    }

    pub fn is_float(&self) -> bool {
        !matches!(self.data, ArrayData::I64(_))
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            ArrayData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::F64(v) => v.clone(),
            ArrayData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            ArrayData::F32(v) => v.clone(),
            ArrayData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            ArrayData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// Integer values: int arrays, or float arrays whose values are all whole numbers.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        match &self.data {
            ArrayData::I64(v) => Some(v.clone()),
            _ => self
                .to_f64_vec()
                .into_iter()
                .map(|x| (x.fract() == 0.0 && x.abs() < 9.0e15).then_some(x as i64))
                .collect(),
        }
    }

    /// An array of the same shape and dtype filled with `v`.
    pub fn filled_like(&self, v: f64) -> Array {
        let n = self.numel();
        let data = match self.data {
            ArrayData::F32(_) => ArrayData::F32(vec![v as f32; n]),
            ArrayData::F64(_) => ArrayData::F64(vec![v; n]),
            // A float field stored as ints gets float fill values.
            ArrayData::I64(_) => ArrayData::F64(vec![v; n]),
        };
        Array { shape: self.shape.clone(), data }
    }
}

/// A metadata value: what `nir.write` stores under `metadata/` (strings, arrays, nested dicts).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    Str(String),
    /// A non-scalar string dataset.
    Strings { shape: Vec<usize>, values: Vec<String> },
    Array(Array),
    Group(Metadata),
}

pub type Metadata = BTreeMap<String, MetaValue>;

/// Convolution padding: the strings of PyTorch or explicit amounts per spatial dim.
#[derive(Clone, Debug, PartialEq)]
pub enum Padding {
    Same,
    Valid,
    Explicit(Vec<i64>),
}

/// One NIR primitive with its fields, named as in the reference.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    Input { shape: Vec<i64> },
    Output { shape: Vec<i64> },
    Affine { weight: Array, bias: Array },
    Linear { weight: Array },
    Scale { scale: Array },
    Conv1d { input_shape: Option<i64>, weight: Array, stride: i64, padding: Padding, dilation: i64, groups: i64, bias: Array },
    Conv2d { input_shape: Option<[i64; 2]>, weight: Array, stride: [i64; 2], padding: Padding, dilation: [i64; 2], groups: i64, bias: Array },
    SumPool2d { kernel_size: [i64; 2], stride: [i64; 2], padding: [i64; 2] },
    AvgPool2d { kernel_size: [i64; 2], stride: [i64; 2], padding: [i64; 2] },
    /// `input_type` holds the input *shape* (the reference's field name).
    Flatten { input_type: Option<Vec<i64>>, start_dim: i64, end_dim: i64 },
    Delay { delay: Array },
    Threshold { threshold: Array },
    I { r: Array },
    IF { r: Array, v_threshold: Array, v_reset: Array },
    LI { tau: Array, r: Array, v_leak: Array },
    LIF { tau: Array, r: Array, v_leak: Array, v_threshold: Array, v_reset: Array },
    CubaLI { tau_syn: Array, tau_mem: Array, r: Array, v_leak: Array, w_in: Array },
    CubaLIF { tau_syn: Array, tau_mem: Array, r: Array, v_leak: Array, v_threshold: Array, v_reset: Array, w_in: Array },
    Graph(NirGraph),
    /// A `type` this reader does not know, kept in lenient mode so the import can name it.
    Unknown { type_name: String },
}

impl NodeKind {
    /// The `type` string written to the file.
    pub fn type_name(&self) -> &str {
        match self {
            NodeKind::Input { .. } => "Input",
            NodeKind::Output { .. } => "Output",
            NodeKind::Affine { .. } => "Affine",
            NodeKind::Linear { .. } => "Linear",
            NodeKind::Scale { .. } => "Scale",
            NodeKind::Conv1d { .. } => "Conv1d",
            NodeKind::Conv2d { .. } => "Conv2d",
            NodeKind::SumPool2d { .. } => "SumPool2d",
            NodeKind::AvgPool2d { .. } => "AvgPool2d",
            NodeKind::Flatten { .. } => "Flatten",
            NodeKind::Delay { .. } => "Delay",
            NodeKind::Threshold { .. } => "Threshold",
            NodeKind::I { .. } => "I",
            NodeKind::IF { .. } => "IF",
            NodeKind::LI { .. } => "LI",
            NodeKind::LIF { .. } => "LIF",
            NodeKind::CubaLI { .. } => "CubaLI",
            NodeKind::CubaLIF { .. } => "CubaLIF",
            NodeKind::Graph(_) => "NIRGraph",
            NodeKind::Unknown { type_name } => type_name,
        }
    }

    /// Whether the node keeps state across time steps (a cycle through it is a recurrence).
    pub fn is_stateful(&self) -> bool {
        matches!(
            self,
            NodeKind::I { .. }
                | NodeKind::IF { .. }
                | NodeKind::LI { .. }
                | NodeKind::LIF { .. }
                | NodeKind::CubaLI { .. }
                | NodeKind::CubaLIF { .. }
                | NodeKind::Delay { .. }
                | NodeKind::Graph(_)
        )
    }
}

/// The type strings of the 19 readable node types (`Identity` is not readable by the reference).
pub const TYPE_NAMES: [&str; 19] = [
    "Input", "Output", "Affine", "Linear", "Scale", "Conv1d", "Conv2d", "SumPool2d", "AvgPool2d", "Flatten", "Delay",
    "Threshold", "I", "IF", "LI", "LIF", "CubaLI", "CubaLIF", "NIRGraph",
];

#[derive(Clone, Debug, PartialEq)]
pub struct NirNode {
    pub kind: NodeKind,
    pub metadata: Metadata,
}

impl NirNode {
    pub fn new(kind: NodeKind) -> NirNode {
        NirNode { kind, metadata: Metadata::new() }
    }
}

/// A `NIRGraph`: named nodes and identity edges (several edges into one node are summed).
/// Nodes are kept sorted by name, the order in which HDF5 lists a group's members.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct NirGraph {
    pub nodes: BTreeMap<String, NirNode>,
    pub edges: Vec<(String, String)>,
    /// The root graph's metadata; a nested graph's metadata is its [`NirNode::metadata`].
    pub metadata: Metadata,
}

/// A whole `.nir` file: the writer's version string and the root graph.
#[derive(Clone, Debug, PartialEq)]
pub struct NirFile {
    pub version: String,
    pub graph: NirGraph,
}

/// The NIR release whose schema this crate writes.
pub const NIR_VERSION: &str = "1.0.8";
