//! `sparkc bench --backend cuda`: scan kernels at the original's benchmark shapes (spec §9),
//! prefill, and decode throughput; a table on stdout and JSON with --json.

use super::bench::Args;
use crate::model_source::load_config;
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
    let gpu = Gpu::new(0)?;
    println!("sparkc bench — backend cuda on {} ({})", gpu.name, gpu.arch);
    let mut json = serde_json::Map::new();

    // 1. Scans at the shapes the original was measured at (S = 511 tokens x 16 frames).
    let cfg = load_config(&a.config, None)?;
    let graph = build_graph(&cfg, &GraphOptions::default())?;
    let fused_graph = crate::backend::prepare("cuda", graph.clone())?;
    let fused = fused_selective_model(&fused_graph)?;
    println!("\nneuron scans at B=2, S=8176 (511 tokens x 16 frames), generated from the neuron models; original: spec §9");
    println!("  {:<62} {:>7} {:>8} {:>7} {:>8} {:>7}", "scan", "columns", "fwd ms", "GB/s", "bwd ms", "GB/s");
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
    for r in &rows {
        let (f, bwd) = time_scan(&gpu, &r.case, 20)?;
        println!(
            "  {:<62} {:>7} {:>8.3} {:>7.0} {:>8.3} {:>7.0}   (original {} / {} ms)",
            r.label, 2 * r.case.c, f.median_ms, f.gb_per_s(), bwd.median_ms, bwd.gb_per_s(), r.original.0, r.original.1
        );
        scans.push(serde_json::json!({
            "scan": r.label, "columns": 2 * r.case.c, "forward_ms": f.median_ms, "forward_gb_per_s": f.gb_per_s(), "forward_bytes": f.bytes,
            "backward_ms": bwd.median_ms, "backward_gb_per_s": bwd.gb_per_s(), "backward_bytes": bwd.bytes,
            "original_forward_ms": r.original.0, "original_backward_ms": r.original.1,
        }));
    }
    json.insert("scans".into(), scans.into());

    // 2. Prefill and decode on the model of --config (random init), in both GEMM precisions.
    let params = init_params(&cfg, 0);
    for precision in [Precision::F32, Precision::Bf16] {
        let session = Session::new(GpuProgram::compile_with(Gpu::new(0)?, &fused_graph, precision)?, params.clone());
        model_timings(a, &cfg, session, precision, &mut json)?;
    }
    training_step(a, &cfg, &params, &mut json)?;
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
        // Two one-token steps first: the first runs op by op, the second is captured as a CUDA
        // graph; the timed steps replay it.
        for _ in 0..2 {
            session.step(BTreeMap::from([("input_ids".to_string(), ids(b, 1))]))?;
        }
        let steps = 32;
        let s = Instant::now();
        for _ in 0..steps {
            session.step(BTreeMap::from([("input_ids".to_string(), ids(b, 1))]))?;
        }
        let secs = s.elapsed().as_secs_f64();
        let tps = (b * steps) as f64 / secs;
        println!("  decode B={b}: {:.2} ms/step, {tps:.1} tokens/s (state on the device, step replayed as a CUDA graph)", secs / steps as f64 * 1e3);
        json.insert(format!("decode_b{b}_tokens_per_s_{tag}"), tps.into());
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

/// One training step's forward and backward on the device at B=2, T=--tokens (bf16 GEMMs and
/// activations, fused scans, fp32 gradients left on the device), and the pool's peak memory.
/// The optimizer is not in it (it runs on the host today), nor is any activation recompute.
fn training_step(a: &Args, cfg: &sparkc_frontend::NeuronSparkConfig, params: &BTreeMap<String, Tensor>, json: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let (b, t) = (2usize, a.tokens);
    let built = build_graph(cfg, &GraphOptions { with_loss: true, ..Default::default() })?;
    let graph = sparkc_passes::autodiff::differentiate(&crate::backend::prepare("cuda", built)?, "total_loss", &[])?;
    let gpu = Gpu::new(0)?;
    let mut prog = GpuProgram::compile_with(gpu, &graph, Precision::Bf16)?;
    prog.set_params(params)?;
    let ids = |seed: usize| Tensor::i64(vec![b, t], (0..b * t).map(|i| ((i + seed) * 7919 % cfg.vocab_size) as i64).collect());
    let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
    for (_, name, ty) in graph.inputs() {
        if name.starts_with("state.") {
            let c = ty.shape.dims()[1].as_const().unwrap_or(0) as usize;
            inputs.insert(name.to_string(), Tensor::zeros(vec![b, c]));
        }
    }
    inputs.insert("input_ids".into(), ids(0));
    inputs.insert("target_ids".into(), ids(1));
    inputs.insert("loss_mask".into(), Tensor::f32(vec![b, t], vec![1.0; b * t]));
    println!("\ntraining step (forward + backward, bf16, fused scans), B={b} T={t}, optimizer not included");
    match prog.run_keeping(&inputs, &["total_loss"]) {
        Ok(_) => {}
        Err(e) => {
            println!("  does not run yet: {e}");
            json.insert("training_error".into(), e.to_string().into());
            return Ok(());
        }
    }
    prog.gpu.reset_peak_memory()?;
    let mut times = Vec::new();
    let mut loss = 0.0;
    for _ in 0..a.iters.max(1) {
        let s = Instant::now();
        let out = prog.run_keeping(&inputs, &["total_loss"])?;
        times.push(s.elapsed().as_secs_f64());
        loss = out["total_loss"].to_f32_vec()[0];
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let peak = prog.gpu.peak_memory()? as f64 / 1e9;
    let tps = (b * t) as f64 / secs;
    println!("  {:.1} ms/step, {tps:.0} tokens/s, peak pool memory {peak:.1} GB (loss {loss:.3})", secs * 1e3);
    json.insert("training_step_ms".into(), (secs * 1e3).into());
    json.insert("training_tokens_per_s".into(), tps.into());
    json.insert("training_peak_gb".into(), peak.into());
    Ok(())
}
