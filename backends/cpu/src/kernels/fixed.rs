//! Integer mode: the fixed-point arithmetic of the quantized IR and its kernels.
//!
//! This module *defines* what `quantize`, `graded_spike`, `synapse_linear`, `fixed_map` and
//! `fixed_scan` compute. Values are i64 holding fixed-point numbers with `frac` fractional bits,
//! saturated to a signed `bits`-bit range after every operation. The neuromorphic backend
//! compiles expressions and neuron models with [`FxCompiler`] into the same straight-line
//! programs it ships as microcode, and the chip simulator evaluates them with [`FxProgram::run`]'s
//! scalar operations, so the CPU in integer mode and the simulated chip agree bit for bit.
//!
//! Rounding: products and shifts round half away from zero; division truncates toward zero.
//! Transcendental functions use lookup tables with linear interpolation ([`Luts`]).

use crate::kernels::map::{access_for, offset};
use rayon::prelude::*;
use sparkc_ir::neuron::{FireCmp, NeuronModel, Reset, SPIKE};
use sparkc_ir::{BinOp, Expr, StateScope, UnOp};
use std::collections::HashMap;

/// A fixed-point format: `frac` fractional bits, values saturated to `bits` (signed, symmetric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fx {
    pub frac: u32,
    pub bits: u32,
}

/// x·2^-s rounded half away from zero (s = 0 is the identity).
pub fn round_shift(x: i128, s: u32) -> i128 {
    if s == 0 {
        return x;
    }
    let half = 1i128 << (s - 1);
    if x >= 0 {
        (x + half) >> s
    } else {
        -((-x + half) >> s)
    }
}

/// Saturate to a signed `bits`-bit range, symmetric: ±(2^(bits−1) − 1).
pub fn sat_bits(x: i128, bits: u32) -> i64 {
    let max = (1i128 << (bits - 1)) - 1;
    x.clamp(-max, max) as i64
}

/// Integer square root (floor) of a non-negative i128.
fn isqrt(x: i128) -> i128 {
    if x <= 0 {
        return 0;
    }
    let mut r = (x as f64).sqrt() as i128;
    while r * r > x {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= x {
        r += 1;
    }
    r
}

impl Fx {
    pub fn new(frac: u32, bits: u32) -> Fx {
        Fx { frac, bits }
    }

    pub fn max(self) -> i64 {
        (1i64 << (self.bits - 1)) - 1
    }

    pub fn sat(self, x: i128) -> i64 {
        sat_bits(x, self.bits)
    }

    /// 1.0 in this format.
    pub fn one(self) -> i64 {
        self.sat(1i128 << self.frac)
    }

    /// round(x·2^frac), saturated; NaN is 0.
    pub fn from_f64(self, x: f64) -> i64 {
        if x.is_nan() {
            return 0;
        }
        let scaled = (x * (self.frac as f64).exp2()).clamp(-(self.max() as f64), self.max() as f64);
        self.sat(scaled.round() as i128)
    }

    pub fn to_f64(self, x: i64) -> f64 {
        x as f64 / (self.frac as f64).exp2()
    }

    fn mul(self, a: i64, b: i64) -> i64 {
        self.sat(round_shift(a as i128 * b as i128, self.frac))
    }

    fn div(self, a: i64, b: i64) -> i64 {
        if b == 0 {
            return self.sat(a.signum() as i128 * self.max() as i128);
        }
        self.sat(((a as i128) << self.frac) / b as i128)
    }

    pub fn bin(self, op: BinOp, a: i64, b: i64) -> i64 {
        match op {
            BinOp::Add => self.sat(a as i128 + b as i128),
            BinOp::Sub => self.sat(a as i128 - b as i128),
            BinOp::Mul => self.mul(a, b),
            BinOp::Div => self.div(a, b),
            BinOp::Min => a.min(b),
            BinOp::Max => a.max(b),
            BinOp::Ge => if a >= b { self.one() } else { 0 },
            BinOp::Gt => if a > b { self.one() } else { 0 },
        }
    }

    pub fn un(self, op: UnOp, a: i64, luts: &Luts) -> i64 {
        match op {
            UnOp::Neg => self.sat(-(a as i128)),
            UnOp::Abs => self.sat((a as i128).abs()),
            UnOp::Sign => a.signum() * self.one(),
            UnOp::Sqrt => self.sat(isqrt((a.max(0) as i128) << self.frac)),
            UnOp::Exp => self.exp(a, luts),
            UnOp::Log => self.log(a, luts),
            UnOp::Log1p => self.log(self.sat(a as i128 + self.one() as i128), luts),
            UnOp::Sigmoid | UnOp::Tanh | UnOp::Softplus => {
                let t = luts.get(LutKind::from_unop(op).expect("table-backed op"));
                if a < t.lo {
                    t.values[0]
                } else if a > t.hi() {
                    if op == UnOp::Softplus { a } else { *t.values.last().expect("tables are non-empty") }
                } else {
                    t.eval(a)
                }
            }
            UnOp::Atan => {
                let t = luts.get(LutKind::Atan);
                if a < t.lo || a > t.hi() {
                    // atan x = ±π/2 − 1/x beyond the table (error below 1/(3x³)).
                    let half_pi = self.from_f64(std::f64::consts::FRAC_PI_2);
                    let tail = self.div(self.one(), a.abs());
                    a.signum() * self.sat(half_pi as i128 - tail as i128)
                } else {
                    t.eval(a)
                }
            }
        }
    }

    /// e^a = 2^(a·log2 e): the integer part is a shift, the fraction a table over [0, 1).
    fn exp(self, a: i64, luts: &Luts) -> i64 {
        let y = self.mul(a, self.from_f64(std::f64::consts::LOG2_E)) as i128;
        let n = y >> self.frac; // floor
        let f = (y - (n << self.frac)) as i64;
        let p = luts.get(LutKind::Exp2).eval(f) as i128;
        if n >= 0 {
            if n >= 64 { self.sat(if p > 0 { i128::MAX } else { 0 }) } else { self.sat(p << n) }
        } else if -n >= 100 {
            0
        } else {
            self.sat(round_shift(p, (-n) as u32))
        }
    }

    /// ln a = ln 2 · log2 a, with log2 a = (msb − frac) + log2(mantissa), the mantissa's log2
    /// from a table over [1, 2). Non-positive arguments give the most negative value.
    fn log(self, a: i64, luts: &Luts) -> i64 {
        if a <= 0 {
            return -self.max();
        }
        let msb = 63 - a.leading_zeros() as i64;
        let f = self.frac as i64;
        let m = if msb >= f { a >> (msb - f) } else { a << (f - msb) };
        let t = luts.get(LutKind::Log2).eval(m) as i128;
        let log2 = ((msb - f) as i128) * (1i128 << self.frac) + t;
        self.sat(round_shift(log2 * self.from_f64(std::f64::consts::LN_2) as i128, self.frac))
    }
}

// ---------------------------------------------------------------- lookup tables

/// The functions that have a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LutKind {
    /// 2^x on [0, 1).
    Exp2,
    /// log2 x on [1, 2).
    Log2,
    Sigmoid,
    Tanh,
    Atan,
    Softplus,
}

impl LutKind {
    pub const ALL: [LutKind; 6] = [LutKind::Exp2, LutKind::Log2, LutKind::Sigmoid, LutKind::Tanh, LutKind::Atan, LutKind::Softplus];

    pub fn name(self) -> &'static str {
        match self {
            LutKind::Exp2 => "exp2",
            LutKind::Log2 => "log2",
            LutKind::Sigmoid => "sigmoid",
            LutKind::Tanh => "tanh",
            LutKind::Atan => "atan",
            LutKind::Softplus => "softplus",
        }
    }

    pub fn code(self) -> u8 {
        LutKind::ALL.iter().position(|&k| k == self).expect("listed") as u8
    }

    pub fn from_code(c: u8) -> Option<LutKind> {
        LutKind::ALL.get(c as usize).copied()
    }

    fn from_unop(op: UnOp) -> Option<LutKind> {
        Some(match op {
            UnOp::Sigmoid => LutKind::Sigmoid,
            UnOp::Tanh => LutKind::Tanh,
            UnOp::Softplus => LutKind::Softplus,
            UnOp::Atan => LutKind::Atan,
            _ => return None,
        })
    }

    /// The tables a unary op reads.
    pub fn for_unop(op: UnOp) -> Vec<LutKind> {
        match op {
            UnOp::Exp => vec![LutKind::Exp2],
            UnOp::Log | UnOp::Log1p => vec![LutKind::Log2],
            _ => LutKind::from_unop(op).into_iter().collect(),
        }
    }

    /// (domain start, log2 of the domain width, the function).
    fn domain(self) -> (f64, u32, fn(f64) -> f64) {
        match self {
            LutKind::Exp2 => (0.0, 0, |x| x.exp2()),
            LutKind::Log2 => (1.0, 0, |x| x.log2()),
            LutKind::Sigmoid => (-16.0, 5, |x| 1.0 / (1.0 + (-x).exp())),
            LutKind::Tanh => (-8.0, 4, f64::tanh),
            LutKind::Atan => (-64.0, 7, f64::atan),
            LutKind::Softplus => (-16.0, 5, |x| if x > 20.0 { x } else { x.exp().ln_1p() }),
        }
    }
}

/// log2 of the number of segments of a table (fewer when the format cannot resolve them).
pub const LUT_SEGMENT_BITS: u32 = 10;

/// A table with linear interpolation: `values[j]` = f(lo + j·2^shift) in fixed point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lut {
    pub lo: i64,
    pub shift: u32,
    pub values: Vec<i64>,
}

impl Lut {
    pub fn build(kind: LutKind, fx: Fx) -> Lut {
        let (lo, width_log2, f) = kind.domain();
        let total = width_log2 + fx.frac; // log2 of the domain width in fixed-point units
        let seg_bits = LUT_SEGMENT_BITS.min(total);
        let shift = total - seg_bits;
        let lo_q = fx.from_f64(lo);
        let values = (0..=(1u64 << seg_bits))
            .map(|j| fx.from_f64(f(fx.to_f64(lo_q) + (j as f64) * ((shift as f64) - fx.frac as f64).exp2())))
            .collect();
        Lut { lo: lo_q, shift, values }
    }

    pub fn hi(&self) -> i64 {
        self.lo + (((self.values.len() - 1) as i64) << self.shift)
    }

    /// Interpolated value at `x`, clamped to the table's domain.
    pub fn eval(&self, x: i64) -> i64 {
        let x = x.clamp(self.lo, self.hi());
        let off = (x - self.lo) as i128;
        let idx = ((off >> self.shift) as usize).min(self.values.len() - 2);
        let r = off - ((idx as i128) << self.shift);
        let (a, b) = (self.values[idx] as i128, self.values[idx + 1] as i128);
        (a + round_shift((b - a) * r, self.shift)) as i64
    }
}

/// Every table of one fixed-point format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Luts {
    pub fx: Fx,
    tables: Vec<Lut>,
}

impl Luts {
    pub fn new(fx: Fx) -> Luts {
        Luts { fx, tables: LutKind::ALL.iter().map(|&k| Lut::build(k, fx)).collect() }
    }

    pub fn get(&self, kind: LutKind) -> &Lut {
        &self.tables[kind.code() as usize]
    }
}

// ---------------------------------------------------------------- straight-line programs

/// One instruction over i64 registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FxInstr {
    Un { op: UnOp, dst: u16, a: u16 },
    Bin { op: BinOp, dst: u16, a: u16, b: u16 },
    /// dst ← cond ≠ 0 ? a : b.
    Select { dst: u16, cond: u16, a: u16, b: u16 },
}

/// A straight-line program: `consts` are loaded once, then `instrs` run per element.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FxProgram {
    pub instrs: Vec<FxInstr>,
    pub consts: Vec<(u16, i64)>,
    pub n_regs: u16,
}

impl FxProgram {
    /// A register file with the constants loaded.
    pub fn registers(&self) -> Vec<i64> {
        let mut r = vec![0; self.n_regs as usize];
        for &(reg, v) in &self.consts {
            r[reg as usize] = v;
        }
        r
    }

    pub fn run(&self, regs: &mut [i64], fx: Fx, luts: &Luts) {
        for ins in &self.instrs {
            match *ins {
                FxInstr::Un { op, dst, a } => regs[dst as usize] = fx.un(op, regs[a as usize], luts),
                FxInstr::Bin { op, dst, a, b } => regs[dst as usize] = fx.bin(op, regs[a as usize], regs[b as usize]),
                FxInstr::Select { dst, cond, a, b } => {
                    regs[dst as usize] = if regs[cond as usize] != 0 { regs[a as usize] } else { regs[b as usize] }
                }
            }
        }
    }

    /// The tables this program reads.
    pub fn luts_used(&self) -> Vec<LutKind> {
        let mut out: Vec<LutKind> = self
            .instrs
            .iter()
            .flat_map(|i| match i {
                FxInstr::Un { op, .. } => LutKind::for_unop(*op),
                _ => vec![],
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Builds an [`FxProgram`]: names bind to registers; every expression node is one instruction
/// (identical subexpressions are computed once; constants are never folded in floating point,
/// so every node rounds exactly as the definition says).
pub struct FxCompiler {
    fx: Fx,
    prog: FxProgram,
    names: HashMap<String, u16>,
    consts: HashMap<i64, u16>,
    cache: HashMap<String, u16>,
}

impl FxCompiler {
    pub fn new(fx: Fx) -> FxCompiler {
        FxCompiler { fx, prog: FxProgram::default(), names: HashMap::new(), consts: HashMap::new(), cache: HashMap::new() }
    }

    pub fn alloc(&mut self) -> Result<u16, String> {
        let r = self.prog.n_regs;
        self.prog.n_regs = r.checked_add(1).ok_or("the program needs more than 65535 registers")?;
        Ok(r)
    }

    pub fn bind(&mut self, name: &str, reg: u16) {
        if self.names.insert(name.to_string(), reg).is_some() {
            self.cache.clear();
        }
    }

    pub fn reg_of(&self, name: &str) -> Option<u16> {
        self.names.get(name).copied()
    }

    pub fn constant(&mut self, v: i64) -> Result<u16, String> {
        if let Some(&r) = self.consts.get(&v) {
            return Ok(r);
        }
        let r = self.alloc()?;
        self.prog.consts.push((r, v));
        self.consts.insert(v, r);
        Ok(r)
    }

    pub fn expr(&mut self, e: &Expr) -> Result<u16, String> {
        match e {
            Expr::Var(v) => return self.names.get(v).copied().ok_or_else(|| format!("expression reads `{v}`, which is not bound")),
            Expr::Const(c) => return self.constant(self.fx.from_f64(*c)),
            _ => {}
        }
        let key = e.to_string();
        if let Some(&r) = self.cache.get(&key) {
            return Ok(r);
        }
        let r = match e {
            Expr::Un(op, a) => {
                let a = self.expr(a)?;
                let dst = self.alloc()?;
                self.prog.instrs.push(FxInstr::Un { op: *op, dst, a });
                dst
            }
            Expr::Bin(op, a, b) => {
                let a = self.expr(a)?;
                let b = self.expr(b)?;
                let dst = self.alloc()?;
                self.prog.instrs.push(FxInstr::Bin { op: *op, dst, a, b });
                dst
            }
            Expr::Var(_) | Expr::Const(_) => unreachable!("handled above"),
        };
        self.cache.insert(key, r);
        Ok(r)
    }

    pub fn select(&mut self, cond: u16, a: u16, b: u16) -> Result<u16, String> {
        let dst = self.alloc()?;
        self.prog.instrs.push(FxInstr::Select { dst, cond, a, b });
        Ok(dst)
    }

    pub fn finish(self) -> FxProgram {
        self.prog
    }
}

/// A compiled element-wise map: operand `i` is read from register `inputs[i]`.
#[derive(Clone, Debug)]
pub struct FxMap {
    pub prog: FxProgram,
    pub inputs: Vec<u16>,
    pub out: u16,
}

pub fn compile_map(expr: &Expr, arity: usize, fx: Fx) -> Result<FxMap, String> {
    let mut c = FxCompiler::new(fx);
    let mut inputs = Vec::with_capacity(arity);
    for i in 0..arity {
        let r = c.alloc()?;
        c.bind(&format!("x{i}"), r);
        inputs.push(r);
    }
    let out = c.expr(expr)?;
    Ok(FxMap { prog: c.finish(), inputs, out })
}

/// One compiled neuron step. Registers: `inputs`, `params` and `state` are loaded before the
/// step; afterwards `state_out[i]` holds state variable i and `outputs[j]` emitted output j.
#[derive(Clone, Debug)]
pub struct FxStep {
    pub prog: FxProgram,
    pub inputs: Vec<u16>,
    pub params: Vec<u16>,
    pub state: Vec<u16>,
    pub state_out: Vec<u16>,
    pub outputs: Vec<u16>,
    /// Each state variable's value at a sequence (or, with token scope, token) start.
    pub init: Vec<i64>,
    pub scope: StateScope,
}

/// Compile one step of `model` (lets, charge, fire, reset, outputs) in fixed point.
pub fn compile_step(model: &NeuronModel, emit: &[String], scope: StateScope, fx: Fx) -> Result<FxStep, String> {
    let fail = |e: String| format!("neuron `{}`: {e}", model.name);
    let mut c = FxCompiler::new(fx);
    let named = |c: &mut FxCompiler, names: Vec<String>| -> Result<Vec<u16>, String> {
        names
            .into_iter()
            .map(|n| {
                let r = c.alloc()?;
                c.bind(&n, r);
                Ok(r)
            })
            .collect()
    };
    let inputs = named(&mut c, model.inputs.clone())?;
    let params = named(&mut c, model.params.clone())?;
    let state = named(&mut c, model.state.iter().map(|s| s.name.clone()).collect())?;
    for b in model.lets.iter().chain(&model.charge) {
        let r = c.expr(&b.expr).map_err(fail)?;
        c.bind(&b.name, r);
    }
    let thr = c.expr(&model.threshold).map_err(fail)?;
    let mem = c.reg_of(&model.membrane).ok_or_else(|| fail(format!("membrane `{}` is not bound", model.membrane)))?;
    let cmp = match model.fire {
        FireCmp::Ge => BinOp::Ge,
        FireCmp::Gt => BinOp::Gt,
    };
    // Built by hand (not through `expr`) so that the threshold register is reused.
    let z = c.alloc()?;
    c.prog.instrs.push(FxInstr::Bin { op: cmp, dst: z, a: mem, b: thr });
    c.bind(SPIKE, z);
    let reset = match model.reset {
        Reset::Subtract => {
            let t = c.alloc()?;
            c.prog.instrs.push(FxInstr::Bin { op: BinOp::Mul, dst: t, a: thr, b: z });
            let r = c.alloc()?;
            c.prog.instrs.push(FxInstr::Bin { op: BinOp::Sub, dst: r, a: mem, b: t });
            Some(r)
        }
        Reset::ToValue(v) => {
            let k = c.constant(fx.from_f64(v))?;
            Some(c.select(z, k, mem)?)
        }
        Reset::None => None,
    };
    if let Some(r) = reset {
        c.bind(&model.membrane, r);
    }
    let mut outputs = Vec::new();
    for name in emit {
        let b = model.output(name).ok_or_else(|| fail(format!("no output `{name}`")))?;
        outputs.push(c.expr(&b.expr).map_err(fail)?);
    }
    let state_out = model.state.iter().map(|s| c.reg_of(&s.name).expect("state is bound")).collect();
    Ok(FxStep {
        prog: c.finish(),
        inputs,
        params,
        state,
        state_out,
        outputs,
        init: model.state.iter().map(|s| fx.from_f64(s.init)).collect(),
        scope,
    })
}

// ---------------------------------------------------------------- scalar boundary operations

/// A graded-spike payload: round_shift(x·mult, shift) saturated to `bits` (one bit: 0 or 1).
pub fn payload(x: i64, mult: i64, shift: u32, bits: u32) -> i64 {
    let v = round_shift(x as i128 * mult as i128, shift);
    if bits == 1 {
        v.clamp(0, 1) as i64
    } else {
        sat_bits(v, bits)
    }
}

/// A dendrite: the synaptic sum scaled into the neuron's format, plus its bias.
pub fn dendrite(acc: i64, mult: i64, shift: u32, bias: i64, bits: u32) -> i64 {
    sat_bits(round_shift(acc as i128 * mult as i128, shift) + bias as i128, bits)
}

/// Integer constants travel as f32 holding integers (exact up to 2^24).
pub fn int_param(x: f32) -> i64 {
    x as i64
}

// ---------------------------------------------------------------- kernels

pub fn quantize(x: &[f32], fx: Fx) -> Vec<i64> {
    x.par_iter().map(|&v| fx.from_f64(v as f64)).collect()
}

pub fn graded_spike(x: &[i64], mult: &[f32], shift: u32, bits: u32) -> Vec<i64> {
    let c = mult.len().max(1);
    let m: Vec<i64> = mult.iter().map(|&v| int_param(v)).collect();
    x.par_iter().enumerate().map(|(i, &v)| payload(v, m[i % c], shift, bits)).collect()
}

/// Σ_i w[o,i]·p[r,i] over the non-zero payloads only (integers: order does not matter), then
/// the dendrite. `p` is [m, i] row-major, `w` [o, i].
#[allow(clippy::too_many_arguments)]
pub fn synapse_linear(p: &[i64], w: &[f32], mult: &[f32], bias: Option<&[f32]>, m: usize, i: usize, o: usize, shift: u32, bits: u32) -> Vec<i64> {
    let wi: Vec<i64> = w.iter().map(|&v| int_param(v)).collect();
    let mi: Vec<i64> = mult.iter().map(|&v| int_param(v)).collect();
    let bi: Vec<i64> = bias.map_or(vec![0; o], |b| b.iter().map(|&v| int_param(v)).collect());
    let mut out = vec![0i64; m * o];
    out.par_chunks_mut(o.max(1)).enumerate().for_each(|(r, row)| {
        let events: Vec<(usize, i64)> = p[r * i..(r + 1) * i].iter().enumerate().filter(|(_, &v)| v != 0).map(|(k, &v)| (k, v)).collect();
        for (oi, y) in row.iter_mut().enumerate() {
            let wrow = &wi[oi * i..(oi + 1) * i];
            // The accumulator wraps at 64 bits (defined, and the same on the simulated chip).
            let acc = events.iter().fold(0i64, |a, &(k, v)| a.wrapping_add(wrow[k].wrapping_mul(v)));
            *y = dendrite(acc, mi[oi], shift, bi[oi], bits);
        }
    });
    out
}

/// A compiled `fixed_map`.
pub struct CompiledFixedMap {
    map: FxMap,
    fx: Fx,
    luts: Luts,
}

pub fn compile_fixed_map(expr: &Expr, arity: usize, fx: Fx) -> Result<CompiledFixedMap, String> {
    Ok(CompiledFixedMap { map: compile_map(expr, arity, fx)?, fx, luts: Luts::new(fx) })
}

/// Operand values as integers: i64 tensors as they are, f32 (integer-valued params) converted.
pub enum IntOperand<'a> {
    I64(&'a [i64]),
    F32(&'a [f32]),
}

impl IntOperand<'_> {
    fn get(&self, i: usize) -> i64 {
        match self {
            IntOperand::I64(v) => v[i],
            IntOperand::F32(v) => int_param(v[i]),
        }
    }
}

impl CompiledFixedMap {
    pub fn run(&self, operands: &[(IntOperand, &[usize])], out_shape: &[usize]) -> Vec<i64> {
        let numel: usize = out_shape.iter().product();
        let access: Vec<_> = operands.iter().map(|(_, s)| access_for(s, out_shape)).collect();
        let mut out = vec![0i64; numel];
        out.par_chunks_mut(1024).enumerate().for_each(|(chunk, dst)| {
            let mut regs = self.map.prog.registers();
            for (j, y) in dst.iter_mut().enumerate() {
                let i = chunk * 1024 + j;
                for ((op, _), (a, &r)) in operands.iter().zip(access.iter().zip(&self.map.inputs)) {
                    regs[r as usize] = op.get(offset(a, i));
                }
                self.map.prog.run(&mut regs, self.fx, &self.luts);
                *y = regs[self.map.out as usize];
            }
        });
        out
    }
}

/// A compiled `fixed_scan`.
pub struct CompiledFixedScan {
    step: FxStep,
    fx: Fx,
    luts: Luts,
}

pub fn compile_fixed_scan(model: &NeuronModel, emit: &[String], scope: StateScope, fx: Fx) -> Result<CompiledFixedScan, String> {
    Ok(CompiledFixedScan { step: compile_step(model, emit, scope, fx)?, fx, luts: Luts::new(fx) })
}

impl CompiledFixedScan {
    /// Inputs [B,S,C], params [C], initial states [B,C]; returns emitted outputs [B,S,C] and
    /// final states [B,C]. `k` is the frames per token (token scope restarts every k steps).
    #[allow(clippy::too_many_arguments)]
    pub fn run(&self, inputs: &[&[i64]], params: &[IntOperand], init: &[&[i64]], b: usize, s: usize, k: usize, c: usize) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
        let st = &self.step;
        // One task per (batch row, channel): the recurrence is independent across them.
        let cols: Vec<(Vec<i64>, Vec<i64>)> = (0..b * c)
            .into_par_iter()
            .map(|task| {
                let (bi, ci) = (task / c, task % c);
                let mut regs = st.prog.registers();
                for (p, &r) in params.iter().zip(&st.params) {
                    regs[r as usize] = p.get(ci);
                }
                for (v, &r) in init.iter().zip(&st.state) {
                    regs[r as usize] = v[bi * c + ci];
                }
                let mut out = vec![0i64; st.outputs.len() * s];
                for step in 0..s {
                    if st.scope == StateScope::Token && step % k == 0 {
                        for (&r, &v0) in st.state.iter().zip(&st.init) {
                            regs[r as usize] = v0;
                        }
                    }
                    let at = (bi * s + step) * c + ci;
                    for (x, &r) in inputs.iter().zip(&st.inputs) {
                        regs[r as usize] = x[at];
                    }
                    st.prog.run(&mut regs, self.fx, &self.luts);
                    for (o, &r) in st.outputs.iter().enumerate() {
                        out[o * s + step] = regs[r as usize];
                    }
                    // Read every new state before writing any: a state may be another's old value.
                    let next: Vec<i64> = st.state_out.iter().map(|&r| regs[r as usize]).collect();
                    for (&dst, v) in st.state.iter().zip(next) {
                        regs[dst as usize] = v;
                    }
                }
                let fin = st.state.iter().map(|&r| regs[r as usize]).collect();
                (out, fin)
            })
            .collect();
        let mut outs = vec![vec![0i64; b * s * c]; st.outputs.len()];
        let mut finals = vec![vec![0i64; b * c]; st.state.len()];
        for (task, (out, fin)) in cols.into_iter().enumerate() {
            let (bi, ci) = (task / c, task % c);
            for (o, dst) in outs.iter_mut().enumerate() {
                for step in 0..s {
                    dst[(bi * s + step) * c + ci] = out[o * s + step];
                }
            }
            for (j, dst) in finals.iter_mut().enumerate() {
                dst[bi * c + ci] = fin[j];
            }
        }
        (outs, finals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkc_ir::parse_expr;

    #[test]
    fn rounding_and_saturation() {
        let fx = Fx::new(8, 16);
        assert_eq!(round_shift(3, 1), 2);
        assert_eq!(round_shift(-3, 1), -2);
        assert_eq!(fx.from_f64(1.0), 256);
        assert_eq!(fx.from_f64(1e9), fx.max());
        assert_eq!(fx.bin(BinOp::Mul, fx.from_f64(0.5), fx.from_f64(-3.0)), fx.from_f64(-1.5));
        assert_eq!(fx.bin(BinOp::Div, 5, 0), fx.max());
        assert_eq!(payload(fx.one(), 1, 8, 1), 1);
    }

    #[test]
    fn transcendentals_are_close() {
        let fx = Fx::new(16, 32);
        let luts = Luts::new(fx);
        for (op, f, tol) in [
            (UnOp::Sigmoid, (|x: f64| 1.0 / (1.0 + (-x).exp())) as fn(f64) -> f64, 1e-4),
            (UnOp::Softplus, |x: f64| if x > 20.0 { x } else { x.exp().ln_1p() }, 1e-3),
            (UnOp::Tanh, f64::tanh, 1e-4),
            (UnOp::Atan, f64::atan, 1e-3),
            (UnOp::Exp, f64::exp, 2e-3),
            (UnOp::Sqrt, f64::sqrt, 1e-4),
        ] {
            for i in 0..200 {
                let x = if op == UnOp::Sqrt { i as f64 * 0.37 } else { (i as f64 - 100.0) * 0.07 };
                let got = fx.to_f64(fx.un(op, fx.from_f64(x), &luts));
                let want = f(x);
                assert!((got - want).abs() <= tol * (1.0 + want.abs()), "{op:?}({x}) = {got}, want {want}");
            }
        }
        for x in [0.01, 0.5, 1.0, 3.0, 100.0] {
            let got = fx.to_f64(fx.un(UnOp::Log, fx.from_f64(x), &luts));
            assert!((got - f64::ln(x)).abs() < 2e-3, "ln({x}) = {got}");
        }
    }

    #[test]
    fn map_program_matches_float_within_resolution() {
        let fx = Fx::new(12, 24);
        let m = compile_fixed_map(&parse_expr("x0 * sigmoid(x1) + x2").unwrap(), 3, fx).unwrap();
        let a: Vec<i64> = [0.5, -1.25, 2.0].iter().map(|&v| fx.from_f64(v)).collect();
        let out = m.run(&[(IntOperand::I64(&a), &[3]), (IntOperand::I64(&a), &[3]), (IntOperand::I64(&a), &[3])], &[3]);
        for (i, &v) in [0.5f64, -1.25, 2.0].iter().enumerate() {
            let want = v / (1.0 + (-v).exp()) + v;
            assert!((fx.to_f64(out[i]) - want).abs() < 2e-3, "{i}");
        }
    }
}
