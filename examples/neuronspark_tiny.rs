//! Build the tiny NeuronSpark from a seed, differentiate its loss, and take one look at the
//! numbers a researcher checks first: loss, ponder cost and the largest gradients.
//!
//!     cargo run --release --example neuronspark_tiny

use sparkc_backend_cpu::CpuProgram;
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::{init::init_params, NeuronSparkConfig};
use sparkc_ir::Tensor;
use sparkc_passes::autodiff::{differentiate, GRAD_PREFIX};
use std::collections::BTreeMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = NeuronSparkConfig::tiny();
    let forward = build_graph(&cfg, &GraphOptions { with_loss: true, ..Default::default() })?;
    let training = differentiate(&forward, "total_loss", &[])?;
    println!("forward graph: {} ops; with the backward: {} ops", forward.len(), training.len());

    let (b, t) = (2, 16);
    let text = b"Spiking neurons carry state from token to token.  ";
    let ids: Vec<i64> = (0..b * (t + 1)).map(|i| text[i % text.len()] as i64).collect();
    let row = |r: usize, from: usize| ids[r * (t + 1) + from..r * (t + 1) + from + t].to_vec();
    let mut inputs = BTreeMap::new();
    inputs.insert("input_ids".to_string(), Tensor::i64(vec![b, t], (0..b).flat_map(|r| row(r, 0)).collect()));
    inputs.insert("target_ids".to_string(), Tensor::i64(vec![b, t], (0..b).flat_map(|r| row(r, 1)).collect()));
    inputs.insert("loss_mask".to_string(), Tensor::f32(vec![b, t], vec![1.0; b * t]));
    for (_, name, ty) in training.inputs() {
        if name.starts_with("state.") {
            let c = ty.shape.dims()[1].as_const().unwrap_or(0) as usize;
            inputs.insert(name.to_string(), Tensor::zeros(vec![b, c]));
        }
    }
    let out = CpuProgram::compile(&training)?.run(&inputs, &init_params(&cfg, 0))?;
    println!("lm_loss {:.4}  ponder_cost {:.4}  total_loss {:.4}", out["lm_loss"].to_f32_vec()[0], out["ponder_cost"].to_f32_vec()[0], out["total_loss"].to_f32_vec()[0]);
    let mut norms: Vec<(f64, String)> = out
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(GRAD_PREFIX).map(|p| (v.to_f32_vec().iter().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt(), p.to_string())))
        .collect();
    norms.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("largest gradient norms:");
    for (n, k) in norms.iter().take(5) {
        println!("  {k:<40} {n:.4e}");
    }
    Ok(())
}
