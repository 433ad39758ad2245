//! `sparkc train`: the original recipe (spec §14) on the CPU, from a TOML file and flags.
//! With no data arguments it trains the tiny model on a synthetic corpus generated from a
//! seeded grammar (the embedded default).

use crate::model_source::{load_config, load_weights};
use crate::plot::{line_chart, Series};
use crate::report::median;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::style::RGBColor;
use sparkc_frontend::corpus::{self, ShardDtype};
use sparkc_frontend::neuronspark::{build_graph, compensate_gradients, compensated_keys, GraphOptions};
use sparkc_frontend::params::neuron_group_keys;
use sparkc_frontend::tokenizer;
use sparkc_runtime::train::checkpoint;
use sparkc_runtime::train::data::PackedData;
use sparkc_runtime::train::optim::OptimizerKind;
use sparkc_runtime::train::{Event, GradHook, TrainConfig, Trainer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Default)]
pub struct Args {
    /// A TOML file with `model`, `tokenizer`, `[data]` and `[train]` (flags override it).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Model config.json or preset (default: tiny).
    #[arg(long)]
    pub model: Option<String>,
    /// Start from these weights instead of a seeded initialisation.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Plain-text files, one document each.
    #[arg(long, num_args = 1..)]
    pub text: Vec<PathBuf>,
    /// JSON-lines files, one document per line under `--jsonl-field`.
    #[arg(long, num_args = 1..)]
    pub jsonl: Vec<PathBuf>,
    #[arg(long)]
    pub jsonl_field: Option<String>,
    /// Pre-tokenized shards of raw little-endian ids (see --shard-dtype).
    #[arg(long, num_args = 1..)]
    pub shards: Vec<PathBuf>,
    #[arg(long, value_parser = ["u16", "u32"])]
    pub shard_dtype: Option<String>,
    /// tokenizer.json, or `bytes` (default) for the built-in byte-level tokenizer.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Run directory: checkpoints, metrics, loss curve, final model.
    #[arg(long, short, default_value = "runs/default")]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many steps in this invocation.
    #[arg(long)]
    pub stop_after: Option<u64>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long, value_parser = ["adam", "adamw"])]
    pub optimizer: Option<String>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub ponder_weight: Option<f64>,
    /// CUDA: layers (the last ones) whose activations stay alive through the forward instead
    /// of being recomputed before their backward: faster, at the cost of memory.
    #[arg(long, default_value_t = 0)]
    pub kept_layers: usize,
    /// Turn the natural-gradient compensation off.
    #[arg(long)]
    pub no_compensate: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Characters of synthetic text for the embedded default corpus.
    #[arg(long, default_value_t = 400_000)]
    pub synthetic_chars: usize,
    /// No progress bar (for logs).
    #[arg(long)]
    pub quiet: bool,
    /// Where training runs: cpu, or cuda (forward, backward, gradient accumulation, clipping and
    /// Adam on the GPU, with per-layer activation recompute).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// GEMM precision on the GPU: f32 (exact, as the CPU) or bf16 (bf16 GEMMs and activations,
    /// fp32 master weights, optimizer, scans and residual stream — the original's recipe).
    #[arg(long, default_value = "f32")]
    pub precision: String,
}

/// The TOML file.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model: Option<String>,
    weights: Option<PathBuf>,
    tokenizer: Option<String>,
    #[serde(default)]
    data: DataConfig,
    #[serde(default)]
    train: Option<TrainConfig>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DataConfig {
    #[serde(default)]
    text: Vec<PathBuf>,
    #[serde(default)]
    jsonl: Vec<PathBuf>,
    jsonl_field: Option<String>,
    #[serde(default)]
    shards: Vec<PathBuf>,
    shard_dtype: Option<ShardDtype>,
}

fn resolve(a: &Args) -> Result<(FileConfig, TrainConfig)> {
    let mut file = match &a.config_file {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str::<FileConfig>(&text).with_context(|| format!("{} is not a valid training config", p.display()))?
        }
        None => FileConfig::default(),
    };
    let mut t = file.train.take().unwrap_or_default();
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { t.$f = v; } )* };
    }
    set!(steps, batch_size, seq_len, grad_accum, lr, warmup, weight_decay, ponder_weight, seed, eval_every, checkpoint_every, keep_checkpoints);
    if let Some(o) = &a.optimizer {
        t.optimizer = if o == "adamw" { OptimizerKind::Adamw } else { OptimizerKind::Adam };
    }
    if a.no_compensate {
        t.compensate = false;
    }
    if a.model.is_some() {
        file.model = a.model.clone();
    }
    if a.weights.is_some() {
        file.weights = a.weights.clone();
    }
    if a.tokenizer.is_some() {
        file.tokenizer = a.tokenizer.clone();
    }
    file.data.text.extend(a.text.iter().cloned());
    file.data.jsonl.extend(a.jsonl.iter().cloned());
    file.data.shards.extend(a.shards.iter().cloned());
    if a.jsonl_field.is_some() {
        file.data.jsonl_field = a.jsonl_field.clone();
    }
    if let Some(d) = &a.shard_dtype {
        file.data.shard_dtype = Some(if d == "u32" { ShardDtype::U32 } else { ShardDtype::U16 });
    }
    t.validate().map_err(anyhow::Error::msg)?;
    Ok((file, t))
}

/// Token ids of the corpus, and a description of where they came from.
fn load_tokens(file: &FileConfig, a: &Args, vocab: usize) -> Result<(Vec<u32>, String)> {
    let d = &file.data;
    if !d.shards.is_empty() {
        let dtype = d.shard_dtype.unwrap_or(ShardDtype::U16);
        let mut ids = Vec::new();
        for p in &d.shards {
            ids.extend(corpus::read_shard(p, dtype)?);
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            bail!("shard token id {bad} is outside the model's vocabulary of {vocab}");
        }
        return Ok((ids, format!("{} shard(s)", d.shards.len())));
    }
    let tok = tokenizer::load(file.tokenizer.as_deref().unwrap_or("bytes"))?;
    let n = tok.get_vocab_size(true);
    if n > vocab {
        bail!("the tokenizer has {n} tokens but the model's vocabulary is {vocab}: use a matching model config");
    }
    let mut docs: Vec<String> = Vec::new();
    for p in &d.text {
        docs.push(corpus::read_text(p)?);
    }
    for p in &d.jsonl {
        docs.extend(corpus::read_jsonl(p, d.jsonl_field.as_deref().unwrap_or("text"))?);
    }
    let origin = if d.text.is_empty() && d.jsonl.is_empty() {
        docs.push(corpus::synthetic(0, a.synthetic_chars));
        format!("the built-in synthetic corpus ({} characters, seed 0)", a.synthetic_chars)
    } else {
        format!("{} document(s)", docs.len())
    };
    let mut ids = Vec::new();
    for doc in &docs {
        ids.extend(tokenizer::encode(&tok, doc)?.into_iter().map(|i| i as u32));
    }
    if ids.is_empty() {
        bail!("the corpus is empty ({origin})");
    }
    Ok((ids, origin))
}

struct Metrics {
    jsonl: std::fs::File,
    csv: std::fs::File,
    train: Vec<(f64, f64)>,
    eval: Vec<(f64, f64)>,
}

impl Metrics {
    /// Open the metrics files; on resume keep only the lines up to `step`.
    fn open(dir: &Path, step: u64) -> Result<Metrics> {
        let jsonl_path = dir.join("metrics.jsonl");
        let mut kept = Vec::new();
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        if step > 0 {
            for line in std::fs::read_to_string(&jsonl_path).unwrap_or_default().lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                let s = v["step"].as_u64().unwrap_or(u64::MAX);
                if s <= step {
                    if let Some(l) = v["loss"].as_f64() {
                        train.push((s as f64, l));
                    }
                    if let Some(l) = v["eval_loss"].as_f64() {
                        eval.push((s as f64, l));
                    }
                    kept.push(line.to_string());
                }
            }
        }
        let mut jsonl = std::fs::File::create(&jsonl_path)?;
        for l in &kept {
            writeln!(jsonl, "{l}")?;
        }
        let csv_path = dir.join("metrics.csv");
        let mut csv = std::fs::File::create(&csv_path)?;
        writeln!(csv, "step,loss,lm_loss,ponder_cost,lr,grad_norm,tokens_per_s,eval_loss")?;
        // The CSV is rebuilt from the kept JSON lines, so both files agree after a resume.
        for line in &kept {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let field = |k: &str| v.get(k).filter(|x| !x.is_null()).map(|x| x.to_string()).unwrap_or_default();
            let cols = ["step", "loss", "lm_loss", "ponder_cost", "lr", "grad_norm", "tokens_per_s", "eval_loss"].map(field);
            writeln!(csv, "{}", cols.join(","))?;
        }
        Ok(Metrics { jsonl, csv, train, eval })
    }

    fn step(&mut self, e: &Event, tps: f64, elapsed: f64) -> Result<()> {
        if let Event::Step { step, loss, lm_loss, ponder_cost, lr, grad_norm, tokens } = e {
            let line = serde_json::json!({"step": step, "loss": loss, "lm_loss": lm_loss, "ponder_cost": ponder_cost, "lr": lr,
                "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tps, "elapsed_s": elapsed});
            writeln!(self.jsonl, "{line}")?;
            writeln!(self.csv, "{step},{loss},{lm_loss},{ponder_cost},{lr},{grad_norm},{tps},")?;
            self.train.push((*step as f64, *loss));
        }
        Ok(())
    }

    fn eval(&mut self, step: u64, loss: f64) -> Result<()> {
        writeln!(self.jsonl, "{}", serde_json::json!({"step": step, "eval_loss": loss}))?;
        writeln!(self.csv, "{step},,,,,,,{loss}")?;
        self.eval.push((step as f64, loss));
        Ok(())
    }

    fn plot(&self, path: &Path) -> Result<()> {
        line_chart(path, "sparkc train — loss", "optimizer step", "loss (nats/token)", &[
            Series { name: "train (total)", points: &self.train, color: RGBColor(31, 119, 180) },
            Series { name: "held-out (LM)", points: &self.eval, color: RGBColor(214, 39, 40) },
        ])
    }
}

/// NeuronSpark's natural-gradient compensation (spec §7) as a trainer hook.
pub fn compensation_hook(cfg: &sparkc_frontend::NeuronSparkConfig, c_max: f64) -> GradHook {
    let cfg2 = cfg.clone();
    GradHook { keys: compensated_keys(cfg), rewrite: Box::new(move |g, p| compensate_gradients(g, p, &cfg2, c_max)) }
}

pub fn run(a: Args) -> Result<()> {
    if a.kept_layers > 0 && a.backend != "cuda" {
        anyhow::bail!("--kept-layers applies to --backend cuda (the {} backend keeps every layer's activations anyway)", a.backend);
    }
    let (file, tcfg) = resolve(&a)?;
    let cfg = load_config(file.model.as_deref().unwrap_or("tiny"), None)?;
    let (tokens, origin) = load_tokens(&file, &a, cfg.vocab_size)?;
    let data = PackedData::new(tokens, tcfg.seq_len, tcfg.eval_fraction)?;
    let init_seed = Some(tcfg.seed);
    let params = load_weights(&cfg, file.weights.as_deref(), init_seed)?;

    let graph = build_graph(&cfg, &GraphOptions { with_loss: true, ponder_weight: tcfg.ponder_weight, debug_outputs: false })?;
    let graph = crate::backend::prepare_training(&a.backend, graph, "total_loss", a.kept_layers)?;
    let program = crate::backend::executor(&a.backend, &a.precision, &graph)?;
    let neuron = neuron_group_keys(&cfg);
    let hook = tcfg.compensate.then(|| compensation_hook(&cfg, tcfg.c_max));
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let ckpt_dir = a.out.join("checkpoints");
    let mut trainer = Trainer::new(program, params, &neuron, data, tcfg.clone(), cfg.to_json(), hook, &ckpt_dir)?;
    if a.resume {
        let dir = checkpoint::latest(&ckpt_dir).with_context(|| format!("--resume: no checkpoint in {}", ckpt_dir.display()))?;
        trainer.resume(&dir)?;
        eprintln!("resumed from {} (step {})", dir.display(), trainer.state.step);
    }
    let d = trainer.data();
    eprintln!(
        "training NeuronSpark (D {}, N {}, K {}, {} layers, D_ff {}, vocab {}) on {origin}: {} tokens, {} train / {} held-out windows of {}",
        cfg.d, cfg.n, cfg.k, cfg.num_layers, cfg.d_ff, cfg.vocab_size, d.tokens(), d.train_windows(), d.eval_windows(), tcfg.seq_len
    );
    std::fs::write(a.out.join("config.json"), cfg.to_json())?;
    let mut metrics = Metrics::open(&a.out, trainer.state.step)?;
    let plot_path = a.out.join("loss.png");

    let bar = ProgressBar::new(tcfg.steps);
    bar.set_style(ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]").expect("valid template"));
    if a.quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_position(trainer.state.step);
    let start = Instant::now();
    let first_step = trainer.state.step;
    let mut last_eval = None;
    let mut steps_here = 0;
    let mut first_loss = None;
    let mut last_loss = f64::NAN;
    let mut step_secs = Vec::new();
    while trainer.state.step < tcfg.steps {
        let t0 = Instant::now();
        let e = trainer.step()?;
        let dt = t0.elapsed().as_secs_f64();
        step_secs.push(dt);
        let Event::Step { step, loss, tokens, lr, .. } = e else { unreachable!("step reports a step") };
        let tps = tokens as f64 / dt;
        metrics.step(&e, tps, start.elapsed().as_secs_f64())?;
        first_loss.get_or_insert(loss);
        last_loss = loss;
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s{}", last_eval.map(|l: f64| format!(" eval {l:.4}")).unwrap_or_default()));
        steps_here += 1;
        let last = step == tcfg.steps || a.stop_after == Some(steps_here);
        if (tcfg.eval_every > 0 && step % tcfg.eval_every == 0) || last {
            if let Some(l) = trainer.evaluate()? {
                last_eval = Some(l);
                metrics.eval(step, l)?;
            }
            metrics.plot(&plot_path)?;
        }
        if (tcfg.checkpoint_every > 0 && step % tcfg.checkpoint_every == 0) || last {
            let note = match trainer.save() {
                Ok(p) => format!("checkpoint {}", p.display()),
                Err(e) => format!("warning: {e}; the previous checkpoints are kept"),
            };
            // A hidden bar swallows println: print plainly when quiet.
            if a.quiet {
                eprintln!("{note}");
            } else {
                bar.println(note);
            }
        }
        if last {
            break;
        }
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let done = trainer.state.step - first_step;
    // The final weights, loadable by `run` and `generate`.
    if let Some(latest) = checkpoint::latest(&ckpt_dir) {
        std::fs::copy(checkpoint::weights_path(&latest), a.out.join("model.safetensors"))?;
    }
    // The typical step: the median after the first (which compiles on a GPU), without
    // evaluation and checkpoints.
    let steady = (step_secs.len() > 1).then(|| median(step_secs[1..].to_vec()));
    let step_tokens = (tcfg.batch_size * tcfg.grad_accum * tcfg.seq_len) as f64;
    let summary = serde_json::json!({
        "steps": trainer.state.step, "steps_this_run": done, "seconds": secs,
        "tokens_seen": trainer.state.tokens_seen,
        "tokens_per_second": trainer.state.tokens_seen as f64 / secs.max(1e-9) * done as f64 / trainer.state.step.max(1) as f64,
        "median_step_seconds": steady, "median_step_tokens_per_second": steady.map(|s| step_tokens / s),
        "first_loss": first_loss, "final_loss": last_loss, "final_eval_loss": last_eval,
    });
    std::fs::write(a.out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    println!("trained {done} steps in {secs:.1} s ({:.0} tokens/s overall)", done as f64 * step_tokens / secs.max(1e-9));
    if let Some(s) = steady {
        println!("a step takes {:.0} ms ({:.0} tokens/s): median after the first, without evaluation and checkpoints", s * 1e3, step_tokens / s);
    }
    if let Some(f) = first_loss {
        println!("loss {f:.4} → {last_loss:.4}{}", last_eval.map(|l| format!(", held-out {l:.4}")).unwrap_or_default());
    }
    println!("run directory {}: model.safetensors, config.json, checkpoints/, metrics.jsonl, metrics.csv, loss.png", a.out.display());
    println!("next: sparkc generate --config {0}/config.json --weights {0}/model.safetensors --tokenizer bytes --prompt \"The \" --max-new-tokens 200", a.out.display());
    Ok(())
}
