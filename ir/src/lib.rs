//! sparkc's intermediate representation for spiking neural networks.
//!
//! - [`types`]: dtypes (including spikes) and shapes with named symbolic dims;
//! - [`expr`]: the scalar expression language of neuron models and element-wise maps;
//! - [`neuron`]: neuron models as data;
//! - [`op`] and [`graph`]: ops with typing rules, wired into a petgraph graph;
//! - [`text`]: printer and parser; [`verify`]: the verifier;
//! - [`schedule`]: the execution order (recomputed nodes run late);
//! - [`tensor`]: host tensors for parameters, inputs and results; [`rng`]: seeded randomness.

pub mod adjoint;
pub mod error;
pub mod expr;
pub mod graph;
pub mod neuron;
pub mod op;
pub mod rng;
pub mod schedule;
pub mod tensor;
pub mod text;
pub mod types;
pub mod verify;

pub use error::IrError;
pub use expr::{parse_expr, BinOp, Expr, UnOp};
pub use graph::{Graph, Node, Port, Value};
pub use petgraph::stable_graph::NodeIndex;
pub use neuron::NeuronModel;
pub use op::{Op, StateScope};
pub use schedule::ScanPairKey;
pub use tensor::Tensor;
pub use types::{DType, Dim, Shape, ValueType};
