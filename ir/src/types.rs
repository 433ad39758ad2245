//! Value types: element dtypes and shapes with named symbolic dimensions.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Element type of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
    BF16,
    I64,
    I32,
    /// One bit per element: a spike train. Backends may bit-pack it.
    Spike,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::Spike => "spike",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        Some(match s {
            "f32" => DType::F32,
            "f64" => DType::F64,
            "bf16" => DType::BF16,
            "i64" => DType::I64,
            "i32" => DType::I32,
            "spike" => DType::Spike,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::BF16)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I64 | DType::I32)
    }

    /// Storage bits per element (spikes are one bit).
    pub fn bits(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 32,
            DType::F64 | DType::I64 => 64,
            DType::BF16 => 16,
            DType::Spike => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: a known size or a named symbol (batch `B`, tokens `T`, frames `K`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dim {
    Const(u64),
    Sym(String),
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }

    pub fn as_const(&self) -> Option<u64> {
        match self {
            Dim::Const(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl From<u64> for Dim {
    fn from(n: u64) -> Dim {
        Dim::Const(n)
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Const(n as u64)
    }
}

/// A number is a constant dimension ("64"); anything else names a symbol ("B").
impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        match s.parse::<u64>() {
            Ok(n) => Dim::Const(n),
            Err(_) => Dim::Sym(s.to_string()),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// Values of the symbolic dimensions that a graph fixes (e.g. `K = 4`); the others stay free.
pub type DimBindings = BTreeMap<String, u64>;

/// Shape of a value; rank 0 is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn new<D: Into<Dim>>(dims: impl IntoIterator<Item = D>) -> Shape {
        Shape(dims.into_iter().map(Into::into).collect())
    }

    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    pub fn last(&self) -> Option<&Dim> {
        self.0.last()
    }

    /// Replace bound symbols by their values.
    pub fn resolve(&self, bindings: &DimBindings) -> Shape {
        Shape(self.0.iter().map(|d| resolve_dim(d, bindings)).collect())
    }

    /// Concrete sizes, using `env` for free symbols; `None` names the first unknown symbol.
    pub fn concrete(&self, env: &DimBindings) -> Result<Vec<usize>, String> {
        self.0
            .iter()
            .map(|d| match d {
                Dim::Const(n) => Ok(*n as usize),
                Dim::Sym(s) => env.get(s).map(|&n| n as usize).ok_or_else(|| s.clone()),
            })
            .collect()
    }
}

pub fn resolve_dim(d: &Dim, bindings: &DimBindings) -> Dim {
    match d {
        Dim::Sym(s) => bindings.get(s).map(|&n| Dim::Const(n)).unwrap_or_else(|| d.clone()),
        c => c.clone(),
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Type of a value: dtype and shape, printed as `f32[B,T,K,64]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ValueType {
    pub dtype: DType,
    pub shape: Shape,
}

impl ValueType {
    pub fn new(dtype: DType, shape: Shape) -> ValueType {
        ValueType { dtype, shape }
    }

    pub fn f32<D: Into<Dim>>(dims: impl IntoIterator<Item = D>) -> ValueType {
        ValueType::new(DType::F32, Shape::new(dims))
    }

    pub fn i64<D: Into<Dim>>(dims: impl IntoIterator<Item = D>) -> ValueType {
        ValueType::new(DType::I64, Shape::new(dims))
    }

    pub fn scalar(dtype: DType) -> ValueType {
        ValueType::new(dtype, Shape::scalar())
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}
