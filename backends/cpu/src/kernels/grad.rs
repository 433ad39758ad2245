//! Kernels of the gradient ops the autodiff pass emits.

use super::map::{access_for, offset, Access};
use rayon::prelude::*;

/// dx[M,I] = dy[M,O] · w[O,I].
pub fn linear_grad_input(dy: &[f32], w: &[f32], m: usize, o: usize, i: usize) -> Vec<f32> {
    let mut dx = vec![0f32; m * i];
    if m > 0 && i > 0 && o > 0 {
        // SAFETY: dy is m·o, w is o·i and dx is m·i; the strides stay inside them.
        unsafe {
            matrixmultiply::sgemm(m, o, i, 1.0, dy.as_ptr(), o as isize, 1, w.as_ptr(), i as isize, 1, 0.0, dx.as_mut_ptr(), i as isize, 1);
        }
    }
    dx
}

/// dw[O,I] = dy[M,O]ᵀ · x[M,I].
pub fn linear_grad_weight(dy: &[f32], x: &[f32], m: usize, o: usize, i: usize) -> Vec<f32> {
    let mut dw = vec![0f32; o * i];
    if m > 0 && i > 0 && o > 0 {
        // SAFETY: dy is read transposed (row stride 1, column stride o) within its m·o elements.
        unsafe {
            matrixmultiply::sgemm(o, m, i, 1.0, dy.as_ptr(), 1, o as isize, x.as_ptr(), i as isize, 1, 0.0, dw.as_mut_ptr(), i as isize, 1);
        }
    }
    dw
}

/// Scatter-add the rows of dy into a [V, D] table gradient (in position order: deterministic).
pub fn embedding_grad(dy: &[f32], ids: &[i64], v: usize, d: usize) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; v * d];
    for (n, &id) in ids.iter().enumerate() {
        if id < 0 || id as usize >= v {
            return Err(format!("token id {id} at position {n} is outside the vocabulary of {v}"));
        }
        let row = &mut out[id as usize * d..(id as usize + 1) * d];
        row.iter_mut().zip(&dy[n * d..(n + 1) * d]).for_each(|(a, b)| *a += b);
    }
    Ok(out)
}

/// [N, K, D] → [N, D], summed over K.
pub fn sum_frames(x: &[f32], k: usize, d: usize) -> Vec<f32> {
    let n = x.len() / (k * d).max(1);
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d).zip(x.par_chunks(k * d)).for_each(|(o, frames)| {
        for f in 0..k {
            o.iter_mut().zip(&frames[f * d..(f + 1) * d]).for_each(|(a, b)| *a += b);
        }
    });
    out
}

/// Gradient of y = x·r·w with r = (mean x² + eps)^(−1/2): returns (dx, dw).
pub fn rms_norm_grad(dy: &[f32], x: &[f32], w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut dx = vec![0f32; x.len()];
    let partial: Vec<Vec<f64>> = dx
        .par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .map(|(dxr, (xr, dyr))| {
            let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            let gx: f64 = (0..d).map(|j| dyr[j] as f64 * w[j] as f64 * xr[j] as f64).sum();
            for j in 0..d {
                dxr[j] = (r * dyr[j] as f64 * w[j] as f64 - xr[j] as f64 * r * r * r * gx / d as f64) as f32;
            }
            (0..d).map(|j| dyr[j] as f64 * xr[j] as f64 * r).collect()
        })
        .collect();
    let mut dw = vec![0f64; d];
    for p in partial {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    (dx, dw.into_iter().map(|v| v as f32).collect())
}

/// Gradient of `ponder_weights` (see `Op::PonderWeights`) w.r.t. its logits, per row of K.
pub fn ponder_weights_grad(dlam: &[f32], dek: &[f32], logits: &[f32], k: usize, clamp: f64, eps: f64) -> Vec<f32> {
    let mut out = vec![0f32; logits.len()];
    out.par_chunks_mut(k).enumerate().for_each(|(r, o)| {
        let l = &logits[r * k..(r + 1) * k];
        let sig: Vec<f64> = l.iter().map(|&x| 1.0 / (1.0 + (-(x as f64)).exp())).collect();
        let p: Vec<f64> = sig.iter().map(|&s| s.clamp(clamp, 1.0 - clamp)).collect();
        let mut surv = vec![0f64; k];
        let mut c = 0f64;
        for f in 0..k {
            surv[f] = c.exp();
            c += (-p[f]).ln_1p();
        }
        let lam: Vec<f64> = (0..k).map(|f| p[f] * surv[f]).collect();
        let z = lam.iter().sum::<f64>() + eps;
        let g: Vec<f64> = (0..k).map(|f| dlam[r * k + f] as f64 + (f + 1) as f64 * dek[r] as f64).collect();
        let cross: f64 = (0..k).map(|f| g[f] * lam[f]).sum::<f64>() / (z * z);
        let dl: Vec<f64> = (0..k).map(|f| g[f] / z - cross).collect();
        // λ_k = p_k·S_k with S_k = exp(Σ_{j<k} log1p(−p_j)).
        let mut dp: Vec<f64> = (0..k).map(|f| dl[f] * surv[f]).collect();
        let mut later = 0.0; // Σ_{k > j} dλ_k·λ_k
        for j in (0..k).rev() {
            dp[j] -= later / (1.0 - p[j]);
            later += dl[j] * lam[j];
        }
        for f in 0..k {
            let inside = sig[f] >= clamp && sig[f] <= 1.0 - clamp;
            o[f] = if inside { (dp[f] * sig[f] * (1.0 - sig[f])) as f32 } else { 0.0 };
        }
    });
    out
}

/// Gradient of `frame_weighted_sum`: (dframes [N,K,D], dweights [N,K]).
pub fn frame_weighted_sum_grad(dy: &[f32], frames: &[f32], w: &[f32], k: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut df = vec![0f32; frames.len()];
    let mut dw = vec![0f32; w.len()];
    df.par_chunks_mut(k * d).zip(dw.par_chunks_mut(k)).enumerate().for_each(|(r, (dfr, dwr))| {
        let g = &dy[r * d..(r + 1) * d];
        for f in 0..k {
            let wf = w[r * k + f];
            let fr = &frames[(r * k + f) * d..(r * k + f + 1) * d];
            dfr[f * d..(f + 1) * d].iter_mut().zip(g).for_each(|(o, &gv)| *o = gv * wf);
            dwr[f] = g.iter().zip(fr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
        }
    });
    (df, dw)
}

/// dlogits = dce·(softmax − onehot(target)), zero rows where the target is ignored.
pub fn cross_entropy_grad(dce: &[f32], logits: &[f32], targets: &[i64], v: usize, ignore: i64) -> Result<Vec<f32>, String> {
    if let Some((pos, &t)) = targets.iter().enumerate().find(|(_, &t)| t != ignore && (t < 0 || t as usize >= v)) {
        return Err(format!("target id {t} at position {pos} is outside the vocabulary of {v}"));
    }
    let mut out = vec![0f32; logits.len()];
    out.par_chunks_mut(v).enumerate().for_each(|(r, o)| {
        let t = targets[r];
        if t == ignore {
            return;
        }
        let row = &logits[r * v..(r + 1) * v];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        for (j, (oj, &x)) in o.iter_mut().zip(row).enumerate() {
            let p = (x as f64 - max).exp() / sum;
            *oj = ((p - (j as i64 == t) as u8 as f64) * dce[r] as f64) as f32;
        }
    });
    Ok(out)
}

pub fn masked_mean_grad(dy: f32, mask: &[f32]) -> Vec<f32> {
    let den: f64 = mask.iter().map(|&m| m as f64).sum();
    mask.iter().map(|&m| (dy as f64 * m as f64 / den) as f32).collect()
}

/// Sum `x` (shape `x_shape`) down to `like_shape`, which broadcasts to it.
pub fn reduce_like(x: &[f32], x_shape: &[usize], like_shape: &[usize]) -> Vec<f32> {
    let n: usize = like_shape.iter().product();
    let acc = access_for(like_shape, x_shape);
    if let Access::Full = acc {
        return x.to_vec();
    }
    let mut out = vec![0f64; n];
    for (i, &v) in x.iter().enumerate() {
        out[offset(&acc, i)] += v as f64;
    }
    out.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_grads_match_naive() {
        let (m, o, i) = (4, 3, 5);
        let dy: Vec<f32> = (0..m * o).map(|v| (v as f32 * 0.3).sin()).collect();
        let x: Vec<f32> = (0..m * i).map(|v| (v as f32 * 0.7).cos()).collect();
        let w: Vec<f32> = (0..o * i).map(|v| (v as f32 * 0.2).sin()).collect();
        let dx = linear_grad_input(&dy, &w, m, o, i);
        let dw = linear_grad_weight(&dy, &x, m, o, i);
        for r in 0..m {
            for c in 0..i {
                let want: f32 = (0..o).map(|k| dy[r * o + k] * w[k * i + c]).sum();
                assert!((dx[r * i + c] - want).abs() < 1e-5);
            }
        }
        for a in 0..o {
            for c in 0..i {
                let want: f32 = (0..m).map(|r| dy[r * o + a] * x[r * i + c]).sum();
                assert!((dw[a * i + c] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn reduce_like_sums_broadcast_dims() {
        let x: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let r = reduce_like(&x, &[2, 3, 4], &[4]);
        assert_eq!(r, (0..4).map(|c| (0..6).map(|k| (k * 4 + c) as f32).sum()).collect::<Vec<f32>>());
        let r = reduce_like(&x, &[2, 3, 4], &[2, 1, 1]);
        assert_eq!(r, vec![(0..12).sum::<i32>() as f32, (12..24).sum::<i32>() as f32]);
    }
}
