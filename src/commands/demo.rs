//! `sparkc demo`: the embedded default — a tiny model from a seed, inspected and generating.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the model is written.
    #[arg(short, long, default_value = "sparkc-demo")]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    println!("== 1. initialise a tiny NeuronSpark from seed {} ==", a.seed);
    super::init::run(super::init::Args { config: "tiny".into(), seed: a.seed, out: a.out.clone(), boundary: None })?;
    let config = a.out.join("config.json").display().to_string();
    let weights = a.out.join("model.safetensors");
    println!("\n== 2. inspect it ==");
    super::inspect::run(super::inspect::Args { model: None, config: Some(config.clone()), weights: Some(weights.clone()), emit: None, boundary: None })?;
    println!("\n== 3. generate from it (random weights, so expect random bytes) ==");
    super::generate::run(super::generate::Args {
        config,
        weights: Some(weights),
        init_seed: None,
        prompt_tensor: None,
        prompt: Some("Spiking networks ".into()),
        tokenizer: Some("bytes".into()),
        max_new_tokens: 48,
        temperature: 0.8,
        top_k: 50,
        top_p: None,
        seed: a.seed,
        eos_id: None,
        out: None,
        boundary: None,
        backend: "cpu".into(),
    })
}
