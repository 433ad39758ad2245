//! Neuron scans, compiled from the neuron model's description into one step program.

use crate::bytecode::{Compiler, Program, Registers, LANES};
use rayon::prelude::*;
use sparkc_ir::neuron::{FireCmp, NeuronModel, Reset, SPIKE};
use sparkc_ir::{BinOp, Expr, StateScope};

pub struct CompiledScan {
    prog: Program,
    inputs: Vec<u16>,
    params: Vec<u16>,
    state: Vec<u16>,
    outs: Vec<u16>,
    state_init: Vec<f32>,
    scope: StateScope,
}

/// Compile one time step of `model` emitting the outputs `emit`.
pub fn compile(model: &NeuronModel, emit: &[String], scope: StateScope) -> Result<CompiledScan, String> {
    let mut c = Compiler::new();
    let named = |c: &mut Compiler, names: &[String]| -> Vec<u16> {
        names
            .iter()
            .map(|n| {
                let r = c.alloc();
                c.bind(n, r);
                r
            })
            .collect()
    };
    let inputs = named(&mut c, &model.inputs);
    let params = named(&mut c, &model.params);
    let state_names: Vec<String> = model.state.iter().map(|s| s.name.clone()).collect();
    let state = named(&mut c, &state_names);
    let fail = |e: crate::bytecode::UnboundVar| format!("neuron `{}`: {e}", model.name);
    for b in &model.lets {
        let r = c.expr(&b.expr).map_err(fail)?;
        c.bind(&b.name, r);
    }
    for b in &model.charge {
        let r = c.expr(&b.expr).map_err(fail)?;
        c.bind(&b.name, r);
    }
    let thr = c.expr(&model.threshold).map_err(fail)?;
    c.bind("__threshold", thr);
    let cmp = match model.fire {
        FireCmp::Ge => BinOp::Ge,
        FireCmp::Gt => BinOp::Gt,
    };
    let mem = Expr::var(&model.membrane);
    let z = c.expr(&Expr::bin(cmp, mem.clone(), Expr::var("__threshold"))).map_err(fail)?;
    c.bind(SPIKE, z);
    let reset = match model.reset {
        Reset::Subtract => Some(Expr::bin(BinOp::Sub, mem.clone(), Expr::bin(BinOp::Mul, Expr::var("__threshold"), Expr::var(SPIKE)))),
        Reset::ToValue(v) => Some(Expr::bin(
            BinOp::Add,
            Expr::bin(BinOp::Mul, Expr::var(SPIKE), Expr::c(v)),
            Expr::bin(BinOp::Mul, Expr::bin(BinOp::Sub, Expr::c(1.0), Expr::var(SPIKE)), mem),
        )),
        Reset::None => None,
    };
    if let Some(e) = reset {
        let r = c.expr(&e).map_err(fail)?;
        c.bind(&model.membrane, r);
    }
    // Outputs get registers of their own: a bare name may share a state register, which the
    // write-back below overwrites.
    let mut outs = Vec::new();
    for name in emit {
        let b = model.output(name).ok_or_else(|| format!("neuron `{}` has no output `{name}`", model.name))?;
        let r = c.expr(&b.expr).map_err(fail)?;
        let own = c.alloc();
        c.copy(own, r);
        outs.push(own);
    }
    // Write the step's state back as a parallel assignment (through temporaries): a charge like
    // `p = q` binds p to q's register, which q's own write-back would otherwise clobber first.
    let temps: Vec<u16> = state_names
        .iter()
        .map(|n| {
            let t = c.alloc();
            c.copy(t, c.reg_of(n).expect("state names are bound"));
            t
        })
        .collect();
    for (i, t) in temps.into_iter().enumerate() {
        c.copy(state[i], t);
    }
    let prog = c.finish();
    Ok(CompiledScan {
        prog,
        inputs,
        params,
        state,
        outs,
        state_init: model.state.iter().map(|s| s.init as f32).collect(),
        scope,
    })
}

/// Shapes of one scan call: batch, frames (T·K), frames per token, channels.
#[derive(Clone, Copy, Debug)]
pub struct ScanDims {
    pub b: usize,
    pub s: usize,
    pub k: usize,
    pub c: usize,
}

impl CompiledScan {
    /// Run over `[B, S, C]` inputs; returns the emitted outputs `[B, S, C]` and final states `[B, C]`.
    pub fn run(&self, inputs: &[&[f32]], params: &[&[f32]], init: &[&[f32]], dims: ScanDims) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let ScanDims { b, s, k, c } = dims;
        let lanes_per_row = c.div_ceil(LANES);
        let n_out = self.outs.len();
        let n_state = self.state.len();
        // Each task owns one batch row and one lane of columns; it returns its outputs
        // lane-major so tasks never share a buffer.
        let tasks: Vec<(Vec<f32>, Vec<f32>)> = (0..b * lanes_per_row)
            .into_par_iter()
            .map(|task| {
                let (bi, lane) = (task / lanes_per_row, task % lanes_per_row);
                let c0 = lane * LANES;
                let len = LANES.min(c - c0);
                let mut regs = Registers::new(&self.prog);
                for (p, &r) in params.iter().zip(&self.params) {
                    regs.reg_mut(r)[..len].copy_from_slice(&p[c0..c0 + len]);
                }
                for (v, &r) in init.iter().zip(&self.state) {
                    regs.reg_mut(r)[..len].copy_from_slice(&v[bi * c + c0..bi * c + c0 + len]);
                }
                let mut out = vec![0f32; n_out * s * len];
                for step in 0..s {
                    if self.scope == StateScope::Token && step % k == 0 {
                        for (&r, &v0) in self.state.iter().zip(&self.state_init) {
                            regs.reg_mut(r)[..len].fill(v0);
                        }
                    }
                    let base = (bi * s + step) * c + c0;
                    for (x, &r) in inputs.iter().zip(&self.inputs) {
                        regs.reg_mut(r)[..len].copy_from_slice(&x[base..base + len]);
                    }
                    self.prog.run(&mut regs, len);
                    for (o, &r) in self.outs.iter().enumerate() {
                        let at = (o * s + step) * len;
                        out[at..at + len].copy_from_slice(&regs.reg(r)[..len]);
                    }
                }
                let mut fin = vec![0f32; n_state * len];
                for (i, &r) in self.state.iter().enumerate() {
                    fin[i * len..(i + 1) * len].copy_from_slice(&regs.reg(r)[..len]);
                }
                (out, fin)
            })
            .collect();
        let mut outs = vec![vec![0f32; b * s * c]; n_out];
        let mut finals = vec![vec![0f32; b * c]; n_state];
        for (task, (out, fin)) in tasks.into_iter().enumerate() {
            let (bi, lane) = (task / lanes_per_row, task % lanes_per_row);
            let c0 = lane * LANES;
            let len = LANES.min(c - c0);
            for (o, dst) in outs.iter_mut().enumerate() {
                for step in 0..s {
                    let src = &out[(o * s + step) * len..(o * s + step + 1) * len];
                    let at = (bi * s + step) * c + c0;
                    dst[at..at + len].copy_from_slice(src);
                }
            }
            for (i, dst) in finals.iter_mut().enumerate() {
                dst[bi * c + c0..bi * c + c0 + len].copy_from_slice(&fin[i * len..(i + 1) * len]);
            }
        }
        (outs, finals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkc_ir::neuron;

    /// The spec's sequential PLIF (§3), written out by hand.
    #[test]
    fn plif_matches_reference_recurrence() {
        let m = neuron::plif();
        let scan = compile(&m, &["leak".into(), "spike".into()], StateScope::Sequence).unwrap();
        let (b, s, c) = (2, 9, 70);
        let x: Vec<f32> = (0..b * s * c).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 0.5).collect();
        let w: Vec<f32> = (0..c).map(|i| (i as f32 * 0.3).sin()).collect();
        let th: Vec<f32> = (0..c).map(|i| 0.2 + 0.01 * i as f32).collect();
        let v0 = vec![0.1f32; b * c];
        let (outs, fin) = scan.run(&[&x], &[&w, &th], &[&v0], ScanDims { b, s, k: 3, c });
        for bi in 0..b {
            for ci in 0..c {
                let beta = 1.0 / (1.0 + (-w[ci]).exp());
                let mut v = v0[bi * c + ci];
                for st in 0..s {
                    let i = (bi * s + st) * c + ci;
                    let p = beta * v + (1.0 - beta) * x[i];
                    let z = if p >= th[ci] { 1.0 } else { 0.0 };
                    v = p - th[ci] * z;
                    assert_eq!(outs[0][i], (1.0 - beta) * v);
                    assert_eq!(outs[1][i], z);
                }
                assert_eq!(fin[0][bi * c + ci], v);
            }
        }
    }
}

/// The reverse scan: recompute the forward state trajectory lane by lane, then run the
/// adjoint step (derived from the neuron model by `sparkc_ir::adjoint`) backwards in time.
pub struct CompiledScanAdjoint {
    forward: CompiledScan,
    prog: Program,
    inputs: Vec<u16>,
    params: Vec<u16>,
    state: Vec<u16>,
    out_grads: Vec<u16>,
    carry: Vec<u16>,
    input_grads: Vec<u16>,
    param_grads: Vec<u16>,
    state_grads: Vec<u16>,
    scope: StateScope,
}

/// Gradients from a reverse scan: per-step inputs [B,S,C], params [C], initial states [B,C].
pub struct ScanGrads {
    pub inputs: Vec<Vec<f32>>,
    pub params: Vec<Vec<f32>>,
    pub init: Vec<Vec<f32>>,
}

pub fn compile_adjoint(model: &NeuronModel, emit: &[String], scope: StateScope) -> Result<CompiledScanAdjoint, String> {
    let forward = compile(model, &[], scope)?;
    let step = sparkc_ir::adjoint::derive(model, emit)?;
    let mut c = Compiler::new();
    let named = |c: &mut Compiler, names: Vec<String>| -> Vec<u16> {
        names
            .into_iter()
            .map(|n| {
                let r = c.alloc();
                c.bind(&n, r);
                r
            })
            .collect()
    };
    let inputs = named(&mut c, model.inputs.clone());
    let params = named(&mut c, model.params.clone());
    let state = named(&mut c, model.state.iter().map(|s| s.name.clone()).collect());
    let out_grads = named(&mut c, emit.iter().map(|o| sparkc_ir::adjoint::output_grad_name(o)).collect());
    let carry = named(&mut c, model.state.iter().map(|s| sparkc_ir::adjoint::state_grad_name(&s.name)).collect());
    for (name, e) in &step.bindings {
        let r = c.expr(e).map_err(|e| format!("adjoint of `{}`: {e}", model.name))?;
        c.bind(name, r);
    }
    // Each gradient in a register of its own: a bare name may resolve to a carry register,
    // which the per-state carry update after the step would overwrite before it is read.
    let reg = |c: &mut Compiler, names: &[String]| {
        names
            .iter()
            .map(|n| {
                let own = c.alloc();
                c.copy(own, c.reg_of(n).expect("gradient bindings exist"));
                own
            })
            .collect::<Vec<_>>()
    };
    let input_grads = reg(&mut c, &step.input_grads);
    let param_grads = reg(&mut c, &step.param_grads);
    let state_grads = reg(&mut c, &step.state_grads);
    Ok(CompiledScanAdjoint { forward, prog: c.finish(), inputs, params, state, out_grads, carry, input_grads, param_grads, state_grads, scope })
}

impl CompiledScanAdjoint {
    /// `out_grads` are the upstream gradients of the emitted outputs [B,S,C]; `final_grads` of
    /// the final states [B,C].
    pub fn run(
        &self,
        inputs: &[&[f32]],
        params: &[&[f32]],
        init: &[&[f32]],
        out_grads: &[&[f32]],
        final_grads: &[&[f32]],
        dims: ScanDims,
    ) -> ScanGrads {
        let ScanDims { b, s, k, c } = dims;
        let lanes_per_row = c.div_ceil(LANES);
        let (ni, np, ns) = (self.inputs.len(), self.params.len(), self.state.len());
        let fwd = &self.forward;
        struct Task {
            inputs: Vec<f32>,
            params: Vec<f64>,
            init: Vec<f32>,
        }
        let tasks: Vec<Task> = (0..b * lanes_per_row)
            .into_par_iter()
            .map(|task| {
                let (bi, lane) = (task / lanes_per_row, task % lanes_per_row);
                let c0 = lane * LANES;
                let len = LANES.min(c - c0);
                // 1. Forward recompute, keeping the state before every step.
                let mut regs = Registers::new(&fwd.prog);
                for (p, &r) in params.iter().zip(&fwd.params) {
                    regs.reg_mut(r)[..len].copy_from_slice(&p[c0..c0 + len]);
                }
                for (v, &r) in init.iter().zip(&fwd.state) {
                    regs.reg_mut(r)[..len].copy_from_slice(&v[bi * c + c0..bi * c + c0 + len]);
                }
                let mut before = vec![0f32; s * ns * len];
                for step in 0..s {
                    if self.scope == StateScope::Token && step % k == 0 {
                        for (&r, &v0) in fwd.state.iter().zip(&fwd.state_init) {
                            regs.reg_mut(r)[..len].fill(v0);
                        }
                    }
                    for (j, &r) in fwd.state.iter().enumerate() {
                        before[(step * ns + j) * len..(step * ns + j + 1) * len].copy_from_slice(&regs.reg(r)[..len]);
                    }
                    let base = (bi * s + step) * c + c0;
                    for (x, &r) in inputs.iter().zip(&fwd.inputs) {
                        regs.reg_mut(r)[..len].copy_from_slice(&x[base..base + len]);
                    }
                    fwd.prog.run(&mut regs, len);
                }
                // 2. Reverse sweep.
                let mut regs = Registers::new(&self.prog);
                for (p, &r) in params.iter().zip(&self.params) {
                    regs.reg_mut(r)[..len].copy_from_slice(&p[c0..c0 + len]);
                }
                for (g, &r) in final_grads.iter().zip(&self.carry) {
                    regs.reg_mut(r)[..len].copy_from_slice(&g[bi * c + c0..bi * c + c0 + len]);
                }
                let mut din = vec![0f32; ni * s * len];
                let mut dparam = vec![0f64; np * len];
                for step in (0..s).rev() {
                    let base = (bi * s + step) * c + c0;
                    for (x, &r) in inputs.iter().zip(&self.inputs) {
                        regs.reg_mut(r)[..len].copy_from_slice(&x[base..base + len]);
                    }
                    for (g, &r) in out_grads.iter().zip(&self.out_grads) {
                        regs.reg_mut(r)[..len].copy_from_slice(&g[base..base + len]);
                    }
                    for (j, &r) in self.state.iter().enumerate() {
                        regs.reg_mut(r)[..len].copy_from_slice(&before[(step * ns + j) * len..(step * ns + j + 1) * len]);
                    }
                    self.prog.run(&mut regs, len);
                    for (i, &r) in self.input_grads.iter().enumerate() {
                        din[(i * s + step) * len..(i * s + step + 1) * len].copy_from_slice(&regs.reg(r)[..len]);
                    }
                    for (i, &r) in self.param_grads.iter().enumerate() {
                        dparam[i * len..(i + 1) * len].iter_mut().zip(regs.reg(r)).for_each(|(a, &g)| *a += g as f64);
                    }
                    // The state before a token's first frame is a constant under token scope.
                    let cut = self.scope == StateScope::Token && step % k == 0;
                    for (&src, &dst) in self.state_grads.iter().zip(&self.carry) {
                        if cut {
                            regs.reg_mut(dst)[..len].fill(0.0);
                        } else {
                            regs.copy(dst, src, len);
                        }
                    }
                }
                let mut dinit = vec![0f32; ns * len];
                for (j, &r) in self.carry.iter().enumerate() {
                    dinit[j * len..(j + 1) * len].copy_from_slice(&regs.reg(r)[..len]);
                }
                Task { inputs: din, params: dparam, init: dinit }
            })
            .collect();
        let mut g = ScanGrads {
            inputs: vec![vec![0f32; b * s * c]; ni],
            params: vec![vec![0f32; c]; np],
            init: vec![vec![0f32; b * c]; ns],
        };
        let mut param_acc = vec![vec![0f64; c]; np];
        for (task, t) in tasks.into_iter().enumerate() {
            let (bi, lane) = (task / lanes_per_row, task % lanes_per_row);
            let c0 = lane * LANES;
            let len = LANES.min(c - c0);
            for (i, dst) in g.inputs.iter_mut().enumerate() {
                for step in 0..s {
                    let at = (bi * s + step) * c + c0;
                    dst[at..at + len].copy_from_slice(&t.inputs[(i * s + step) * len..(i * s + step + 1) * len]);
                }
            }
            for (i, acc) in param_acc.iter_mut().enumerate() {
                acc[c0..c0 + len].iter_mut().zip(&t.params[i * len..(i + 1) * len]).for_each(|(a, b)| *a += b);
            }
            for (j, dst) in g.init.iter_mut().enumerate() {
                dst[bi * c + c0..bi * c + c0 + len].copy_from_slice(&t.init[j * len..(j + 1) * len]);
            }
        }
        g.params = param_acc.into_iter().map(|v| v.into_iter().map(|x| x as f32).collect()).collect();
        g
    }
}
