//! Dense kernels: GEMM-backed linear layers, gathers, frame reshuffles and row normalisations.

use rayon::prelude::*;

/// Up to this many rows a linear layer reads each weight row once and dots it with every input
/// row (memory-bound, like decoding a token); above it matrixmultiply's packed SGEMM wins. Packing
/// the whole weight matrix for a handful of rows costs more than the product (measured: the 0.9B
/// model's 2-token calibration forward at K=16, M=32: 2.8 s → 0.9 s).
const SKINNY_ROWS: usize = 32;

/// y[M,O] = x[M,I] · w[O,I]ᵀ (+ b[O]), through matrixmultiply's threaded SGEMM (or, for a few
/// rows, one pass over the weights).
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, i: usize, o: usize) -> Vec<f32> {
    if m > 0 && m <= SKINNY_ROWS && o > 0 && i > 0 {
        return skinny(x, w, bias, m, i, o);
    }
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

/// y = x·wᵀ (+ b) for few rows: output columns in parallel blocks, each weight row streamed once
/// and dotted with every input row (which stay in cache).
fn skinny(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, i: usize, o: usize) -> Vec<f32> {
    const BLOCK: usize = 64;
    #[cfg(target_arch = "x86_64")]
    let fma = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    // Column-major while computing ([O, M]) so that parallel blocks own contiguous memory.
    let mut yt = vec![0f32; o * m];
    yt.par_chunks_mut(BLOCK * m).enumerate().for_each(|(blk, out)| {
        let cols = blk * BLOCK..blk * BLOCK + out.len() / m;
        #[cfg(target_arch = "x86_64")]
        if fma {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { skinny_block_fma(x, w, bias, i, cols, out) };
            return;
        }
        skinny_block(x, w, bias, i, cols, out);
    });
    let mut y = vec![0f32; m * o];
    for (j, col) in yt.chunks(m).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * o + j] = v;
        }
    }
    y
}

/// Output columns `cols` of [`skinny`] into `out` ([cols, M]); `dot` is the lane kernel.
#[inline(always)]
fn skinny_block_with(x: &[f32], w: &[f32], bias: Option<&[f32]>, i: usize, cols: std::ops::Range<usize>, out: &mut [f32], dot: impl Fn(&[f32], &[f32]) -> f32) {
    let m = out.len() / cols.len().max(1);
    for (j, col) in cols.zip(out.chunks_mut(m)) {
        let wr = &w[j * i..(j + 1) * i];
        let b = bias.map_or(0.0, |b| b[j]);
        for (r, y) in col.iter_mut().enumerate() {
            *y = dot(&x[r * i..(r + 1) * i], wr) + b;
        }
    }
}

fn skinny_block(x: &[f32], w: &[f32], bias: Option<&[f32]>, i: usize, cols: std::ops::Range<usize>, out: &mut [f32]) {
    skinny_block_with(x, w, bias, i, cols, out, |a, b| dot(a, b, |acc, x, y| acc + x * y));
}

/// [`skinny_block`] compiled for AVX2 + FMA (the default target is baseline x86-64, whose
/// 4-lane SSE would make the few-row product compute-bound).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn skinny_block_fma(x: &[f32], w: &[f32], bias: Option<&[f32]>, i: usize, cols: std::ops::Range<usize>, out: &mut [f32]) {
    skinny_block_with(x, w, bias, i, cols, out, |a, b| dot(a, b, |acc, x, y| x.mul_add(y, acc)));
}

/// A dot product in 16 independent lanes (vectorised; the order is fixed, so it is deterministic).
#[inline(always)]
fn dot(a: &[f32], b: &[f32], fmadd: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (xa, xb) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = fmadd(acc[l], xa[l], xb[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
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
        // Both paths (skinny up to 16 rows, packed SGEMM above), ragged lane tails and blocks.
        for (m, i, o) in [(5, 7, 3), (1, 37, 130), (16, 45, 65), (17, 45, 65), (40, 16, 1)] {
            let x: Vec<f32> = (0..m * i).map(|v| (v as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..o * i).map(|v| (v as f32 * 0.11).cos()).collect();
            let b: Vec<f32> = (0..o).map(|v| v as f32 * 0.25 - 1.0).collect();
            for bias in [None, Some(&b[..])] {
                let y = linear(&x, &w, bias, m, i, o);
                for r in 0..m {
                    for c in 0..o {
                        let want: f32 = (0..i).map(|k| x[r * i + k] * w[c * i + k]).sum::<f32>() + bias.map_or(0.0, |b| b[c]);
                        assert!((y[r * o + c] - want).abs() < 1e-4, "m={m} i={i} o={o} at ({r},{c})");
                    }
                }
            }
        }
    }
}
