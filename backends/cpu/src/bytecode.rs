//! Expressions compiled to register bytecode that runs over a lane of `LANES` columns at once.
//!
//! Interpreting an expression tree per element would dominate scan time; here each instruction
//! is a tight loop over a lane, which the compiler vectorises, so dispatch is paid once per
//! instruction per lane rather than per element.

use sparkc_ir::expr::{BinOp, Expr, UnOp};
use std::collections::HashMap;

pub const LANES: usize = 64;

#[derive(Clone, Copy, Debug)]
enum Instr {
    Un(UnOp, u16, u16),
    Bin(BinOp, u16, u16, u16),
    Copy(u16, u16),
}

/// A straight-line program over registers of `LANES` floats.
#[derive(Clone, Debug, Default)]
pub struct Program {
    instrs: Vec<Instr>,
    consts: Vec<(u16, f32)>,
    regs: usize,
}

/// Builds a [`Program`]: names are bound to registers, expressions are compiled to new ones.
#[derive(Default)]
pub struct Compiler {
    prog: Program,
    names: HashMap<String, u16>,
    consts: HashMap<u32, u16>,
    cache: HashMap<String, u16>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("expression reads `{0}`, which is not bound")]
pub struct UnboundVar(pub String);

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// A fresh register (e.g. for an input the caller fills).
    pub fn alloc(&mut self) -> u16 {
        let r = self.prog.regs as u16;
        self.prog.regs += 1;
        r
    }

    /// Bind `name` to register `reg`; cached subexpressions that read an old binding are dropped.
    pub fn bind(&mut self, name: &str, reg: u16) {
        if self.names.insert(name.to_string(), reg).is_some() {
            self.cache.clear();
        }
    }

    pub fn reg_of(&self, name: &str) -> Option<u16> {
        self.names.get(name).copied()
    }

    fn constant(&mut self, v: f32) -> u16 {
        if let Some(&r) = self.consts.get(&v.to_bits()) {
            return r;
        }
        let r = self.alloc();
        self.prog.consts.push((r, v));
        self.consts.insert(v.to_bits(), r);
        r
    }

    /// Compile `e`; the result register is returned (shared subexpressions are computed once).
    pub fn expr(&mut self, e: &Expr) -> Result<u16, UnboundVar> {
        if let Expr::Var(v) = e {
            return self.names.get(v).copied().ok_or_else(|| UnboundVar(v.clone()));
        }
        if let Expr::Const(c) = e {
            return Ok(self.constant(*c as f32));
        }
        let key = e.to_string();
        if let Some(&r) = self.cache.get(&key) {
            return Ok(r);
        }
        let r = match e {
            Expr::Un(op, a) => {
                let a = self.expr(a)?;
                let d = self.alloc();
                self.prog.instrs.push(Instr::Un(*op, d, a));
                d
            }
            Expr::Bin(op, a, b) => {
                let a = self.expr(a)?;
                let b = self.expr(b)?;
                let d = self.alloc();
                self.prog.instrs.push(Instr::Bin(*op, d, a, b));
                d
            }
            Expr::Var(_) | Expr::Const(_) => unreachable!("handled above"),
        };
        self.cache.insert(key, r);
        Ok(r)
    }

    /// Emit `dst ← src`.
    pub fn copy(&mut self, dst: u16, src: u16) {
        if dst != src {
            self.prog.instrs.push(Instr::Copy(dst, src));
        }
    }

    pub fn finish(self) -> Program {
        self.prog
    }
}

pub fn un_f32(op: UnOp, x: f32) -> f32 {
    match op {
        UnOp::Neg => -x,
        UnOp::Abs => x.abs(),
        UnOp::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        UnOp::Exp => x.exp(),
        UnOp::Log => x.ln(),
        UnOp::Log1p => x.ln_1p(),
        UnOp::Sqrt => x.sqrt(),
        UnOp::Tanh => x.tanh(),
        UnOp::Atan => x.atan(),
        UnOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnOp::Softplus => {
            if x > 20.0 {
                x
            } else {
                x.exp().ln_1p()
            }
        }
    }
}

pub fn bin_f32(op: BinOp, a: f32, b: f32) -> f32 {
    match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div => a / b,
        BinOp::Min => a.min(b),
        BinOp::Max => a.max(b),
        BinOp::Ge => (a >= b) as u8 as f32,
        BinOp::Gt => (a > b) as u8 as f32,
    }
}

/// A register file for one lane.
pub struct Registers {
    data: Vec<f32>,
}

impl Registers {
    pub fn new(prog: &Program) -> Registers {
        let mut r = Registers { data: vec![0.0; prog.regs * LANES] };
        for &(reg, v) in &prog.consts {
            r.reg_mut(reg).fill(v);
        }
        r
    }

    pub fn reg(&self, r: u16) -> &[f32] {
        &self.data[r as usize * LANES..(r as usize + 1) * LANES]
    }

    pub fn reg_mut(&mut self, r: u16) -> &mut [f32] {
        &mut self.data[r as usize * LANES..(r as usize + 1) * LANES]
    }

    /// dst ← src on the first `n` lanes.
    pub fn copy(&mut self, dst: u16, src: u16, n: usize) {
        let (d, s) = (dst as usize * LANES, src as usize * LANES);
        self.data.copy_within(s..s + n, d);
    }
}

impl Program {
    /// Run every instruction on the first `n` lanes.
    pub fn run(&self, regs: &mut Registers, n: usize) {
        for ins in &self.instrs {
            match *ins {
                Instr::Un(op, d, x) => {
                    // Results are allocated after their operands, so d > x: split there.
                    let (lo, hi) = regs.data.split_at_mut(d as usize * LANES);
                    let a = &lo[x as usize * LANES..x as usize * LANES + n];
                    let dst = &mut hi[..n];
                    match op {
                        UnOp::Neg => dst.iter_mut().zip(a).for_each(|(o, &x)| *o = -x),
                        UnOp::Abs => dst.iter_mut().zip(a).for_each(|(o, &x)| *o = x.abs()),
                        _ => dst.iter_mut().zip(a).for_each(|(o, &x)| *o = un_f32(op, x)),
                    }
                }
                Instr::Bin(op, d, x, y) => {
                    let (lo, hi) = regs.data.split_at_mut(d as usize * LANES);
                    let a = &lo[x as usize * LANES..x as usize * LANES + n];
                    let b = &lo[y as usize * LANES..y as usize * LANES + n];
                    let dst = &mut hi[..n];
                    macro_rules! lanes {
                        ($f:expr) => {
                            for i in 0..n {
                                dst[i] = $f(a[i], b[i]);
                            }
                        };
                    }
                    match op {
                        BinOp::Add => lanes!(|x: f32, y: f32| x + y),
                        BinOp::Sub => lanes!(|x: f32, y: f32| x - y),
                        BinOp::Mul => lanes!(|x: f32, y: f32| x * y),
                        BinOp::Div => lanes!(|x: f32, y: f32| x / y),
                        _ => lanes!(|x, y| bin_f32(op, x, y)),
                    }
                }
                Instr::Copy(d, s) => {
                    let (d, s) = (d as usize * LANES, s as usize * LANES);
                    regs.data.copy_within(s..s + n, d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkc_ir::parse_expr;

    #[test]
    fn matches_tree_evaluation() {
        let e = parse_expr("softplus(x0 + x1) * x2 - max(x0, 0.5) / (1.0 + abs(x1))").unwrap();
        let mut c = Compiler::new();
        let regs: Vec<u16> = (0..3).map(|i| {
            let r = c.alloc();
            c.bind(&format!("x{i}"), r);
            r
        }).collect();
        let out = c.expr(&e).unwrap();
        let prog = c.finish();
        let mut rf = Registers::new(&prog);
        for (k, &r) in regs.iter().enumerate() {
            for i in 0..LANES {
                rf.reg_mut(r)[i] = (i as f32 - 30.0) * 0.1 * (k as f32 + 1.0);
            }
        }
        prog.run(&mut rf, LANES);
        for i in 0..LANES {
            let x = |k: usize| ((i as f32 - 30.0) * 0.1 * (k as f32 + 1.0)) as f64;
            let want = e.eval(&|v| x(v[1..].parse().unwrap()));
            assert!((rf.reg(out)[i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "{i}");
        }
    }
}
