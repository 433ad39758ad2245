//! The neuromorphic backend: from a float IR graph to a spike program for a target chip.
//!
//! - [`target`]: target descriptions (TOML) with the source of every energy constant;
//! - [`pipeline`]: calibrate on sample data, quantize (`sparkc_passes::quantize`), lower,
//!   legalize, place and route;
//! - [`lower`]: the quantized IR into neuron groups, synapse layers and stages;
//! - [`microcode`]: fused per-neuron programs generated from the neuron models' IR;
//! - [`legalize`] and [`place`]: diagnostics that name the layer and the limit; cores, chips,
//!   routes;
//! - [`program`], [`format`], [`dump`]: the spike program, its versioned binary form with a
//!   validating loader, and its text dump.

pub mod dump;
pub mod format;
pub mod legalize;
pub mod lower;
pub mod microcode;
pub mod pipeline;
pub mod place;
pub mod program;
pub mod target;

pub use format::{read_program, write_program};
pub use legalize::Diagnostic;
pub use pipeline::{compile, compile_quantized, CompileOptions, Compiled};
pub use program::SpikeProgram;
pub use target::Target;

#[derive(Debug, thiserror::Error)]
pub enum NeuroError {
    #[error(transparent)]
    Target(#[from] target::TargetError),
    #[error(transparent)]
    Ir(#[from] sparkc_ir::IrError),
    #[error(transparent)]
    Quantize(#[from] sparkc_passes::quantize::QuantError),
    #[error("calibration inputs: {0}")]
    Inputs(String),
    #[error("calibration run failed: {0}")]
    Calibrate(#[from] sparkc_backend_cpu::CpuError),
    #[error("cannot lower layer `{layer}` to the chip: {msg}")]
    Lower { layer: String, msg: String },
    #[error("the program does not fit target `{target}`:\n{}", .diagnostics.iter().map(|d| format!("  {d}")).collect::<Vec<_>>().join("\n"))]
    Legalize { target: String, diagnostics: Vec<Diagnostic> },
    #[error(transparent)]
    Format(#[from] format::FormatError),
}
