//! `sparkc bench`: forward throughput of the CPU backend and the GEMM crate's GFLOP/s at the
//! model's own GEMM shapes. A table on stdout, JSON with --json.

use crate::model_source::load_config;
use crate::report::{median, si};
use anyhow::{bail, Result};
use sparkc_backend_cpu::kernels::dense;
use sparkc_backend_cpu::{CpuProgram, Profile};
use sparkc_frontend::init::init_params;
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_ir::{Op, Tensor};
use sparkc_runtime::Session;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
#[derive(Clone)]
pub struct Args {
    /// config.json, or a preset: tiny, small, neuronspark-0.9b.
    #[arg(long, default_value = "tiny")]
    pub config: String,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, default_value_t = 8)]
    pub tokens: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Time a training pass (forward, loss and backward) instead of inference.
    #[arg(long)]
    pub train: bool,
    /// What `--backend cuda` measures: any of scans, inference (prefill and decode in f32 and bf16), decode (bf16 only), training.
    #[arg(long, value_delimiter = ',', default_value = "scans,inference,training")]
    pub parts: Vec<String>,
    /// CUDA training: layers (the last ones) whose activations stay alive instead of being
    /// recomputed before their backward.
    #[arg(long, default_value_t = 0)]
    pub kept_layers: usize,
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 || a.tokens == 0 || a.iters == 0 {
        bail!("--batch, --tokens and --iters must be positive");
    }
    match a.backend.as_str() {
        "cpu" => {}
        "cuda" => return super::bench_cuda::run(&a),
        other => bail!("unknown backend `{other}` (use cpu or cuda)"),
    }
    let cfg = load_config(&a.config, None)?;
    let mut graph = build_graph(&cfg, &GraphOptions { with_loss: a.train, ..Default::default() })?;
    if a.train {
        graph = sparkc_passes::autodiff::differentiate(&graph, "total_loss", &[])?;
    }
    let params = init_params(&cfg, 0);
    let threads = rayon::current_num_threads();
    let mut session = Session::new(CpuProgram::compile(&graph)?, params);
    let ids: Vec<i64> = (0..a.batch * a.tokens).map(|i| (i * 7919 % cfg.vocab_size) as i64).collect();
    let mut feed = BTreeMap::from([("input_ids".to_string(), Tensor::i64(vec![a.batch, a.tokens], ids.clone()))]);
    if a.train {
        let targets: Vec<i64> = ids.iter().map(|&i| (i + 1) % cfg.vocab_size as i64).collect();
        feed.insert("target_ids".into(), Tensor::i64(vec![a.batch, a.tokens], targets));
        feed.insert("loss_mask".into(), Tensor::f32(vec![a.batch, a.tokens], vec![1.0; a.batch * a.tokens]));
    }

    // Warm up, then time whole forward passes; profile the last one by op kind.
    session.reset(a.batch);
    session.step(feed.clone())?;
    let mut times = Vec::new();
    let mut profile = Profile::default();
    for i in 0..a.iters {
        session.reset(a.batch);
        let start = Instant::now();
        if i + 1 == a.iters {
            let mut inputs = feed.clone();
            inputs.extend(session.state().clone());
            session.executor().run_profiled(&inputs, session.params(), Some(&mut profile))?;
        } else {
            session.step(feed.clone())?;
        }
        times.push(start.elapsed().as_secs_f64());
    }
    let t = median(times);
    let tokens_per_s = (a.batch * a.tokens) as f64 / t;

    // GEMM GFLOP/s at every distinct (M, I, O) of the model's linear layers.
    let mut shapes = BTreeSet::new();
    for n in graph.g.node_indices() {
        if let Op::Linear { .. } = graph.node(n).op {
            let ops = graph.operands(n);
            let x = graph.value_type(ops[0]).shape.resolve(&graph.dims);
            let w = graph.value_type(ops[1]).shape.resolve(&graph.dims);
            let frames = if x.rank() == 4 { cfg.k } else { 1 };
            let (o, i) = (w.dims()[0].as_const().unwrap_or(0) as usize, w.dims()[1].as_const().unwrap_or(0) as usize);
            shapes.insert((a.batch * a.tokens * frames, i, o));
        }
    }
    let mut gemm_rows = Vec::new();
    for &(m, i, o) in &shapes {
        let x: Vec<f32> = (0..m * i).map(|v| ((v % 97) as f32 - 48.0) * 0.01).collect();
        let w: Vec<f32> = (0..o * i).map(|v| ((v % 89) as f32 - 44.0) * 0.01).collect();
        dense::linear(&x, &w, None, m, i, o);
        let reps = ((2e8 / (2.0 * (m * i * o) as f64)).ceil() as usize).clamp(1, 200);
        let start = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(dense::linear(&x, &w, None, m, i, o));
        }
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        gemm_rows.push((m, i, o, 2.0 * (m * i * o) as f64 / secs / 1e9));
    }

    println!("sparkc bench — backend cpu, {threads} threads, config {} (D {}, N {}, K {}, layers {}, D_ff {}), B={} T={}",
        a.config, cfg.d, cfg.n, cfg.k, cfg.num_layers, cfg.d_ff, a.batch, a.tokens);
    let pass = if a.train { "training pass (forward + backward)" } else { "forward" };
    println!("\n{pass}: {:.4} s per pass (median of {}), {:.1} tokens/s", t, a.iters, tokens_per_s);
    let total: f64 = profile.by_op.values().sum();
    println!("\ntime by op (last pass)");
    let mut by: Vec<_> = profile.by_op.iter().collect();
    by.sort_by(|a, b| b.1.total_cmp(a.1));
    for (op, s) in &by {
        println!("  {op:<20} {:>9.2} ms  {:>5.1}%", *s * 1e3, 100.0 * *s / total);
    }
    println!("\nGEMM (matrixmultiply sgemm) at the model's shapes");
    println!("  {:>8} {:>6} {:>6}  {:>8}", "M", "I", "O", "GFLOP/s");
    for (m, i, o, g) in &gemm_rows {
        println!("  {m:>8} {i:>6} {o:>6}  {g:>8.1}");
    }
    let macs = sparkc_passes::cost::analyze(&graph).gemm_macs_per_token as f64 * (a.batch * a.tokens) as f64;
    let linear_s = profile.by_op.get("linear").copied().unwrap_or(0.0);
    if linear_s > 0.0 {
        println!("  in the forward pass: {}FLOP in {:.2} ms = {:.1} GFLOP/s", si(2.0 * macs), linear_s * 1e3, 2.0 * macs / linear_s / 1e9);
    }
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "backend": "cpu", "train": a.train, "threads": threads, "config": a.config, "batch": a.batch, "tokens": a.tokens,
            "forward_seconds": t, "tokens_per_second": tokens_per_s,
            "time_by_op_seconds": profile.by_op,
            "gemm": gemm_rows.iter().map(|(m, i, o, g)| serde_json::json!({"m": m, "i": i, "o": o, "gflops": g})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}
