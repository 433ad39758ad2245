//! CUDA C generated from the IR: expressions, element-wise map kernels and neuron scan
//! kernels (forward, and the reverse scan from `sparkc_ir::adjoint`). Nothing here knows any
//! particular neuron model: kernels come from the model's description.

use sparkc_ir::expr::{BinOp, Expr, UnOp};
use sparkc_ir::neuron::{FireCmp, NeuronModel, Reset, SPIKE};
use std::collections::BTreeMap;
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
fn constant(c: f64) -> String {
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
__device__ __forceinline__ float sp_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float sp_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sp_sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
/* How an operand of a broadcasting map is indexed from the output index i. */
__device__ __forceinline__ long long sp_bcast(long long i, int mode, long long n) {
    return mode == 0 ? i : (mode == 1 ? i % n : (mode == 2 ? i / n : 0));
}
"#;

/// An element-wise kernel `name(out, n, x0, mode0, n0, x1, ...)` computing `e` over x0..xk.
pub fn map_kernel(name: &str, e: &Expr, arity: usize) -> String {
    let mut s = String::new();
    let params: Vec<String> = (0..arity).map(|i| format!("const float* __restrict__ x{i}, int m{i}, long long n{i}")).collect();
    let _ = writeln!(s, "extern \"C\" __global__ void {name}(float* __restrict__ out, long long n{}{}) {{", if arity > 0 { ", " } else { "" }, params.join(", "));
    let _ = writeln!(s, "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {{");
    for i in 0..arity {
        let _ = writeln!(s, "    float a{i} = x{i}[sp_bcast(i, m{i}, n{i})];");
    }
    let body = expr(e, &|v| v.strip_prefix('x').map(|k| format!("a{k}")).unwrap_or_else(|| ident(v)));
    let _ = writeln!(s, "    out[i] = {body};");
    let _ = writeln!(s, "  }}\n}}");
    s
}

/// Statements for one forward step of `model`: reads the C variables of inputs, params and
/// state (`ident(name)`), leaves the spike in `z`, the emitted outputs in `out_<k>` and the new
/// state back in the state variables.
fn forward_step(model: &NeuronModel, emit: &[String]) -> String {
    let mut s = String::new();
    // Current C name of each model name (charges rebind the state).
    let mut cur: BTreeMap<String, String> = BTreeMap::new();
    for n in model.inputs.iter().chain(&model.params) {
        cur.insert(n.clone(), ident(n));
    }
    for st in &model.state {
        cur.insert(st.name.clone(), ident(&st.name));
    }
    let mut fresh = 0;
    let mut bind = |s: &mut String, cur: &mut BTreeMap<String, String>, name: &str, e: &Expr| {
        let c = format!("t{fresh}");
        fresh += 1;
        let code = expr(e, &|v| cur.get(v).cloned().unwrap_or_else(|| ident(v)));
        let _ = writeln!(s, "      const float {c} = {code};");
        cur.insert(name.to_string(), c);
    };
    for b in model.lets.iter().chain(&model.charge) {
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
    s
}

/// Steps per unrolled group: the loads of a group are issued before its sequential math, so
/// several frames of memory traffic are in flight per thread. Measured on an H100 (see
/// docs/cuda-notes.md): 16 is best with three per-step inputs, 32 with one.
pub fn scan_unroll(model: &NeuronModel) -> usize {
    if model.inputs.len() <= 1 {
        32
    } else {
        16
    }
}

/// The forward scan kernel: one thread per (batch row, channel); per-step inputs are [B,S,C].
/// Signature: (inputs..., params..., init states..., outputs..., final states..., B, S, K, C).
pub fn scan_forward_kernel(name: &str, model: &NeuronModel, emit: &[String], token_scope: bool) -> String {
    scan_forward_kernel_unrolled(name, model, emit, token_scope, scan_unroll(model))
}

/// [`scan_forward_kernel`] with `u` frames of loads issued ahead of the sequential math.
pub fn scan_forward_kernel_unrolled(name: &str, model: &NeuronModel, emit: &[String], token_scope: bool, u: usize) -> String {
    let mut s = String::new();
    let mut params = Vec::new();
    for n in &model.inputs {
        params.push(format!("const float* __restrict__ in_{}", ident(n)));
    }
    for n in &model.params {
        params.push(format!("const float* __restrict__ p_{}", ident(n)));
    }
    for st in &model.state {
        params.push(format!("const float* __restrict__ init_{}", ident(&st.name)));
    }
    for k in 0..emit.len() {
        params.push(format!("float* __restrict__ o_{k}"));
    }
    for st in &model.state {
        params.push(format!("float* __restrict__ fin_{}", ident(&st.name)));
    }
    params.extend(["int B", "int S", "int K", "int C"].map(String::from));
    let _ = writeln!(s, "extern \"C\" __global__ void {name}({}) {{", params.join(", "));
    let _ = writeln!(s, "  const long long col = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
    let _ = writeln!(s, "  if (col >= (long long)B * C) return;");
    let _ = writeln!(s, "  const int b = (int)(col / C), c = (int)(col % C);");
    for n in &model.params {
        let _ = writeln!(s, "  const float {} = p_{}[c];", ident(n), ident(n));
    }
    for st in &model.state {
        let _ = writeln!(s, "  float {} = init_{}[col];", ident(&st.name), ident(&st.name));
    }
    let _ = writeln!(s, "  const long long base = (long long)b * S * C + c;");
    let _ = writeln!(s, "  for (int s0 = 0; s0 < S; s0 += {u}) {{");
    for n in &model.inputs {
        let _ = writeln!(s, "    float buf_{}[{u}];", ident(n));
    }
    let _ = writeln!(s, "    #pragma unroll\n    for (int j = 0; j < {u}; ++j) {{\n      if (s0 + j < S) {{");
    for n in &model.inputs {
        let _ = writeln!(s, "        buf_{0}[j] = in_{0}[base + (long long)(s0 + j) * C];", ident(n));
    }
    let _ = writeln!(s, "      }}\n    }}");
    let _ = writeln!(s, "    #pragma unroll\n    for (int j = 0; j < {u}; ++j) {{\n      if (s0 + j >= S) break;");
    let _ = writeln!(s, "      const int step = s0 + j;");
    if token_scope {
        for st in &model.state {
            let _ = writeln!(s, "      if (step % K == 0) {} = {};", ident(&st.name), constant(st.init));
        }
    }
    for n in &model.inputs {
        let _ = writeln!(s, "      const float {0} = buf_{0}[j];", ident(n));
    }
    s.push_str(&forward_step(model, emit));
    for k in 0..emit.len() {
        let _ = writeln!(s, "      o_{k}[base + (long long)step * C] = out_{k};");
    }
    let _ = writeln!(s, "    }}\n  }}");
    for st in &model.state {
        let _ = writeln!(s, "  fin_{0}[col] = {0};", ident(&st.name));
    }
    let _ = writeln!(s, "}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkc_ir::neuron;

    #[test]
    fn kernels_are_generated_from_the_model() {
        let src = scan_forward_kernel("plif_fwd", &neuron::plif(), &["leak".into()], false);
        assert!(src.contains("extern \"C\" __global__ void plif_fwd("));
        assert!(src.contains(">= "), "{src}");
        assert!(src.contains("sp_sigmoid(v_w)"), "{src}");
        let m = map_kernel("m0", &sparkc_ir::parse_expr("softplus(x0 + x1) * x2").unwrap(), 3);
        assert!(m.contains("sp_softplus((a0 + a1))"), "{m}");
    }
}

/// The reverse scan kernel, from the model's adjoint step (`sparkc_ir::adjoint::derive`).
/// One thread per (batch row, channel): it re-runs the forward scan writing the state before
/// every step to `scratch`, then walks back in time.
/// Signature: (inputs..., params..., init states..., grads of emitted outputs...,
/// grads of final states..., scratch per state..., input grads..., param grads per row
/// [B,C]..., init-state grads..., B, S, K, C).
pub fn scan_adjoint_kernel(name: &str, model: &NeuronModel, emit: &[String], token_scope: bool) -> Result<String, String> {
    let step = sparkc_ir::adjoint::derive(model, emit)?;
    let mut s = String::new();
    let mut params = Vec::new();
    let id = |n: &str| ident(n);
    for n in &model.inputs {
        params.push(format!("const float* __restrict__ in_{}", id(n)));
    }
    for n in &model.params {
        params.push(format!("const float* __restrict__ p_{}", id(n)));
    }
    for st in &model.state {
        params.push(format!("const float* __restrict__ init_{}", id(&st.name)));
    }
    for k in 0..emit.len() {
        params.push(format!("const float* __restrict__ g_{k}"));
    }
    for st in &model.state {
        params.push(format!("const float* __restrict__ gf_{}", id(&st.name)));
    }
    for st in &model.state {
        params.push(format!("float* __restrict__ scratch_{}", id(&st.name)));
    }
    for n in &model.inputs {
        params.push(format!("float* __restrict__ din_{}", id(n)));
    }
    for n in &model.params {
        params.push(format!("float* __restrict__ dp_{}", id(n)));
    }
    for st in &model.state {
        params.push(format!("float* __restrict__ dinit_{}", id(&st.name)));
    }
    params.extend(["int B", "int S", "int K", "int C"].map(String::from));
    let _ = writeln!(s, "extern \"C\" __global__ void {name}({}) {{", params.join(", "));
    let _ = writeln!(s, "  const long long col = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
    let _ = writeln!(s, "  if (col >= (long long)B * C) return;");
    let _ = writeln!(s, "  const int b = (int)(col / C), c = (int)(col % C);");
    let _ = writeln!(s, "  const long long base = (long long)b * S * C + c;");
    for n in &model.params {
        let _ = writeln!(s, "  const float {} = p_{}[c];", id(n), id(n));
    }
    // 1. Forward recompute, keeping the state before each step.
    let _ = writeln!(s, "  {{");
    for st in &model.state {
        let _ = writeln!(s, "    float {} = init_{}[col];", id(&st.name), id(&st.name));
    }
    let _ = writeln!(s, "    for (int step = 0; step < S; ++step) {{");
    if token_scope {
        for st in &model.state {
            let _ = writeln!(s, "      if (step % K == 0) {} = {};", id(&st.name), constant(st.init));
        }
    }
    for st in &model.state {
        let _ = writeln!(s, "      scratch_{0}[base + (long long)step * C] = {0};", id(&st.name));
    }
    for n in &model.inputs {
        let _ = writeln!(s, "      const float {0} = in_{0}[base + (long long)step * C];", id(n));
    }
    s.push_str(&forward_step(model, &[]));
    let _ = writeln!(s, "    }}\n  }}");
    // 2. Reverse sweep.
    for st in &model.state {
        let _ = writeln!(s, "  float carry_{0} = gf_{0}[col];", id(&st.name));
    }
    for n in &model.params {
        let _ = writeln!(s, "  double acc_{} = 0.0;", id(n));
    }
    let _ = writeln!(s, "  for (int step = S - 1; step >= 0; --step) {{");
    let _ = writeln!(s, "    const long long at = base + (long long)step * C;");
    for n in &model.inputs {
        let _ = writeln!(s, "    const float {0} = in_{0}[at];", id(n));
    }
    for st in &model.state {
        let _ = writeln!(s, "    const float {0} = scratch_{0}[at];", id(&st.name));
        let _ = writeln!(s, "    const float {} = carry_{};", id(&sparkc_ir::adjoint::state_grad_name(&st.name)), id(&st.name));
    }
    for (k, o) in emit.iter().enumerate() {
        let _ = writeln!(s, "    const float {} = g_{k}[at];", id(&sparkc_ir::adjoint::output_grad_name(o)));
    }
    for (n, e) in &step.bindings {
        let _ = writeln!(s, "    const float {} = {};", id(n), expr(e, &|v| id(v)));
    }
    for (n, g) in model.inputs.iter().zip(&step.input_grads) {
        let _ = writeln!(s, "    din_{}[at] = {};", id(n), id(g));
    }
    for (n, g) in model.params.iter().zip(&step.param_grads) {
        let _ = writeln!(s, "    acc_{} += (double){};", id(n), id(g));
    }
    for (st, g) in model.state.iter().zip(&step.state_grads) {
        let cut = if token_scope { "(step % K == 0) ? 0.0f : " } else { "" };
        let _ = writeln!(s, "    carry_{} = {cut}{};", id(&st.name), id(g));
    }
    let _ = writeln!(s, "  }}");
    for st in &model.state {
        let _ = writeln!(s, "  dinit_{0}[col] = carry_{0};", id(&st.name));
    }
    for n in &model.params {
        let _ = writeln!(s, "  dp_{0}[col] = (float)acc_{0};", id(n));
    }
    let _ = writeln!(s, "}}");
    Ok(s)
}
