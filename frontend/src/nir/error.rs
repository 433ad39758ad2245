//! Errors of NIR reading, writing, import and export. Every message names the file, the node
//! or the field at fault.

use std::fmt;

/// How bad a finding of the import or export is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Written as well as the target format allows, with what differs recorded (e.g. a
    /// subtractive reset written as a NIR LIF with `metadata/reset = "subtract"`).
    Approximation,
    /// Cannot be expressed: the node is left out (export with `partial`) or the whole run fails.
    Unsupported,
}

/// One finding about one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub node: String,
    /// The node's kind: a NIR type name or an IR op name.
    pub kind: String,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Approximation => "approximated",
            Severity::Unsupported => "unsupported",
        };
        write!(f, "{tag}: node `{}` ({}): {}", self.node, self.kind, self.message)
    }
}

fn list(diags: &[Diagnostic]) -> String {
    diags.iter().map(|d| format!("\n  {d}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum NirError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    /// The bytes are not a readable HDF5 file (corrupt, truncated, unsupported feature).
    #[error("{origin}: not a readable HDF5 file: {msg}")]
    Hdf5 { origin: String, msg: String },
    /// The HDF5 file is fine but is not a NIR model (missing `node`, bad `type`, ...).
    #[error("{origin}: not a NIR file: {msg}")]
    Format { origin: String, msg: String },
    /// One node is malformed: unknown type, unknown or missing field, wrong dtype or shape.
    #[error("{origin}: node `{node}`: {msg}")]
    Node { origin: String, node: String, msg: String },
    /// The graph's edges and node types do not fit together.
    #[error("{origin}: graph `{graph}`: {msg}")]
    Graph { origin: String, graph: String, msg: String },
    /// Import into the IR failed; each diagnostic names a node and why.
    #[error("cannot import the NIR graph into the IR:{}", list(.0))]
    Import(Vec<Diagnostic>),
    /// Export to NIR failed; each diagnostic names a node and why.
    #[error("cannot export to NIR (pass `partial` to write what NIR can express):{}", list(.0))]
    Export(Vec<Diagnostic>),
    /// Bad options (dt, names) or an inconsistent IR.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ir(#[from] sparkc_ir::IrError),
}
