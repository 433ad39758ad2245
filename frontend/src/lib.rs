//! Front end: NeuronSpark configs and checkpoints into the IR.

pub mod checkpoint;
pub mod config;
pub mod init;
pub mod neuronspark;
pub mod params;
pub mod tensors_io;

pub use config::{Boundary, NeuronSparkConfig};
