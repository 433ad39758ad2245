//! NIR (Neuromorphic Intermediate Representation) files: reading, writing, import into the IR
//! and export from it.
//!
//! - [`model`]: the NIR graph as data (18 primitives, `NIRGraph`, metadata);
//! - [`h5`], [`h5read`], [`h5write`]: HDF5 through pure-Rust crates (no libhdf5);
//! - [`schema`]: the on-disk layout of nir 0.1 – 1.0.8 files, strict or lenient;
//! - [`types`]: type inference and checking as the reference does it;
//! - [`discretize`]: dt, scheme and framework conventions, and the neuron models they give;
//! - [`import`]: NIR → IR graph + parameters; [`export`]: IR graph + parameters → NIR.

pub mod discretize;
pub mod error;
pub mod export;
pub mod h5;
pub mod h5read;
pub mod h5write;
pub mod import;
pub mod model;
pub mod schema;
pub mod types;

pub use discretize::{Convention, Discretisation, Scheme};
pub use error::{Diagnostic, NirError, Severity};
pub use export::{export_graph, ExportOptions, Exported};
pub use import::{import_graph, ImportOptions, Imported};
pub use model::{Array, ArrayData, MetaValue, Metadata, NirFile, NirGraph, NirNode, NodeKind, Padding, NIR_VERSION};
pub use schema::Mode;

use std::path::Path;

/// How to read a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadOptions {
    /// Strict refuses what `nir.read` (type_check=True) refuses; lenient warns and goes on.
    pub mode: Mode,
}

/// A file read, with what lenient mode let through.
#[derive(Clone, Debug)]
pub struct ReadResult {
    pub file: NirFile,
    pub types: types::GraphTypes,
    pub warnings: Vec<String>,
}

/// Read a NIR file from bytes; `origin` names it in errors.
pub fn read_bytes(bytes: &[u8], origin: &str, opts: ReadOptions) -> Result<ReadResult, NirError> {
    let tree = h5read::read_tree(bytes, origin)?;
    let (file, mut warnings) = schema::from_tree(&tree, origin, opts.mode)?;
    types::validate_structure(&file.graph, "", origin)?;
    let (types, problems) = types::infer(&file.graph, "");
    if let Some(p) = problems.first() {
        match opts.mode {
            Mode::Strict => {
                return Err(NirError::Node {
                    origin: origin.to_string(),
                    node: p.node.clone(),
                    msg: format!("{} (the reference reader's type check refuses this; read in lenient mode to continue)", p.msg),
                })
            }
            Mode::Lenient => warnings.extend(problems.iter().map(|p| format!("node `{}`: {}", p.node, p.msg))),
        }
    }
    Ok(ReadResult { file, types, warnings })
}

/// Read a NIR file from disk.
pub fn read_file(path: &Path, opts: ReadOptions) -> Result<ReadResult, NirError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| NirError::Read { path: origin.clone(), source })?;
    read_bytes(&bytes, &origin, opts)
}

/// Encode a NIR file. `compress` deflates every array as nir ≥ 1.0.8 does by default.
pub fn write_bytes(file: &NirFile, compress: bool) -> Result<Vec<u8>, NirError> {
    types::validate_structure(&file.graph, "", "<output>")?;
    let tree = schema::to_tree(file)?;
    h5write::write_tree(&tree, compress)
}

/// Write a NIR file to disk (atomically: a temporary file renamed over `path`).
pub fn write_file(path: &Path, file: &NirFile, compress: bool) -> Result<(), NirError> {
    let bytes = write_bytes(file, compress)?;
    crate::tensors_io::write_atomically(path, &bytes).map_err(|e| NirError::Write {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })
}
