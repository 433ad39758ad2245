//! `sparkc inspect`: parameters by component, FLOPs per token, recurrent state and the IR.

use crate::model_source::load_config;
use crate::report::{bytes, si, thousands};
use anyhow::{bail, Result};
use sparkc_frontend::checkpoint::load_checkpoint;
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::params::{count_by_component, total_params};
use sparkc_passes::cost;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A NIR file to describe (instead of --config).
    #[arg(conflicts_with = "config", required_unless_present = "config")]
    pub model: Option<PathBuf>,
    /// config.json, or a preset: tiny, small, neuronspark-0.9b.
    #[arg(long)]
    pub config: Option<String>,
    /// A checkpoint to check against the config (every key and shape).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Print the IR after the summary: `ir` as built, `fused-ir` as the CUDA backend runs it
    /// (modulation prologues and output epilogues folded into the neuron scans).
    #[arg(long)]
    pub emit: Option<String>,
    /// Override the config's boundary activation (leak or vpost).
    #[arg(long)]
    pub boundary: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(p) = &a.model {
        return crate::commands::nir::inspect_nir(p);
    }
    let cfg = load_config(a.config.as_deref().unwrap_or("tiny"), a.boundary.as_deref())?;
    println!(
        "model: NeuronSpark  vocab {}  D {}  N {}  K {}  layers {}  D_ff {}  v_th_min {}  boundary {}",
        cfg.vocab_size, cfg.d, cfg.n, cfg.k, cfg.num_layers, cfg.d_ff, cfg.v_th_min, cfg.boundary.name()
    );
    println!("\nparameters by component");
    let total = total_params(&cfg);
    for (component, count) in count_by_component(&cfg) {
        println!("  {:<44} {:>15}  {:>5.1}%", component.label(), thousands(count), 100.0 * count as f64 / total as f64);
    }
    println!("  {:<44} {:>15}", "total", thousands(total));

    let graph = build_graph(&cfg, &GraphOptions::default())?;
    let c = cost::analyze(&graph);
    println!("\nforward cost per token");
    println!("  GEMM multiply-accumulates  {:>12}MAC  ({}FLOP)", si(c.gemm_macs_per_token as f64), si(2.0 * c.gemm_macs_per_token as f64));
    println!("  element-wise and scans     {:>12}FLOP", si(c.elementwise_flops_per_token as f64));
    println!("  neuron updates             {:>12}", si(c.neuron_steps_per_token as f64));
    println!("  total                      {:>12}FLOP", si(c.flops_per_token() as f64));
    let state = cost::state_bytes_per_sequence(&graph);
    println!("\nrecurrent state per sequence: {} ({} floats)", bytes(state), thousands(state / 4));

    if let Some(w) = &a.weights {
        let params = load_checkpoint(w, &cfg)?;
        println!("\nweights {}: all {} parameters present with the expected shapes", w.display(), params.len());
    }
    match a.emit.as_deref() {
        None => {}
        Some("ir") => print!("\n{}", sparkc_ir::text::print(&graph)?),
        Some("fused-ir") => {
            let (fused, report) = sparkc_passes::scan_fusion::fuse_scans(&graph)?;
            print!("\n{report}\n\n{}", sparkc_ir::text::print(&fused)?);
        }
        Some(other) => bail!("--emit takes `ir` or `fused-ir`, got `{other}`"),
    }
    Ok(())
}
