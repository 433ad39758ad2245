//! `--backend cpu|cuda`: the executor a command runs on.

use anyhow::{bail, Result};
use sparkc_backend_cpu::CpuProgram;
use sparkc_backend_cuda::{Gpu, GpuProgram};
use sparkc_ir::Graph;
use sparkc_runtime::Executor;

pub fn executor(backend: &str, graph: &Graph) -> Result<Box<dyn Executor>> {
    Ok(match backend {
        "cpu" => Box::new(CpuProgram::compile(graph)?),
        "cuda" => Box::new(GpuProgram::compile(Gpu::new(0)?, graph)?),
        other => bail!("unknown backend `{other}` (use cpu or cuda)"),
    })
}
