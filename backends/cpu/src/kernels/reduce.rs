//! PonderNet halting weights, cross-entropy and means.

use rayon::prelude::*;

/// Halting weights over K logits per row: returns (λ̂ [N,K], E[K] [N]). See `Op::PonderWeights`.
pub fn ponder_weights(logits: &[f32], k: usize, clamp: f64, eps: f64) -> (Vec<f32>, Vec<f32>) {
    let n = logits.len() / k.max(1);
    let (clamp, eps) = (clamp as f32, eps as f32);
    let mut lam = vec![0f32; n * k];
    let mut expected = vec![0f32; n];
    lam.par_chunks_mut(k).zip(expected.par_iter_mut()).enumerate().for_each(|(r, (l, e))| {
        let row = &logits[r * k..(r + 1) * k];
        let mut log_survival = 0f32; // exclusive cumulative sum of log1p(−p)
        let mut total = 0f32;
        for f in 0..k {
            let p = (1.0 / (1.0 + (-row[f]).exp())).clamp(clamp, 1.0 - clamp);
            l[f] = p * log_survival.exp();
            log_survival += (-p).ln_1p();
            total += l[f];
        }
        let denom = total + eps;
        let mut ek = 0f32;
        for (f, v) in l.iter_mut().enumerate() {
            *v /= denom;
            ek += (f + 1) as f32 * *v;
        }
        *e = ek;
    });
    (lam, expected)
}

/// Per-row cross-entropy of logits [N,V] against targets [N]; 0 where target == ignore.
pub fn cross_entropy(logits: &[f32], targets: &[i64], v: usize, ignore: i64) -> Result<Vec<f32>, String> {
    if let Some((pos, &t)) = targets.iter().enumerate().find(|(_, &t)| t != ignore && (t < 0 || t as usize >= v)) {
        return Err(format!("target id {t} at position {pos} is outside the vocabulary of {v}"));
    }
    Ok(targets
        .par_iter()
        .enumerate()
        .map(|(r, &t)| {
            if t == ignore {
                return 0.0;
            }
            let row = &logits[r * v..(r + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            (lse - row[t as usize] as f64) as f32
        })
        .collect())
}

pub fn masked_mean(x: &[f32], mask: &[f32]) -> f32 {
    let num: f64 = x.iter().zip(mask).map(|(&a, &m)| a as f64 * m as f64).sum();
    let den: f64 = mask.iter().map(|&m| m as f64).sum();
    (num / den) as f32
}

pub fn mean(x: &[f32]) -> f32 {
    (x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64) as f32
}
