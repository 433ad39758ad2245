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
"#;
