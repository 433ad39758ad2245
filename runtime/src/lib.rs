//! Runtime: runs compiled programs.
//!
//! - [`session`]: a program plus parameters plus the neuron state it carries between calls;
//! - [`sampling`]: temperature / top-k / top-p sampling from logits, seeded;
//! - [`generate`]: prefill then token-by-token decoding on a session.

pub mod generate;
pub mod sampling;
pub mod session;
pub mod train;

pub use generate::{generate, GenerateOptions};
pub use sampling::Sampler;
pub use session::{Executor, Session};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Cpu(#[from] sparkc_backend_cpu::CpuError),
    #[error(transparent)]
    Cuda(#[from] sparkc_backend_cuda::CudaError),
    #[error("{0}")]
    Usage(String),
}
pub mod neuro;
