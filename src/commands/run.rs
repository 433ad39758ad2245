//! `sparkc run`: one forward pass (and the loss when targets are given) on the CPU.

use crate::model_source::ModelArgs;
use anyhow::{bail, Context, Result};
use sparkc_frontend::neuronspark::{build_graph, compensate_gradients, GraphOptions};
use sparkc_passes::autodiff::{differentiate, GRAD_PREFIX};
use sparkc_frontend::tensors_io::{read_tensors, write_tensors};
use sparkc_ir::Tensor;
use sparkc_runtime::Session;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Inputs: `input_ids` I64 [B,T]; optional `target_ids` I64 [B,T] and `loss_mask` [B,T].
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write `logits`, `ponder_cost` and, with targets, the losses.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight of the ponder cost in `total_loss`.
    #[arg(long, default_value_t = 0.01)]
    pub ponder_weight: f64,
    /// Also write d total_loss / d parameter for every parameter (F32, keyed by name).
    #[arg(long)]
    pub grads_out: Option<PathBuf>,
    /// Apply the natural-gradient compensation (spec §7, C_max 100) to the written gradients.
    #[arg(long, requires = "grads_out")]
    pub compensate: bool,
}

/// Check an id tensor: integer, rank 2.
fn ids(inputs: &BTreeMap<String, Tensor>, key: &str, file: &str) -> Result<Option<Tensor>> {
    let Some(t) = inputs.get(key) else { return Ok(None) };
    if t.as_i64().is_none() {
        bail!("`{key}` in {file} must be an integer tensor, got {}", t.dtype());
    }
    if t.shape.len() != 2 {
        bail!("`{key}` in {file} must be [B,T], got shape {:?}", t.shape);
    }
    Ok(Some(t.clone()))
}

pub fn run(a: Args) -> Result<()> {
    let cfg = a.model.load_config()?;
    let params = a.model.load_weights(&cfg)?;
    let file = a.inputs.display().to_string();
    let inputs = read_tensors(&a.inputs)?;
    let input_ids = ids(&inputs, "input_ids", &file)?.with_context(|| format!("{file} has no `input_ids`"))?;
    let (b, t) = (input_ids.shape[0], input_ids.shape[1]);
    if b == 0 || t == 0 {
        bail!("`input_ids` in {file} is empty (shape {:?})", input_ids.shape);
    }
    let targets = ids(&inputs, "target_ids", &file)?;
    let mut feed = BTreeMap::from([("input_ids".to_string(), input_ids.clone())]);
    if let Some(targets) = &targets {
        if targets.shape != input_ids.shape {
            bail!("`target_ids` {:?} must have the shape of `input_ids` {:?}", targets.shape, input_ids.shape);
        }
        let mask = match inputs.get("loss_mask") {
            Some(m) if m.shape == input_ids.shape => Tensor::f32(m.shape.clone(), m.to_f32_vec()),
            Some(m) => bail!("`loss_mask` {:?} must have the shape of `input_ids` {:?}", m.shape, input_ids.shape),
            // No mask: score every position whose target is not the ignore id 0 (the HF wrapper's rule).
            None => Tensor::f32(targets.shape.clone(), targets.as_i64().unwrap_or_default().iter().map(|&x| (x != 0) as u8 as f32).collect()),
        };
        feed.insert("target_ids".into(), targets.clone());
        feed.insert("loss_mask".into(), mask);
    }
    if a.grads_out.is_some() && targets.is_none() {
        bail!("--grads-out needs `target_ids` in {file}");
    }
    let opts = GraphOptions { with_loss: targets.is_some(), ponder_weight: a.ponder_weight, debug_outputs: false };
    let mut graph = crate::backend::prepare(&a.model.backend, build_graph(&cfg, &opts)?)?;
    if a.grads_out.is_some() {
        graph = differentiate(&graph, "total_loss", &[])?;
    }
    let mut session = Session::new(crate::backend::executor(&a.model.backend, &a.model.precision, &graph)?, params);
    session.reset(b);
    let out = session.step(feed)?;

    let mut result = BTreeMap::new();
    result.insert("logits".to_string(), out["logits"].clone());
    let scalar = |name: &str| Tensor::f32(vec![1], out[name].to_f32_vec());
    result.insert("ponder_cost".to_string(), scalar("ponder_cost"));
    if targets.is_some() {
        result.insert("ce_per_token".to_string(), Tensor::f32(vec![b * t], out["ce_per_token"].to_f32_vec()));
        result.insert("lm_loss".to_string(), scalar("lm_loss"));
        result.insert("total_loss".to_string(), scalar("total_loss"));
    }
    write_tensors(&a.out, &result, None)?;
    if let Some(path) = &a.grads_out {
        let mut grads: BTreeMap<String, Tensor> = out
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(GRAD_PREFIX).map(|p| (p.to_string(), v.clone())))
            .collect();
        if a.compensate {
            compensate_gradients(&mut grads, session.params(), &cfg, 100.0).map_err(anyhow::Error::msg)?;
        }
        write_tensors(path, &grads, None)?;
        println!("wrote {} ({} parameter gradients{})", path.display(), grads.len(), if a.compensate { ", compensated" } else { "" });
    }
    let summary: Vec<String> = ["lm_loss", "total_loss", "ponder_cost"]
        .iter()
        .filter_map(|k| result.get(*k).map(|v| format!("{k} {:.6}", v.to_f32_vec()[0])))
        .collect();
    println!("wrote {} (B={b}, T={t}): {}", a.out.display(), summary.join(", "));
    if let Some(v) = out.get("lm_loss").map(|t| t.to_f32_vec()[0]).filter(|v| !v.is_finite()) {
        eprintln!("warning: lm_loss is {v} (is the loss mask all zero?)");
    }
    Ok(())
}
