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
    let mut outs = Vec::new();
    for name in emit {
        let b = model.output(name).ok_or_else(|| format!("neuron `{}` has no output `{name}`", model.name))?;
        outs.push(c.expr(&b.expr).map_err(fail)?);
    }
    // Write the step's state back. A state that was not charged is still bound to its own
    // register, so the copy is skipped and outputs that read it see the same value.
    for (i, n) in state_names.iter().enumerate() {
        let cur = c.reg_of(n).expect("state names are bound");
        c.copy(state[i], cur);
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
