//! Generation (spec §16): prefill the prompt, then feed one new token per step, carrying the
//! neuron state; stop when every row has just produced the EOS id or after `max_new_tokens`.

use crate::sampling::Sampler;
use crate::session::{Executor, Session};
use crate::RuntimeError;
use sparkc_ir::Tensor;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub eos_id: Option<i64>,
}

/// Logits of the last position: [B, T, V] → B rows of V.
fn last_logits(logits: &Tensor) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let (b, t, v) = match logits.shape.as_slice() {
        &[b, t, v] => (b, t, v),
        other => return Err(RuntimeError::Usage(format!("logits must be [B,T,V], got {other:?}"))),
    };
    let data = logits.as_f32().ok_or_else(|| RuntimeError::Usage("logits must be f32".into()))?;
    Ok((0..b).map(|r| data[(r * t + t - 1) * v..(r * t + t) * v].to_vec()).collect())
}

/// Generate from `prompt` (B rows of equal length). `on_token` is called after every step with
/// the number of tokens generated so far (for progress display). Returns prompt + generated.
pub fn generate<E: Executor>(
    session: &mut Session<E>,
    prompt: &[Vec<i64>],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(usize),
) -> Result<Vec<Vec<i64>>, RuntimeError> {
    let b = prompt.len();
    let tp = prompt.first().map_or(0, |p| p.len());
    if b == 0 || tp == 0 {
        return Err(RuntimeError::Usage("the prompt must hold at least one token per row".into()));
    }
    if prompt.iter().any(|p| p.len() != tp) {
        return Err(RuntimeError::Usage("all prompt rows must have the same length (no padding support)".into()));
    }
    let mut rows: Vec<Vec<i64>> = prompt.to_vec();
    if opts.max_new_tokens == 0 {
        return Ok(rows);
    }
    session.reset(b);
    let ids = Tensor::i64(vec![b, tp], prompt.iter().flatten().copied().collect());
    let mut out = session.step(BTreeMap::from([("input_ids".to_string(), ids)]))?;
    for step in 0..opts.max_new_tokens {
        let logits = out.get("logits").ok_or_else(|| RuntimeError::Usage("the graph has no `logits` output".into()))?;
        let next: Vec<i64> = last_logits(logits)?.iter().map(|l| sampler.sample(l) as i64).collect();
        for (row, &t) in rows.iter_mut().zip(&next) {
            row.push(t);
        }
        on_token(step + 1);
        let all_eos = opts.eos_id.is_some_and(|eos| next.iter().all(|&t| t == eos));
        if all_eos || step + 1 == opts.max_new_tokens {
            break;
        }
        let ids = Tensor::i64(vec![b, 1], next);
        out = session.step(BTreeMap::from([("input_ids".to_string(), ids)]))?;
    }
    Ok(rows)
}
