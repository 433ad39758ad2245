//! Neuron microcode: the fixed-point step programs of a group's element-wise ops, fused into
//! one program per neuron. The programs themselves come from the neuron models' and maps' IR
//! (`sparkc_backend_cpu::kernels::fixed::{compile_step, compile_map}`), so no neuron type has
//! hand-written code here: fusing only renumbers registers and wires one op's result register
//! into the next op's operand register.

use sparkc_backend_cpu::kernels::fixed::{FxInstr, FxProgram};

/// The name of an instruction's operation, as listed in a target's `microcode_ops`.
pub fn op_name(i: &FxInstr) -> &'static str {
    match i {
        FxInstr::Un { op, .. } => op.name(),
        FxInstr::Bin { op, .. } => match op {
            sparkc_ir::BinOp::Add => "add",
            sparkc_ir::BinOp::Sub => "sub",
            sparkc_ir::BinOp::Mul => "mul",
            sparkc_ir::BinOp::Div => "div",
            sparkc_ir::BinOp::Min => "min",
            sparkc_ir::BinOp::Max => "max",
            sparkc_ir::BinOp::Ge => "ge",
            sparkc_ir::BinOp::Gt => "gt",
        },
        FxInstr::Select { .. } => "select",
    }
}

/// Appends programs into one register file.
#[derive(Default)]
pub struct Fuser {
    prog: FxProgram,
}

impl Fuser {
    pub fn alloc(&mut self) -> Result<u16, String> {
        let r = self.prog.n_regs;
        self.prog.n_regs = r.checked_add(1).ok_or("a fused neuron program needs more than 65535 registers")?;
        Ok(r)
    }

    /// Append `p`. `bound[r]` gives the fused register for those of `p`'s registers that are
    /// wired to something already in the file (operands); every other register gets a fresh
    /// one. Returns the map from `p`'s registers to fused registers.
    pub fn append(&mut self, p: &FxProgram, bound: &[(u16, u16)]) -> Result<Vec<u16>, String> {
        let mut map = vec![u16::MAX; p.n_regs as usize];
        for &(from, to) in bound {
            map[from as usize] = to;
        }
        for r in map.iter_mut() {
            if *r == u16::MAX {
                *r = self.alloc()?;
            }
        }
        for &(reg, v) in &p.consts {
            self.prog.consts.push((map[reg as usize], v));
        }
        let m = |r: u16| map[r as usize];
        for ins in &p.instrs {
            self.prog.instrs.push(match *ins {
                FxInstr::Un { op, dst, a } => FxInstr::Un { op, dst: m(dst), a: m(a) },
                FxInstr::Bin { op, dst, a, b } => FxInstr::Bin { op, dst: m(dst), a: m(a), b: m(b) },
                FxInstr::Select { dst, cond, a, b } => FxInstr::Select { dst: m(dst), cond: m(cond), a: m(a), b: m(b) },
            });
        }
        Ok(map)
    }

    pub fn finish(self) -> FxProgram {
        self.prog
    }
}

/// Check that every register an instruction reads is loaded or written before (inputs,
/// params, state and constants are `preloaded`).
pub fn check_program(p: &FxProgram, preloaded: &[u16]) -> Result<(), String> {
    let mut ready = vec![false; p.n_regs as usize];
    for &r in preloaded.iter().chain(p.consts.iter().map(|(r, _)| r)) {
        *ready.get_mut(r as usize).ok_or_else(|| format!("register r{r} is outside the program's {} registers", p.n_regs))? = true;
    }
    for (k, ins) in p.instrs.iter().enumerate() {
        let (dst, reads): (u16, Vec<u16>) = match *ins {
            FxInstr::Un { dst, a, .. } => (dst, vec![a]),
            FxInstr::Bin { dst, a, b, .. } => (dst, vec![a, b]),
            FxInstr::Select { dst, cond, a, b } => (dst, vec![cond, a, b]),
        };
        for r in reads.into_iter().chain(std::iter::once(dst)) {
            if r as usize >= ready.len() {
                return Err(format!("instruction {k} uses register r{r}; the program has {}", p.n_regs));
            }
        }
        for r in match *ins {
            FxInstr::Un { a, .. } => vec![a],
            FxInstr::Bin { a, b, .. } => vec![a, b],
            FxInstr::Select { cond, a, b, .. } => vec![cond, a, b],
        } {
            if !ready[r as usize] {
                return Err(format!("instruction {k} reads register r{r} before anything writes it"));
            }
        }
        ready[dst as usize] = true;
    }
    Ok(())
}
