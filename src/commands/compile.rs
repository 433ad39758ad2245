//! `sparkc compile`: a model into a spike program for a neuromorphic target (calibrate on sample
//! data, quantize the leak currents, legalize, place and route, write the binary and a dump).

use super::simulate::load_inputs;
use crate::model_source::{load_config, load_weights};
use crate::report::{si, thousands};
use anyhow::{bail, Context, Result};
use sparkc_backend_neuro::pipeline::{compile, CompileOptions};
use sparkc_backend_neuro::{dump, write_program, Target};
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::tensors_io::read_tensors;
use sparkc_passes::quantize::QuantReport;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Target description (TOML), e.g. targets/loihi2.toml.
    #[arg(long)]
    pub target: PathBuf,
    /// NeuronSpark config.json, or a preset: tiny, small, neuronspark-0.9b.
    #[arg(long, conflicts_with = "ir")]
    pub config: Option<String>,
    /// Or any model as IR text (e.g. from `sparkc import`), with --weights holding its parameters.
    #[arg(long)]
    pub ir: Option<PathBuf>,
    /// Checkpoint / parameters (safetensors).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Use a seeded random initialisation instead of --weights (NeuronSpark configs).
    #[arg(long)]
    pub init_seed: Option<u64>,
    /// Where to write the spike program.
    #[arg(short, long)]
    pub out: PathBuf,
    /// Calibration data: a safetensors file with the model's inputs (`input_ids` [B,T] for
    /// NeuronSpark), or `synthetic:SEED:B:T` (windows of the built-in synthetic corpus).
    #[arg(long, default_value = "synthetic:1:8:64")]
    pub calib: String,
    /// Payload bits of the leak currents (neuron outputs sent as graded spikes).
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Payload bits of other activations sent as events (default: the target's graded-spike width, at most 16).
    #[arg(long)]
    pub act_bits: Option<u32>,
    /// Fractional bits of the fixed-point format (default: calibrated).
    #[arg(long)]
    pub frac: Option<u32>,
    /// Payload ranges (of 6 bits or more) are the calibrated ranges times this, for values the
    /// calibration data did not show.
    #[arg(long, default_value_t = 2.0)]
    pub headroom: f64,
    /// Also write the readable text dump of the program here.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Write the quantization error report (per layer) as JSON here.
    #[arg(long)]
    pub quant_report: Option<PathBuf>,
    /// Also write the quantized IR (text) here; `sparkc run`-style integer execution on the CPU reads it.
    #[arg(long)]
    pub emit_ir: Option<PathBuf>,
}

pub fn quant_report_json(r: &QuantReport) -> serde_json::Value {
    let num = |x: f64| if x.is_finite() { serde_json::json!(x) } else { serde_json::json!(null) };
    serde_json::json!({
        "frac": r.frac,
        "state_bits": r.state_bits,
        "saturated_parameters": r.saturated,
        "layers": r.layers.iter().map(|l| serde_json::json!({
            "layer": l.name,
            "kind": l.kind,
            "bits": l.bits,
            "channels": l.channels,
            "max_abs_error": num(l.max_abs_error),
            "mean_abs_error": num(l.mean_abs_error),
            "snr_db": num(l.snr_db),
            "suppressed_fraction": l.suppressed,
        })).collect::<Vec<_>>(),
    })
}

pub fn run(a: Args) -> Result<()> {
    let t0 = Instant::now();
    let target = Target::load(&a.target)?;
    let (graph, params, vocab) = match (&a.config, &a.ir) {
        (Some(c), None) => {
            let cfg = load_config(c, None)?;
            let params = load_weights(&cfg, a.weights.as_deref(), a.init_seed)?;
            (build_graph(&cfg, &GraphOptions::default())?, params, Some(cfg.vocab_size))
        }
        (None, Some(ir)) => {
            let text = std::fs::read_to_string(ir).with_context(|| format!("cannot read {}", ir.display()))?;
            let g = sparkc_ir::text::parse(&text).with_context(|| format!("{} is not valid IR text", ir.display()))?;
            sparkc_ir::verify::verify(&g)?;
            let w = a.weights.as_ref().context("--ir needs --weights with its parameters")?;
            (g, read_tensors(w)?, None)
        }
        _ => bail!("give --config C (NeuronSpark) or --ir FILE (IR text)"),
    };
    let load_s = t0.elapsed().as_secs_f64();
    let calib = load_inputs(&a.calib, vocab)?;
    let t1 = Instant::now();
    if !(a.headroom.is_finite() && a.headroom >= 1.0) {
        bail!("--headroom must be at least 1, got {}", a.headroom);
    }
    let opts = CompileOptions { leak_bits: a.bits, act_bits: a.act_bits, frac: a.frac, headroom: a.headroom };
    let compiled = compile(&graph, params, &calib, &target, &opts)?;
    let compile_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    write_program(&a.out, &compiled.program)?;
    let write_s = t2.elapsed().as_secs_f64();
    let p = &compiled.program;
    let synapse_bits: u64 = p.placement.cores.iter().map(|c| c.synapse_bits).sum();
    println!("wrote {} for target `{}` ({})", a.out.display(), target.name, target.description);
    println!(
        "  {} neuron groups, {} neurons, {} synapse layers, {} synapses ({} bits of synapse memory)",
        p.groups.len(),
        thousands(p.neuron_count()),
        p.synapses.len(),
        thousands(p.synapse_count()),
        si(synapse_bits as f64)
    );
    println!(
        "  placed on {} cores of {} chip(s) ({} cores per chip; {} board(s) of {} chips)",
        p.placement.cores.len(),
        p.placement.chips,
        target.chip.cores,
        p.placement.chips.div_ceil(target.board.chips),
        target.board.chips
    );
    let mgmt = p.stages.iter().filter(|s| matches!(s.kind, sparkc_backend_neuro::program::StageKind::Management { .. })).count();
    let host = p.stages.iter().filter(|s| matches!(s.kind, sparkc_backend_neuro::program::StageKind::Host)).count();
    println!("  {} stages: {} on neuromorphic cores, {mgmt} on management cores, {host} on the host", p.stages.len(), p.stages.len() - mgmt - host);
    println!("  fixed point: {} fractional bits, {}-bit state; leak currents {}-bit payloads", p.fx.frac, p.fx.bits, a.bits);
    for n in compiled.notes.iter().take(8) {
        println!("  {n}");
    }
    if compiled.notes.len() > 8 {
        println!("  ... and {} more notes of the same kinds (splits of large layers)", compiled.notes.len() - 8);
    }
    let q = &compiled.quantized.report;
    println!("\nquantization error on the calibration data ({}):", a.calib);
    println!("  {:<48} {:<10} {:>4} {:>11} {:>11} {:>8} {:>10}", "layer", "kind", "bits", "max |err|", "mean |err|", "SNR dB", "suppressed");
    // A large model's table goes to --quant-report; here, the worst layer of each kind.
    let shown: Vec<&sparkc_passes::quantize::LayerError> = if q.layers.len() <= 80 {
        q.layers.iter().collect()
    } else {
        let mut kinds: Vec<&str> = q.layers.iter().map(|l| l.kind).collect();
        kinds.sort();
        kinds.dedup();
        kinds.iter().filter_map(|k| q.layers.iter().filter(|l| l.kind == *k).min_by(|a, b| a.snr_db.total_cmp(&b.snr_db))).collect()
    };
    if shown.len() < q.layers.len() {
        println!("  ({} layers; the lowest-SNR one of each kind is shown, all of them with --quant-report)", q.layers.len());
    }
    for l in shown {
        println!(
            "  {:<48} {:<10} {:>4} {:>11.3e} {:>11.3e} {:>8.1} {:>10}",
            l.name,
            l.kind,
            l.bits,
            l.max_abs_error,
            l.mean_abs_error,
            l.snr_db,
            l.suppressed.map(|s| format!("{:.1}%", 100.0 * s)).unwrap_or_else(|| "-".into())
        );
    }
    if !q.saturated.is_empty() {
        println!("  saturated parameters: {}", q.saturated.join(", "));
    }
    let phases: Vec<String> = compiled.timings.iter().map(|(k, s)| format!("{k} {s:.2} s")).collect();
    println!(
        "\ncompile time {:.2} s ({}), writing {:.2} s; loading the model {load_s:.2} s",
        compile_s,
        phases.join(", "),
        write_s
    );
    if let Some(path) = &a.text {
        std::fs::write(path, dump::dump(p)).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.quant_report {
        std::fs::write(path, serde_json::to_string_pretty(&quant_report_json(q))?).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.emit_ir {
        std::fs::write(path, &p.source_ir).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
