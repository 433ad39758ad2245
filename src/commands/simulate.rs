//! `sparkc simulate`: run a spike program on the simulated chip with the same inputs and outputs
//! as `sparkc run`, and report what the chip spent (per layer, core and chip), with plots.

use anyhow::{bail, Context, Result};
use sparkc_backend_cpu::kernels::reduce;
use sparkc_backend_neuro::{read_program, Target};
use sparkc_frontend::corpus;
use sparkc_frontend::tensors_io::{read_tensors, write_tensors};
use sparkc_frontend::tokenizer;
use sparkc_ir::Tensor;
use sparkc_runtime::neuro::{plot, ChipSimulator, SimReport};
use sparkc_runtime::{generate, GenerateOptions, Sampler, Session};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The spike program (from `sparkc compile`).
    pub program: PathBuf,
    /// Inputs: a safetensors file (`input_ids` I64 [B,T], optional `target_ids`, `loss_mask`),
    /// or `synthetic:SEED:B:T` (windows of the built-in synthetic corpus, with targets).
    #[arg(long)]
    pub inputs: String,
    /// Where to write `logits`, `ponder_cost` and, with targets, the losses (as `sparkc run`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the report (per layer, core and chip; management cores and host) as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Draw the event raster and per-layer activity into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Outputs of `sparkc run` on the same inputs: print top-1 agreement and the loss change.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Check that the program was compiled for this target.
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Write the inputs used (e.g. a synthetic set) so that `sparkc run` can read the same.
    #[arg(long)]
    pub save_inputs: Option<PathBuf>,
    /// Weight of the ponder cost in `total_loss`.
    #[arg(long, default_value_t = 0.01)]
    pub ponder_weight: f64,
}

/// `synthetic:SEED:B:T`, or a safetensors file. Synthetic windows are consecutive byte-level
/// tokens of the built-in corpus (seed 0 is what `sparkc train` trains on by default; other
/// seeds give text the model has not seen), with `target_ids` the next tokens.
pub fn load_inputs(spec: &str, vocab: Option<usize>) -> Result<BTreeMap<String, Tensor>> {
    if let Some(rest) = spec.strip_prefix("synthetic:") {
        let parts: Vec<&str> = rest.split(':').collect();
        let [seed, b, t] = parts.as_slice() else { bail!("synthetic inputs are `synthetic:SEED:B:T`, got `{spec}`") };
        let (seed, b, t): (u64, usize, usize) = (seed.parse()?, b.parse()?, t.parse()?);
        if b == 0 || t == 0 {
            bail!("`{spec}`: B and T must be positive");
        }
        if vocab.is_some_and(|v| v < 256) {
            bail!("synthetic inputs are bytes; the model's vocabulary ({}) is smaller than 256", vocab.unwrap_or(0));
        }
        let need = b * (t + 1);
        let text = corpus::synthetic(seed, need * 2 + 256);
        let ids = tokenizer::encode(&tokenizer::byte_level(), &text)?;
        if ids.len() < need {
            bail!("the synthetic corpus is too short for {b} x {t} tokens");
        }
        let mut input = Vec::with_capacity(b * t);
        let mut target = Vec::with_capacity(b * t);
        for r in 0..b {
            let w = &ids[r * (t + 1)..(r + 1) * (t + 1)];
            input.extend_from_slice(&w[..t]);
            target.extend_from_slice(&w[1..]);
        }
        return Ok(BTreeMap::from([
            ("input_ids".to_string(), Tensor::i64(vec![b, t], input)),
            ("target_ids".to_string(), Tensor::i64(vec![b, t], target)),
        ]));
    }
    Ok(read_tensors(Path::new(spec))?)
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
}

/// `logits`, `ponder_cost` and, with targets, the losses of `sparkc run` (the host computes the
/// loss from the chip's logits with the CPU backend's kernels).
fn run_outputs(out: &BTreeMap<String, Tensor>, inputs: &BTreeMap<String, Tensor>, ponder_weight: f64) -> Result<BTreeMap<String, Tensor>> {
    let logits = out.get("logits").context("the program has no `logits` output")?;
    let mut result = BTreeMap::from([("logits".to_string(), logits.clone())]);
    let ponder = out.get("ponder_cost").map(|t| t.to_f32_vec()[0]);
    if let Some(pc) = ponder {
        result.insert("ponder_cost".into(), Tensor::f32(vec![1], vec![pc]));
    }
    if let Some(targets) = inputs.get("target_ids") {
        let ids = targets.as_i64().context("`target_ids` must be integers")?;
        let v = *logits.shape.last().unwrap_or(&1);
        let ce = reduce::cross_entropy(logits.as_f32().context("logits must be f32")?, ids, v, 0).map_err(anyhow::Error::msg)?;
        let mask: Vec<f32> = match inputs.get("loss_mask") {
            Some(m) => m.to_f32_vec(),
            None => ids.iter().map(|&x| (x != 0) as u8 as f32).collect(),
        };
        let lm = reduce::masked_mean(&ce, &mask);
        result.insert("ce_per_token".into(), Tensor::f32(vec![ce.len()], ce));
        result.insert("lm_loss".into(), Tensor::f32(vec![1], vec![lm]));
        result.insert("total_loss".into(), Tensor::f32(vec![1], vec![lm + (ponder_weight as f32) * ponder.unwrap_or(0.0)]));
    }
    Ok(result)
}

pub fn print_report(r: &SimReport) {
    let t = &r.totals;
    println!("simulated {} token(s) ({} frames) on {} core(s) of {} chip(s) of target `{}`", r.tokens, r.frames, r.cores, r.chips, r.target);
    println!("  synaptic ops {}, neuron updates {} ({} active), events {} of {} payloads ({:.1}% suppressed), partial sums {}, hops {} (+{} chip-to-chip)",
        t.synops, t.neuron_updates, t.active_updates, t.events, t.payloads,
        100.0 * (1.0 - t.events as f64 / t.payloads.max(1) as f64), t.partial_sums, t.hops, t.chip_hops);
    let e = &t.energy;
    println!(
        "  energy {:.3e} pJ: synops {:.3e}, neurons {:.3e}, routing {:.3e}, management cores {:.3e}, host {:.3e}",
        e.total_pj, e.synops_pj, e.neuron_updates_pj, e.routing_pj, e.management_pj, e.host_pj
    );
    println!(
        "  per token: {:.3} uJ in total, {:.3} uJ on the chip(s) without the host; estimated time {:.3} ms per token",
        t.energy_per_token_pj * 1e-6,
        t.chip_energy_per_token_pj * 1e-6,
        t.time_per_token_s * 1e3
    );
    println!("  simulator: {:.2} s wall, {:.3e} synaptic events/s", t.wall_s, t.synops_per_second);
    println!("  {:<44} {:>7} {:>6} {:>12} {:>10} {:>11} {:>12}", "layer", "neurons", "cores", "synops", "events", "event rate", "energy pJ");
    for l in &r.layers {
        println!("  {:<44} {:>7} {:>6} {:>12} {:>10} {:>10.1}% {:>12.3e}", l.name, l.neurons, l.cores, l.synops, l.events, 100.0 * l.event_rate, l.energy_pj);
    }
    for s in &r.management {
        println!("  management core (chip {}): {:<40} {:>12} ops {:>12.3e} pJ", s.chip.unwrap_or(0), s.name, s.ops, s.energy_pj);
    }
    for s in &r.host {
        println!("  host: {:<56} {:>12} ops {:>12.3e} pJ", s.name, s.ops, s.energy_pj);
    }
}

pub fn run(a: Args) -> Result<()> {
    let program = read_program(&a.program)?;
    if let Some(t) = &a.target {
        let want = Target::load(t)?;
        if want != program.target {
            bail!("{} was compiled for target `{}`, not for {} (`{}`); recompile it", a.program.display(), program.target.name, t.display(), want.name);
        }
    }
    let inputs = load_inputs(&a.inputs, None)?;
    if let Some(path) = &a.save_inputs {
        write_tensors(path, &inputs, None)?;
        println!("wrote {}", path.display());
    }
    let mut sim = ChipSimulator::new(program)?;
    let mut session = Session::new(sim_executor(&mut sim), BTreeMap::new());
    // The batch: the leading dim of an input the program declares as [B, ...].
    let b = sim_batch(&session, &inputs)?;
    session.reset(b);
    let out = session.step(inputs.clone())?;
    drop(session);
    let result = if out.contains_key("logits") { run_outputs(&out, &inputs, a.ponder_weight)? } else { out.clone() };
    let report = sim.report();
    print_report(&report);
    if let Some(lm) = result.get("lm_loss") {
        println!("  lm_loss {:.6}", lm.to_f32_vec()[0]);
    }
    if let Some(path) = &a.compare {
        let reference = read_tensors(path)?;
        if !result.contains_key("logits") {
            for (k, ours) in &result {
                if let Some(theirs) = reference.get(k).filter(|t| t.shape == ours.shape) {
                    let d = ours.to_f32_vec().iter().zip(theirs.to_f32_vec()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                    println!("  `{k}`: max |difference| to the reference {d:.4e}");
                }
            }
        }
        let Some(theirs) = reference.get("logits").filter(|_| result.contains_key("logits")) else { return finish(&a, &result, &report, &sim) };
        let ours = &result["logits"];
        if ours.shape != theirs.shape {
            bail!("reference logits are {:?}, the chip's {:?}", theirs.shape, ours.shape);
        }
        let v = *ours.shape.last().unwrap_or(&1);
        let (x, y) = (ours.to_f32_vec(), theirs.to_f32_vec());
        let rows = x.len() / v.max(1);
        let agree = (0..rows).filter(|&r| argmax(&x[r * v..(r + 1) * v]) == argmax(&y[r * v..(r + 1) * v])).count();
        println!("  top-1 agreement with the reference: {agree}/{rows} = {:.2}%", 100.0 * agree as f64 / rows.max(1) as f64);
        if let (Some(l1), Some(l0)) = (result.get("lm_loss"), reference.get("lm_loss")) {
            let (l1, l0) = (l1.to_f32_vec()[0] as f64, l0.to_f32_vec()[0] as f64);
            println!("  lm_loss {l1:.6} vs reference {l0:.6}: {:+.3}%", 100.0 * (l1 - l0) / l0);
        }
    }
    finish(&a, &result, &report, &sim)
}

/// Write the outputs, the report and the plots.
fn finish(a: &Args, result: &BTreeMap<String, Tensor>, report: &SimReport, sim: &ChipSimulator) -> Result<()> {
    if let Some(path) = &a.out {
        write_tensors(path, result, None)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.report {
        std::fs::write(path, report.to_json()).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(dir) = &a.plots {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        plot::raster(&dir.join("raster.png"), sim.recording())?;
        plot::activity(&dir.join("activity.png"), sim.recording(), report)?;
        println!("wrote {} and {}", dir.join("raster.png").display(), dir.join("activity.png").display());
    }
    Ok(())
}

fn sim_batch<E: sparkc_runtime::Executor>(session: &Session<E>, inputs: &BTreeMap<String, Tensor>) -> Result<usize> {
    let g = session.executor().graph();
    g.inputs()
        .into_iter()
        .find_map(|(_, name, ty)| (ty.shape.dims().first() == Some(&sparkc_ir::Dim::sym("B"))).then(|| inputs.get(name)).flatten())
        .and_then(|t| t.shape.first().copied())
        .context("the inputs do not give the batch size (no input the program declares as [B, ...])")
}

/// A borrowed simulator as a session's executor (the report stays with the simulator).
fn sim_executor(sim: &mut ChipSimulator) -> SimRef<'_> {
    SimRef(sim)
}

struct SimRef<'a>(&'a mut ChipSimulator);

impl sparkc_runtime::Executor for SimRef<'_> {
    fn graph(&self) -> &sparkc_ir::Graph {
        self.0.signature()
    }

    fn execute(&mut self, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, sparkc_runtime::RuntimeError> {
        sparkc_runtime::Executor::execute(self.0, inputs, params)
    }
}

/// `sparkc generate --backend neuro`: generate on the simulated chip from a spike program.
/// Returns the rows (prompt + generated) and the chip's report over the whole generation.
pub fn generate_on_chip(
    program: &Path,
    prompt: &[Vec<i64>],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    on_token: impl FnMut(usize),
) -> Result<(Vec<Vec<i64>>, SimReport)> {
    let mut sim = ChipSimulator::new(read_program(program)?)?;
    let rows = {
        let mut session = Session::new(sim_executor(&mut sim), BTreeMap::new());
        generate(&mut session, prompt, opts, sampler, on_token)?
    };
    Ok((rows, sim.report()))
}
