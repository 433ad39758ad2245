//! `sparkc init`: write config.json and a seeded random initialisation (spec §10).

use crate::model_source::load_config;
use anyhow::{Context, Result};
use sparkc_frontend::checkpoint::save_checkpoint;
use sparkc_frontend::init::init_params;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// config.json, or a preset: tiny, small, neuronspark-0.9b.
    #[arg(long, default_value = "tiny")]
    pub config: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (gets config.json and model.safetensors).
    #[arg(short, long)]
    pub out: PathBuf,
    #[arg(long)]
    pub boundary: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = load_config(&a.config, a.boundary.as_deref())?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let params = init_params(&cfg, a.seed);
    let cfg_path = a.out.join("config.json");
    std::fs::write(&cfg_path, cfg.to_json()).with_context(|| format!("cannot write {}", cfg_path.display()))?;
    let w = a.out.join("model.safetensors");
    save_checkpoint(&w, &params, &cfg)?;
    println!("wrote {} and {} (seed {})", cfg_path.display(), w.display(), a.seed);
    Ok(())
}
