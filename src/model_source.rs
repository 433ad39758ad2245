//! Where a model comes from on the command line: a config (a file or a preset name) and
//! weights (a checkpoint, or a seeded random initialisation).

use anyhow::{bail, Context, Result};
use sparkc_frontend::checkpoint::load_checkpoint;
use sparkc_frontend::{init::init_params, Boundary, NeuronSparkConfig};
use sparkc_ir::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const PRESETS: &[&str] = &["tiny", "small", "neuronspark-0.9b"];

/// `--config` takes a path to an HF-style config.json or a preset name.
pub fn load_config(spec: &str, boundary: Option<&str>) -> Result<NeuronSparkConfig> {
    let mut cfg = match spec {
        "tiny" => NeuronSparkConfig::tiny(),
        // The "D=256, N=8, K=8, 4 layers, D_ff=768" benchmark shape of the issues.
        "small" => NeuronSparkConfig { vocab_size: 256, d: 256, n: 8, k: 8, num_layers: 4, d_ff: 768, v_th_min: 0.1, boundary: Boundary::Leak },
        "neuronspark-0.9b" | "0.9b" => NeuronSparkConfig::neuronspark_0_9b(),
        path => {
            let p = Path::new(path);
            if !p.exists() {
                bail!("config `{path}` is neither a file nor a preset ({})", PRESETS.join(", "));
            }
            NeuronSparkConfig::load(p)?
        }
    };
    if let Some(b) = boundary {
        cfg.boundary = Boundary::parse(b).with_context(|| format!("--boundary must be `leak` or `vpost`, got `{b}`"))?;
    }
    Ok(cfg)
}

/// Parameters from `--weights`, or from `--init-seed` when no weights are given.
pub fn load_weights(cfg: &NeuronSparkConfig, weights: Option<&Path>, init_seed: Option<u64>) -> Result<BTreeMap<String, Tensor>> {
    match (weights, init_seed) {
        (Some(w), _) => Ok(load_checkpoint(w, cfg)?),
        (None, Some(seed)) => Ok(init_params(cfg, seed)),
        (None, None) => bail!("give --weights FILE (or --init-seed N for a random initialisation)"),
    }
}

/// The flags that say which model runs where, shared by `run` and `generate`.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// config.json, or a preset: tiny, small, neuronspark-0.9b.
    #[arg(long)]
    pub config: String,
    /// Checkpoint (safetensors; keys with or without `model.`; F32 or BF16).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Use a seeded random initialisation instead of --weights.
    #[arg(long)]
    pub init_seed: Option<u64>,
    /// Override the config's boundary activation (leak or vpost).
    #[arg(long)]
    pub boundary: Option<String>,
    /// Where to run: cpu or cuda (and, for `generate`, neuro with --program).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Arithmetic on cuda: f32 (exact) or bf16 (bf16 GEMMs and activations, fp32 accumulation).
    #[arg(long, default_value = "f32")]
    pub precision: String,
}

impl ModelArgs {
    pub fn load_config(&self) -> Result<NeuronSparkConfig> {
        load_config(&self.config, self.boundary.as_deref())
    }

    pub fn load_weights(&self, cfg: &NeuronSparkConfig) -> Result<BTreeMap<String, Tensor>> {
        load_weights(cfg, self.weights.as_deref(), self.init_seed)
    }
}
