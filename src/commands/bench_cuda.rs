//! `sparkc bench --backend cuda`: scan kernels at the original's benchmark shapes (spec §9),
//! prefill, and decode throughput; a table on stdout and JSON with --json.

use super::bench::Args;
use crate::model_source::load_config;
use anyhow::Result;
use sparkc_backend_cuda::bench::time_scan_forward;
use sparkc_backend_cuda::program::Precision;
use sparkc_backend_cuda::{Gpu, GpuProgram};
use sparkc_frontend::init::init_params;
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_ir::{neuron, Tensor};
use sparkc_runtime::Session;
use std::collections::BTreeMap;
use std::time::Instant;

pub fn run(a: &Args) -> Result<()> {
    let gpu = Gpu::new(0)?;
    println!("sparkc bench — backend cuda on {} ({})", gpu.name, gpu.arch);
    let mut json = serde_json::Map::new();

    // 1. Scans at the shapes the original was measured at (S = 511 tokens x 16 frames).
    println!("\nneuron scans, forward (f32, generated from the neuron model; original: spec §9)");
    println!("  {:<44} {:>9} {:>9} {:>10}", "scan", "columns", "ms", "GB/s");
    let cases = [
        ("selective PLIF (SNNBlock hidden), B=2", neuron::selective_plif(), "vpost", 7168usize, 4.01),
        ("PLIF row-param (FFN gate+up merged), B=2", neuron::plif(), "leak", 5376, 3.34),
        ("PLIF row-param (input/output neuron), B=2", neuron::plif(), "leak", 896, 3.18),
    ];
    let mut scans = Vec::new();
    for (label, model, emit, c, original) in cases {
        for unroll in [8usize, 16, 32] {
            let t = time_scan_forward(&gpu, &model, &[emit.to_string()], 2, 8176, 16, c, 20, unroll)?;
            let shown = format!("{label} [unroll {unroll}]");
            println!("  {shown:<54} {:>7} {:>9.3} {:>10.0}   (original {original} ms)", 2 * c, t.median_ms, t.gb_per_s());
            scans.push(serde_json::json!({"scan": label, "unroll": unroll, "columns": 2 * c, "ms": t.median_ms, "gb_per_s": t.gb_per_s(), "bytes": t.bytes, "original_ms": original}));
        }
    }
    json.insert("scans_forward".into(), scans.into());

    // 2. Prefill and decode on the model of --config (random init), in both GEMM precisions.
    let cfg = load_config(&a.config, None)?;
    let graph = build_graph(&cfg, &GraphOptions::default())?;
    let params = init_params(&cfg, 0);
    for precision in [Precision::F32, Precision::Bf16] {
        let session = Session::new(GpuProgram::compile_with(Gpu::new(0)?, &graph, precision)?, params.clone());
        model_timings(a, &cfg, session, precision, &mut json)?;
    }
    println!("\ntraining at this size on the CUDA backend: not yet (no activation recompute, host-side optimizer); `sparkc train --backend cuda` runs smaller models");
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::Value::Object(json))?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn model_timings(
    a: &Args,
    cfg: &sparkc_frontend::NeuronSparkConfig,
    mut session: Session<GpuProgram>,
    precision: Precision,
    json: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let tag = match precision {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    };
    let ids = |b: usize, t: usize| Tensor::i64(vec![b, t], (0..b * t).map(|i| (i * 7919 % cfg.vocab_size) as i64).collect());
    let t = a.tokens;
    session.reset(1);
    session.step(BTreeMap::from([("input_ids".to_string(), ids(1, t))]))?;
    let mut prefill = Vec::new();
    for _ in 0..a.iters {
        session.reset(1);
        let s = Instant::now();
        session.step(BTreeMap::from([("input_ids".to_string(), ids(1, t))]))?;
        prefill.push(s.elapsed().as_secs_f64() * 1e3);
    }
    prefill.sort_by(f64::total_cmp);
    let prefill_ms = prefill[prefill.len() / 2];
    println!("\nmodel {} (D {}, layers {}, K {}), {tag} GEMMs, end to end including host transfers", a.config, cfg.d, cfg.num_layers, cfg.k);
    println!("  prefill B=1 T={t}: {prefill_ms:.1} ms");
    json.insert(format!("prefill_ms_{tag}"), prefill_ms.into());
    json.insert("prefill_tokens".into(), t.into());
    for b in [1usize, 8] {
        session.reset(b);
        session.step(BTreeMap::from([("input_ids".to_string(), ids(b, 4))]))?;
        let steps = 16;
        let s = Instant::now();
        for _ in 0..steps {
            session.step(BTreeMap::from([("input_ids".to_string(), ids(b, 1))]))?;
        }
        let secs = s.elapsed().as_secs_f64();
        let tps = (b * steps) as f64 / secs;
        println!("  decode B={b}: {:.1} ms/step, {tps:.1} tokens/s", secs / steps as f64 * 1e3);
        json.insert(format!("decode_b{b}_tokens_per_s_{tag}"), tps.into());
    }
    Ok(())
}
