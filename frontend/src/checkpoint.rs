//! NeuronSpark checkpoints: loading with full validation against [`param_specs`], and saving.
//!
//! The original loaders use `strict=False`, so a typo in a key silently leaves a parameter at its
//! random init (spec §18 item 13). Here every problem is collected and reported in one error:
//! every missing key, every unexpected key, every mis-shaped key, every non-float parameter and
//! every parameter holding NaN/Inf — a user fixing a converter sees the whole picture at once.
//!
//! Accepted input: HF files (every key prefixed with `model.`) and raw state dicts (no prefix),
//! with F32, BF16, F16 or F64 values; everything comes back as F32 under the raw key.

use crate::config::NeuronSparkConfig;
use crate::params::param_specs;
use crate::tensors_io::{self, IoError, SafetensorsContents, StDtype};
use sparkc_ir::tensor::{Tensor, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

/// The key prefix of the HF `model.safetensors` export.
pub const HF_PREFIX: &str = "model.";

/// How many entries of each list [`CheckpointReport`]'s Display prints before "... and N more".
pub const REPORT_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// Some keys carry the `model.` prefix and some do not.
    #[error(
        "{path}: checkpoint mixes keys with the `model.` prefix (e.g. `{with_prefix}`) and without it \
         (e.g. `{without_prefix}`); use one convention for all keys"
    )]
    MixedPrefix { path: String, with_prefix: String, without_prefix: String },
    /// The tensors do not match the model's parameter table.
    #[error("{0}")]
    Mismatch(Box<CheckpointReport>),
}

/// A problem with a key that is expected and present.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeMismatch {
    pub key: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// Everything wrong with a checkpoint, by key. Keys are the raw names (prefix stripped).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckpointReport {
    /// The file (or other origin) checked.
    pub path: String,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub misshaped: Vec<ShapeMismatch>,
    /// Parameters stored with a non-float dtype, with that dtype's name.
    pub non_float: Vec<(String, String)>,
    /// Parameters holding NaN or ±Inf, with how many such values.
    pub non_finite: Vec<(String, usize)>,
}

impl CheckpointReport {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.misshaped.is_empty()
            && self.non_float.is_empty()
            && self.non_finite.is_empty()
    }

    /// Every key the report names, for callers that want to match on them.
    pub fn keys(&self) -> Vec<&str> {
        let mut v: Vec<&str> = Vec::new();
        v.extend(self.missing.iter().map(String::as_str));
        v.extend(self.unexpected.iter().map(String::as_str));
        v.extend(self.misshaped.iter().map(|m| m.key.as_str()));
        v.extend(self.non_float.iter().map(|(k, _)| k.as_str()));
        v.extend(self.non_finite.iter().map(|(k, _)| k.as_str()));
        v
    }
}

fn write_list<T>(f: &mut fmt::Formatter<'_>, title: &str, items: &[T], line: impl Fn(&T) -> String) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    writeln!(f)?;
    write!(f, "  {} {title}:", items.len())?;
    for item in items.iter().take(REPORT_LINES) {
        writeln!(f)?;
        write!(f, "    {}", line(item))?;
    }
    if items.len() > REPORT_LINES {
        writeln!(f)?;
        write!(f, "    ... and {} more", items.len() - REPORT_LINES)?;
    }
    Ok(())
}

impl fmt::Display for CheckpointReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: checkpoint does not match the model config", self.path)?;
        write_list(f, "missing keys", &self.missing, |k| format!("`{k}`"))?;
        write_list(f, "unexpected keys", &self.unexpected, |k| format!("`{k}`"))?;
        write_list(f, "keys with the wrong shape", &self.misshaped, |m| {
            format!("`{}`: expected {:?}, found {:?}", m.key, m.expected, m.found)
        })?;
        write_list(f, "keys with a non-float dtype", &self.non_float, |(k, d)| {
            format!("`{k}`: {d} (parameters must be F32, BF16, F16 or F64)")
        })?;
        write_list(f, "keys with NaN/Inf values", &self.non_finite, |(k, n)| format!("`{k}`: {n} non-finite values"))
    }
}

/// Load a checkpoint for `cfg`: keys without prefix, all F32, validated against `param_specs(cfg)`.
pub fn load_checkpoint(path: &Path, cfg: &NeuronSparkConfig) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let contents = tensors_io::read_safetensors(path)?;
    check_contents(contents, cfg, &path.display().to_string())
}

/// [`load_checkpoint`] on an in-memory file; `origin` names it in errors.
pub fn load_checkpoint_from_bytes(
    bytes: &[u8],
    origin: &str,
    cfg: &NeuronSparkConfig,
) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let contents = tensors_io::read_safetensors_from_bytes(bytes, origin)?;
    check_contents(contents, cfg, origin)
}

fn check_contents(
    contents: SafetensorsContents,
    cfg: &NeuronSparkConfig,
    origin: &str,
) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let SafetensorsContents { tensors, source_dtypes, .. } = contents;
    let with = tensors.keys().find(|k| k.starts_with(HF_PREFIX));
    let without = tensors.keys().find(|k| !k.starts_with(HF_PREFIX));
    let strip = match (with, without) {
        (Some(w), Some(wo)) => {
            return Err(CheckpointError::MixedPrefix {
                path: origin.to_string(),
                with_prefix: w.clone(),
                without_prefix: wo.clone(),
            })
        }
        (Some(_), None) => true,
        _ => false,
    };
    let raw = |k: &str| if strip { k.strip_prefix(HF_PREFIX).unwrap_or(k).to_string() } else { k.to_string() };
    let dtypes: HashMap<String, StDtype> = source_dtypes.into_iter().map(|(k, d)| (raw(&k), d)).collect();
    let params: BTreeMap<String, Tensor> = tensors.into_iter().map(|(k, t)| (raw(&k), t)).collect();
    validate_params_inner(&params, cfg, origin, &dtypes)?;
    Ok(params)
}

/// Check a parameter set against `param_specs(cfg)`: exactly the expected keys, shapes, F32
/// values, all finite. `origin` names the set in the error.
pub fn validate_params(
    params: &BTreeMap<String, Tensor>,
    cfg: &NeuronSparkConfig,
    origin: &str,
) -> Result<(), CheckpointError> {
    validate_params_inner(params, cfg, origin, &HashMap::new())
}

fn validate_params_inner(
    params: &BTreeMap<String, Tensor>,
    cfg: &NeuronSparkConfig,
    origin: &str,
    source_dtypes: &HashMap<String, StDtype>,
) -> Result<(), CheckpointError> {
    let specs = param_specs(cfg);
    let mut report = CheckpointReport { path: origin.to_string(), ..CheckpointReport::default() };
    for spec in &specs {
        let Some(t) = params.get(&spec.key) else {
            report.missing.push(spec.key.clone());
            continue;
        };
        if t.shape != spec.shape {
            report.misshaped.push(ShapeMismatch {
                key: spec.key.clone(),
                expected: spec.shape.clone(),
                found: t.shape.clone(),
            });
        }
        match &t.data {
            TensorData::F32(v) => {
                let bad = v.iter().filter(|x| !x.is_finite()).count();
                if bad > 0 {
                    report.non_finite.push((spec.key.clone(), bad));
                }
            }
            TensorData::I64(_) => {
                let name = source_dtypes.get(&spec.key).map_or("I64", |d| d.name());
                report.non_float.push((spec.key.clone(), name.to_string()));
            }
        }
    }
    let expected: std::collections::HashSet<&str> = specs.iter().map(|s| s.key.as_str()).collect();
    report.unexpected = params.keys().filter(|k| !expected.contains(k.as_str())).cloned().collect();
    if report.is_empty() {
        Ok(())
    } else {
        Err(CheckpointError::Mismatch(Box::new(report)))
    }
}

/// Save parameters under their raw keys (no prefix), F32, with `cfg.to_json()` in the metadata
/// under `"config"`, atomically. The set is validated first, so a saved file always loads.
pub fn save_checkpoint(
    path: &Path,
    params: &BTreeMap<String, Tensor>,
    cfg: &NeuronSparkConfig,
) -> Result<(), CheckpointError> {
    validate_params(params, cfg, &path.display().to_string())?;
    let metadata: HashMap<String, String> =
        [("config".to_string(), cfg.to_json()), ("format".to_string(), "pt".to_string())].into();
    tensors_io::write_tensors(path, params, Some(metadata))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_caps_long_lists() {
        let report = CheckpointReport {
            path: "f".into(),
            missing: (0..25).map(|i| format!("k{i}")).collect(),
            ..CheckpointReport::default()
        };
        let text = report.to_string();
        assert!(text.contains("25 missing keys"));
        assert!(text.contains("`k19`"));
        assert!(!text.contains("`k20`"));
        assert!(text.contains("... and 5 more"));
    }
}
