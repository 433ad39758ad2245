//! `sparkc generate`: prefill the prompt, then sample token by token with the state carried.

use crate::model_source::ModelArgs;
use sparkc_frontend::tokenizer;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::tensors_io::{read_tensors, write_tensors};
use sparkc_ir::Tensor;
use sparkc_runtime::{generate, GenerateOptions, Sampler, Session};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt ids as FILE:KEY, an integer tensor [B,T] or [T] in a safetensors file.
    #[arg(long, conflicts_with = "prompt")]
    pub prompt_tensor: Option<String>,
    /// Prompt text (needs --tokenizer).
    #[arg(long, requires = "tokenizer")]
    pub prompt: Option<String>,
    /// tokenizer.json, or `bytes` for the built-in byte-level tokenizer.
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long)]
    pub max_new_tokens: usize,
    /// 0 samples greedily.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when every row has just produced this id.
    #[arg(long)]
    pub eos_id: Option<i64>,
    /// Write `tokens` (I64 [B, prompt+generated]) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The spike program for `--backend neuro` (from `sparkc compile`).
    #[arg(long)]
    pub program: Option<PathBuf>,
}

fn prompt_rows(a: &Args, tok: Option<&tokenizers::Tokenizer>) -> Result<Vec<Vec<i64>>> {
    if let Some(spec) = &a.prompt_tensor {
        let (file, key) = spec.rsplit_once(':').with_context(|| format!("--prompt-tensor must be FILE:KEY, got `{spec}`"))?;
        let tensors = read_tensors(std::path::Path::new(file))?;
        let t = tensors.get(key).with_context(|| format!("{file} has no tensor `{key}` (it has: {})", tensors.keys().cloned().collect::<Vec<_>>().join(", ")))?;
        let ids = t.as_i64().with_context(|| format!("`{key}` must be an integer tensor, got {}", t.dtype()))?;
        return match t.shape.as_slice() {
            [_] => Ok(vec![ids.to_vec()]),
            [_, n] if *n > 0 => Ok(ids.chunks(*n).map(<[i64]>::to_vec).collect()),
            other => bail!("`{key}` must be [T] or [B,T] and non-empty, got {other:?}"),
        };
    }
    match (&a.prompt, tok) {
        (Some(text), Some(tok)) => Ok(vec![tokenizer::encode(tok, text)?]),
        _ => bail!("give --prompt-tensor FILE:KEY, or --prompt TEXT with --tokenizer"),
    }
}

pub fn run(a: Args) -> Result<()> {
    let cfg = a.model.load_config()?;
    let tok = a.tokenizer.as_deref().map(tokenizer::load).transpose()?;
    if let Some(t) = &tok {
        let n = t.get_vocab_size(true);
        if n > cfg.vocab_size {
            bail!("the tokenizer has {n} tokens but the model's vocabulary is {}", cfg.vocab_size);
        }
    }
    let prompt = prompt_rows(&a, tok.as_ref())?;
    if prompt.iter().any(|r| r.is_empty()) {
        bail!("the prompt is empty");
    }
    if let Some(bad) = prompt.iter().flatten().find(|&&id| id < 0 || id as usize >= cfg.vocab_size) {
        bail!("prompt token id {bad} is outside the vocabulary of {}", cfg.vocab_size);
    }
    let mut sampler = Sampler::new(a.temperature, Some(a.top_k).filter(|&k| k > 0), a.top_p, a.seed);
    let bar = ProgressBar::new(a.max_new_tokens as u64);
    bar.set_style(ProgressStyle::with_template("{spinner} generating {pos}/{len} tokens [{elapsed_precise}] {per_sec}").expect("valid template"));
    if a.max_new_tokens < 32 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, eos_id: a.eos_id };
    let start = Instant::now();
    let rows = if a.model.backend == "neuro" {
        let p = a.program.as_deref().context("--backend neuro needs --program model.spk (from `sparkc compile`)")?;
        let (rows, report) = crate::commands::simulate::generate_on_chip(p, &prompt, &opts, &mut sampler, |n| bar.set_position(n as u64))?;
        bar.finish_and_clear();
        crate::commands::simulate::print_report(&report);
        rows
    } else {
        let params = a.model.load_weights(&cfg)?;
        let graph = crate::backend::prepare_generation(&a.model.backend, build_graph(&cfg, &GraphOptions::default())?)?;
        let mut session = Session::new(crate::backend::executor(&a.model.backend, &a.model.precision, &graph)?, params);
        generate(&mut session, &prompt, &opts, &mut sampler, |n| bar.set_position(n as u64))?
    };
    bar.finish_and_clear();
    let generated = rows[0].len() - prompt[0].len();
    let secs = start.elapsed().as_secs_f64();
    eprintln!("generated {generated} tokens x {} rows in {secs:.2} s ({:.1} tokens/s)", rows.len(), (generated * rows.len()) as f64 / secs);
    for (i, row) in rows.iter().enumerate() {
        match &tok {
            Some(t) => println!("[{i}] {}", tokenizer::decode(t, row)?),
            None => println!("[{i}] {row:?}"),
        }
    }
    if let Some(out) = &a.out {
        let width = rows[0].len();
        let t = Tensor::i64(vec![rows.len(), width], rows.into_iter().flatten().collect());
        write_tensors(out, &BTreeMap::from([("tokens".to_string(), t)]), None)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
