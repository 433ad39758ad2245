//! Errors of the IR crate. Every message names the op, node or value at fault.

use crate::expr::ExprError;
use crate::neuron::NeuronError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IrError {
    #[error("type error in `{op}` node `{node}`: {msg}")]
    Type { op: String, node: String, msg: String },
    #[error("{0}")]
    Graph(String),
    #[error("verifier: {0}")]
    Verify(String),
    #[error("parse error at line {line}: {msg}")]
    Parse { line: usize, msg: String },
    #[error(transparent)]
    Neuron(#[from] NeuronError),
    #[error(transparent)]
    Expr(#[from] ExprError),
}
