//! Dense kernels: GEMM-backed linear layers, gathers, frame reshuffles and row normalisations.

use rayon::prelude::*;

/// y[M,O] = x[M,I] · w[O,I]ᵀ (+ b[O]), through matrixmultiply's threaded SGEMM.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, i: usize, o: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * o];
    if m > 0 && o > 0 {
        if i > 0 {
            // SAFETY: the slices hold m·i, o·i and m·o elements and the strides stay inside them.
            unsafe {
                matrixmultiply::sgemm(
                    m, i, o, 1.0,
                    x.as_ptr(), i as isize, 1,
                    w.as_ptr(), 1, i as isize,
                    0.0,
                    y.as_mut_ptr(), o as isize, 1,
                );
            }
        }
        if let Some(b) = bias {
            y.par_chunks_mut(o).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
        }
    }
    y
}

/// out[n, :] = table[ids[n], :]; an id outside the table is an error naming it.
pub fn embedding(table: &[f32], d: usize, ids: &[i64]) -> Result<Vec<f32>, String> {
    let rows = table.len() / d.max(1);
    let mut out = vec![0f32; ids.len() * d];
    for (n, &id) in ids.iter().enumerate() {
        if id < 0 || id as usize >= rows {
            return Err(format!("token id {id} at position {n} is outside the vocabulary of {rows}"));
        }
        let id = id as usize;
        out[n * d..(n + 1) * d].copy_from_slice(&table[id * d..(id + 1) * d]);
    }
    Ok(out)
}

/// [N, D] → [N, K, D] by repetition.
pub fn repeat_frames(x: &[f32], n: usize, k: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * k * d];
    out.par_chunks_mut(k * d).zip(x.par_chunks(d)).for_each(|(o, row)| {
        for f in 0..k {
            o[f * d..(f + 1) * d].copy_from_slice(row);
        }
    });
    out
}

/// [N, K, D] → [N, D], mean over K (summed in frame order, then divided, as torch does).
pub fn mean_frames(x: &[f32], n: usize, k: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d).zip(x.par_chunks(k * d)).for_each(|(o, frames)| {
        for f in 0..k {
            o.iter_mut().zip(&frames[f * d..(f + 1) * d]).for_each(|(a, b)| *a += b);
        }
        o.iter_mut().for_each(|a| *a /= k as f32);
    });
    let _ = n;
    out
}

/// [N, K, D] weighted by [N, K] → [N, D].
pub fn frame_weighted_sum(x: &[f32], w: &[f32], k: usize, d: usize) -> Vec<f32> {
    let n = w.len() / k.max(1);
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
        for f in 0..k {
            let wf = w[r * k + f];
            let row = &x[(r * k + f) * d..(r * k + f + 1) * d];
            o.iter_mut().zip(row).for_each(|(a, b)| *a += wf * b);
        }
    });
    out
}

/// x − mean over the last dim, per row.
pub fn center_last(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_mut(d).for_each(|row| {
        let mean = (row.iter().map(|&v| v as f64).sum::<f64>() / d as f64) as f32;
        row.iter_mut().for_each(|v| *v -= mean);
    });
    out
}

/// x / sqrt(mean(x²) + eps) · w, per row (fp32 output, f64 accumulation).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let d = w.len();
    let mut out = x.to_vec();
    out.par_chunks_mut(d).for_each(|row| {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        row.iter_mut().zip(w).for_each(|(v, g)| *v = *v * inv * g);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive() {
        let (m, i, o) = (5, 7, 3);
        let x: Vec<f32> = (0..m * i).map(|v| (v as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..o * i).map(|v| (v as f32 * 0.11).cos()).collect();
        let b = vec![0.5, -1.0, 2.0];
        let y = linear(&x, &w, Some(&b), m, i, o);
        for r in 0..m {
            for c in 0..o {
                let want: f32 = (0..i).map(|k| x[r * i + k] * w[c * i + k]).sum::<f32>() + b[c];
                assert!((y[r * o + c] - want).abs() < 1e-5);
            }
        }
    }
}
