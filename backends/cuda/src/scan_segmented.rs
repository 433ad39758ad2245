//! The time-parallel reverse scan, for scans with few columns.
//!
//! The tiled reverse scan walks all S steps of a column inside one block, so it takes S steps'
//! latency however few columns there are: at 1,792 columns most SMs wait. But the state
//! adjoint's recurrence is affine in the carried adjoint, a_{t-1} = A_t·a_t + B_t, with A_t and
//! B_t given by the forward (re-run from its checkpoints) and the output gradients alone. So the
//! steps are cut into segments of [`SEGMENT_CHUNKS`] checkpoint chunks, one thread per
//! (column, segment), in two kernels:
//! 1. the summary kernel composes its segment's (A, B) over the segment's steps;
//! 2. the adjoint kernel composes the later segments' summaries into the adjoint entering its own segment,
//!    then runs the full reverse step over the segment as the per-column kernel does, writing
//!    the input gradients and one parameter-gradient sum per (segment, column).
//!
//! Each reads the per-step inputs once, so the pair moves about twice what the tiled kernel
//! moves: worth it where the tiled kernel would leave SMs idle. One state variable only, and the
//! forward's checkpoints must exist.

use crate::codegen::{expr, ident, Elem};
use crate::scan_codegen::{adjoint_params, adjoint_result_params, adjoint_step_body, column_setup, reverse_chunks, split_adjoint, CHECKPOINT_EVERY};
use sparkc_ir::adjoint::{derive, state_grad_name};
use sparkc_ir::expr::Expr;
use sparkc_ir::neuron::NeuronModel;
use std::collections::BTreeSet;
use std::fmt::Write;

/// Checkpoint chunks per segment: 8 × 16 = 128 steps, 64 segments at S = 8,176.
pub const SEGMENT_CHUNKS: usize = 8;

/// Segments of a scan over `s` steps.
pub fn segments(s: usize) -> usize {
    s.div_ceil(CHECKPOINT_EVERY).div_ceil(SEGMENT_CHUNKS)
}

/// Whether `cols` columns run the segmented reverse scan rather than the tiled one: when
/// 128-channel blocks would fill at most a quarter of the SMs. Measured on the H100 at
/// S = 8,176 (segmented / tiled): 1,792 columns 0.12 / 0.50 ms, 5,376 columns 0.52 / 0.42 ms,
/// 14,336 columns 2.7 / 1.8 ms. `SPARKC_SEGMENTED_REVERSE` = `always` or `never` overrides
/// the choice, for tuning and tests.
pub fn prefer_segments(cols: usize, sms: usize) -> bool {
    // Read once: this runs at every reverse-scan launch.
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| match std::env::var("SPARKC_SEGMENTED_REVERSE").as_deref() {
        Ok("always") => Some(true),
        Ok("never") => Some(false),
        _ => None,
    });
    forced.unwrap_or(4 * cols.div_ceil(crate::scan_codegen::TILE_THREADS) <= sms)
}

/// The two kernels' sources (see the module documentation).
pub struct SegmentedAdjoint {
    pub summary: String,
    pub adjoint: String,
}

/// The segmented reverse scan of `model`, or why it does not apply (more than one state, or an
/// adjoint that is not affine in the carried state adjoint). The adjoint kernel's signature is
/// the per-column kernel's with `seg_a, seg_b, nseg` in place of `have_ck`; its parameter
/// gradients are [nseg, B, C]. The summary kernel takes the leading parameters, then
/// `seg_a, seg_b, nseg, B, S, K, C`. Both launch as (⌈B·C/128⌉, nseg) blocks of 128 threads.
#[allow(clippy::too_many_arguments)]
pub fn scan_adjoint_segmented(summary_name: &str, name: &str, model: &NeuronModel, emit: &[String], token_scope: bool, inputs: &[Elem], out_grads: &[Elem], in_grads: &[Elem]) -> Result<SegmentedAdjoint, String> {
    let [state] = model.state.as_slice() else {
        return Err(format!("`{}` has {} state variables; the segmented reverse scan takes one", model.name, model.state.len()));
    };
    let coefficients = affine_step(model, emit, token_scope)?;
    let id = |n: &str| ident(n);
    let st = id(&state.name);
    let lead = adjoint_params(model, emit, inputs, out_grads)?;
    let g = SEGMENT_CHUNKS;
    let head = |s: &mut String| {
        let _ = writeln!(s, "  const long long col = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
        let _ = writeln!(s, "  const int seg = blockIdx.y;");
        let _ = writeln!(s, "  if (col >= (long long)B * C) return;");
        s.push_str(&column_setup(model));
        let _ = writeln!(s, "  const int last = min(nck, (seg + 1) * {g}) - 1;");
        let _ = writeln!(s, "  const long long bc = (long long)B * C;");
    };

    let mut p = lead.clone();
    p.extend(["float* __restrict__ seg_a", "float* __restrict__ seg_b", "int nseg", "int B", "int S", "int K", "int C"].map(String::from));
    let mut summary = format!("extern \"C\" __global__ void {summary_name}({}) {{\n", p.join(", "));
    head(&mut summary);
    let _ = writeln!(summary, "  float sum_a = 1.0f, sum_b = 0.0f;");
    let compose = format!("{coefficients}      sum_b = coef_a * sum_b + coef_b;\n      sum_a = coef_a * sum_a;\n");
    summary.push_str(&reverse_chunks(model, emit, token_scope, "last", &format!("seg * {g}"), &compose));
    let _ = writeln!(summary, "  seg_a[seg * bc + col] = sum_a;\n  seg_b[seg * bc + col] = sum_b;\n}}");

    let mut p = lead;
    p.extend(["const float* __restrict__ seg_a", "const float* __restrict__ seg_b", "int nseg"].map(String::from));
    p.extend(adjoint_result_params(model, in_grads)?);
    p.extend(["int B", "int S", "int K", "int C"].map(String::from));
    let mut adjoint = format!("extern \"C\" __global__ void {name}({}) {{\n", p.join(", "));
    head(&mut adjoint);
    // The adjoint entering this segment: the final one carried back through the later segments.
    let _ = writeln!(adjoint, "  float carry_{st} = gf_{st}[col];");
    let _ = writeln!(adjoint, "  for (int k = nseg - 1; k > seg; --k) carry_{st} = seg_a[k * bc + col] * carry_{st} + seg_b[k * bc + col];");
    for n in &model.params {
        let _ = writeln!(adjoint, "  double acc_{} = 0.0;", id(n));
    }
    let step = derive(model, emit)?;
    adjoint.push_str(&reverse_chunks(model, emit, token_scope, "last", &format!("seg * {g}"), &adjoint_step_body(model, &step, token_scope)));
    let _ = writeln!(adjoint, "  if (seg == 0) dinit_{st}[col] = carry_{st};");
    for n in &model.params {
        let _ = writeln!(adjoint, "  dp_{0}[seg * bc + col] = (float)acc_{0};", id(n));
    }
    adjoint.push_str("}\n");
    Ok(SegmentedAdjoint { summary, adjoint })
}

/// Statements that set `coef_a` and `coef_b` for one reverse step (A_t and B_t above): the
/// state-adjoint-independent bindings as they are, the rest once with the carried adjoint at
/// zero (giving B_t) and once as tangents with respect to it (giving A_t). Where the state
/// restarts at a token boundary both are zero.
fn affine_step(model: &NeuronModel, emit: &[String], token_scope: bool) -> Result<String, String> {
    let split = split_adjoint(model, emit)?;
    let id = |n: &str| ident(n);
    let carried = state_grad_name(&model.state[0].name);
    let grad = split.step.state_grads.first().ok_or("the adjoint has no state gradient")?;
    let mut s = String::new();
    for (n, e) in &split.parallel {
        let _ = writeln!(s, "      const float {} = {};", id(n), expr(e, &|v| id(v)));
    }
    let _ = writeln!(s, "      const float {} = 0.0f;", id(&carried));
    let tangent = |n: &str| id(&format!("tangent_{n}"));
    let _ = writeln!(s, "      const float {} = 1.0f;", tangent(&carried));
    let mut dependent: BTreeSet<String> = BTreeSet::from([carried.clone()]);
    for (n, e) in &split.chain {
        let mut terms = Vec::new();
        for v in e.vars().into_iter().filter(|v| dependent.contains(v)) {
            let local = e.diff(&v);
            if local.vars().iter().any(|u| dependent.contains(u)) {
                return Err(format!("the adjoint of `{}` is not affine in the carried state adjoint (`{n}`)", model.name));
            }
            if local != Expr::c(0.0) {
                terms.push(format!("({}) * {}", expr(&local, &|u| id(u)), tangent(&v)));
            }
        }
        let _ = writeln!(s, "      const float {} = {};", id(n), expr(e, &|v| id(v)));
        let _ = writeln!(s, "      const float {} = {};", tangent(n), if terms.is_empty() { "0.0f".to_string() } else { terms.join(" + ") });
        dependent.insert(n.clone());
    }
    let (a, b) = if dependent.contains(grad) { (tangent(grad), id(grad)) } else { ("0.0f".to_string(), id(grad)) };
    let cut = if token_scope { "(step % K == 0) ? 0.0f : " } else { "" };
    let _ = writeln!(s, "      const float coef_a = {cut}{a};\n      const float coef_b = {cut}{b};");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkc_ir::neuron;

    /// PLIF with a detached reset: a_{t-1} = β·(a_t + …): A_t is β and enters the summary; the
    /// adjoint kernel starts from the later segments' summaries.
    #[test]
    fn plif_reverse_scan_splits_into_segments() {
        let m = neuron::plif();
        let emit = ["leak".to_string()];
        let k = scan_adjoint_segmented("plif_seg_summary", "plif_seg", &m, &emit, true, &[Elem::F32], &[Elem::Bf16], &[Elem::Bf16]).unwrap();
        assert!(k.summary.contains("void plif_seg_summary("), "{}", k.summary);
        assert!(k.summary.contains("const float coef_a = (step % K == 0) ? 0.0f : "), "{}", k.summary);
        assert!(k.adjoint.contains("carry_v_v = seg_a[k * bc + col] * carry_v_v + seg_b[k * bc + col]"), "{}", k.adjoint);
        assert!(k.adjoint.contains("dp_v_w[seg * bc + col]"), "{}", k.adjoint);
        assert_eq!(segments(8176), 64);
        // A_t = β and B_t = β·(gradient terms) at zero carry, before the composition.
        assert!(k.summary.contains("sum_b = coef_a * sum_b + coef_b;"), "{}", k.summary);
    }

    /// A reset that is not detached puts the surrogate into A_t, which is still affine.
    #[test]
    fn a_non_detached_reset_is_still_affine() {
        let k = scan_adjoint_segmented("lif_summary", "lif_seg", &neuron::lif(), &["spike".to_string()], false, &[Elem::F32], &[Elem::F32], &[Elem::F32]).unwrap();
        assert!(k.summary.contains("tangent_"), "{}", k.summary);
    }
}
