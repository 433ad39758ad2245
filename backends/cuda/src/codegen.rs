//! CUDA C generated from the IR: expressions, element-wise map kernels and one neuron step
//! (the scan kernels around it are in `scan_codegen`). Nothing here knows any particular
//! neuron model: kernels come from the model's description.

use sparkc_ir::expr::{BinOp, Expr, UnOp};
use sparkc_ir::neuron::{FireCmp, NeuronModel, Reset, SPIKE};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// A C identifier for an IR name.
pub fn ident(name: &str) -> String {
    let mut s = String::from("v_");
    for c in name.chars() {
        s.push(if c.is_ascii_alphanumeric() { c } else { '_' });
    }
    s
}

/// An f32 constant, bit-exact (no decimal round trip).
pub(crate) fn constant(c: f64) -> String {
    format!("__int_as_float(0x{:08x})", (c as f32).to_bits())
}

/// `e` as a CUDA C f32 expression; `var` maps IR names to C expressions.
pub fn expr(e: &Expr, var: &dyn Fn(&str) -> String) -> String {
    match e {
        Expr::Var(v) => var(v),
        Expr::Const(c) => constant(*c),
        Expr::Un(op, a) => {
            let a = expr(a, var);
            match op {
                UnOp::Neg => format!("(-({a}))"),
                UnOp::Abs => format!("fabsf({a})"),
                UnOp::Sign => format!("sp_sign({a})"),
                UnOp::Exp => format!("expf({a})"),
                UnOp::Log => format!("logf({a})"),
                UnOp::Log1p => format!("log1pf({a})"),
                UnOp::Sqrt => format!("sqrtf({a})"),
                UnOp::Tanh => format!("tanhf({a})"),
                UnOp::Atan => format!("atanf({a})"),
                UnOp::Sigmoid => format!("sp_sigmoid({a})"),
                UnOp::Softplus => format!("sp_softplus({a})"),
            }
        }
        Expr::Bin(op, a, b) => {
            let (a, b) = (expr(a, var), expr(b, var));
            match op {
                BinOp::Add => format!("({a} + {b})"),
                BinOp::Sub => format!("({a} - {b})"),
                BinOp::Mul => format!("({a} * {b})"),
                BinOp::Div => format!("({a} / {b})"),
                BinOp::Min => format!("fminf({a}, {b})"),
                BinOp::Max => format!("fmaxf({a}, {b})"),
                BinOp::Ge => format!("(({a}) >= ({b}) ? 1.0f : 0.0f)"),
                BinOp::Gt => format!("(({a}) > ({b}) ? 1.0f : 0.0f)"),
            }
        }
    }
}

/// Helpers every generated module starts with; they match the CPU backend's f32 formulas.
pub const PRELUDE: &str = r#"
#ifdef SP_FAST
/* bf16 programs: hardware exp/log/reciprocal (their storage rounds far more than these). */
__device__ __forceinline__ float sp_sigmoid(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }
__device__ __forceinline__ float sp_softplus(float x) { return x > 20.0f ? x : __logf(1.0f + __expf(x)); }
__device__ __forceinline__ float sp_fma(float a, float b, float c) { return fmaf(a, b, c); }
#else
__device__ __forceinline__ float sp_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float sp_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
/* Exact programs round the product and the sum apart, as the CPU oracle does. */
__device__ __forceinline__ float sp_fma(float a, float b, float c) { return a * b + c; }
#endif
__device__ __forceinline__ float sp_sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
/* Loads and stores by storage type; arithmetic is f32. bf16 is stored as its bit pattern and
   rounded to nearest even (NaN stays NaN). */
__device__ __forceinline__ float sp_ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float sp_ld(const unsigned short* p, long long i) { return __uint_as_float(((unsigned int)p[i]) << 16); }
/* Two adjacent elements (i even): one 32-bit load of a bf16 pair, one 64-bit load of f32s. */
__device__ __forceinline__ float2 sp_ld2(const float* p, long long i) { return *(const float2*)(p + i); }
__device__ __forceinline__ float2 sp_ld2(const unsigned short* p, long long i) {
    const unsigned int u = *(const unsigned int*)(p + i);
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ unsigned short sp_bf16(float v) {
#if __CUDA_ARCH__ >= 800
    /* One instruction where the hardware converts (the same rounding; NaN stays NaN). */
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}
__device__ __forceinline__ void sp_st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void sp_st(unsigned short* p, long long i, float v) { p[i] = sp_bf16(v); }
/* Two adjacent elements (i even): one 64-bit store of f32s, one 32-bit store of a bf16 pair. */
__device__ __forceinline__ void sp_st2(float* p, long long i, float2 v) { *(float2*)(p + i) = v; }
__device__ __forceinline__ void sp_st2(unsigned short* p, long long i, float2 v) {
#if __CUDA_ARCH__ >= 800
    /* Both halves rounded by one instruction (the same rounding as sp_bf16). */
    unsigned int u;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(v.y), "f"(v.x));
    *(unsigned int*)(p + i) = u;
#else
    *(unsigned int*)(p + i) = (unsigned int)sp_bf16(v.x) | ((unsigned int)sp_bf16(v.y) << 16);
#endif
}
/* cp.async: 16-byte global → shared copies (to a shared-memory address) that complete in
   groups (sm_80+). */
__device__ __forceinline__ void sp_cp16_at(unsigned int smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(smem), "l"(gmem));
}
__device__ __forceinline__ void sp_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void sp_cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }
/* The most frames a fused PonderNet kernel keeps in registers (fusion::PONDER_FRAMES). */
#define PONDER_FRAMES 32
/* How an operand of a broadcasting map is indexed from the output index i. */
__device__ __forceinline__ long long sp_bcast(long long i, int mode, long long n) {
    return mode == 0 ? i : (mode == 1 ? i % n : (mode == 2 ? i / n : 0));
}
"#;

/// How a tensor is stored on the device. Arithmetic is always f32; bf16 halves the bytes of
/// the large activations that GEMMs read and write (mixed precision, as the original's autocast).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    Bf16,
}

impl Elem {
    pub fn c_type(self) -> &'static str {
        match self {
            Elem::F32 => "float",
            Elem::Bf16 => "unsigned short",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 => 2,
        }
    }
}

/// An element-wise kernel `name(out, n, x0, mode0, n0, x1, ...)` computing `e` over x0..xk,
/// all f32.
pub fn map_kernel(name: &str, e: &Expr, arity: usize) -> String {
    map_kernel_typed(name, e, &vec![Elem::F32; arity], Elem::F32)
}

/// [`map_kernel`] with the storage of every operand and of the result.
pub fn map_kernel_typed(name: &str, e: &Expr, ins: &[Elem], out: Elem) -> String {
    let mut s = String::new();
    let params: Vec<String> = ins.iter().enumerate().map(|(i, t)| format!("const {}* __restrict__ x{i}, int m{i}, long long n{i}", t.c_type())).collect();
    let _ = writeln!(s, "extern \"C\" __global__ void {name}({}* __restrict__ out, long long n{}{}) {{", out.c_type(), if ins.is_empty() { "" } else { ", " }, params.join(", "));
    let _ = writeln!(s, "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {{");
    for i in 0..ins.len() {
        let _ = writeln!(s, "    float a{i} = sp_ld(x{i}, sp_bcast(i, m{i}, n{i}));");
    }
    let body = expr(e, &|v| v.strip_prefix('x').map(|k| format!("a{k}")).unwrap_or_else(|| ident(v)));
    let _ = writeln!(s, "    sp_st(out, i, {body});");
    let _ = writeln!(s, "  }}\n}}");
    s
}

/// PonderNet over one (b, t) row of k <= PONDER_FRAMES frames, for inference: the halt logits (a
/// dot product of each frame with w_h, plus b_h), the halting weights and the weighted sum of
/// the frames, written f32 or bf16. Each frame element is `e` over the operands x0..xk (all of
/// the frames' shape), so the element-wise map that makes the frames runs inside this kernel.
/// One block per row: each thread loads its columns of all k frames at once (a decode step has
/// a single row, so the loads' latency is the cost). Signature: (out, out_bf16, x0.., w_h, b_h,
/// rows, k, d, clamp, eps).
pub fn ponder_aggregate_kernel(name: &str, e: &Expr, ins: &[Elem]) -> String {
    let mut s = String::new();
    let params: Vec<String> = ins.iter().enumerate().map(|(i, t)| format!("const {}* __restrict__ x{i}", t.c_type())).collect();
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void {name}(void* out, int out_bf16, {}, const float* wh, const float* bh, long long rows, int k, int d, float clampv, float eps) {{",
        params.join(", ")
    );
    let loads: String = (0..ins.len()).map(|i| format!("const float a{i} = sp_ld(x{i}, i); ")).collect();
    let body = expr(e, &|v| v.strip_prefix('x').map(|k| format!("a{k}")).unwrap_or_else(|| ident(v)));
    let _ = writeln!(s, "  auto frame = [&](long long i) -> float {{ {loads}return {body}; }};");
    s.push_str(
        r#"  __shared__ float part[32][PONDER_FRAMES];
  __shared__ float lam[PONDER_FRAMES];
  const long long r = blockIdx.x;
  if (r >= rows) return;
  const long long base = r * k * d;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  float acc[PONDER_FRAMES];
#pragma unroll
  for (int f = 0; f < PONDER_FRAMES; ++f) acc[f] = 0.0f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float w = wh[j];
#pragma unroll
    for (int f = 0; f < PONDER_FRAMES; ++f)
      if (f < k) acc[f] += frame(base + (long long)f * d + j) * w;
  }
#pragma unroll
  for (int f = 0; f < PONDER_FRAMES; ++f) {
    if (f < k) {
      float v = acc[f];
      for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
      if (lane == 0) part[warp][f] = v;
    }
  }
  __syncthreads();
  if (warp == 0) {
    /* Lane f: frame f's logit, halting probability, and survival = exp of the exclusive
       prefix sum of log1p(-p). */
    float logit = bh[0];
    if (lane < k) for (int w = 0; w < warps; ++w) logit += part[w][lane];
    const float p = lane < k ? fminf(fmaxf(1.0f / (1.0f + expf(-logit)), clampv), 1.0f - clampv) : 0.0f;
    const float lg = lane < k ? log1pf(-p) : 0.0f;
    float inc = lg;
    for (int s = 1; s < 32; s <<= 1) {
      const float t = __shfl_up_sync(0xffffffffu, inc, s);
      if (lane >= s) inc += t;
    }
    const float l = lane < k ? p * expf(inc - lg) : 0.0f;
    float total = l;
    for (int s = 16; s > 0; s >>= 1) total += __shfl_xor_sync(0xffffffffu, total, s);
    if (lane < k) lam[lane] = l / (total + eps);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float y = 0.0f;
    for (int f = 0; f < k; ++f) y += lam[f] * frame(base + (long long)f * d + j);
    if (out_bf16) sp_st((unsigned short*)out, r * d + j, y); else sp_st((float*)out, r * d + j, y);
  }
}
"#,
    );
    s
}

/// Statements for one forward step of `model`: reads the C variables of inputs, params and
/// state (`ident(name)`), leaves the spike in `z`, the emitted outputs in `out_<k>` and the new
/// state back in the state variables.
pub(crate) fn forward_step(model: &NeuronModel, emit: &[String]) -> String {
    forward_step_given(model, emit, &BTreeSet::new())
}

/// [`forward_step`] where the lets in `given` are already defined (as `ident(name)`), e.g.
/// computed ahead by other threads.
pub(crate) fn forward_step_given(model: &NeuronModel, emit: &[String], given: &BTreeSet<String>) -> String {
    forward_step_named(model, emit, given).0
}

/// [`forward_step_given`], with the C variable that holds each let's value.
pub(crate) fn forward_step_named(model: &NeuronModel, emit: &[String], given: &BTreeSet<String>) -> (String, BTreeMap<String, String>) {
    let mut s = String::new();
    // Current C name of each model name (charges rebind the state).
    let mut cur: BTreeMap<String, String> = BTreeMap::new();
    for n in model.inputs.iter().chain(&model.params).chain(given) {
        cur.insert(n.clone(), ident(n));
    }
    for st in &model.state {
        cur.insert(st.name.clone(), ident(&st.name));
    }
    let mut fresh = 0;
    // Names whose value depends on the state (the sequential path of a scan).
    let mut dependent: BTreeSet<String> = model.state.iter().map(|st| st.name.clone()).collect();
    let mut bind = |s: &mut String, cur: &mut BTreeMap<String, String>, name: &str, e: &Expr| {
        let c = format!("t{fresh}");
        fresh += 1;
        let on_chain = |e: &Expr| e.vars().iter().any(|v| dependent.contains(v));
        let named = |v: &str| cur.get(v).cloned().unwrap_or_else(|| ident(v));
        let code = match e {
            // a·s + b with only a·s on the state's path: one fused multiply-add after b is
            // ready, not a multiply and then an add on the path (fast math lets the compiler
            // fuse either product, and it may pick b's).
            Expr::Bin(BinOp::Add, l, r) if on_chain(l) != on_chain(r) => {
                let (prod, rest) = if on_chain(l) { (l, r) } else { (r, l) };
                match &**prod {
                    Expr::Bin(BinOp::Mul, a, b) => format!("sp_fma({}, {}, {})", expr(a, &named), expr(b, &named), expr(rest, &named)),
                    _ => expr(e, &named),
                }
            }
            _ => expr(e, &named),
        };
        if on_chain(e) {
            dependent.insert(name.to_string());
        }
        let _ = writeln!(s, "      const float {c} = {code};");
        cur.insert(name.to_string(), c);
    };
    for b in model.lets.iter().filter(|b| !given.contains(&b.name)).chain(&model.charge) {
        bind(&mut s, &mut cur, &b.name, &b.expr);
    }
    bind(&mut s, &mut cur, "__threshold", &model.threshold);
    let mem = cur[&model.membrane].clone();
    let thr = cur["__threshold"].clone();
    let cmp = match model.fire {
        FireCmp::Ge => ">=",
        FireCmp::Gt => ">",
    };
    let _ = writeln!(s, "      const float z = ({mem} {cmp} {thr}) ? 1.0f : 0.0f;");
    cur.insert(SPIKE.to_string(), "z".to_string());
    let reset = match model.reset {
        Reset::Subtract => Some(format!("{mem} - {thr} * z")),
        Reset::ToValue(v) => Some(format!("z * {} + (1.0f - z) * {mem}", constant(v))),
        Reset::None => None,
    };
    if let Some(r) = reset {
        let _ = writeln!(s, "      const float t_reset = {r};");
        cur.insert(model.membrane.clone(), "t_reset".into());
    }
    for (k, o) in emit.iter().enumerate() {
        let b = model.output(o).expect("emitted outputs exist (verified)");
        let code = expr(&b.expr, &|v| cur.get(v).cloned().unwrap_or_else(|| ident(v)));
        let _ = writeln!(s, "      const float out_{k} = {code};");
    }
    for st in &model.state {
        let _ = writeln!(s, "      {} = {};", ident(&st.name), cur[&st.name]);
    }
    let lets = model.lets.iter().filter_map(|b| cur.get(&b.name).map(|c| (b.name.clone(), c.clone()))).collect();
    (s, lets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_kernels_are_generated_from_the_expression() {
        let m = map_kernel("m0", &sparkc_ir::parse_expr("softplus(x0 + x1) * x2").unwrap(), 3);
        assert!(m.contains("sp_softplus((a0 + a1))"), "{m}");
        let t = map_kernel_typed("m1", &sparkc_ir::parse_expr("x0 * x1").unwrap(), &[Elem::Bf16, Elem::F32], Elem::Bf16);
        let p = ponder_aggregate_kernel("p0", &sparkc_ir::parse_expr("x0 * sigmoid(x1) + x2").unwrap(), &[Elem::Bf16, Elem::Bf16, Elem::F32]);
        assert!(p.contains("return ((a0 * sp_sigmoid(a1)) + a2);") && p.contains("const unsigned short* __restrict__ x1, const float* __restrict__ x2, const float* wh"), "{p}");
        assert!(t.contains("unsigned short* __restrict__ out") && t.contains("const unsigned short* __restrict__ x0"), "{t}");
    }
}
