//! Training data: a token stream packed into windows of T+1 tokens (inputs, next-token targets
//! and a loss mask), a held-out split, and a seeded shuffle whose position is a resumable cursor.

use sparkc_ir::rng::Rng;
use sparkc_ir::Tensor;

/// A window: `t + 1` tokens starting at `start` in the stream; positions past the stream's end
/// are padding (id 0, not scored).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Window {
    start: usize,
}

#[derive(Clone, Debug)]
pub struct PackedData {
    tokens: Vec<u32>,
    t: usize,
    train: Vec<Window>,
    eval: Vec<Window>,
}

/// Where the shuffled walk over the training windows stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
}

/// One batch: `input_ids`, `target_ids` (I64 [B,T]) and `loss_mask` (F32 [B,T]).
pub struct Batch {
    pub input_ids: Tensor,
    pub target_ids: Tensor,
    pub loss_mask: Tensor,
    /// Scored positions in the batch.
    pub tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("the corpus is empty")]
    Empty,
    #[error("the corpus has {tokens} tokens: too few for one window of {t} tokens plus a held-out window")]
    TooSmall { tokens: usize, t: usize },
}

impl PackedData {
    /// Cut `tokens` into windows with stride `t` (each window holds t+1 tokens: the targets are
    /// the inputs shifted by one). The last `eval_fraction` of the windows (at least one when
    /// the fraction is positive) is held out.
    pub fn new(tokens: Vec<u32>, t: usize, eval_fraction: f64) -> Result<PackedData, DataError> {
        if tokens.is_empty() {
            return Err(DataError::Empty);
        }
        if t == 0 || tokens.len() < 2 {
            return Err(DataError::TooSmall { tokens: tokens.len(), t });
        }
        let n = (tokens.len() - 1).div_ceil(t);
        let windows: Vec<Window> = (0..n).map(|i| Window { start: i * t }).collect();
        let n_eval = if eval_fraction > 0.0 { ((n as f64 * eval_fraction).round() as usize).max(1) } else { 0 };
        if n_eval >= n {
            return Err(DataError::TooSmall { tokens: tokens.len(), t });
        }
        let (train, eval) = windows.split_at(n - n_eval);
        Ok(PackedData { tokens, t, train: train.to_vec(), eval: eval.to_vec() })
    }

    pub fn train_windows(&self) -> usize {
        self.train.len()
    }

    pub fn eval_windows(&self) -> usize {
        self.eval.len()
    }

    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }

    fn batch_of(&self, windows: &[Window]) -> Batch {
        let (b, t) = (windows.len(), self.t);
        let (mut x, mut y, mut m) = (vec![0i64; b * t], vec![0i64; b * t], vec![0f32; b * t]);
        let mut scored = 0;
        for (r, w) in windows.iter().enumerate() {
            for j in 0..t {
                let (i, o) = (w.start + j, w.start + j + 1);
                if o < self.tokens.len() {
                    x[r * t + j] = self.tokens[i] as i64;
                    y[r * t + j] = self.tokens[o] as i64;
                    m[r * t + j] = 1.0;
                    scored += 1;
                } else if i < self.tokens.len() {
                    x[r * t + j] = self.tokens[i] as i64;
                }
            }
        }
        Batch {
            input_ids: Tensor::i64(vec![b, t], x),
            target_ids: Tensor::i64(vec![b, t], y),
            loss_mask: Tensor::f32(vec![b, t], m),
            tokens: scored,
        }
    }

    /// The permutation of training windows for `epoch` (seeded, so a cursor is enough to resume).
    fn order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.train.len()).collect();
        let mut rng = Rng::derive(seed, &format!("epoch-{epoch}"));
        for i in (1..idx.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            idx.swap(i, j);
        }
        idx
    }

    /// The next training batch of `b` windows, advancing `cursor` (epochs wrap).
    pub fn next_batch(&self, b: usize, seed: u64, cursor: &mut Cursor) -> Batch {
        let mut picked = Vec::with_capacity(b);
        let mut order = self.order(seed, cursor.epoch);
        while picked.len() < b {
            if cursor.position as usize >= order.len() {
                cursor.epoch += 1;
                cursor.position = 0;
                order = self.order(seed, cursor.epoch);
            }
            picked.push(self.train[order[cursor.position as usize]]);
            cursor.position += 1;
        }
        self.batch_of(&picked)
    }

    /// Held-out batches of `b` windows, in order (the last may be smaller), at most `max`.
    pub fn eval_batches(&self, b: usize, max: usize) -> Vec<Batch> {
        self.eval.chunks(b.max(1)).take(max).map(|w| self.batch_of(w)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_masks() {
        let data = PackedData::new((1..=20).collect(), 4, 0.2).unwrap();
        assert_eq!(data.train_windows() + data.eval_windows(), 5);
        let mut c = Cursor { epoch: 0, position: 0 };
        let batch = data.next_batch(2, 1, &mut c);
        let x = batch.input_ids.as_i64().unwrap();
        let y = batch.target_ids.as_i64().unwrap();
        for r in 0..2 {
            for j in 0..4 {
                if batch.loss_mask.as_f32().unwrap()[r * 4 + j] > 0.0 {
                    assert_eq!(y[r * 4 + j], x[r * 4 + j] + 1);
                }
            }
        }
        // Resuming from a cursor gives the same next batch.
        let mut c2 = c;
        let a = data.next_batch(3, 1, &mut c);
        let b = data.next_batch(3, 1, &mut c2);
        assert_eq!(a.input_ids, b.input_ids);
    }

    #[test]
    fn rejects_empty_and_tiny() {
        assert!(matches!(PackedData::new(vec![], 4, 0.1), Err(DataError::Empty)));
        assert!(PackedData::new(vec![1, 2, 3], 4, 0.5).is_err());
    }
}
