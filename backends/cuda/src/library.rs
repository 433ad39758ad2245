//! Kernels for the model-independent ops (gathers, norms, PonderNet weights, losses). Map and
//! scan kernels are generated per graph (`codegen`); these are appended to every module.
//! Reductions accumulate in double, as the CPU backend does, so both agree to rounding.

pub const LIBRARY: &str = r#"
#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void sp_embedding(float* out, const float* table, const long long* ids, long long n, int d) {
    GRID_STRIDE(i, n * d) { out[i] = table[ids[i / d] * d + i % d]; }
}

/* Grid (columns of d, rows): each thread reads one value and writes its k copies (a 64-bit
   division per element made this several times slower than its bytes). */
extern "C" __global__ void sp_repeat_frames(float* out, const float* x, long long n, int k, int d) {
    for (long long r = blockIdx.y; r < n; r += gridDim.y)
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < d; c += gridDim.x * blockDim.x) {
            const float v = x[r * d + c];
            for (int f = 0; f < k; ++f) out[(r * k + f) * d + c] = v;
        }
}

extern "C" __global__ void sp_mean_frames(float* out, const float* x, long long n, int k, int d) {
    GRID_STRIDE(i, n * d) {
        long long r = i / d; int c = (int)(i % d);
        float acc = 0.0f;
        for (int f = 0; f < k; ++f) acc += x[(r * k + f) * d + c];
        out[i] = acc / (float)k;
    }
}

/* A batched GEMM's pointer table (up to 12 entries), written in stream order for a run that is
   not captured (a captured step's tables are written once, when it is captured). */
extern "C" __global__ void sp_pointer_table(unsigned long long* t, int n, unsigned long long p0, unsigned long long p1, unsigned long long p2, unsigned long long p3,
    unsigned long long p4, unsigned long long p5, unsigned long long p6, unsigned long long p7, unsigned long long p8, unsigned long long p9, unsigned long long p10, unsigned long long p11) {
    const unsigned long long p[12] = {p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11};
    if (threadIdx.x < n) t[threadIdx.x] = p[threadIdx.x];
}

/* Zero `words` 4-byte words, then a 2-byte tail if `tail` (a bf16 buffer of odd length). */
extern "C" __global__ void sp_zero(unsigned int* p, long long words, int tail) {
    GRID_STRIDE(i, words) p[i] = 0u;
    if (tail && blockIdx.x == 0 && threadIdx.x == 0) ((unsigned short*)(p + words))[0] = 0;
}

/* f32 -> bf16 with round-to-nearest-even (bit arithmetic: NVRTC needs no toolkit header). */
extern "C" __global__ void sp_to_bf16(unsigned short* out, const float* x, long long n) {
    GRID_STRIDE(i, n) {
        unsigned int u = __float_as_uint(x[i]);
        unsigned int r = 0x7fffu + ((u >> 16) & 1u);
        out[i] = (unsigned short)((u + r) >> 16);
    }
}

/* A linear layer with a handful of outputs (PonderNet's halt logit): one warp per row, fp32
   operands, double accumulation, bias added. A GEMM library call would also need a bf16 copy
   of x and a separate bias kernel. */
extern "C" __global__ void sp_linear_narrow(float* y, const float* x, const float* w, const float* bias, long long rows, int in, int out) {
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    for (int o = 0; o < out; ++o) {
        double acc = 0.0;
        for (int k = lane; k < in; k += 32) acc += (double)x[row * in + k] * (double)w[(long long)o * in + k];
        for (int s = 16; s > 0; s >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, s);
        if (lane == 0) y[row * out + o] = (float)(acc + (bias ? (double)bias[o] : 0.0));
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

/* Row kernels: a team of blockDim.x threads per row, blockDim.y rows per block. Many rows: a
   warp per row (8 per block), its lanes reading the row contiguously. Few rows (a decode step):
   a whole 256-thread block per row, so the row's loads are in flight together instead of one
   warp waiting on them in turn. Sums in double as on the CPU. */
__device__ __forceinline__ double sp_warp_sum(double v) {
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
    return v;
}
__device__ double sp_team_sum(double v) {
    v = sp_warp_sum(v);
    if (blockDim.x <= 32) return v;
    __shared__ double part[32];
    __syncthreads(); /* an earlier call's readers are done with part */
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) t += part[w];
    return t;
}
/* float4s per lane of the row kernels' register paths: rows up to 1,024 floats. */
#define RMS_LANE_VECS 8
#define ROW_TEAM(r, rows) const long long r = blockIdx.x * (long long)blockDim.y + threadIdx.y; const int lane = threadIdx.x, team = blockDim.x; if (r >= (rows)) return;

/* x / sqrt(mean(x^2) + eps) * w. A warp's row of up to 1,024 floats (a multiple of 4) is
   loaded whole into registers as float4s before any use, and summed in f32 per lane, f64
   across the warp: one trip to memory per row, not one per few columns. */
extern "C" __global__ void sp_rms_norm(float* out, const float* x, const float* w, long long rows, int d, double eps) {
    ROW_TEAM(r, rows)
    const float* xr = x + r * d;
    float* yr = out + r * d;
    if (team == 32 && d % 4 == 0 && d <= 32 * 4 * RMS_LANE_VECS) {
        const int nv = d / 4;
        const float4* x4 = (const float4*)xr;
        float4 xv[RMS_LANE_VECS];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < RMS_LANE_VECS; ++k) {
            const int j = lane + 32 * k;
            if (j < nv) xv[k] = x4[j];
        }
#pragma unroll
        for (int k = 0; k < RMS_LANE_VECS; ++k) {
            if (lane + 32 * k < nv) ss += xv[k].x * xv[k].x + xv[k].y * xv[k].y + xv[k].z * xv[k].z + xv[k].w * xv[k].w;
        }
        const float inv = (float)(1.0 / sqrt(sp_team_sum((double)ss) / d + eps));
        const float4* w4 = (const float4*)w;
        float4* y4 = (float4*)yr;
#pragma unroll
        for (int k = 0; k < RMS_LANE_VECS; ++k) {
            const int j = lane + 32 * k;
            if (j < nv) {
                const float4 a = xv[k], g = w4[j];
                y4[j] = make_float4(a.x * inv * g.x, a.y * inv * g.y, a.z * inv * g.z, a.w * inv * g.w);
            }
        }
        return;
    }
    double acc = 0.0;
#pragma unroll 4
    for (int j = lane; j < d; j += team) acc += (double)xr[j] * (double)xr[j];
    float inv = (float)(1.0 / sqrt(sp_team_sum(acc) / d + eps));
#pragma unroll 4
    for (int j = lane; j < d; j += team) yr[j] = xr[j] * inv * w[j];
}

/* x - mean(x). */
extern "C" __global__ void sp_center_last(float* out, const float* x, long long rows, int d) {
    ROW_TEAM(r, rows)
    const float* xr = x + r * d;
    float* yr = out + r * d;
    double acc = 0.0;
#pragma unroll 4
    for (int j = lane; j < d; j += team) acc += (double)xr[j];
    float mean = (float)(sp_team_sum(acc) / d);
#pragma unroll 4
    for (int j = lane; j < d; j += team) yr[j] = xr[j] - mean;
}

/* The residual update of a sub-layer, fused for inference: out[r, f] = h[r, f] + (u[r] − mean u[r])
   for each of the k frames f of row r (center_last, repeat_frames and the add in one pass).
   Grid (rows, k): each block recomputes its row's mean (d values, from L2) and writes one frame,
   so a decode step's single row still spreads over k blocks. */
extern "C" __global__ void sp_centered_residual(float* out, const float* h, const float* u, long long rows, int k, int d) {
    const long long r = blockIdx.x;
    const int f = blockIdx.y;
    const float* ur = u + r * d;
    double acc = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc += (double)ur[j];
    __shared__ double part[32];
    acc = sp_warp_sum(acc);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = acc;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) total += part[w];
    const float mean = (float)(total / d);
    const long long base = (r * k + f) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[base + j] = h[base + j] + (ur[j] - mean);
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

/* Stores into an output the storage plan made f32 or bf16. */
__device__ __forceinline__ void sp_st_as(void* out, int bf16, long long i, float v) {
    if (bf16) sp_st((unsigned short*)out, i, v); else sp_st((float*)out, i, v);
}

/* y[r] = Σ_f w[r, f] x[r, f], written f32 or bf16 (an out-projection GEMM reads it). */
extern "C" __global__ void sp_frame_weighted_sum(void* out, int out_bf16, const float* x, const float* w, long long rows, int k, int d) {
    GRID_STRIDE(i, rows * d) {
        long long r = i / d; int c = (int)(i % d);
        float acc = 0.0f;
        for (int f = 0; f < k; ++f) acc += w[r * k + f] * x[(r * k + f) * d + c];
        sp_st_as(out, out_bf16, i, acc);
    }
}

/* One block per row: logsumexp(logits) - logits[target], 0 where ignored. */
/* A row's maximum and Σ exp(x − max) (in double), for the loss and its gradient. One block. */
__device__ void sp_row_softmax_stats(const float* row, int v, double* maxv, double* sum) {
    __shared__ float mx[1024];
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, row[j]);
    mx[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) { if (threadIdx.x < s) mx[threadIdx.x] = fmaxf(mx[threadIdx.x], mx[threadIdx.x + s]); __syncthreads(); }
    *maxv = mx[0];
    double acc = 0.0;
    for (int j = threadIdx.x; j < v; j += blockDim.x) acc += exp((double)row[j] - *maxv);
    *sum = sp_block_sum(acc);
}

extern "C" __global__ void sp_cross_entropy(float* out, const float* logits, const long long* targets, int v, long long ignore) {
    long long t = targets[blockIdx.x];
    if (t == ignore) { if (threadIdx.x == 0) out[blockIdx.x] = 0.0f; return; }
    const float* row = logits + (long long)blockIdx.x * v;
    double maxv, sum;
    sp_row_softmax_stats(row, v, &maxv, &sum);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)(maxv + log(sum) - (double)row[t]);
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

/* First pass of a column sum over many rows: block (32, 8) sums 32 columns over one chunk of
   rows into partial[chunk * n + j]; sp_sum_chunks then adds the chunks (fixed order, so the
   result does not depend on scheduling). */
extern "C" __global__ void sp_sum_rows_partial(double* partial, const float* x, long long rows, long long n, long long chunk) {
    __shared__ double buf[8][33];
    const long long j = blockIdx.x * 32LL + threadIdx.x;
    const long long r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
    double acc = 0.0;
    if (j < n) for (long long r = r0 + threadIdx.y; r < r1; r += 8) acc += (double)x[r * n + j];
    buf[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        double t = 0.0;
        for (int k = 0; k < 8; ++k) t += buf[k][threadIdx.x];
        partial[blockIdx.y * n + j] = t;
    }
}

extern "C" __global__ void sp_sum_chunks(float* out, const double* partial, long long chunks, long long n) {
    GRID_STRIDE(j, n) {
        double acc = 0.0;
        for (long long r = 0; r < chunks; ++r) acc += partial[r * n + j];
        out[j] = (float)acc;
    }
}

/* First pass of a full sum: each block's grid-stride share into partial[block]. */
extern "C" __global__ void sp_sum_all_partial(double* partial, const float* x, long long n) {
    double acc = 0.0;
    GRID_STRIDE(i, n) acc += (double)x[i];
    acc = sp_block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

/* out[r] = sum over j < inner of x[r * inner + j]  (an outer broadcast's adjoint). */
extern "C" __global__ void sp_sum_inner(float* out, const float* x, long long rows, long long inner) {
    /* One warp per row: its lanes read the row contiguously. */
    const long long warps = (long long)gridDim.x * (blockDim.x / 32);
    for (long long r = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
        double acc = 0.0;
        for (long long j = threadIdx.x % 32; j < inner; j += 32) acc += (double)x[r * inner + j];
        for (int s = 16; s > 0; s >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, s);
        if (threadIdx.x % 32 == 0) out[r] = (float)acc;
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

/* dx of y = x r w with r = (mean x^2 + eps)^-1/2; dw partial per row. */
extern "C" __global__ void sp_rms_norm_grad(float* dx, float* dw_rows, const float* dy, const float* x, const float* w, long long rows, int d, double eps) {
    ROW_TEAM(row, rows)
    long long off = row * d;
    double ss = 0.0, gx = 0.0;
    /* Unrolled, so that several loads of the row are in flight at once. */
#pragma unroll 4
    for (int j = lane; j < d; j += team) {
        double xv = x[off + j];
        ss += xv * xv;
        gx += (double)dy[off + j] * (double)w[j] * xv;
    }
    ss = sp_team_sum(ss);
    gx = sp_team_sum(gx);
    double r = 1.0 / sqrt(ss / d + eps);
#pragma unroll 4
    for (int j = lane; j < d; j += team) {
        double xv = x[off + j];
        dx[off + j] = (float)(r * (double)dy[off + j] * (double)w[j] - xv * r * r * r * gx / d);
        dw_rows[off + j] = (float)((double)dy[off + j] * xv * r);
    }
}

/* sp_rms_norm_grad for rows of d <= 1024 floats, d a multiple of 4, without the per-row dw: a
   block of 8 warps walks rows with a stride (one warp per row). A lane loads its float4s of x
   and dy once, all before any use (up to 16 16-byte loads in flight per lane: the kernel waits
   on memory, not on instructions), sums x² and dy·w·x in f32 over its own columns and in f64
   across the warp, writes dx from the registers, and adds its columns' dw into its warp's row
   of shared memory (in registers they would spill); the block's sum goes to
   dw_partial[block * d + j] (sp_sum_chunks adds the blocks in a fixed order). */
extern "C" __global__ void __launch_bounds__(256, 2) sp_rms_norm_grad_blocks(float* dx, double* dw_partial, const float* dy, const float* x, const float* w, long long rows, int d, double eps) {
    __shared__ float red[8][32 * 4 * RMS_LANE_VECS];
    const int lane = threadIdx.x, warp = threadIdx.y, nv = d / 4;
    const float4* w4 = (const float4*)w;
    float4* dw = (float4*)red[warp];
#pragma unroll
    for (int k = 0; k < RMS_LANE_VECS; ++k) dw[lane + 32 * k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (long long r = blockIdx.x * 8LL + warp; r < rows; r += gridDim.x * 8LL) {
        const float4* x4 = (const float4*)(x + r * d);
        const float4* g4 = (const float4*)(dy + r * d);
        float4 xv[RMS_LANE_VECS], gv[RMS_LANE_VECS];
#pragma unroll
        for (int k = 0; k < RMS_LANE_VECS; ++k) {
            const int j = lane + 32 * k;
            if (j < nv) {
                xv[k] = x4[j];
                gv[k] = g4[j];
            }
        }
        float ss = 0.0f, gx = 0.0f;
#pragma unroll
        for (int k = 0; k < RMS_LANE_VECS; ++k) {
            const int j = lane + 32 * k;
            if (j < nv) {
                const float4 a = xv[k], g = gv[k], wv = w4[j];
                ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
                gx += g.x * wv.x * a.x + g.y * wv.y * a.y + g.z * wv.z * a.z + g.w * wv.w * a.w;
            }
        }
        const double sst = sp_team_sum((double)ss), gxt = sp_team_sum((double)gx);
        const double rr = 1.0 / sqrt(sst / d + eps);
        const float rf = (float)rr, cf = (float)(rr * rr * rr * gxt / d);
        float4* dx4 = (float4*)(dx + r * d);
#pragma unroll
        for (int k = 0; k < RMS_LANE_VECS; ++k) {
            const int j = lane + 32 * k;
            if (j < nv) {
                const float4 a = xv[k], g = gv[k], wv = w4[j];
                dx4[j] = make_float4(rf * g.x * wv.x - a.x * cf, rf * g.y * wv.y - a.y * cf, rf * g.z * wv.z - a.z * cf, rf * g.w * wv.w - a.w * cf);
                float4 acc = dw[j];
                acc.x += g.x * a.x * rf;
                acc.y += g.y * a.y * rf;
                acc.z += g.z * a.z * rf;
                acc.w += g.w * a.w * rf;
                dw[j] = acc;
            }
        }
    }
    __syncthreads();
    for (int j = warp * 32 + lane; j < d; j += 256) {
        double acc = 0.0;
        for (int q = 0; q < 8; ++q) acc += red[q][j];
        dw_partial[blockIdx.x * (long long)d + j] = acc;
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

/* Grid (columns of d, rows): each thread reads dy once and writes its k frames (no 64-bit
   division per element). */
extern "C" __global__ void sp_frame_weighted_sum_grad_frames(float* dframes, const float* dy, const float* w, long long rows, int k, int d) {
    for (long long r = blockIdx.y; r < rows; r += gridDim.y)
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < d; c += gridDim.x * blockDim.x) {
            const float g = dy[r * d + c];
            for (int f = 0; f < k; ++f) dframes[(r * k + f) * d + c] = g * w[r * k + f];
        }
}

/* A team per (row, frame) (ROW_TEAM): dw = sum_d dy * frame. */
extern "C" __global__ void sp_frame_weighted_sum_grad_weights(float* dw, const float* dy, const float* frames, long long rks, int k, int d) {
    ROW_TEAM(rk, rks)
    const long long r = rk / k;
    double acc = 0.0;
#pragma unroll 4
    for (int j = lane; j < d; j += team) acc += (double)dy[r * d + j] * (double)frames[rk * d + j];
    acc = sp_team_sum(acc);
    if (lane == 0) dw[rk] = (float)acc;
}

/* One block per row: (softmax - onehot) * dce. */
extern "C" __global__ void sp_cross_entropy_grad(float* out, const float* dce, const float* logits, const long long* targets, int v, long long ignore) {
    long long t = targets[blockIdx.x];
    float* o = out + (long long)blockIdx.x * v;
    if (t == ignore) { for (int j = threadIdx.x; j < v; j += blockDim.x) o[j] = 0.0f; return; }
    const float* row = logits + (long long)blockIdx.x * v;
    double maxv, sum;
    sp_row_softmax_stats(row, v, &maxv, &sum);
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

/* Training on the device. Gradient accumulation over micro-batches: acc = s·g, or acc += s·g. */
extern "C" __global__ void sp_accumulate(float* acc, const float* g, float s, int first, long long n) {
    GRID_STRIDE(i, n) { acc[i] = first ? s * g[i] : acc[i] + s * g[i]; }
}

/* Σ x² into out[0] (double, as the host clip does); one atomic per block. */
extern "C" __global__ void sp_sum_squares(double* out, const float* x, long long n) {
    double acc = 0.0;
    GRID_STRIDE(i, n) { double v = (double)x[i]; acc += v * v; }
    acc = sp_block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

/* One Adam / AdamW step of one parameter tensor, as runtime::train::optim::Adam::step (there in
   double, here in float): g ← g·gscale (clipping); Adam adds wd·p to g, AdamW decays p. The bf16
   copy GEMMs read is refreshed in the same pass when there is one. */
extern "C" __global__ void sp_adam(float* p, float* m, float* v, unsigned short* p_bf16, const float* g, long long n,
                                   float lr, float wd, float b1, float b2, float eps, float bc1, float bc2, float gscale, int decoupled) {
    GRID_STRIDE(i, n) {
        float pi = p[i];
        float gi = g[i] * gscale;
        if (!decoupled) gi += wd * pi;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        if (decoupled) pi *= 1.0f - lr * wd;
        pi -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        p[i] = pi;
        if (p_bf16) {
            unsigned int u = __float_as_uint(pi);
            p_bf16[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
}
"#;
