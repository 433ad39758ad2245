//! `sparkc demo`: the embedded default, end to end — train the tiny NeuronSpark from a seed on
//! the built-in synthetic corpus, inspect it, and generate text from it.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Optimizer steps (600 takes about three minutes on two cores).
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    /// Run directory.
    #[arg(short, long, default_value = "runs/demo")]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    println!("== 1. train a tiny NeuronSpark (seed {}) on the built-in synthetic corpus ==", a.seed);
    super::train::run(super::train::Args {
        out: a.out.clone(),
        steps: Some(a.steps),
        seed: Some(a.seed),
        synthetic_chars: 400_000,
        backend: "cpu".into(),
        precision: "f32".into(),
        ..Default::default()
    })?;
    let config = a.out.join("config.json").display().to_string();
    let weights = a.out.join("model.safetensors");
    println!("\n== 2. inspect it ==");
    super::inspect::run(super::inspect::Args { model: None, config: Some(config.clone()), weights: Some(weights.clone()), emit: None, boundary: None })?;
    println!("\n== 3. generate from it (loss curve: {}) ==", a.out.join("loss.png").display());
    for (temperature, seed) in [(0.0, 0), (0.8, a.seed)] {
        super::generate::run(super::generate::Args {
            model: crate::model_source::ModelArgs {
                config: config.clone(),
                weights: Some(weights.clone()),
                init_seed: None,
                boundary: None,
                backend: "cpu".into(),
                precision: "f32".into(),
            },
            prompt_tensor: None,
            prompt: Some("The ".into()),
            tokenizer: Some("bytes".into()),
            max_new_tokens: 240,
            temperature,
            top_k: 50,
            top_p: None,
            seed,
            eos_id: None,
            out: None,
            program: None,
        })?;
    }
    Ok(())
}
