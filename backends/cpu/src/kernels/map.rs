//! Element-wise maps with NumPy broadcasting, evaluated lane by lane through bytecode.

use crate::bytecode::{Compiler, Program, Registers, LANES};
use rayon::prelude::*;
use sparkc_ir::Expr;

/// How an operand's element is found from the output's flat index.
#[derive(Clone, Debug)]
pub(crate) enum Access {
    /// Same shape as the output.
    Full,
    /// The output's trailing `n` elements repeat (e.g. a [C] parameter over [..., C]).
    Suffix(usize),
    /// The output's leading `n` elements each broadcast over `inner` (e.g. [B,T,1] over [B,T,K]).
    Outer { inner: usize },
    /// One value for all.
    Scalar,
    /// Anything else: per-dimension strides (0 where broadcast).
    Strided { out_dims: Vec<usize>, strides: Vec<usize> },
}

pub(crate) fn access_for(shape: &[usize], out: &[usize]) -> Access {
    let numel: usize = shape.iter().product();
    let out_numel: usize = out.iter().product();
    if numel == out_numel {
        return Access::Full;
    }
    if numel == 1 {
        return Access::Scalar;
    }
    // Right-align the operand against the output.
    let mut padded = vec![1usize; out.len() - shape.len()];
    padded.extend_from_slice(shape);
    let first_real = padded.iter().position(|&d| d != 1).unwrap_or(padded.len());
    if padded[first_real..] == out[first_real..] {
        return Access::Suffix(numel);
    }
    let last_real = padded.iter().rposition(|&d| d != 1).map_or(0, |p| p + 1);
    if padded[..last_real] == out[..last_real] && padded[last_real..].iter().all(|&d| d == 1) {
        return Access::Outer { inner: out[last_real..].iter().product() };
    }
    let mut strides = vec![0usize; out.len()];
    let mut s = 1;
    for i in (0..out.len()).rev() {
        strides[i] = if padded[i] == 1 { 0 } else { s };
        s *= padded[i];
    }
    Access::Strided { out_dims: out.to_vec(), strides }
}

pub(crate) fn offset(access: &Access, i: usize) -> usize {
    match access {
        Access::Full => i,
        Access::Suffix(n) => i % n,
        Access::Outer { inner } => i / inner,
        Access::Scalar => 0,
        Access::Strided { out_dims, strides } => {
            let mut rem = i;
            let mut off = 0;
            for d in (0..out_dims.len()).rev() {
                off += (rem % out_dims[d]) * strides[d];
                rem /= out_dims[d];
            }
            off
        }
    }
}

/// A compiled map: operand registers, the result register and the program.
pub struct CompiledMap {
    prog: Program,
    inputs: Vec<u16>,
    out: u16,
}

pub fn compile(expr: &Expr, arity: usize) -> Result<CompiledMap, String> {
    let mut c = Compiler::new();
    let inputs: Vec<u16> = (0..arity)
        .map(|i| {
            let r = c.alloc();
            c.bind(&format!("x{i}"), r);
            r
        })
        .collect();
    let out = c.expr(expr).map_err(|e| e.to_string())?;
    Ok(CompiledMap { prog: c.finish(), inputs, out })
}

impl CompiledMap {
    pub fn run(&self, operands: &[(&[f32], &[usize])], out_shape: &[usize]) -> Vec<f32> {
        let n: usize = out_shape.iter().product();
        let access: Vec<Access> = operands.iter().map(|(_, s)| access_for(s, out_shape)).collect();
        let mut out = vec![0f32; n];
        out.par_chunks_mut(LANES * 64).enumerate().for_each(|(block, chunk)| {
            let mut regs = Registers::new(&self.prog);
            for (l, lane) in chunk.chunks_mut(LANES).enumerate() {
                let base = block * LANES * 64 + l * LANES;
                let len = lane.len();
                for ((data, _), (acc, &reg)) in operands.iter().zip(access.iter().zip(&self.inputs)) {
                    let dst = &mut regs.reg_mut(reg)[..len];
                    match acc {
                        Access::Full => dst.copy_from_slice(&data[base..base + len]),
                        Access::Scalar => dst.fill(data[0]),
                        // Walk the repeating operand without a division per element.
                        Access::Suffix(n) => {
                            let mut at = base % n;
                            for v in dst.iter_mut() {
                                *v = data[at];
                                at += 1;
                                if at == *n {
                                    at = 0;
                                }
                            }
                        }
                        Access::Outer { inner } => {
                            let (mut at, mut within) = (base / inner, base % inner);
                            for v in dst.iter_mut() {
                                *v = data[at];
                                within += 1;
                                if within == *inner {
                                    within = 0;
                                    at += 1;
                                }
                            }
                        }
                        Access::Strided { .. } => dst.iter_mut().enumerate().for_each(|(j, v)| *v = data[offset(acc, base + j)]),
                    }
                }
                self.prog.run(&mut regs, len);
                lane.copy_from_slice(&regs.reg(self.out)[..len]);
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasts() {
        let m = compile(&sparkc_ir::parse_expr("x0 * x1 + x2").unwrap(), 3).unwrap();
        let x: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let c = vec![1.0, 2.0, 3.0, 4.0];
        let outer = vec![10.0, 20.0];
        let y = m.run(&[(&x, &[2, 3, 4]), (&c, &[4]), (&outer, &[2, 1, 1])], &[2, 3, 4]);
        for i in 0..24 {
            assert_eq!(y[i], x[i] * c[i % 4] + outer[i / 12]);
        }
        let mid = vec![1.0, 2.0, 3.0];
        let y = m.run(&[(&x, &[2, 3, 4]), (&mid, &[3, 1]), (&[0.0], &[])], &[2, 3, 4]);
        for i in 0..24 {
            assert_eq!(y[i], x[i] * mid[(i / 4) % 3]);
        }
    }
}
