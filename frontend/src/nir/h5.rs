//! The HDF5 layer as a plain tree: groups of named groups and datasets. `h5read` builds it from
//! bytes, `h5write` writes it, and `schema` maps it to and from the NIR model. Keeping the HDF5
//! crates behind this tree keeps their types out of the rest of the module.

use super::model::Array;
use std::collections::BTreeMap;

/// A dataset's value.
#[derive(Clone, Debug, PartialEq)]
pub enum H5Value {
    /// A scalar string dataset (`type`, `version`, Conv `padding`, metadata strings).
    Str(String),
    /// A string dataset with a shape (the `(E, 2)` edges).
    Strings { shape: Vec<usize>, values: Vec<String> },
    Array(Array),
}

#[derive(Clone, Debug, PartialEq)]
pub enum H5Entry {
    Group(H5Group),
    Dataset(H5Value),
}

/// A group's members by name (sorted, as HDF5 lists them).
pub type H5Group = BTreeMap<String, H5Entry>;

/// Deepest group nesting read or written; deeper input is refused rather than recursed into.
pub const MAX_DEPTH: usize = 64;
