//! Front end: NeuronSpark configs and checkpoints into the IR.

pub mod config;

pub use config::{Boundary, NeuronSparkConfig};
