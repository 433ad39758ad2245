//! Front end: NeuronSpark configs and checkpoints into the IR.

pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod init;
pub mod neuronspark;
pub mod nir;
pub mod params;
pub mod tensors_io;
pub mod tokenizer;

pub use config::{Boundary, NeuronSparkConfig};
