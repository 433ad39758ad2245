//! Training checkpoints: one directory per step holding the weights (loadable by `run` and
//! `generate`), the optimizer state and the trainer's position. A checkpoint is written into a
//! temporary directory and renamed into place, so a failed write (a full disk, say) leaves the
//! previous checkpoints as they were; only then are the oldest beyond `keep` removed.

use super::data::Cursor;
use sparkc_frontend::tensors_io::{read_tensors, write_tensors, IoError};
use sparkc_ir::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Everything besides tensors that a resumed run needs to continue bit-identically.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Micro-batches consumed (the learning-rate schedule's clock).
    pub micro: u64,
    pub cursor: Cursor,
    pub tokens_seen: u64,
    /// The optimizer's bias-correction step counter.
    pub optimizer_t: u64,
    /// The data seed (shuffling); resuming with another seed is refused.
    pub seed: u64,
    /// The model config as JSON, checked on resume.
    pub model_config: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("cannot read checkpoint {path}: {msg}")]
    Read { path: String, msg: String },
    #[error(transparent)]
    Tensors(#[from] IoError),
}

const WEIGHTS: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer.json";
const CONFIG: &str = "config.json";

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Write a checkpoint for `state.step` under `root`; returns its directory.
pub fn save(
    root: &Path,
    params: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let werr = |path: &Path, source| CheckpointError::Write { path: path.display().to_string(), source };
    std::fs::create_dir_all(root).map_err(|e| werr(root, e))?;
    let final_dir = root.join(step_dir_name(state.step));
    let tmp = root.join(format!(".{}.tmp-{}", step_dir_name(state.step), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<(), CheckpointError> {
        std::fs::create_dir_all(&tmp).map_err(|e| werr(&tmp, e))?;
        let meta: HashMap<String, String> = [("config".to_string(), state.model_config.clone()), ("format".to_string(), "pt".to_string())].into();
        write_tensors(&tmp.join(WEIGHTS), params, Some(meta))?;
        write_tensors(&tmp.join(OPTIMIZER), optimizer, None)?;
        let json = serde_json::to_string_pretty(state).expect("trainer state serialises");
        write_file(&tmp.join(STATE), json.as_bytes()).map_err(|e| werr(&tmp.join(STATE), e))?;
        write_file(&tmp.join(CONFIG), state.model_config.as_bytes()).map_err(|e| werr(&tmp.join(CONFIG), e))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| werr(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| werr(&final_dir, e))?;
        if let Ok(d) = std::fs::File::open(root) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    prune(root, keep);
    Ok(final_dir)
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut dirs: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            let p = e.path();
            p.join(STATE).exists().then_some((step, p))
        })
        .collect();
    dirs.sort();
    dirs.into_iter().map(|(_, p)| p).collect()
}

pub fn latest(root: &Path) -> Option<PathBuf> {
    list(root).pop()
}

fn prune(root: &Path, keep: usize) {
    let all = list(root);
    if keep == 0 || all.len() <= keep {
        return;
    }
    for old in &all[..all.len() - keep] {
        let _ = std::fs::remove_dir_all(old);
    }
}

/// A loaded checkpoint.
pub struct Loaded {
    pub params: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub state: TrainerState,
}

pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let rerr = |msg: String| CheckpointError::Read { path: dir.display().to_string(), msg };
    let text = std::fs::read_to_string(dir.join(STATE)).map_err(|e| rerr(format!("{STATE}: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| rerr(format!("{STATE}: {e}")))?;
    Ok(Loaded { params: read_tensors(&dir.join(WEIGHTS))?, optimizer: read_tensors(&dir.join(OPTIMIZER))?, state })
}

/// The weights file of a checkpoint directory.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join(WEIGHTS)
}
