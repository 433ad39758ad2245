//! `--backend cpu|cuda`: the executor a command runs on.

use anyhow::{bail, Result};
use sparkc_backend_cpu::CpuProgram;
use sparkc_backend_cuda::program::Precision;
use sparkc_backend_cuda::{Gpu, GpuProgram};
use sparkc_ir::Graph;
use sparkc_runtime::Executor;

/// The graph a backend runs, before autodiff: the CUDA backend fuses modulation prologues and
/// output epilogues into the neuron scans (so that the backward is fused too); the CPU backend,
/// the oracle, runs the graph as built.
pub fn prepare(backend: &str, graph: Graph) -> Result<Graph> {
    if backend != "cuda" {
        return Ok(graph);
    }
    let (fused, _report) = sparkc_passes::scan_fusion::fuse_scans(&graph)?;
    Ok(fused)
}

/// The graph token generation runs: [`prepare`], keeping only the logits and the carried
/// state (no ponder cost: two kernels fewer per sub-layer and token).
pub fn prepare_generation(backend: &str, graph: Graph) -> Result<Graph> {
    Ok(sparkc_passes::prune::for_generation(&prepare(backend, graph)?))
}

/// The training graph a backend runs: [`prepare`], differentiated for `loss`; on CUDA with
/// per-layer activation recompute (only each layer's input stays alive through the forward;
/// the layer is run again just before its backward), as the original checkpoints its layers.
/// The last `kept_layers` layers are not recomputed: their activations stay alive instead,
/// which saves their second forward where memory allows.
pub fn prepare_training(backend: &str, graph: Graph, loss: &str, kept_layers: usize) -> Result<Graph> {
    let train = sparkc_passes::autodiff::differentiate(&prepare(backend, graph)?, loss, &[])?;
    if backend != "cuda" {
        return Ok(train);
    }
    let layers = train.g.node_weights().filter_map(|n| sparkc_passes::recompute::layer_of(&n.name)).max().map_or(0, |l| l + 1);
    let first_kept = layers.saturating_sub(kept_layers);
    let (recomputed, _report) = sparkc_passes::recompute::recompute_layers_where(&train, &|l| l < first_kept)?;
    Ok(recomputed)
}

/// `precision` is `f32` (exact, the default) or `bf16` (bf16 GEMM operands, CUDA only).
pub fn executor(backend: &str, precision: &str, graph: &Graph) -> Result<Box<dyn Executor>> {
    let precision = match precision {
        "f32" => Precision::F32,
        "bf16" if backend == "cuda" => Precision::Bf16,
        "bf16" => bail!("--precision bf16 needs --backend cuda (the CPU backend is the fp32 oracle)"),
        other => bail!("unknown precision `{other}` (use f32 or bf16)"),
    };
    Ok(match backend {
        "cpu" => Box::new(CpuProgram::compile(graph)?),
        "cuda" => Box::new(GpuProgram::compile_with(Gpu::new(0)?, graph, precision)?),
        other => bail!("unknown backend `{other}` (use cpu or cuda)"),
    })
}
