//! `sparkc bench --backend cuda`: scan kernels at the original's benchmark shapes (spec §9),
//! prefill, and decode throughput; a table on stdout and JSON with --json.

use super::bench::Args;
use crate::model_source::load_config;
use crate::report::median;
use anyhow::Result;
use anyhow::Context;
use sparkc_backend_cuda::bench::{time_scan, ScanCase};
use sparkc_backend_cuda::codegen::Elem;
use sparkc_backend_cuda::scan_codegen::ScanIo;
use sparkc_backend_cuda::program::Precision;
use sparkc_backend_cuda::{Gpu, GpuProgram};
use sparkc_frontend::init::init_params;
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_ir::{neuron, Tensor};
use sparkc_runtime::Session;
use std::collections::BTreeMap;
use std::time::Instant;

pub fn run(a: &Args) -> Result<()> {
    if let Some(p) = a.parts.iter().find(|p| !["scans", "inference", "decode", "training"].contains(&p.as_str())) {
        anyhow::bail!("--parts: unknown part `{p}` (use scans, inference, decode, training)");
    }
    let part = |p: &str| a.parts.iter().any(|x| x == p);
    let gpu = Gpu::new(0)?;
    println!("sparkc bench — backend cuda on {} ({})", gpu.name, gpu.arch);
    let mut json = serde_json::Map::new();

    // 1. Scans at the shapes the original was measured at (S = 511 tokens x 16 frames).
    let cfg = load_config(&a.config, None)?;
    let graph = build_graph(&cfg, &GraphOptions::default())?;
    let fused_graph = crate::backend::prepare("cuda", graph.clone())?;
    let fused = fused_selective_model(&fused_graph)?;
    if part("scans") {
        println!("\nneuron scans at B=2, S=8176 (511 tokens x 16 frames), generated from the neuron models; original: spec §9");
        println!("  {:<62} {:>7} {:>8} {:>7} {:>8} {:>7} {:>8}", "scan", "columns", "fwd ms", "GB/s", "bwd ms", "GB/s", "seg ms");
    }
    let (f32x, bf16x) = (Elem::F32, Elem::Bf16);
    let sel = neuron::selective_plif();
    let plif = neuron::plif();
    let (vpost, leak) = (vec!["vpost".to_string()], vec!["leak".to_string()]);
    struct Row<'a> {
        label: &'a str,
        case: ScanCase<'a>,
        original: (f64, f64),
    }
    let case = |model, emit, inputs: Vec<Elem>, outputs: Vec<Elem>, range, c, simple| {
        let fast = outputs.contains(&Elem::Bf16);
        ScanCase { model, emit, io: ScanIo { inputs, outputs }, range, b: 2, s: 8176, k: 16, c, simple_unroll: simple, fast }
    };
    let rows = [
        Row { label: "selective PLIF, fused prologue, bf16 in/out (what runs)", case: case(&fused, &vpost, vec![bf16x; fused.inputs.len()], vec![bf16x], (-1.0, 1.0), 7168, None), original: (4.01, 5.56) },
        Row { label: "selective PLIF, unfused, f32 in/out, tiled", case: case(&sel, &vpost, vec![f32x; 3], vec![f32x], (0.05, 0.95), 7168, None), original: (4.01, 5.56) },
        Row { label: "selective PLIF, unfused, f32, one thread per column", case: case(&sel, &vpost, vec![f32x; 3], vec![f32x], (0.05, 0.95), 7168, Some(16)), original: (4.01, 5.56) },
        Row { label: "PLIF row-param (FFN gate+up), bf16 in/out", case: case(&plif, &leak, vec![bf16x], vec![bf16x], (-1.0, 1.0), 5376, None), original: (3.34, 4.9) },
        Row { label: "PLIF row-param (input/output neuron), f32 in, bf16 out", case: case(&plif, &leak, vec![f32x], vec![bf16x], (-1.0, 1.0), 896, None), original: (3.18, 4.6) },
    ];
    let mut scans = Vec::new();
    for r in rows.iter().filter(|_| part("scans")) {
        let (f, bwd, seg) = time_scan(&gpu, &r.case, 20)?;
        let seg_text = seg.map_or("-".to_string(), |ms| format!("{ms:.3}"));
        println!(
            "  {:<62} {:>7} {:>8.3} {:>7.0} {:>8.3} {:>7.0} {:>8}   (original {} / {} ms)",
            r.label, 2 * r.case.c, f.median_ms, f.gb_per_s(), bwd.median_ms, bwd.gb_per_s(), seg_text, r.original.0, r.original.1
        );
        scans.push(serde_json::json!({
            "scan": r.label, "columns": 2 * r.case.c, "forward_ms": f.median_ms, "forward_gb_per_s": f.gb_per_s(), "forward_bytes": f.bytes,
            "backward_ms": bwd.median_ms, "backward_gb_per_s": bwd.gb_per_s(), "backward_bytes": bwd.bytes, "backward_segmented_ms": seg,
            "original_forward_ms": r.original.0, "original_backward_ms": r.original.1,
        }));
    }
    if part("scans") {
        json.insert("scans".into(), scans.into());
    }

    // 2. Prefill and decode on the model of --config (random init), in both GEMM precisions.
    // bf16 first: a program's replayed decode step runs ~7% slower on an H100 after an f32
    // program has run in the same process (not the clocks, not the pool's freed blocks, not
    // the prefills; docs/cuda-notes.md, session 8), and bf16 is what generation runs.
    let params = init_params(&cfg, 0);
    let generation_graph = crate::backend::prepare_generation("cuda", graph)?;
    for precision in [Precision::Bf16, Precision::F32].into_iter().filter(|_| part("inference")) {
        let mut session = Session::new(GpuProgram::compile_with(Gpu::new(0)?, &generation_graph, precision)?, params.clone());
        prefill_timings(a, &cfg, &mut session, precision, &mut json)?;
        decode_timings(&cfg, &mut session, precision, &mut json)?;
        if precision == Precision::Bf16 {
            profiles(a, &cfg, &mut session, &mut json)?;
        }
    }
    if part("decode") && !part("inference") {
        let mut session = Session::new(GpuProgram::compile_with(Gpu::new(0)?, &generation_graph, Precision::Bf16)?, params.clone());
        println!("\nmodel {} (D {}, layers {}, K {}), bf16 GEMMs", a.config, cfg.d, cfg.num_layers, cfg.k);
        decode_timings(&cfg, &mut session, Precision::Bf16, &mut json)?;
    }
    if part("training") {
        training_step(a, &cfg, &params, &mut json)?;
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::Value::Object(json))?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn precision_tag(precision: Precision) -> &'static str {
    match precision {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    }
}

/// Token ids for a (b, t) batch, the same for every run.
fn bench_ids(cfg: &sparkc_frontend::NeuronSparkConfig, b: usize, t: usize) -> Tensor {
    Tensor::i64(vec![b, t], (0..b * t).map(|i| (i * 7919 % cfg.vocab_size) as i64).collect())
}

/// One session step on (b, t) bench ids.
fn step_ids(session: &mut Session<GpuProgram>, cfg: &sparkc_frontend::NeuronSparkConfig, b: usize, t: usize) -> Result<()> {
    session.step(BTreeMap::from([("input_ids".to_string(), bench_ids(cfg, b, t))]))?;
    Ok(())
}

/// Prefill of --tokens tokens at B=1 (median of --iters).
fn prefill_timings(
    a: &Args,
    cfg: &sparkc_frontend::NeuronSparkConfig,
    session: &mut Session<GpuProgram>,
    precision: Precision,
    json: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let tag = precision_tag(precision);
    let t = a.tokens;
    session.reset(1);
    step_ids(session, cfg, 1, t)?;
    let mut prefill = Vec::new();
    for _ in 0..a.iters {
        session.reset(1);
        let s = Instant::now();
        step_ids(session, cfg, 1, t)?;
        prefill.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let prefill_ms = median(prefill);
    println!("\nmodel {} (D {}, layers {}, K {}), {tag} GEMMs, end to end including host transfers", a.config, cfg.d, cfg.num_layers, cfg.k);
    println!("  prefill B=1 T={t}: {prefill_ms:.1} ms");
    json.insert(format!("prefill_ms_{tag}"), prefill_ms.into());
    json.insert("prefill_tokens".into(), t.into());
    Ok(())
}

/// Per-node profiles of a prefill and of a one-token step run node by node (the timed decode
/// steps replay a CUDA graph). Run after the timings, which they would otherwise disturb.
fn profiles(a: &Args, cfg: &sparkc_frontend::NeuronSparkConfig, session: &mut Session<GpuProgram>, json: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    session.reset(1);
    session.executor_mut().set_profiling(true);
    step_ids(session, cfg, 1, a.tokens)?;
    println!("  prefill B=1 T={}:", a.tokens);
    print_profile(&session.executor().profile()?, json, "prefill_profile");
    step_ids(session, cfg, 1, 1)?;
    println!("  one-token step, node by node:");
    print_profile(&session.executor().profile()?, json, "decode_step_profile");
    session.executor_mut().set_profiling(false);
    Ok(())
}

/// Decode tokens/s at B=1 and B=8, the state kept on the device and the step replayed as a
/// CUDA graph.
fn decode_timings(
    cfg: &sparkc_frontend::NeuronSparkConfig,
    session: &mut Session<GpuProgram>,
    precision: Precision,
    json: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let tag = precision_tag(precision);
    for b in [1usize, 8] {
        session.reset(b);
        step_ids(session, cfg, b, 4)?;
        // Two one-token steps first: the first runs op by op, the second is captured as a CUDA
        // graph; the timed steps replay it.
        for _ in 0..2 {
            step_ids(session, cfg, b, 1)?;
        }
        let steps = 32;
        let s = Instant::now();
        for _ in 0..steps {
            step_ids(session, cfg, b, 1)?;
        }
        let secs = s.elapsed().as_secs_f64();
        let tps = (b * steps) as f64 / secs;
        println!("  decode B={b}: {:.2} ms/step, {tps:.1} tokens/s (state on the device, step replayed as a CUDA graph)", secs / steps as f64 * 1e3);
        json.insert(format!("decode_b{b}_tokens_per_s_{tag}"), tps.into());
        if let Some(ms) = session.executor().time_captured_step(steps)? {
            println!("    device time per replayed step: {ms:.2} ms (the rest of a step is host work and the logits' download)");
            json.insert(format!("decode_b{b}_device_ms_{tag}"), ms.into());
        }
        if let Some(kinds) = session.executor().captured_step_nodes()? {
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            println!("    the captured step's graph nodes: {}", list.join(", "));
            json.insert(format!("decode_b{b}_graph_nodes_{tag}"), serde_json::to_value(&kinds)?);
        }
    }
    Ok(())
}

/// The neuron model the scan-fusion pass made for the SNNBlock's hidden neurons (selective PLIF
/// with its modulation prologue).
fn fused_selective_model(g: &sparkc_ir::Graph) -> Result<sparkc_ir::neuron::NeuronModel> {
    for n in g.g.node_indices() {
        let node = g.node(n);
        if let sparkc_ir::Op::Scan { neuron, .. } = &node.op {
            if node.name.ends_with("hidden_neuron") {
                return Ok(g.neurons[neuron].clone());
            }
        }
    }
    None.context("the fused graph has no SNNBlock hidden-neuron scan")
}

/// Training steps at the --config model, B=2, T=--tokens, as `sparkc train --backend cuda
/// --precision bf16` runs them: bf16 GEMMs and activations, fused scans, per-layer activation
/// recompute, gradients accumulated, compensated, clipped and applied by AdamW on the device.
/// Also the pool's peak memory over those steps.
fn training_step(a: &Args, cfg: &sparkc_frontend::NeuronSparkConfig, params: &BTreeMap<String, Tensor>, json: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    use sparkc_runtime::train::{data::PackedData, optim::OptimizerKind, TrainConfig, Trainer};
    let (b, t) = (2usize, a.tokens);
    let built = build_graph(cfg, &GraphOptions { with_loss: true, ..Default::default() })?;
    let graph = crate::backend::prepare_training("cuda", built, "total_loss", a.kept_layers)?;
    let prog = GpuProgram::compile_with(Gpu::new(0)?, &graph, Precision::Bf16)?;
    // The device's pool, seen through a second handle (the program moves into the trainer).
    let pool = Gpu::new(0)?;
    let tcfg = TrainConfig { batch_size: b, seq_len: t, steps: 1_000, optimizer: OptimizerKind::Adamw, weight_decay: 0.1, checkpoint_every: 0, eval_every: 0, ..Default::default() };
    let text = sparkc_frontend::corpus::synthetic(0, (b * (t + 1) * 8).max(100_000));
    let data = PackedData::new(text.bytes().map(u32::from).collect(), t, 0.0).map_err(anyhow::Error::msg)?;
    let neuron = sparkc_frontend::params::neuron_group_keys(cfg);
    let hook = super::train::compensation_hook(cfg, 100.0);
    let dir = std::env::temp_dir().join(format!("sparkc-bench-train-{}", std::process::id()));
    let exec: Box<dyn sparkc_runtime::Executor> = Box::new(prog);
    let mut trainer = Trainer::new(exec, params.clone(), &neuron, data, tcfg, cfg.to_json(), Some(hook), &dir)?;
    println!("\ntraining step (AdamW on the device, bf16 GEMMs, fused scans, layer recompute but for the last {}), B={b} T={t}", a.kept_layers);
    // The first step compiles nothing more but allocates the optimizer state.
    if let Err(e) = trainer.step() {
        println!("  does not run yet: {e}");
        json.insert("training_error".into(), e.to_string().into());
        return Ok(());
    }
    pool.reset_peak_memory()?;
    let mut times = Vec::new();
    let mut loss = 0.0;
    for _ in 0..a.iters.max(1) {
        let s = Instant::now();
        if let sparkc_runtime::train::Event::Step { loss: l, .. } = trainer.step()? {
            loss = l;
        }
        times.push(s.elapsed().as_secs_f64());
    }
    let secs = median(times);
    let peak = pool.peak_memory()? as f64 / 1e9;
    // One more step with every node timed: where the step's device time goes.
    if let Some(dev) = trainer.device() {
        dev.set_profiling(true);
    }
    trainer.step()?;
    if let Some(dev) = trainer.device() {
        let rows = dev.profile()?;
        dev.set_profiling(false);
        print_profile(&rows, json, "training_profile");
    }
    let tps = (b * t) as f64 / secs;
    println!("  {:.1} ms/step, {tps:.0} tokens/s, peak pool memory {peak:.1} GB (loss {loss:.3}; original: 1,466 ms, 698 tokens/s, 30.9 GB)", secs * 1e3);
    json.insert("training_step_ms".into(), (secs * 1e3).into());
    json.insert("training_tokens_per_s".into(), tps.into());
    json.insert("training_peak_gb".into(), peak.into());
    Ok(())
}

/// The longest kinds of node of a profiled run, with their share of the total.
fn print_profile(rows: &[(String, usize, f64)], json: &mut serde_json::Map<String, serde_json::Value>, key: &str) {
    let total: f64 = rows.iter().map(|r| r.2).sum();
    println!("    device time by node kind (one profiled run, {total:.1} ms in nodes):");
    for (what, calls, ms) in rows.iter().take(14) {
        println!("      {what:<48} {calls:>5} calls {ms:>9.2} ms {:>5.1}%", 100.0 * ms / total.max(1e-12));
    }
    let list: Vec<serde_json::Value> = rows.iter().map(|(w, c, ms)| serde_json::json!({"what": w, "calls": c, "ms": ms})).collect();
    json.insert(key.into(), list.into());
}
