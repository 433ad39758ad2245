//! CUDA backend: lowers the IR to CUDA C (one module per compiled graph: map and neuron-scan
//! kernels generated from the IR, plus a small library of model-independent kernels), compiles
//! it at run time with NVRTC (PTX cached on disk by a hash of source and GPU architecture) and
//! runs GEMMs through cuBLAS. Libraries are loaded dynamically, so building needs no CUDA.

/// A driver call's error as `CudaError::Driver`, returned with `?` (modules below use it).
macro_rules! drv {
    ($e:expr) => {
        $e.map_err(|e| $crate::CudaError::Driver(format!("{e:?}")))?
    };
}

pub mod bench;
mod capture;
pub mod codegen;
pub mod device;
mod fusion;
pub mod library;
pub mod program;
pub mod scan_codegen;
pub mod scan_segmented;
pub mod training;

pub use device::{unavailable_reason, Gpu};
pub use program::GpuProgram;
pub use training::AdamUpdate;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no usable GPU: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("NVRTC compilation failed: {0}")]
    Compile(String),
    #[error("not supported by the CUDA backend: {0}")]
    Unsupported(String),
    #[error("input error: {0}")]
    Input(String),
}
