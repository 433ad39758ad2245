//! Training: data, optimizer, schedule, checkpoints and the loop.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{Event, GradHook, TrainConfig, TrainError, Trainer};
