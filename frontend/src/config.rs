//! The HF-style NeuronSpark `config.json` (plus our `boundary` key).

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The boundary activation of the fixed PLIF neurons (spec §3, §19).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Boundary {
    /// (1 − β)·V_post: NeuronSpark-V1 and the HF code.
    Leak,
    /// Raw V_post: the v8.0 code.
    Vpost,
}

impl Boundary {
    pub fn name(self) -> &'static str {
        match self {
            Boundary::Leak => "leak",
            Boundary::Vpost => "vpost",
        }
    }

    pub fn parse(s: &str) -> Option<Boundary> {
        match s {
            "leak" => Some(Boundary::Leak),
            "vpost" => Some(Boundary::Vpost),
            _ => None,
        }
    }
}

fn default_boundary() -> Boundary {
    Boundary::Leak
}

/// Model hyper-parameters. Other keys of an HF config (`model_type`, `auto_map`, ...) are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeuronSparkConfig {
    pub vocab_size: usize,
    #[serde(rename = "D")]
    pub d: usize,
    #[serde(rename = "N")]
    pub n: usize,
    #[serde(rename = "K")]
    pub k: usize,
    pub num_layers: usize,
    #[serde(rename = "D_ff")]
    pub d_ff: usize,
    pub v_th_min: f64,
    #[serde(default = "default_boundary")]
    pub boundary: Boundary,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("config {path} is not a valid NeuronSpark config: {msg}")]
    Invalid { path: String, msg: String },
}

impl NeuronSparkConfig {
    /// The released 0.9B model (spec §1).
    pub fn neuronspark_0_9b() -> NeuronSparkConfig {
        NeuronSparkConfig { vocab_size: 6144, d: 896, n: 8, k: 16, num_layers: 20, d_ff: 2688, v_th_min: 0.1, boundary: Boundary::Leak }
    }

    /// The shape of the golden tiny model (`golden/neuronspark-tiny`).
    pub fn tiny() -> NeuronSparkConfig {
        NeuronSparkConfig { vocab_size: 256, d: 64, n: 4, k: 4, num_layers: 2, d_ff: 128, v_th_min: 0.1, boundary: Boundary::Leak }
    }

    pub fn dn(&self) -> usize {
        self.d * self.n
    }

    pub fn from_json_str(text: &str, origin: &str) -> Result<NeuronSparkConfig, ConfigError> {
        let cfg: NeuronSparkConfig = serde_json::from_str(text)
            .map_err(|e| ConfigError::Invalid { path: origin.to_string(), msg: e.to_string() })?;
        cfg.validate().map_err(|msg| ConfigError::Invalid { path: origin.to_string(), msg })?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<NeuronSparkConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
        NeuronSparkConfig::from_json_str(&text, &path.display().to_string())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Sizes must be positive and small enough that shapes and counts fit in memory arithmetic.
    pub fn validate(&self) -> Result<(), String> {
        let limit = 1usize << 24;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("D", self.d),
            ("N", self.n),
            ("K", self.k),
            ("num_layers", self.num_layers),
            ("D_ff", self.d_ff),
        ] {
            if v == 0 {
                return Err(format!("`{name}` must be positive"));
            }
            if v > limit {
                return Err(format!("`{name}` = {v} is larger than {limit}"));
            }
        }
        if self.d.checked_mul(self.n).is_none_or(|dn| dn > limit) {
            return Err("`D`·`N` is too large".into());
        }
        if !self.v_th_min.is_finite() || self.v_th_min < 0.0 {
            return Err(format!("`v_th_min` must be a finite non-negative number, got {}", self.v_th_min));
        }
        Ok(())
    }
}
