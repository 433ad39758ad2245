//! Kernels for the model-independent ops (gathers, norms, PonderNet weights, losses). Map and
//! scan kernels are generated per graph (`codegen`); these are appended to every module.
//! Reductions accumulate in double, as the CPU backend does, so both agree to rounding.

pub const LIBRARY: &str = r#"
#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void sp_embedding(float* out, const float* table, const long long* ids, long long n, int d) {
    GRID_STRIDE(i, n * d) { out[i] = table[ids[i / d] * d + i % d]; }
}

extern "C" __global__ void sp_repeat_frames(float* out, const float* x, long long n, int k, int d) {
    GRID_STRIDE(i, n * k * d) { long long r = i / ((long long)k * d); out[i] = x[r * d + i % d]; }
}

extern "C" __global__ void sp_mean_frames(float* out, const float* x, long long n, int k, int d) {
    GRID_STRIDE(i, n * d) {
        long long r = i / d; int c = (int)(i % d);
        float acc = 0.0f;
        for (int f = 0; f < k; ++f) acc += x[(r * k + f) * d + c];
        out[i] = acc / (float)k;
    }
}

/* f32 -> bf16 with round-to-nearest-even (bit arithmetic: NVRTC needs no toolkit header). */
extern "C" __global__ void sp_to_bf16(unsigned short* out, const float* x, long long n) {
    GRID_STRIDE(i, n) {
        unsigned int u = __float_as_uint(x[i]);
        unsigned int r = 0x7fffu + ((u >> 16) & 1u);
        out[i] = (unsigned short)((u + r) >> 16);
    }
}

extern "C" __global__ void sp_add_bias(float* y, const float* b, long long rows, int o) {
    GRID_STRIDE(i, rows * o) { y[i] += b[i % o]; }
}

/* Block-wide sum of doubles (blockDim.x is a power of two, <= 1024). */
__device__ double sp_block_sum(double v) {
    __shared__ double buf[1024];
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    double r = buf[0];
    __syncthreads();
    return r;
}

/* One block per row: x / sqrt(mean(x^2) + eps) * w. */
extern "C" __global__ void sp_rms_norm(float* out, const float* x, const float* w, int d, double eps) {
    const float* xr = x + (long long)blockIdx.x * d;
    float* yr = out + (long long)blockIdx.x * d;
    double acc = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc += (double)xr[j] * (double)xr[j];
    double ms = sp_block_sum(acc) / d;
    float inv = (float)(1.0 / sqrt(ms + eps));
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] * inv * w[j];
}

/* One block per row: x - mean(x). */
extern "C" __global__ void sp_center_last(float* out, const float* x, int d) {
    const float* xr = x + (long long)blockIdx.x * d;
    float* yr = out + (long long)blockIdx.x * d;
    double acc = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc += (double)xr[j];
    float mean = (float)(sp_block_sum(acc) / d);
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] - mean;
}

/* PonderNet halting weights over K logits per row. */
extern "C" __global__ void sp_ponder_weights(float* lam, float* ek, const float* logits, long long rows, int k, float clampv, float eps) {
    GRID_STRIDE(r, rows) {
        const float* l = logits + r * k;
        float* o = lam + r * k;
        float log_surv = 0.0f, total = 0.0f;
        for (int f = 0; f < k; ++f) {
            float p = fminf(fmaxf(1.0f / (1.0f + expf(-l[f])), clampv), 1.0f - clampv);
            o[f] = p * expf(log_surv);
            log_surv += log1pf(-p);
            total += o[f];
        }
        float denom = total + eps, e = 0.0f;
        for (int f = 0; f < k; ++f) { o[f] /= denom; e += (float)(f + 1) * o[f]; }
        ek[r] = e;
    }
}

extern "C" __global__ void sp_frame_weighted_sum(float* out, const float* x, const float* w, long long rows, int k, int d) {
    GRID_STRIDE(i, rows * d) {
        long long r = i / d; int c = (int)(i % d);
        float acc = 0.0f;
        for (int f = 0; f < k; ++f) acc += w[r * k + f] * x[(r * k + f) * d + c];
        out[i] = acc;
    }
}

/* One block per row: logsumexp(logits) - logits[target], 0 where ignored. */
extern "C" __global__ void sp_cross_entropy(float* out, const float* logits, const long long* targets, int v, long long ignore) {
    long long t = targets[blockIdx.x];
    if (t == ignore) { if (threadIdx.x == 0) out[blockIdx.x] = 0.0f; return; }
    const float* row = logits + (long long)blockIdx.x * v;
    __shared__ float mx[1024];
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, row[j]);
    mx[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) { if (threadIdx.x < s) mx[threadIdx.x] = fmaxf(mx[threadIdx.x], mx[threadIdx.x + s]); __syncthreads(); }
    double maxv = mx[0];
    double acc = 0.0;
    for (int j = threadIdx.x; j < v; j += blockDim.x) acc += exp((double)row[j] - maxv);
    double lse = maxv + log(sp_block_sum(acc));
    if (threadIdx.x == 0) out[blockIdx.x] = (float)(lse - (double)row[t]);
}

/* One block: out[0] = sum(x * mask) / sum(mask) (mask may be null: plain mean). */
extern "C" __global__ void sp_masked_mean(float* out, const float* x, const float* mask, long long n) {
    double num = 0.0, den = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        double m = mask ? (double)mask[i] : 1.0;
        num += (double)x[i] * m; den += m;
    }
    num = sp_block_sum(num);
    den = sp_block_sum(den);
    if (threadIdx.x == 0) out[0] = (float)(num / den);
}

/* ---------------- gradient kernels ---------------- */

/* out[j] = sum over r of x[r * n + j]  (sum of rows: a [n] suffix broadcast's adjoint). */
extern "C" __global__ void sp_sum_rows(float* out, const float* x, long long rows, long long n) {
    GRID_STRIDE(j, n) {
        double acc = 0.0;
        for (long long r = 0; r < rows; ++r) acc += (double)x[r * n + j];
        out[j] = (float)acc;
    }
}

/* out[r] = sum over j < inner of x[r * inner + j]  (an outer broadcast's adjoint). */
extern "C" __global__ void sp_sum_inner(float* out, const float* x, long long rows, long long inner) {
    GRID_STRIDE(r, rows) {
        double acc = 0.0;
        for (long long j = 0; j < inner; ++j) acc += (double)x[r * inner + j];
        out[r] = (float)acc;
    }
}

/* Embedding gradient: positions grouped by id on the host (offsets [V+1], positions). */
extern "C" __global__ void sp_embedding_grad(float* out, const float* dy, const long long* offsets, const long long* positions, long long v, int d) {
    GRID_STRIDE(i, v * d) {
        long long row = i / d; int c = (int)(i % d);
        float acc = 0.0f;
        for (long long p = offsets[row]; p < offsets[row + 1]; ++p) acc += dy[positions[p] * d + c];
        out[i] = acc;
    }
}

extern "C" __global__ void sp_sum_frames(float* out, const float* x, long long n, int k, int d) {
    GRID_STRIDE(i, n * d) {
        long long r = i / d; int c = (int)(i % d);
        float acc = 0.0f;
        for (int f = 0; f < k; ++f) acc += x[(r * k + f) * d + c];
        out[i] = acc;
    }
}

/* One block per row: dx of y = x r w with r = (mean x^2 + eps)^-1/2; dw partial per row. */
extern "C" __global__ void sp_rms_norm_grad(float* dx, float* dw_rows, const float* dy, const float* x, const float* w, int d, double eps) {
    long long off = (long long)blockIdx.x * d;
    double ss = 0.0, gx = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double xv = x[off + j];
        ss += xv * xv;
        gx += (double)dy[off + j] * (double)w[j] * xv;
    }
    ss = sp_block_sum(ss);
    gx = sp_block_sum(gx);
    double r = 1.0 / sqrt(ss / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double xv = x[off + j];
        dx[off + j] = (float)(r * (double)dy[off + j] * (double)w[j] - xv * r * r * r * gx / d);
        dw_rows[off + j] = (float)((double)dy[off + j] * xv * r);
    }
}

extern "C" __global__ void sp_ponder_weights_grad(float* out, const float* dlam, const float* dek, const float* logits, long long rows, int k, double clampv, double eps) {
    GRID_STRIDE(r, rows) {
        double sig[64], p[64], surv[64], lam[64], dl[64], dp[64];
        const float* l = logits + r * k;
        double c = 0.0, z = eps, cross = 0.0;
        for (int f = 0; f < k; ++f) {
            sig[f] = 1.0 / (1.0 + exp(-(double)l[f]));
            p[f] = fmin(fmax(sig[f], clampv), 1.0 - clampv);
            surv[f] = exp(c);
            c += log1p(-p[f]);
            lam[f] = p[f] * surv[f];
            z += lam[f];
        }
        for (int f = 0; f < k; ++f) cross += ((double)dlam[r * k + f] + (f + 1) * (double)dek[r]) * lam[f];
        cross /= z * z;
        for (int f = 0; f < k; ++f) { dl[f] = ((double)dlam[r * k + f] + (f + 1) * (double)dek[r]) / z - cross; dp[f] = dl[f] * surv[f]; }
        double later = 0.0;
        for (int j = k - 1; j >= 0; --j) { dp[j] -= later / (1.0 - p[j]); later += dl[j] * lam[j]; }
        for (int f = 0; f < k; ++f) {
            int inside = sig[f] >= clampv && sig[f] <= 1.0 - clampv;
            out[r * k + f] = inside ? (float)(dp[f] * sig[f] * (1.0 - sig[f])) : 0.0f;
        }
    }
}

extern "C" __global__ void sp_frame_weighted_sum_grad_frames(float* dframes, const float* dy, const float* w, long long rows, int k, int d) {
    GRID_STRIDE(i, rows * k * d) {
        long long rk = i / d; int c = (int)(i % d); long long r = rk / k;
        dframes[i] = dy[r * d + c] * w[rk];
    }
}

/* One block per (row, frame): dw = sum_d dy * frame. */
extern "C" __global__ void sp_frame_weighted_sum_grad_weights(float* dw, const float* dy, const float* frames, int k, int d) {
    long long rk = blockIdx.x; long long r = rk / k;
    double acc = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc += (double)dy[r * d + j] * (double)frames[rk * d + j];
    acc = sp_block_sum(acc);
    if (threadIdx.x == 0) dw[rk] = (float)acc;
}

/* One block per row: (softmax - onehot) * dce. */
extern "C" __global__ void sp_cross_entropy_grad(float* out, const float* dce, const float* logits, const long long* targets, int v, long long ignore) {
    long long t = targets[blockIdx.x];
    float* o = out + (long long)blockIdx.x * v;
    if (t == ignore) { for (int j = threadIdx.x; j < v; j += blockDim.x) o[j] = 0.0f; return; }
    const float* row = logits + (long long)blockIdx.x * v;
    __shared__ float mx[1024];
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, row[j]);
    mx[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) { if (threadIdx.x < s) mx[threadIdx.x] = fmaxf(mx[threadIdx.x], mx[threadIdx.x + s]); __syncthreads(); }
    double maxv = mx[0];
    double acc = 0.0;
    for (int j = threadIdx.x; j < v; j += blockDim.x) acc += exp((double)row[j] - maxv);
    double sum = sp_block_sum(acc);
    double g = dce[blockIdx.x];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        double p = exp((double)row[j] - maxv) / sum;
        o[j] = (float)((p - (j == t ? 1.0 : 0.0)) * g);
    }
}

/* dx = dy * mask / sum(mask), or dy / n without a mask. One block. */
extern "C" __global__ void sp_mean_grad(float* out, const float* dy, const float* mask, long long n) {
    double den = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) den += mask ? (double)mask[i] : 1.0;
    den = sp_block_sum(den);
    for (long long i = threadIdx.x; i < n; i += blockDim.x) out[i] = (float)((double)dy[0] * (mask ? (double)mask[i] : 1.0) / den);
}
"#;
