//! Property tests of the reverse-mode autodiff pass (`sparkc_passes::autodiff`).
//!
//! Random small graphs (B, T, K ≤ 3, channels ≤ 6) are built from the forward ops, differentiated,
//! and every `grad.<param>` / `grad.<input>` is compared at a few random coordinates with central
//! finite differences of the forward graph, all run through the f32 CPU interpreter.
//!
//! Spiking scans are only finite-difference-checkable where the surrogate does not contribute:
//! either the spike is consumed only through a detached reset (PLIF, selective PLIF, custom
//! "detached" models), or the surrogate is a narrow triangle and no membrane comes within its
//! support (custom "dead surrogate" models, which then may also consume spikes and use
//! non-detached resets). In both cases a coordinate whose ±eps perturbation changes the spike
//! pattern is skipped. The surrogate itself is checked against hand-computed references.
//!
//! Everything is deterministic: proptest runs with a fixed seed, graphs and data come from
//! `sparkc_ir::rng::Rng` seeded by the generated spec.

use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};
use sparkc_backend_cpu::CpuProgram;
use sparkc_ir::neuron::{Binding, FireCmp, NeuronModel, Reset, StateVar, Surrogate, SurrogateKind, SPIKE};
use sparkc_ir::rng::Rng;
use sparkc_ir::{neuron, parse_expr, BinOp, DType, Dim, Expr, Graph, Op, Shape, StateScope, Tensor, UnOp, Value, ValueType};
use sparkc_passes::autodiff::{differentiate, AutodiffError, GRAD_PREFIX};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

// ------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------

fn pe(src: &str) -> Expr {
    parse_expr(src).unwrap_or_else(|e| panic!("test expression `{src}`: {e}"))
}

fn var(n: &str) -> Expr {
    Expr::var(n)
}

fn cst(x: f64) -> Expr {
    Expr::c(x)
}

fn un(op: UnOp, a: Expr) -> Expr {
    Expr::un(op, a)
}

fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
    Expr::bin(op, a, b)
}

fn bind(name: &str, e: Expr) -> Binding {
    Binding { name: name.to_string(), expr: e }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn cd(n: usize) -> Dim {
    Dim::Const(n as u64)
}

fn f32_ty(dims: Vec<Dim>) -> ValueType {
    ValueType::new(DType::F32, Shape(dims))
}

fn scalar_of(t: &Tensor) -> f64 {
    assert_eq!(t.numel(), 1, "expected a scalar, got shape {:?}", t.shape);
    t.to_f32_vec()[0] as f64
}

fn graph_text(g: &Graph) -> String {
    sparkc_ir::text::print(g).unwrap_or_else(|e| format!("<graph does not print: {e}>"))
}

fn run_graph(g: &Graph, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let p = CpuProgram::compile(g).unwrap_or_else(|e| panic!("compile: {e}\n{}", graph_text(g)));
    p.run(inputs, params).unwrap_or_else(|e| panic!("run: {e}\n{}", graph_text(g)))
}

/// A random smooth expression over `vars`: sigmoid, tanh, softplus, atan, exp of small values,
/// +, −, ·, division by (1 + b²). Nothing with a kink or a restricted domain.
fn rand_smooth(s: &mut Rng, vars: &[String], depth: u32) -> Expr {
    if depth == 0 || s.uniform() < 0.2 {
        if s.uniform() < 0.85 {
            return var(&vars[s.below(vars.len() as u64) as usize]);
        }
        return cst(round3(s.uniform_range(-1.0, 1.0)));
    }
    let a = rand_smooth(s, vars, depth - 1);
    match s.below(12) {
        0 => un(UnOp::Sigmoid, a),
        1 => un(UnOp::Tanh, a),
        2 => un(UnOp::Softplus, a),
        3 => un(UnOp::Exp, bin(BinOp::Mul, cst(0.5), un(UnOp::Tanh, a))),
        4 => un(UnOp::Atan, a),
        5 => un(UnOp::Neg, a),
        6 => bin(BinOp::Mul, cst(round3(s.uniform_range(-1.5, 1.5))), a),
        7 => bin(BinOp::Add, a, rand_smooth(s, vars, depth - 1)),
        8 => bin(BinOp::Sub, a, rand_smooth(s, vars, depth - 1)),
        9 => bin(BinOp::Mul, a, rand_smooth(s, vars, depth - 1)),
        10 => {
            let b = rand_smooth(s, vars, depth - 1);
            bin(BinOp::Div, a, bin(BinOp::Add, cst(1.0), bin(BinOp::Mul, b.clone(), b)))
        }
        _ => un(UnOp::Exp, bin(BinOp::Mul, cst(0.25), a)),
    }
}

/// Make `e` read every name of `must` (so that every operand is on a gradient path).
fn use_all(s: &mut Rng, mut e: Expr, must: &[String]) -> Expr {
    for m in must {
        if !e.vars().contains(m) {
            e = if s.uniform() < 0.5 {
                bin(BinOp::Add, e, bin(BinOp::Mul, cst(0.5), un(UnOp::Tanh, var(m))))
            } else {
                bin(BinOp::Mul, e, bin(BinOp::Add, cst(1.0), bin(BinOp::Mul, cst(0.3), un(UnOp::Tanh, var(m)))))
            };
        }
    }
    e
}

/// 3·tanh(e/3): the identity for small values, at most 3 in magnitude. Random maps end in it so
/// that products and sums do not compound into huge values over several steps (where every
/// smooth function looks like a step to a finite difference).
fn soft_clamp(e: Expr) -> Expr {
    bin(BinOp::Mul, cst(3.0), un(UnOp::Tanh, bin(BinOp::Div, e, cst(3.0))))
}

/// How random values are drawn.
#[derive(Clone, Copy, Debug)]
enum Gen {
    U(f64, f64),
    N(f64, f64),
    C(f64),
}

impl Gen {
    fn draw(self, d: &mut Rng) -> f64 {
        match self {
            Gen::U(lo, hi) => d.uniform_range(lo, hi),
            Gen::N(m, s) => d.normal(m, s),
            Gen::C(c) => c,
        }
    }
}

// ------------------------------------------------------------------------------------------
// A reference neuron scan in f64 (straight from the model's documented semantics)
// ------------------------------------------------------------------------------------------

/// Runs `model` over per-step inputs [B,S,C], params [C] and initial states [B,C]; returns the
/// emitted outputs [B,S,C] and the final states [B,C].
#[allow(clippy::too_many_arguments)]
fn reference_scan(
    m: &NeuronModel,
    emit: &[&str],
    scope: StateScope,
    inputs: &[Vec<f64>],
    params: &[Vec<f64>],
    init: &[Vec<f64>],
    (b, s, k, c): (usize, usize, usize, usize),
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut outs = vec![vec![0.0; b * s * c]; emit.len()];
    let mut finals = vec![vec![0.0; b * c]; m.state.len()];
    for bi in 0..b {
        for ci in 0..c {
            let mut st: Vec<f64> = init.iter().map(|v| v[bi * c + ci]).collect();
            for step in 0..s {
                if scope == StateScope::Token && step % k == 0 {
                    st = m.state.iter().map(|sv| sv.init).collect();
                }
                let mut env: BTreeMap<String, f64> = BTreeMap::new();
                for (n, p) in m.params.iter().zip(params) {
                    env.insert(n.clone(), p[ci]);
                }
                let at = (bi * s + step) * c + ci;
                for (n, x) in m.inputs.iter().zip(inputs) {
                    env.insert(n.clone(), x[at]);
                }
                for (sv, &v) in m.state.iter().zip(&st) {
                    env.insert(sv.name.clone(), v);
                }
                for bnd in m.lets.iter().chain(&m.charge) {
                    let v = bnd.expr.eval(&|n| env[n]);
                    env.insert(bnd.name.clone(), v);
                }
                let thr = m.threshold.eval(&|n| env[n]);
                let mem = env[&m.membrane];
                let z = match m.fire {
                    FireCmp::Ge => (mem >= thr) as u8 as f64,
                    FireCmp::Gt => (mem > thr) as u8 as f64,
                };
                match m.reset {
                    Reset::Subtract => {
                        env.insert(m.membrane.clone(), mem - thr * z);
                    }
                    Reset::ToValue(r) => {
                        env.insert(m.membrane.clone(), z * r + (1.0 - z) * mem);
                    }
                    Reset::None => {}
                }
                env.insert(SPIKE.to_string(), z);
                for (o, name) in emit.iter().enumerate() {
                    let bnd = m.output(name).expect("emitted output exists");
                    outs[o][at] = bnd.expr.eval(&|n| env[n]);
                }
                st = m.state.iter().map(|sv| env[&sv.name]).collect();
            }
            for (j, v) in st.into_iter().enumerate() {
                finals[j][bi * c + ci] = v;
            }
        }
    }
    (outs, finals)
}

// ------------------------------------------------------------------------------------------
// Random graph specs and the builder
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Spec {
    seed: u64,
    b: usize,
    t: usize,
    k: usize,
    c: usize,
    start: u8,
    steps: Vec<u8>,
    finish: u8,
    symbolic: bool,
}

fn spec_strategy(max_steps: usize) -> impl Strategy<Value = Spec> {
    (
        any::<u64>(),
        (1..=3usize, 1..=3usize, 1..=3usize, 1..=6usize),
        0..3u8,
        prop::collection::vec(0..8u8, 1..=max_steps),
        0..4u8,
        any::<bool>(),
    )
        .prop_map(|(seed, (b, t, k, c), start, steps, finish, symbolic)| Spec { seed, b, t, k, c, start, steps, finish, symbolic })
}

/// Which scans a random graph may hold.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flavor {
    /// Only scans that never spike in a way the loss can see: smooth everywhere.
    Smooth,
    /// Spiking scans (and at least one scan per graph).
    Spiking,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ScanKind {
    /// Built-in `lif` (not detached) with a threshold of 1e3: never fires, surrogate ≈ 0.
    LifFar,
    /// `lif` with `Reset::None`: fires, but the spike is not consumed.
    Leaky,
    Plif,
    SelectivePlif,
    /// A random custom model whose spike reaches the loss only through a detached reset.
    CustomDetached,
    /// A random custom model with a narrow triangle surrogate whose support no membrane enters.
    CustomDead,
}

/// A graph ready for checking.
struct Case {
    g: Graph,
    inputs: BTreeMap<String, Tensor>,
    params: BTreeMap<String, Tensor>,
    /// Float inputs differentiated too (`grad.<input>`).
    wrt: Vec<String>,
    /// Outputs that must not change under ±eps (spike patterns); otherwise the coordinate is skipped.
    probes: Vec<String>,
    /// Outputs whose magnitude must exceed the bound at the base point (dead surrogates).
    margins: Vec<(String, f64)>,
    /// Initial-state tensors of token-scoped scans (their gradient is exactly zero).
    token_inits: Vec<String>,
    /// Whether a scan of the graph can spike.
    spiking: bool,
    /// What the generator put in (for the coverage accounting).
    features: Vec<String>,
}

struct Builder {
    case: Case,
    /// Structure (ops, expressions, models).
    s: Rng,
    /// Data (parameter and input values).
    d: Rng,
    b: usize,
    t: usize,
    k: usize,
    symbolic: bool,
    n: usize,
    aux: Vec<Value>,
    flavor: Flavor,
    table: Option<Value>,
    forced_kind: Option<ScanKind>,
    forced_scope: Option<StateScope>,
    finals_prob: f64,
}

impl Builder {
    fn new(spec: &Spec, attempt: u64, flavor: Flavor) -> Builder {
        let mut g = Graph::new("prop");
        if spec.symbolic {
            g.bind_dim("K", spec.k as u64);
        }
        Builder {
            case: Case {
                g,
                inputs: BTreeMap::new(),
                params: BTreeMap::new(),
                wrt: Vec::new(),
                probes: Vec::new(),
                margins: Vec::new(),
                token_inits: Vec::new(),
                spiking: false,
                features: Vec::new(),
            },
            s: Rng::derive(spec.seed, "structure"),
            d: Rng::derive(spec.seed ^ attempt.wrapping_mul(0x9E37_79B9_7F4A_7C15), "data"),
            b: spec.b,
            t: spec.t,
            k: spec.k,
            symbolic: spec.symbolic,
            n: 0,
            aux: Vec::new(),
            flavor,
            table: None,
            forced_kind: None,
            forced_scope: None,
            finals_prob: 0.4,
        }
    }

    fn env(&self) -> BTreeMap<String, u64> {
        [("B", self.b), ("T", self.t), ("K", self.k)].iter().map(|(n, v)| (n.to_string(), *v as u64)).collect()
    }

    fn bd(&self) -> Dim {
        if self.symbolic {
            Dim::sym("B")
        } else {
            cd(self.b)
        }
    }

    fn td(&self) -> Dim {
        if self.symbolic {
            Dim::sym("T")
        } else {
            cd(self.t)
        }
    }

    fn kd(&self) -> Dim {
        if self.symbolic {
            Dim::sym("K")
        } else {
            cd(self.k)
        }
    }

    fn feat(&mut self, f: impl Into<String>) {
        self.case.features.push(f.into());
    }

    fn coin(&mut self, p: f64) -> bool {
        self.s.uniform() < p
    }

    fn pick(&mut self, n: usize) -> usize {
        self.s.below(n as u64) as usize
    }

    fn fresh(&mut self, p: &str) -> String {
        self.n += 1;
        format!("{p}{}", self.n)
    }

    fn dims(&self, v: Value) -> Vec<Dim> {
        self.case.g.value_type(v).shape.0.clone()
    }

    fn sizes(&self, v: Value) -> Vec<usize> {
        self.case.g.value_type(v).shape.concrete(&self.env()).expect("all dims are known")
    }

    fn last(&self, v: Value) -> usize {
        *self.sizes(v).last().expect("rank >= 1")
    }

    fn data(&mut self, dims: &[Dim], gen: Gen) -> Tensor {
        let shape = Shape(dims.to_vec()).concrete(&self.env()).expect("all dims are known");
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| gen.draw(&mut self.d) as f32).collect();
        Tensor::f32(shape, data)
    }

    fn param(&mut self, prefix: &str, dims: Vec<Dim>, gen: Gen) -> Value {
        let name = self.fresh(prefix);
        let t = self.data(&dims, gen);
        self.case.params.insert(name.clone(), t);
        self.case.g.param(&name, f32_ty(dims)).expect("fresh parameter")
    }

    fn input(&mut self, prefix: &str, dims: Vec<Dim>, gen: Gen, wrt: bool) -> Value {
        let name = self.fresh(prefix);
        let t = self.data(&dims, gen);
        self.case.inputs.insert(name.clone(), t);
        if wrt {
            self.case.wrt.push(name.clone());
        }
        self.case.g.input(&name, f32_ty(dims))
    }

    /// A 0/1 float input with at least one 1.
    fn mask(&mut self, dims: Vec<Dim>) -> Value {
        let name = self.fresh("mask");
        let shape = Shape(dims.clone()).concrete(&self.env()).expect("known dims");
        let n: usize = shape.iter().product();
        let mut data: Vec<f32> = (0..n).map(|_| (self.d.uniform() < 0.7) as u8 as f32).collect();
        if data.iter().all(|&m| m == 0.0) {
            data[self.d.below(n as u64) as usize] = 1.0;
        }
        self.case.inputs.insert(name.clone(), Tensor::f32(shape, data));
        self.case.g.input(&name, f32_ty(dims))
    }

    fn int_input(&mut self, prefix: &str, dims: Vec<Dim>, data: Vec<i64>) -> Value {
        let name = self.fresh(prefix);
        let shape = Shape(dims.clone()).concrete(&self.env()).expect("known dims");
        self.case.inputs.insert(name.clone(), Tensor::i64(shape, data));
        self.case.g.input(&name, ValueType::new(DType::I64, Shape(dims)))
    }

    fn op(&mut self, op: Op, operands: &[Value], what: &str) -> Vec<Value> {
        let name = self.fresh(&format!("{what}."));
        match self.case.g.add(op, operands, &name) {
            Ok(v) => v,
            Err(e) => panic!("test generator built an ill-typed node: {e}\n{}", graph_text(&self.case.g)),
        }
    }

    fn op1(&mut self, op: Op, operands: &[Value], what: &str) -> Value {
        self.op(op, operands, what)[0]
    }

    fn map(&mut self, src: &str, operands: &[Value]) -> Value {
        self.op1(Op::Map { expr: pe(src) }, operands, "map")
    }

    // ---- graph pieces ----

    fn start(&mut self, code: u8, c: usize) -> Value {
        let (bd, td, kd) = (self.bd(), self.td(), self.kd());
        match code % 3 {
            0 => {
                let wrt = self.coin(0.5);
                self.input("x", vec![bd, td, cd(c)], Gen::U(-1.0, 1.0), wrt)
            }
            1 => {
                let v = 5;
                let table = self.param("emb", vec![cd(v), cd(c)], Gen::N(0.0, 1.0));
                self.table = Some(table);
                let ids: Vec<i64> = (0..self.b * self.t).map(|_| self.d.below(v as u64) as i64).collect();
                let ids = self.int_input("ids", vec![bd, td], ids);
                self.op1(Op::Embedding, &[table, ids], "embedding")
            }
            _ => {
                let wrt = self.coin(0.5);
                self.input("xf", vec![bd, td, kd, cd(c)], Gen::U(-1.0, 1.0), wrt)
            }
        }
    }

    fn step(&mut self, code: u8, cur: Value) -> Value {
        let frames = self.dims(cur).len() == 4;
        match code % 8 {
            0 => {
                let out = 1 + self.pick(6);
                let bias = self.coin(0.5);
                self.feat(if bias { "linear with bias" } else { "linear without bias" });
                self.linear(cur, out, bias)
            }
            1 => self.map_step(cur),
            2 => self.norm(cur),
            3 => self.op1(Op::CenterLast, &[cur], "center_last"),
            4 => {
                if frames {
                    self.op1(Op::MeanFrames, &[cur], "mean_frames")
                } else {
                    self.frames_of(cur)
                }
            }
            5 => {
                let f = self.frames_of(cur);
                self.ponder(f)
            }
            6 => {
                let f = self.frames_of(cur);
                self.scan(f)
            }
            _ => self.fanout(cur),
        }
    }

    fn frames_of(&mut self, cur: Value) -> Value {
        if self.dims(cur).len() == 4 {
            return cur;
        }
        let frames = self.kd();
        self.op1(Op::RepeatFrames { frames }, &[cur], "repeat_frames")
    }

    fn linear(&mut self, x: Value, out: usize, bias: bool) -> Value {
        let i = self.last(x);
        let w = self.param("w", vec![cd(out), cd(i)], Gen::N(0.0, 1.0 / (i as f64).sqrt()));
        let mut ops = vec![x, w];
        if bias {
            ops.push(self.param("bias", vec![cd(out)], Gen::U(-0.5, 0.5)));
        }
        self.op1(Op::Linear { bias }, &ops, "linear")
    }

    /// An element-wise map of `cur` and up to two broadcast operands (params or inputs).
    fn map_step(&mut self, cur: Value) -> Value {
        let dims = self.dims(cur);
        let rank = dims.len();
        let c = self.last(cur);
        let mut ops = vec![cur];
        for _ in 0..self.pick(3) {
            let which = self.pick(6);
            self.feat(format!("map operand {}", ["[C]", "[1]", "[]", "[...,1]", "[T,(1,)C]", "full"][which]));
            let shape: Vec<Dim> = match which {
                0 => vec![cd(c)],
                1 => vec![cd(1)],
                2 => vec![],
                3 => {
                    let mut d = dims[..rank - 1].to_vec();
                    d.push(cd(1));
                    d
                }
                4 => {
                    if rank == 4 {
                        vec![self.td(), cd(1), cd(c)]
                    } else {
                        vec![self.td(), cd(c)]
                    }
                }
                _ => dims.clone(),
            };
            let v = if self.coin(0.3) {
                self.feat("map operand is a gradient input");
                self.input("m", shape, Gen::U(-1.0, 1.0), true)
            } else {
                self.param("p", shape, Gen::U(-1.0, 1.0))
            };
            ops.push(v);
        }
        let vars: Vec<String> = (0..ops.len()).map(|i| format!("x{i}")).collect();
        let e = rand_smooth(&mut self.s, &vars, 3);
        let e = soft_clamp(use_all(&mut self.s, e, &vars));
        self.op1(Op::Map { expr: e }, &ops, "map")
    }

    /// `cur` combined with a linear image of itself: a fan-out whose adjoints accumulate.
    fn fanout(&mut self, cur: Value) -> Value {
        let c = self.last(cur);
        let y = self.linear(cur, c, false);
        let vars = vec!["x0".to_string(), "x1".to_string()];
        let e = rand_smooth(&mut self.s, &vars, 2);
        let e = soft_clamp(use_all(&mut self.s, e, &vars));
        self.op1(Op::Map { expr: e }, &[cur, y], "fanout")
    }

    fn norm(&mut self, cur: Value) -> Value {
        let c = self.last(cur);
        if c == 1 {
            return self.map_step(cur);
        }
        let w = self.param("norm", vec![cd(c)], Gen::U(0.5, 1.5));
        // A row whose RMS is near zero makes the norm a smoothed sign at the scale √eps (a
        // centred pair is ±(a, −a)/|a|), which no finite difference resolves. The gradient's
        // formula does not depend on eps, so narrow rows get an eps that keeps them smooth.
        let eps = [0.05, 0.5][self.pick(2)];
        self.feat(format!("norm eps {eps}"));
        let op = if self.coin(0.5) { Op::RmsNorm { eps } } else { Op::LateralInhibition { eps } };
        self.op1(op, &[cur, w], "norm")
    }

    fn ponder(&mut self, f: Value) -> Value {
        let logits = self.linear(f, 1, true);
        let pw = self.op(Op::PonderWeights { clamp: 1e-6, eps: 1e-8 }, &[logits], "ponder");
        let h = self.op1(Op::FrameWeightedSum, &[f, pw[0]], "frame_weighted_sum");
        let which = self.pick(3);
        if which > 0 {
            self.feat("ponder E[K] consumed");
        }
        match which {
            0 => h,
            1 => self.map("x0 + 0.2 * x1", &[h, pw[1]]),
            _ => {
                let a = self.weighted_mean(pw[1]);
                self.aux.push(a);
                h
            }
        }
    }

    /// mean(v · R)·sqrt(numel) with a fixed random R: a scalar whose gradient is O(1) and not
    /// symmetric in the elements (so permutation bugs show).
    fn weighted_mean(&mut self, v: Value) -> Value {
        let dims = self.dims(v);
        let n: usize = self.sizes(v).iter().product();
        let r = self.input("r", dims, Gen::U(-1.0, 1.0), false);
        let y = self.map("x0 * x1", &[v, r]);
        let m = self.op1(Op::Mean, &[y], "mean");
        self.map(&format!("x0 * {:?}", (n as f64).sqrt()), &[m])
    }

    fn masked_weighted_mean(&mut self, v: Value) -> Value {
        let dims = self.dims(v);
        let n: usize = self.sizes(v).iter().product();
        let r = self.input("r", dims.clone(), Gen::U(-1.0, 1.0), false);
        let y = self.map("x0 * x1", &[v, r]);
        let mask = self.mask(dims);
        let m = self.op1(Op::MaskedMean, &[y, mask], "masked_mean");
        self.map(&format!("x0 * {:?}", (n as f64).sqrt()), &[m])
    }

    fn scan_kind(&mut self) -> ScanKind {
        if let Some(k) = self.forced_kind {
            return k;
        }
        match self.flavor {
            Flavor::Smooth => [ScanKind::LifFar, ScanKind::Leaky][self.pick(2)],
            Flavor::Spiking => [
                ScanKind::Plif,
                ScanKind::SelectivePlif,
                ScanKind::CustomDetached,
                ScanKind::CustomDetached,
                ScanKind::CustomDead,
                ScanKind::CustomDead,
                ScanKind::LifFar,
                ScanKind::Leaky,
            ][self.pick(8)],
        }
    }

    fn scan(&mut self, f: Value) -> Value {
        let c = self.last(f);
        let kind = self.scan_kind();
        let scope = self.forced_scope.unwrap_or_else(|| if self.coin(0.5) { StateScope::Sequence } else { StateScope::Token });
        // (model, per-step inputs, param value generators, consumable outputs, probes, margin)
        type Setup = (NeuronModel, Vec<Value>, Vec<Gen>, Vec<String>, Vec<String>, Option<(String, f64)>);
        let (model, step_inputs, param_gens, consumable, probes, margin): Setup = match kind {
            ScanKind::LifFar => {
                (neuron::lif(), vec![f], vec![Gen::U(0.2, 0.6), Gen::C(1000.0)], vec!["vpost".into(), "spike".into()], vec![], None)
            }
            ScanKind::Leaky => {
                let mut m = neuron::lif();
                m.name = "leaky".into();
                m.reset = Reset::None;
                (m, vec![f], vec![Gen::U(0.2, 0.6), Gen::U(0.1, 0.5)], vec!["vpost".into()], vec![], None)
            }
            ScanKind::Plif => (
                neuron::plif(),
                vec![f],
                vec![Gen::N(0.0, 1.0), Gen::U(0.05, 0.4)],
                vec!["vpost".into(), "leak".into()],
                vec!["spike".into()],
                None,
            ),
            ScanKind::SelectivePlif => {
                let p1 = self.param("sel_b", vec![cd(c)], Gen::U(-1.0, 1.0));
                let beta = self.map("0.8 * sigmoid(x0 + x1)", &[f, p1]);
                let p2 = self.param("sel_u", vec![cd(c)], Gen::U(0.3, 1.0));
                let u = self.map("x0 * x1", &[f, p2]);
                let p3 = self.param("sel_t", vec![cd(c)], Gen::U(-1.0, 1.0));
                let theta = self.map("0.1 + 0.4 * sigmoid(x1 - x0)", &[f, p3]);
                (neuron::selective_plif(), vec![beta, u, theta], vec![], vec!["vpost".into()], vec!["spike".into()], None)
            }
            ScanKind::CustomDetached | ScanKind::CustomDead => {
                let name = self.fresh("custom");
                let cm = custom_model(&mut self.s, &name, kind == ScanKind::CustomDead);
                let mut ins = vec![f];
                if cm.model.inputs.len() > 1 {
                    let p = self.param("y", vec![cd(c)], Gen::U(-1.0, 1.0));
                    let vars = vec!["x0".to_string(), "x1".to_string()];
                    let e = rand_smooth(&mut self.s, &vars, 2);
                    let e = soft_clamp(use_all(&mut self.s, e, &vars));
                    ins.push(self.op1(Op::Map { expr: e }, &[f, p], "map"));
                }
                let gens = cm.model.params.iter().map(|_| Gen::U(-1.0, 1.0)).collect();
                (cm.model, ins, gens, cm.consumable, cm.probes, cm.margin)
            }
        };
        if !matches!(kind, ScanKind::LifFar) {
            self.case.spiking = true;
        }
        self.feat(format!("scan {kind:?}"));
        self.feat(format!("scope {}", scope.name()));
        if matches!(kind, ScanKind::CustomDetached | ScanKind::CustomDead) {
            self.feat(format!("reset {:?}{}", model.reset, if model.detach_reset { " detached" } else { "" }));
            self.feat(format!("surrogate {}", model.surrogate.name()));
            self.feat(format!("fire {:?}", model.fire));
            self.feat(format!("custom with {} states", model.state.len()));
        }
        self.case.g.add_neuron(model.clone()).expect("valid model");
        let mut operands = step_inputs;
        for (p, gen) in model.params.iter().zip(param_gens) {
            let v = self.param(&format!("{p}_"), vec![cd(c)], gen);
            operands.push(v);
        }
        let mut init_names = Vec::new();
        for sv in &model.state {
            let dims = vec![self.bd(), cd(c)];
            let v = if self.coin(0.5) {
                self.feat("scan init is a gradient input");
                self.input(&format!("{}0_", sv.name), dims, Gen::U(-0.3, 0.3), true)
            } else {
                self.param(&format!("{}0_", sv.name), dims, Gen::U(-0.3, 0.3))
            };
            init_names.push(self.case.g.node(v.node).name.clone());
            operands.push(v);
        }
        if scope == StateScope::Token {
            self.case.token_inits.extend(init_names);
        }
        // Emit a non-empty random subset of the consumable outputs, then the probes.
        let mut consumed: Vec<String> = consumable.iter().filter(|_| self.coin(0.6)).cloned().collect();
        if consumed.is_empty() {
            consumed.push(consumable[self.pick(consumable.len())].clone());
        }
        if consumed.iter().any(|c| c == "spike" || c == "zfeat") {
            self.feat(format!("spike consumed ({kind:?})"));
        }
        let mut emit = consumed.clone();
        for p in probes.iter().chain(margin.iter().map(|(n, _)| n)) {
            if !emit.contains(p) {
                emit.push(p.clone());
            }
        }
        let results = self.op(Op::Scan { neuron: model.name.clone(), emit: emit.clone(), scope }, &operands, "scan");
        let at = |name: &str| results[emit.iter().position(|e| e == name).expect("emitted")];
        let mut out = at(&consumed[0]);
        for name in &consumed[1..] {
            let r = at(name);
            if self.coin(0.5) {
                out = self.map("x0 + 0.5 * x1", &[out, r]);
            } else {
                let a = self.weighted_mean(r);
                self.aux.push(a);
            }
        }
        for p in &probes {
            let name = self.fresh("probe.");
            self.case.g.set_output(&name, at(p));
            self.case.probes.push(name);
        }
        if let Some((m, bound)) = &margin {
            let name = self.fresh("margin.");
            self.case.g.set_output(&name, at(m));
            self.case.margins.push((name, *bound));
        }
        for j in 0..model.state.len() {
            if self.coin(self.finals_prob) {
                self.feat("scan final state consumed");
                let a = self.weighted_mean(results[emit.len() + j]);
                self.aux.push(a);
            }
        }
        out
    }

    fn finish(&mut self, code: u8, cur: Value) {
        let tokens = self.dims(cur).len() == 3;
        let main = match code % 4 {
            0 if tokens => self.ce_head(cur),
            1 => self.masked_weighted_mean(cur),
            _ => self.weighted_mean(cur),
        };
        let mut loss = main;
        for a in std::mem::take(&mut self.aux) {
            loss = self.map("x0 + x1", &[loss, a]);
        }
        self.case.g.set_output("loss", loss);
    }

    fn ce_head(&mut self, cur: Value) -> Value {
        let c = self.last(cur);
        let (bd, td) = (self.bd(), self.td());
        // Tie the head to the embedding table when the widths agree (as NeuronSpark does).
        let table = self.table.filter(|&t| self.dims(t)[1] == cd(c));
        let tie = self.coin(0.7);
        let (w, v) = match table {
            Some(t) if tie => {
                self.feat("head tied to the embedding");
                (t, self.sizes(t)[0])
            }
            _ => {
                let v = 2 + self.pick(4);
                (self.param("head", vec![cd(v), cd(c)], Gen::N(0.0, 1.0 / (c as f64).sqrt())), v)
            }
        };
        let bias = self.coin(0.5);
        let mut ops = vec![cur, w];
        if bias {
            ops.push(self.param("head_b", vec![cd(v)], Gen::U(-0.5, 0.5)));
        }
        let logits = self.op1(Op::Linear { bias }, &ops, "head");
        let ignore = -100;
        let n = self.b * self.t;
        let mut targets: Vec<i64> = (0..n).map(|_| if self.d.uniform() < 0.2 { ignore } else { self.d.below(v as u64) as i64 }).collect();
        if targets.iter().all(|&t| t == ignore) {
            targets[0] = 0;
        }
        if targets.contains(&ignore) {
            self.feat("ignored targets");
        }
        let targets = self.int_input("targets", vec![bd.clone(), td.clone()], targets);
        let ce = self.op1(Op::CrossEntropy { ignore_index: ignore }, &[logits, targets], "cross_entropy");
        if self.coin(0.5) {
            self.op1(Op::Mean, &[ce], "mean")
        } else {
            let mask = self.mask(vec![bd, td]);
            self.op1(Op::MaskedMean, &[ce, mask], "masked_mean")
        }
    }
}

fn build(spec: &Spec, attempt: u64, flavor: Flavor, tweak: &dyn Fn(&mut Builder)) -> Case {
    let mut bld = Builder::new(spec, attempt, flavor);
    tweak(&mut bld);
    let mut cur = bld.start(spec.start, spec.c);
    let mut steps = spec.steps.clone();
    if flavor == Flavor::Spiking && !steps.iter().any(|s| s % 8 == 6) {
        steps.push(6);
    }
    for &code in &steps {
        cur = bld.step(code, cur);
    }
    bld.finish(spec.finish, cur);
    bld.case
}

/// A random custom neuron model.
struct CustomModel {
    model: NeuronModel,
    /// Outputs the loss may consume.
    consumable: Vec<String>,
    probes: Vec<String>,
    margin: Option<(String, f64)>,
}

/// `dead`: a narrow triangle surrogate, any reset (detached or not), spikes may be consumed, and
/// a `margin` output (membrane − threshold before the reset) to check the surrogate is zero.
/// Otherwise: a detached (or absent) reset and outputs that do not read the spike.
///
/// Charges are never a bare state name (`p = q`): see `delay_line_*` below for why.
fn custom_model(s: &mut Rng, name: &str, dead: bool) -> CustomModel {
    let strs = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut params = Vec::new();
    if s.uniform() < 0.7 {
        params.push("a".to_string());
    }
    if s.uniform() < 0.6 {
        params.push("b".to_string());
    }
    let inputs = if s.uniform() < 0.3 { strs(&["x", "y"]) } else { strs(&["x"]) };
    let has_w = s.uniform() < 0.5;
    let mut state = vec![StateVar { name: "v".into(), init: round3(s.uniform_range(-0.2, 0.2)) }];
    if has_w {
        state.push(StateVar { name: "w".into(), init: round3(s.uniform_range(-0.2, 0.2)) });
    }
    let mut known: Vec<String> = params.iter().chain(&inputs).cloned().collect();
    let mut lets = Vec::new();
    if !params.is_empty() && s.uniform() < 0.5 {
        lets.push(bind("d", rand_smooth(s, &params, 2)));
        known.push("d".into());
    }
    let decay_arg = {
        let vars: Vec<String> = known.clone();
        rand_smooth(s, &vars, 2)
    };
    let drive = {
        let mut vars = known.clone();
        if has_w {
            vars.push("w".into());
        }
        let e = rand_smooth(s, &vars, 2);
        use_all(s, e, &inputs)
    };
    // v = 0.7·σ(·)·v + tanh(drive): |v| stays below 3.4 even when nothing resets it. Other
    // expressions read v only through tanh(v): a product like atan(w)·2v with a large v inside
    // a tanh is a sign function of w, which finite differences cannot follow.
    let squash_v = |e: Expr| e.substitute(&|n| (n == "v").then(|| un(UnOp::Tanh, var("v"))));
    let mut charge = vec![bind(
        "v",
        bin(BinOp::Add, bin(BinOp::Mul, bin(BinOp::Mul, cst(0.7), un(UnOp::Sigmoid, decay_arg)), var("v")), un(UnOp::Tanh, drive)),
    )];
    if has_w {
        let vars = strs(&["v", "w", "x"]);
        let e = rand_smooth(s, &vars, 2);
        let e = squash_v(use_all(s, e, &strs(&["v"])));
        charge.push(bind(
            "w",
            bin(
                BinOp::Add,
                bin(BinOp::Mul, cst(round3(s.uniform_range(0.3, 0.9))), var("w")),
                bin(BinOp::Mul, cst(0.5), un(UnOp::Tanh, e)),
            ),
        ));
    }
    let mut thr_choices = vec![cst(round3(s.uniform_range(0.1, 0.6)))];
    if params.iter().any(|p| p == "b") {
        thr_choices.push(pe("0.5 * softplus(b) + 0.05"));
    }
    if has_w {
        thr_choices.push(pe("0.3 + 0.2 * tanh(w)"));
    }
    if inputs.len() > 1 {
        thr_choices.push(pe("0.2 + 0.3 * sigmoid(y)"));
    }
    let threshold = thr_choices[s.below(thr_choices.len() as u64) as usize].clone();
    let fire = if s.uniform() < 0.5 { FireCmp::Ge } else { FireCmp::Gt };
    let reset = match s.below(3) {
        0 => Reset::Subtract,
        1 => Reset::ToValue([0.0, -0.1, 0.05][s.below(3) as usize]),
        _ => Reset::None,
    };
    let mut feat_vars = strs(&["v"]);
    if has_w {
        feat_vars.push("w".into());
    }
    feat_vars.extend(params.iter().cloned());
    let feat = {
        let e = rand_smooth(s, &feat_vars, 2);
        squash_v(use_all(s, e, &strs(&["v"])))
    };
    let mut outputs = vec![bind("spike", var(SPIKE)), bind("vpost", var("v")), bind("feat", feat)];
    let mut consumable = strs(&["vpost", "feat"]);
    let (surrogate, detach_reset, margin) = if dead {
        let alpha = [50.0, 200.0][s.below(2) as usize];
        state.push(StateVar { name: "m".into(), init: 0.0 });
        charge.push(bind("m", bin(BinOp::Sub, var("v"), threshold.clone())));
        outputs.push(bind("margin", var("m")));
        outputs.push(bind("zfeat", bin(BinOp::Mul, var(SPIKE), pe("0.5 + tanh(v)"))));
        consumable.extend(strs(&["spike", "zfeat"]));
        (Surrogate { kind: SurrogateKind::Triangle, alpha }, s.uniform() < 0.5, Some(("margin".to_string(), 1.0 / alpha + 2e-3)))
    } else {
        let kind = [SurrogateKind::Sigmoid, SurrogateKind::Atan, SurrogateKind::Triangle][s.below(3) as usize];
        (Surrogate { kind, alpha: [1.0, 2.0, 4.0][s.below(3) as usize] }, true, None)
    };
    let model = NeuronModel {
        name: name.to_string(),
        params,
        inputs,
        state,
        lets,
        charge,
        membrane: "v".into(),
        threshold,
        fire,
        reset,
        detach_reset,
        surrogate,
        outputs,
    };
    model.validate().unwrap_or_else(|e| panic!("generated model is invalid: {e}\n{model}"));
    CustomModel { model, consumable, probes: strs(&["spike"]), margin }
}

// ------------------------------------------------------------------------------------------
// The finite-difference checker
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Tol {
    eps: f64,
    rtol: f64,
    atol: f64,
    per_tensor: usize,
}

const SMOOTH_TOL: Tol = Tol { eps: 1e-2, rtol: 1e-2, atol: 1e-3, per_tensor: 3 };
const SPIKING_TOL: Tol = Tol { eps: 4e-3, rtol: 2e-2, atol: 2e-3, per_tensor: 3 };

#[derive(Clone, Debug, Default)]
struct Stats {
    cases: usize,
    spiking_cases: usize,
    /// Cases where no data draw kept every membrane off the dead surrogate's support.
    discarded: usize,
    checked: usize,
    /// Coordinates skipped because ±eps changed a spike pattern.
    skipped: usize,
    /// Spikes seen in probes (to know that the spiking tests spike).
    spikes: usize,
    probe_elems: usize,
    /// Coordinates that matched only with the half step / Richardson extrapolation.
    refined: usize,
    /// How often each op and generator feature occurred in the checked graphs.
    coverage: BTreeMap<String, usize>,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.cases += o.cases;
        self.spiking_cases += o.spiking_cases;
        self.discarded += o.discarded;
        self.checked += o.checked;
        self.skipped += o.skipped;
        self.spikes += o.spikes;
        self.probe_elems += o.probe_elems;
        self.refined += o.refined;
        for (k, n) in &o.coverage {
            *self.coverage.entry(k.clone()).or_default() += n;
        }
    }

    /// Fail unless every named op / feature occurred at least `min` times.
    fn require(&self, names: &[&str], min: usize) {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| self.coverage.get(**n).copied().unwrap_or(0) < min)
            .map(|n| format!("{n}: {}", self.coverage.get(*n).copied().unwrap_or(0)))
            .collect();
        assert!(missing.is_empty(), "the generator under-covers {missing:?} (wanted >= {min}); coverage: {:?}", self.coverage);
    }
}

enum Outcome {
    Checked { stats: Stats, grads: BTreeMap<String, Tensor> },
    MarginTooSmall,
}

fn fd_check(case: &Case, tol: Tol, seed: u64) -> Result<Outcome, String> {
    let g = &case.g;
    let ctx = || format!("\n--- graph ---\n{}", graph_text(g));
    let wrt: Vec<&str> = case.wrt.iter().map(|s| s.as_str()).collect();
    let dg = differentiate(g, "loss", &wrt).map_err(|e| format!("differentiate failed: {e}{}", ctx()))?;
    let fwd = CpuProgram::compile(g).map_err(|e| format!("forward does not compile: {e}{}", ctx()))?;
    let bwd = CpuProgram::compile(&dg).map_err(|e| format!("gradient graph does not compile: {e}{}", ctx()))?;
    let base = fwd.run(&case.inputs, &case.params).map_err(|e| format!("forward run: {e}{}", ctx()))?;
    let l0 = scalar_of(&base["loss"]);
    if !l0.is_finite() {
        return Err(format!("loss is {l0}{}", ctx()));
    }
    for (name, bound) in &case.margins {
        if base[name].to_f32_vec().iter().any(|m| (m.abs() as f64) <= *bound) {
            return Ok(Outcome::MarginTooSmall);
        }
    }
    let out = bwd.run(&case.inputs, &case.params).map_err(|e| format!("gradient run: {e}{}", ctx()))?;
    // The gradient graph keeps every forward output, with the same values.
    for (name, t) in &base {
        let o = out.get(name).ok_or_else(|| format!("the gradient graph lost forward output `{name}`{}", ctx()))?;
        let same = o.shape == t.shape && o.to_f32_vec().iter().zip(t.to_f32_vec()).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
        if !same {
            return Err(format!("forward output `{name}` differs in the gradient graph{}", ctx()));
        }
    }
    let mut stats = Stats { cases: 1, spiking_cases: case.spiking as usize, ..Stats::default() };
    for n in g.g.node_indices() {
        *stats.coverage.entry(format!("op:{}", g.node(n).op.name())).or_default() += 1;
    }
    for f in &case.features {
        *stats.coverage.entry(f.clone()).or_default() += 1;
    }
    for (_, _, ty) in g.inputs().into_iter().chain(g.params()) {
        if ty.shape.0.iter().any(|d| matches!(d, Dim::Sym(_))) {
            *stats.coverage.entry("symbolic dims".into()).or_default() += 1;
            break;
        }
    }
    for p in &case.probes {
        let v = base[p].to_f32_vec();
        stats.spikes += v.iter().filter(|&&x| x != 0.0).count();
        stats.probe_elems += v.len();
    }
    let mut targets: Vec<(String, bool)> =
        case.params.iter().filter(|(_, t)| t.as_f32().is_some()).map(|(n, _)| (n.clone(), false)).collect();
    targets.extend(case.wrt.iter().map(|n| (n.clone(), true)));
    // Every float param and every requested input has a gradient output of its shape.
    let names: BTreeSet<String> = out.keys().filter(|k| k.starts_with(GRAD_PREFIX)).cloned().collect();
    let want: BTreeSet<String> = targets.iter().map(|(n, _)| format!("{GRAD_PREFIX}{n}")).collect();
    if names != want {
        return Err(format!("gradient outputs {names:?}, expected {want:?}{}", ctx()));
    }
    let mut rng = Rng::derive(seed, "coordinates");
    let mut failures = Vec::new();
    for (name, is_input) in &targets {
        let t = if *is_input { &case.inputs[name] } else { &case.params[name] };
        let grad = &out[&format!("{GRAD_PREFIX}{name}")];
        if grad.shape != t.shape {
            return Err(format!("grad.{name} has shape {:?}, the tensor {:?}{}", grad.shape, t.shape, ctx()));
        }
        let gv = grad.as_f32().ok_or_else(|| format!("grad.{name} is not f32"))?;
        if let Some(bad) = gv.iter().find(|x| !x.is_finite()) {
            return Err(format!("grad.{name} holds {bad}{}", ctx()));
        }
        let n = t.numel();
        let coords: Vec<usize> = if n <= tol.per_tensor {
            (0..n).collect()
        } else {
            let mut set = BTreeSet::new();
            while set.len() < tol.per_tensor {
                set.insert(rng.below(n as u64) as usize);
            }
            set.into_iter().collect()
        };
        for i in coords {
            let x0 = t.as_f32().expect("float tensor")[i];
            let eval = |x: f32| -> Result<BTreeMap<String, Tensor>, String> {
                let r = if *is_input {
                    let mut m = case.inputs.clone();
                    m.get_mut(name).unwrap().as_f32_mut().unwrap()[i] = x;
                    fwd.run(&m, &case.params)
                } else {
                    let mut m = case.params.clone();
                    m.get_mut(name).unwrap().as_f32_mut().unwrap()[i] = x;
                    fwd.run(&case.inputs, &m)
                };
                r.map_err(|e| format!("perturbed run: {e}"))
            };
            // Central difference with step h; None when a spike pattern changes within ±h.
            let central = |h: f64| -> Result<Option<f64>, String> {
                let (xp, xm) = ((x0 as f64 + h) as f32, (x0 as f64 - h) as f32);
                let (rp, rm) = (eval(xp)?, eval(xm)?);
                if case.probes.iter().any(|p| rp[p] != base[p] || rm[p] != base[p]) {
                    return Ok(None);
                }
                Ok(Some((scalar_of(&rp["loss"]) - scalar_of(&rm["loss"])) / (xp as f64 - xm as f64)))
            };
            let ad = gv[i] as f64;
            let close = |fd: f64| (ad - fd).abs() <= tol.rtol * ad.abs().max(fd.abs()) + tol.atol;
            let Some(fd) = central(tol.eps)? else {
                stats.skipped += 1;
                continue;
            };
            stats.checked += 1;
            if close(fd) {
                continue;
            }
            // Strong curvature at the scale of eps (e.g. a norm of nearly cancelling values):
            // accept a match with half the step or with the Richardson extrapolation of both.
            // A wrong gradient misses at every step size.
            let half = central(tol.eps / 2.0)?;
            if let Some(fd2) = half {
                if close(fd2) || close((4.0 * fd2 - fd) / 3.0) {
                    stats.refined += 1;
                    continue;
                }
            }
            failures
                .push(format!("grad.{name}[{i}] (of {:?}): autodiff {ad:.6}, finite difference {fd:.6} (half step: {half:?})", t.shape));
        }
    }
    if !failures.is_empty() {
        return Err(format!("{} gradient mismatches:\n  {}{}", failures.len(), failures.join("\n  "), ctx()));
    }
    let grads = out.into_iter().filter(|(k, _)| k.starts_with(GRAD_PREFIX)).collect();
    Ok(Outcome::Checked { stats, grads })
}

/// Build and check `spec`; for dead-surrogate graphs, redraw the data (same structure) until
/// no membrane is inside the surrogate's support.
/// What a checked case leaves for further assertions: the case and its gradients.
type Checked = Option<(Case, BTreeMap<String, Tensor>)>;

fn check_spec(spec: &Spec, flavor: Flavor, tol: Tol, tweak: &dyn Fn(&mut Builder)) -> Result<(Stats, Checked), String> {
    for attempt in 0..6 {
        let case = build(spec, attempt, flavor, tweak);
        match fd_check(&case, tol, spec.seed)? {
            Outcome::Checked { stats, grads } => return Ok((stats, Some((case, grads)))),
            Outcome::MarginTooSmall => continue,
        }
    }
    Ok((Stats { cases: 1, discarded: 1, ..Stats::default() }, None))
}

/// Fixed seed for reproducible runs; `SPARKC_AUTODIFF_SEED=<u64>` explores other graphs and
/// `SPARKC_AUTODIFF_SCALE=<n>` multiplies the case counts.
fn config(cases: u32) -> ProptestConfig {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    ProptestConfig {
        cases: cases * env("SPARKC_AUTODIFF_SCALE").unwrap_or(1) as u32,
        rng_seed: RngSeed::Fixed(env("SPARKC_AUTODIFF_SEED").unwrap_or(0x00AD_5EED)),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

fn run_property(cases: u32, max_steps: usize, flavor: Flavor, tol: Tol) -> Stats {
    let total = RefCell::new(Stats::default());
    let mut runner = TestRunner::new(config(cases));
    let result = runner.run(&spec_strategy(max_steps), |spec| {
        let (stats, _) = check_spec(&spec, flavor, tol, &|_| {}).map_err(TestCaseError::fail)?;
        total.borrow_mut().add(&stats);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let st = total.into_inner();
    eprintln!("{flavor:?}: {st:?}");
    st
}

// ------------------------------------------------------------------------------------------
// 1. Finite differences on random graphs
// ------------------------------------------------------------------------------------------

/// Linear, maps with broadcast params, norms, frame ops, PonderNet, embedding + cross-entropy,
/// masked means and non-firing LIF / leaky-integrator scans.
#[test]
fn fd_random_smooth_graphs() {
    let st = run_property(2000, 6, Flavor::Smooth, SMOOTH_TOL);
    assert!(st.checked >= st.cases * 5, "too few coordinates checked: {st:?}");
    assert_eq!(st.skipped, 0, "smooth graphs should never flip a spike: {st:?}");
    let ops = [
        "op:linear",
        "op:map",
        "op:rms_norm",
        "op:lateral_inhibition",
        "op:repeat_frames",
        "op:mean_frames",
        "op:center_last",
        "op:ponder_weights",
        "op:frame_weighted_sum",
        "op:embedding",
        "op:cross_entropy",
        "op:masked_mean",
        "op:mean",
        "op:scan",
    ];
    st.require(&ops, 5);
    st.require(
        &[
            "linear with bias",
            "linear without bias",
            "map operand [C]",
            "map operand [1]",
            "map operand []",
            "map operand [...,1]",
            "map operand [T,(1,)C]",
            "map operand full",
            "map operand is a gradient input",
            "ponder E[K] consumed",
            "scan LifFar",
            "scan Leaky",
            "scope sequence",
            "scope token",
            "scan init is a gradient input",
            "scan final state consumed",
            "head tied to the embedding",
            "ignored targets",
            "symbolic dims",
        ],
        3,
    );
}

/// PLIF, selective PLIF and random custom models that spike. Coordinates whose ±eps flips a
/// spike are skipped; most must still be checked, and the scans must actually fire.
#[test]
fn fd_random_spiking_graphs() {
    let st = run_property(2000, 5, Flavor::Spiking, SPIKING_TOL);
    assert!(st.spiking_cases * 2 >= st.cases, "too few spiking graphs: {st:?}");
    assert!(st.spikes * 20 >= st.probe_elems, "the scans hardly fire: {st:?}");
    assert!(st.checked * 2 >= st.checked + st.skipped, "more than half of the coordinates were skipped: {st:?}");
    assert!(st.discarded * 5 <= st.cases, "too many dead-surrogate cases discarded: {st:?}");
    st.require(
        &[
            "scan Plif",
            "scan SelectivePlif",
            "scan CustomDetached",
            "scan CustomDead",
            "scope sequence",
            "scope token",
            "reset Subtract detached",
            "reset Subtract",
            "reset None detached",
            "surrogate sigmoid",
            "surrogate atan",
            "surrogate triangle",
            "fire Ge",
            "fire Gt",
            "custom with 2 states",
            "custom with 3 states",
            "spike consumed (CustomDead)",
            "scan final state consumed",
        ],
        3,
    );
    let to_value = st.coverage.iter().filter(|(k, _)| k.starts_with("reset ToValue")).map(|(_, n)| n).sum::<usize>();
    assert!(to_value >= 3, "too few reset-to-value scans: {:?}", st.coverage);
}

// ------------------------------------------------------------------------------------------
// 3. Token vs sequence scope of the scan adjoint
// ------------------------------------------------------------------------------------------

fn scope_strategy() -> impl Strategy<Value = (Spec, usize)> {
    (any::<u64>(), (1..=3usize, 1..=3usize, 1..=3usize, 1..=6usize), any::<bool>(), 0..6usize).prop_map(
        |(seed, (b, t, k, c), symbolic, kind)| {
            // Frames input, one scan, weighted loss.
            (Spec { seed, b, t, k, c, start: 2, steps: vec![6], finish: 2, symbolic }, kind)
        },
    )
}

/// The same single-scan graph and data under both scopes: both match finite differences; under
/// token scope the initial states get exactly zero gradient (they are never read).
#[test]
fn fd_scan_adjoint_token_vs_sequence_scope() {
    let kinds =
        [ScanKind::LifFar, ScanKind::Leaky, ScanKind::Plif, ScanKind::SelectivePlif, ScanKind::CustomDetached, ScanKind::CustomDead];
    let total = RefCell::new(Stats::default());
    let mut runner = TestRunner::new(config(600));
    let result = runner.run(&scope_strategy(), |(spec, kind)| {
        let kind = kinds[kind];
        let flavor = if matches!(kind, ScanKind::LifFar | ScanKind::Leaky) { Flavor::Smooth } else { Flavor::Spiking };
        let tol = if flavor == Flavor::Smooth { SMOOTH_TOL } else { SPIKING_TOL };
        let mut per_scope = Vec::new();
        for scope in [StateScope::Sequence, StateScope::Token] {
            let tweak = |b: &mut Builder| {
                b.forced_kind = Some(kind);
                b.forced_scope = Some(scope);
                b.finals_prob = 1.0;
            };
            let (stats, checked) =
                check_spec(&spec, flavor, tol, &tweak).map_err(|e| TestCaseError::fail(format!("{scope:?} scope: {e}")))?;
            total.borrow_mut().add(&stats);
            per_scope.push(checked);
        }
        if let Some((case, grads)) = &per_scope[1] {
            prop_assert!(!case.token_inits.is_empty());
            for name in &case.token_inits {
                let gvals = grads[&format!("{GRAD_PREFIX}{name}")].to_f32_vec();
                prop_assert!(gvals.iter().all(|&g| g == 0.0), "token scope: grad.{name} = {gvals:?}, expected zeros");
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let st = total.into_inner();
    eprintln!("scopes: {st:?}");
    assert!(st.checked >= st.cases * 3, "too few coordinates checked: {st:?}");
}

/// Token scope on a hand-checkable case: K = 2 frames per token, LIF that never fires. The
/// gradient of the first frame of token 1 must not see token 2's frames, unlike sequence scope.
#[test]
fn token_scope_cuts_the_state_gradient_between_tokens() {
    let build = |scope: StateScope| {
        let mut g = Graph::new("scope");
        g.add_neuron(neuron::lif()).unwrap();
        let x = g.input("x", ValueType::f32([1u64, 2, 2, 1]));
        let beta = g.param("beta", ValueType::f32([1u64])).unwrap();
        let th = g.param("th", ValueType::f32([1u64])).unwrap();
        let v0 = g.input("v0", ValueType::f32([1u64, 1]));
        let r = g.add(Op::Scan { neuron: "lif".into(), emit: vec!["vpost".into()], scope }, &[x, beta, th, v0], "scan").unwrap();
        let loss = g.add1(Op::Mean, &[r[0]], "mean").unwrap();
        g.set_output("loss", loss);
        g
    };
    let inputs: BTreeMap<String, Tensor> = [
        ("x".to_string(), Tensor::f32(vec![1, 2, 2, 1], vec![0.1, 0.2, 0.3, 0.4])),
        ("v0".to_string(), Tensor::f32(vec![1, 1], vec![0.5])),
    ]
    .into();
    let params: BTreeMap<String, Tensor> =
        [("beta".to_string(), Tensor::f32(vec![1], vec![0.5])), ("th".to_string(), Tensor::f32(vec![1], vec![1000.0]))].into();
    let grads = |scope| {
        let dg = differentiate(&build(scope), "loss", &["x", "v0"]).unwrap();
        let out = run_graph(&dg, &inputs, &params);
        (out["grad.x"].to_f32_vec(), out["grad.v0"].to_f32_vec())
    };
    // v_s = β v_{s−1} + x_s; loss = mean of the 4 v's. ∂loss/∂x_s = (1/4) Σ_{s' ≥ s, same run} β^{s'−s}.
    let (gx_seq, gv0_seq) = grads(StateScope::Sequence);
    let want_seq = [(1.0 + 0.5 + 0.25 + 0.125) / 4.0, (1.0 + 0.5 + 0.25) / 4.0, (1.0 + 0.5) / 4.0, 1.0 / 4.0];
    let (gx_tok, gv0_tok) = grads(StateScope::Token);
    let want_tok = [(1.0 + 0.5) / 4.0, 1.0 / 4.0, (1.0 + 0.5) / 4.0, 1.0 / 4.0];
    for i in 0..4 {
        assert!((gx_seq[i] as f64 - want_seq[i]).abs() < 1e-6, "sequence {gx_seq:?}");
        assert!((gx_tok[i] as f64 - want_tok[i]).abs() < 1e-6, "token {gx_tok:?}");
    }
    assert!((gv0_seq[0] as f64 - 0.5 * want_seq[0]).abs() < 1e-6, "{gv0_seq:?}");
    assert_eq!(gv0_tok, vec![0.0]);
}

// ------------------------------------------------------------------------------------------
// 2. The surrogate matters: hand-computed references
// ------------------------------------------------------------------------------------------

/// The surrogate derivative, written independently of `Surrogate::derivative_expr`.
fn surrogate_value(kind: SurrogateKind, alpha: f64, x: f64) -> f64 {
    match kind {
        SurrogateKind::Sigmoid => {
            let s = 1.0 / (1.0 + (-alpha * x).exp());
            alpha * s * (1.0 - s)
        }
        SurrogateKind::Atan => {
            let k = std::f64::consts::FRAC_PI_2 * alpha * x;
            alpha / 2.0 / (1.0 + k * k)
        }
        SurrogateKind::Triangle => (alpha * (1.0 - alpha * x.abs())).max(0.0),
    }
}

/// One channel, S frames: x_s = p·xin_s feeds V_s = β·P_{s−1} + x_s (P_0 = v0), z_s = V_s ≥ θ,
/// P_s = reset(V_s, z_s) (V − θ·z, z·r + (1 − z)·V, or V); loss = mean_s(linear(z, wo) + wv·P).
#[derive(Clone, Debug)]
struct Srg {
    kind: SurrogateKind,
    alpha: f64,
    detach: bool,
    reset: Reset,
    xin: Vec<f64>,
    p: f64,
    v0: f64,
    beta: f64,
    th: f64,
    wo: f64,
    wv: f64,
}

fn srg_model(kind: SurrogateKind, alpha: f64, detach: bool, reset: Reset) -> NeuronModel {
    NeuronModel {
        name: "srg".into(),
        params: vec!["beta".into(), "th".into()],
        inputs: vec!["x".into()],
        state: vec![StateVar { name: "v".into(), init: 0.0 }],
        lets: vec![],
        charge: vec![bind("v", pe("beta * v + x"))],
        membrane: "v".into(),
        threshold: pe("th"),
        fire: FireCmp::Ge,
        reset,
        detach_reset: detach,
        surrogate: Surrogate { kind, alpha },
        outputs: vec![bind("spike", var(SPIKE)), bind("vpost", var("v"))],
    }
}

/// The autodiff gradients of the `Srg` graph.
fn srg_autodiff(c: &Srg) -> BTreeMap<String, f64> {
    let s = c.xin.len() as u64;
    let mut g = Graph::new("surrogate");
    g.add_neuron(srg_model(c.kind, c.alpha, c.detach, c.reset)).unwrap();
    let xin = g.input("xin", ValueType::f32([1, 1, s, 1]));
    let p = g.param("p", ValueType::f32([1u64])).unwrap();
    let xs = g.add1(Op::Map { expr: pe("x0 * x1") }, &[xin, p], "scale").unwrap();
    let beta = g.param("beta", ValueType::f32([1u64])).unwrap();
    let th = g.param("th", ValueType::f32([1u64])).unwrap();
    let v0 = g.input("v0", ValueType::f32([1u64, 1]));
    let r = g
        .add(
            Op::Scan { neuron: "srg".into(), emit: vec!["spike".into(), "vpost".into()], scope: StateScope::Sequence },
            &[xs, beta, th, v0],
            "scan",
        )
        .unwrap();
    let wo = g.param("wo", ValueType::f32([1u64, 1])).unwrap();
    let ls = g.add1(Op::Linear { bias: false }, &[r[0], wo], "readout").unwrap();
    let wv = g.param("wv", ValueType::f32([1u64])).unwrap();
    let y = g.add1(Op::Map { expr: pe("x0 + x1 * x2") }, &[ls, r[1], wv], "mix").unwrap();
    let loss = g.add1(Op::Mean, &[y], "mean").unwrap();
    g.set_output("loss", loss);
    let dg = differentiate(&g, "loss", &["v0"]).unwrap();
    let f = |x: f64| vec![x as f32];
    let inputs: BTreeMap<String, Tensor> = [
        ("xin".to_string(), Tensor::f32(vec![1, 1, s as usize, 1], c.xin.iter().map(|&x| x as f32).collect())),
        ("v0".to_string(), Tensor::f32(vec![1, 1], f(c.v0))),
    ]
    .into();
    let params: BTreeMap<String, Tensor> = [
        ("p".to_string(), Tensor::f32(vec![1], f(c.p))),
        ("beta".to_string(), Tensor::f32(vec![1], f(c.beta))),
        ("th".to_string(), Tensor::f32(vec![1], f(c.th))),
        ("wo".to_string(), Tensor::f32(vec![1, 1], f(c.wo))),
        ("wv".to_string(), Tensor::f32(vec![1], f(c.wv))),
    ]
    .into();
    let out = run_graph(&dg, &inputs, &params);
    out.iter().filter_map(|(k, t)| k.strip_prefix(GRAD_PREFIX).map(|n| (n.to_string(), t.to_f32_vec()[0] as f64))).collect()
}

/// Hand-written backpropagation through the `Srg` recurrence (f64, the surrogate for ∂z/∂V).
fn srg_reference(c: &Srg) -> BTreeMap<String, f64> {
    let n = c.xin.len();
    let nf = n as f64;
    let mut pre = vec![c.v0]; // P_{s−1}
    let (mut z, mut sg, mut vs) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for s in 0..n {
        let v = c.beta * pre[s] + c.p * c.xin[s];
        vs[s] = v;
        z[s] = (v >= c.th) as u8 as f64;
        sg[s] = surrogate_value(c.kind, c.alpha, v - c.th);
        pre.push(match c.reset {
            Reset::Subtract => v - c.th * z[s],
            Reset::ToValue(r) => z[s] * r + (1.0 - z[s]) * v,
            Reset::None => v,
        });
    }
    let (mut gth, mut gbeta, mut gp, mut carry) = (0.0, 0.0, 0.0, 0.0);
    for s in (0..n).rev() {
        let gpost = carry + c.wv / nf;
        // Partials of P = reset(V, z, θ): (∂P/∂V with z fixed, ∂P/∂z, ∂P/∂θ with z fixed).
        let (dp_dv, dp_dz, dp_dth) = match c.reset {
            Reset::Subtract => (1.0, -c.th, -z[s]),
            Reset::ToValue(r) => (1.0 - z[s], r - vs[s], 0.0),
            Reset::None => (1.0, 0.0, 0.0),
        };
        let gz = c.wo / nf + if c.detach { 0.0 } else { gpost * dp_dz };
        let gv = gpost * dp_dv + gz * sg[s];
        gth += gpost * dp_dth - gz * sg[s];
        gbeta += gv * pre[s];
        gp += gv * c.xin[s];
        carry = gv * c.beta;
    }
    [("p", gp), ("beta", gbeta), ("th", gth), ("wo", z.iter().sum::<f64>() / nf), ("wv", pre[1..].iter().sum::<f64>() / nf), ("v0", carry)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

fn assert_close_maps(got: &BTreeMap<String, f64>, want: &BTreeMap<String, f64>, what: &str) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
    for (k, w) in want {
        let g = got[k];
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: grad.{k} = {g}, hand-computed {w}");
    }
}

const SURROGATES: [(SurrogateKind, f64); 3] = [(SurrogateKind::Sigmoid, 4.0), (SurrogateKind::Atan, 2.0), (SurrogateKind::Triangle, 1.0)];

/// One step, one channel: the spike is consumed through a linear readout, so the upstream
/// parameter `p` gets its gradient only through the surrogate (wv = 0), and the closed forms
/// ∂L/∂V_pre = wo·sg + wv·(1 − θ·sg) (not detached) vs wo·sg + wv (detached) hold.
#[test]
fn surrogate_gradient_one_step_matches_hand_computation() {
    for (kind, alpha) in SURROGATES {
        for xin in [0.4, 0.1] {
            // V = 0.6·0.25 + 1.2·xin = 0.63 (fires, V − θ = 0.13) or 0.27 (silent, −0.23).
            for wv in [0.0, -0.4] {
                let base = Srg {
                    kind,
                    alpha,
                    detach: false,
                    reset: Reset::Subtract,
                    xin: vec![xin],
                    p: 1.2,
                    v0: 0.25,
                    beta: 0.6,
                    th: 0.5,
                    wo: 0.7,
                    wv,
                };
                let v = base.beta * base.v0 + base.p * xin;
                let z = (v >= base.th) as u8 as f64;
                let sg = surrogate_value(kind, alpha, v - base.th);
                assert!(sg > 0.05, "test point must be inside the surrogate's support");
                let mut grads = Vec::new();
                for detach in [false, true] {
                    let c = Srg { detach, ..base.clone() };
                    let what = format!("{kind:?}(α={alpha}) xin={xin} wv={wv} detach={detach}");
                    let got = srg_autodiff(&c);
                    assert_close_maps(&got, &srg_reference(&c), &what);
                    // Closed forms of the one-step case.
                    let dv_pre = c.wo * sg + c.wv * (1.0 - if detach { 0.0 } else { c.th * sg });
                    let dth = -c.wo * sg + c.wv * (-z + if detach { 0.0 } else { c.th * sg });
                    let close =
                        |g: f64, w: f64, n: &str| assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: {n} = {g}, formula {w}");
                    close(got["p"], dv_pre * xin, "grad.p");
                    close(got["v0"], dv_pre * c.beta, "grad.v0");
                    close(got["beta"], dv_pre * c.v0, "grad.beta");
                    close(got["th"], dth, "grad.th");
                    close(got["wo"], z, "grad.wo");
                    close(got["wv"], v - c.th * z, "grad.wv");
                    if wv == 0.0 {
                        assert!(got["p"].abs() > 1e-2, "{what}: the spike's surrogate must reach the upstream param, got {}", got["p"]);
                    }
                    grads.push(got);
                }
                // Not detached minus detached: ∂V_post/∂V_pre = 1 − θ·sg vs 1.
                let (nd, d) = (&grads[0], &grads[1]);
                let want_dv0 = -base.beta * wv * base.th * sg;
                let want_dth = wv * base.th * sg;
                assert!((nd["v0"] - d["v0"] - want_dv0).abs() < 1e-5, "{kind:?}: Δgrad.v0 = {}, formula {want_dv0}", nd["v0"] - d["v0"]);
                assert!((nd["th"] - d["th"] - want_dth).abs() < 1e-5, "{kind:?}: Δgrad.th = {}, formula {want_dth}", nd["th"] - d["th"]);
                if wv != 0.0 {
                    assert!((nd["v0"] - d["v0"]).abs() > 1e-3, "detaching the reset must change the gradient");
                } else {
                    assert_eq!(nd, d, "with no consumer of V_post, detaching changes nothing");
                }
            }
        }
    }
}

/// Several steps: the surrogate and the (non-)detached reset compound through the recurrence;
/// soft reset, reset to a value, and no reset.
#[test]
fn surrogate_gradient_multi_step_matches_hand_backprop() {
    for (kind, alpha) in
        SURROGATES.into_iter().chain([(SurrogateKind::Sigmoid, 1.5), (SurrogateKind::Atan, 0.7), (SurrogateKind::Triangle, 0.8)])
    {
        for reset in [Reset::Subtract, Reset::ToValue(-0.1), Reset::ToValue(0.2), Reset::None] {
            for detach in [false, true] {
                for xin in [vec![0.4, -0.1, 0.5, 0.3], vec![0.2, 0.2, 0.2]] {
                    let c = Srg { kind, alpha, detach, reset, xin: xin.clone(), p: 1.1, v0: -0.1, beta: 0.7, th: 0.45, wo: -0.6, wv: 0.35 };
                    let (got, want) = (srg_autodiff(&c), srg_reference(&c));
                    if xin.len() == 4 {
                        assert!(want["wo"] > 0.0, "the test sequence must fire");
                    }
                    assert_close_maps(&got, &want, &format!("{kind:?}(α={alpha}) {reset:?} detach={detach} xin={xin:?}"));
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// 4. Errors, never panics
// ------------------------------------------------------------------------------------------

/// x [2,3,4] → linear → y [2,3,5] → mean → loss.
fn small_graph() -> Graph {
    let mut g = Graph::new("small");
    let x = g.input("x", ValueType::f32([2u64, 3, 4]));
    let w = g.param("w", ValueType::f32([5u64, 4])).unwrap();
    let y = g.add1(Op::Linear { bias: false }, &[x, w], "lin").unwrap();
    let loss = g.add1(Op::Mean, &[y], "mean").unwrap();
    g.set_output("y", y);
    g.set_output("loss", loss);
    g
}

#[test]
fn error_loss_must_be_scalar() {
    let err = differentiate(&small_graph(), "y", &[]).unwrap_err();
    assert!(matches!(&err, AutodiffError::NotScalar { name, .. } if name == "y"), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`y`") && msg.contains("f32[2,3,5]") && msg.contains("scalar"), "{msg}");
}

#[test]
fn error_missing_loss_output() {
    let err = differentiate(&small_graph(), "total_loss", &[]).unwrap_err();
    assert!(matches!(&err, AutodiffError::NoSuchOutput(n) if n == "total_loss"), "{err:?}");
    assert!(err.to_string().contains("`total_loss`"), "{err}");
}

#[test]
fn error_missing_input() {
    let err = differentiate(&small_graph(), "loss", &["x", "ids"]).unwrap_err();
    assert!(matches!(&err, AutodiffError::NoSuchInput(n) if n == "ids"), "{err:?}");
    assert!(err.to_string().contains("`ids`"), "{err}");
}

/// Every gradient op, placed on the path to the loss of a forward graph, is refused with an
/// error naming the op and the node.
#[test]
fn error_gradient_op_on_the_loss_path() {
    type Make = fn(&mut Graph) -> Value;
    fn par(g: &mut Graph, n: &str, d: &[u64]) -> Value {
        g.param(n, ValueType::f32(d.iter().copied())).unwrap()
    }
    fn ids(g: &mut Graph) -> Value {
        g.input("ids", ValueType::i64([2u64, 3]))
    }
    let cases: Vec<(&str, Make)> = vec![
        ("reduce_like", |g| {
            let (x, c) = (par(g, "x", &[2, 3, 2, 4]), par(g, "c", &[4]));
            g.add1(Op::ReduceLike, &[x, c], "bad").unwrap()
        }),
        ("linear_grad_input", |g| {
            let (x, w) = (par(g, "x", &[2, 3, 2, 4]), par(g, "w", &[4, 3]));
            g.add1(Op::LinearGradInput, &[x, w], "bad").unwrap()
        }),
        ("linear_grad_weight", |g| {
            let (dy, x) = (par(g, "dy", &[2, 3, 2, 4]), par(g, "x", &[2, 3, 2, 3]));
            g.add1(Op::LinearGradWeight, &[dy, x], "bad").unwrap()
        }),
        ("embedding_grad", |g| {
            let (dy, table) = (par(g, "dy", &[2, 3, 4]), par(g, "table", &[5, 4]));
            let i = ids(g);
            g.add1(Op::EmbeddingGrad, &[dy, i, table], "bad").unwrap()
        }),
        ("sum_frames", |g| {
            let x = par(g, "x", &[2, 3, 2, 4]);
            g.add1(Op::SumFrames, &[x], "bad").unwrap()
        }),
        ("rms_norm_grad", |g| {
            let (dy, x, w) = (par(g, "dy", &[2, 3, 4]), par(g, "x", &[2, 3, 4]), par(g, "w", &[4]));
            g.add(Op::RmsNormGrad { eps: 1e-6 }, &[dy, x, w], "bad").unwrap()[0]
        }),
        ("scan_adjoint", |g| {
            g.add_neuron(neuron::plif()).unwrap();
            let (x, w, th, v0) = (par(g, "x", &[2, 3, 2, 4]), par(g, "w", &[4]), par(g, "th", &[4]), par(g, "v0", &[2, 4]));
            let (gy, gv) = (par(g, "gy", &[2, 3, 2, 4]), par(g, "gv", &[2, 4]));
            let op = Op::ScanAdjoint { neuron: "plif".into(), emit: vec!["vpost".into()], scope: StateScope::Sequence };
            g.add(op, &[x, w, th, v0, gy, gv], "bad").unwrap()[0]
        }),
        ("ponder_weights_grad", |g| {
            let (dl, de, l) = (par(g, "dl", &[2, 3, 2, 1]), par(g, "de", &[2, 3, 1]), par(g, "l", &[2, 3, 2, 1]));
            g.add1(Op::PonderWeightsGrad { clamp: 1e-7, eps: 1e-8 }, &[dl, de, l], "bad").unwrap()
        }),
        ("frame_weighted_sum_grad", |g| {
            let (dy, f, w) = (par(g, "dy", &[2, 3, 4]), par(g, "f", &[2, 3, 2, 4]), par(g, "w", &[2, 3, 2, 1]));
            g.add(Op::FrameWeightedSumGrad, &[dy, f, w], "bad").unwrap()[0]
        }),
        ("cross_entropy_grad", |g| {
            let (d, l) = (par(g, "d", &[2, 3]), par(g, "l", &[2, 3, 5]));
            let t = ids(g);
            g.add1(Op::CrossEntropyGrad { ignore_index: 0 }, &[d, l, t], "bad").unwrap()
        }),
        ("masked_mean_grad", |g| {
            let (d, m) = (par(g, "d", &[]), par(g, "m", &[2, 3]));
            g.add1(Op::MaskedMeanGrad, &[d, m], "bad").unwrap()
        }),
        ("mean_grad", |g| {
            let (d, x) = (par(g, "d", &[]), par(g, "x", &[2, 3]));
            g.add1(Op::MeanGrad, &[d, x], "bad").unwrap()
        }),
    ];
    for (name, make) in cases {
        let mut g = Graph::new("grad_op");
        let v = make(&mut g);
        let y = g.add1(Op::Map { expr: pe("x0 * x0") }, &[v], "square").unwrap();
        let loss = g.add1(Op::Mean, &[y], "mean").unwrap();
        g.set_output("loss", loss);
        let err = differentiate(&g, "loss", &[]).unwrap_err();
        assert!(matches!(&err, AutodiffError::Unsupported { op, node, .. } if op == name && node == "bad"), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{name}`")) && msg.contains("`bad`"), "{name}: {msg}");
    }
}

/// `zeros_like` is a constant: differentiating through it is fine and gives zeros.
#[test]
fn zeros_like_on_the_loss_path_gives_zero_gradients() {
    let mut g = Graph::new("zeros");
    let x = g.param("x", ValueType::f32([2u64, 3])).unwrap();
    let z = g.add1(Op::ZerosLike, &[x], "z").unwrap();
    let y = g.add1(Op::Map { expr: pe("x0 + 2.0 * x1") }, &[x, z], "y").unwrap();
    let loss = g.add1(Op::Mean, &[y], "mean").unwrap();
    g.set_output("loss", loss);
    let dg = differentiate(&g, "loss", &[]).unwrap();
    let params: BTreeMap<String, Tensor> = [("x".to_string(), Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))].into();
    let out = run_graph(&dg, &BTreeMap::new(), &params);
    assert_eq!(out["grad.x"].to_f32_vec(), vec![1.0 / 6.0; 6]);
}

#[test]
fn error_mask_that_requires_a_gradient() {
    let mut g = Graph::new("mask");
    let x = g.param("x", ValueType::f32([2u64, 3])).unwrap();
    let m = g.param("m", ValueType::f32([2u64, 3])).unwrap();
    let loss = g.add1(Op::MaskedMean, &[x, m], "the_masked_mean").unwrap();
    g.set_output("loss", loss);
    let err = differentiate(&g, "loss", &[]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AutodiffError::Unsupported { .. }), "{msg}");
    assert!(msg.contains("`masked_mean`") && msg.contains("`the_masked_mean`"), "{msg}");
}

#[test]
fn error_mean_frames_with_an_unfixed_frame_count() {
    let mut g = Graph::new("frames");
    let x = g.input("x", ValueType::f32(["B", "T", "K"].map(Dim::sym).into_iter().chain([cd(4)])));
    let w = g.param("w", ValueType::f32([4u64])).unwrap();
    let y = g.add1(Op::Map { expr: pe("x0 * x1") }, &[x, w], "scale").unwrap();
    let m = g.add1(Op::MeanFrames, &[y], "the_mean_frames").unwrap();
    let loss = g.add1(Op::Mean, &[m], "mean").unwrap();
    g.set_output("loss", loss);
    let err = differentiate(&g, "loss", &[]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AutodiffError::Unsupported { .. }), "{msg}");
    assert!(msg.contains("`mean_frames`") && msg.contains("`the_mean_frames`") && msg.contains('K'), "{msg}");
    // Binding K makes it differentiable.
    g.bind_dim("K", 2);
    differentiate(&g, "loss", &[]).unwrap();
}

/// A scalar loss of an integer type cannot be seeded: an error, not a panic.
#[test]
fn error_integer_loss() {
    let mut g = Graph::new("int");
    let x = g.param("x", ValueType::f32([3u64])).unwrap();
    let m = g.add1(Op::Mean, &[x], "mean").unwrap();
    let i = g.add1(Op::Cast { to: DType::I64 }, &[m], "to_int").unwrap();
    g.set_output("loss", i);
    assert!(differentiate(&g, "loss", &[]).is_err());
}

// ------------------------------------------------------------------------------------------
// Scan kernels against the f64 reference on state-copy models
// ------------------------------------------------------------------------------------------

/// One scan (T = 1, K = S frames, sequence scope), every input and initial state a gradient
/// input, loss = Σ R·outputs. Returns the worst forward error against `reference_scan` and
/// the worst gradient error against f64 central differences of the reference.
fn single_scan_vs_reference(model: &NeuronModel, emit: &[&str], s: usize, c: usize, seed: u64) -> (f64, f64, String) {
    let mut d = Rng::new(seed);
    let mut g = Graph::new("reference");
    g.add_neuron(model.clone()).unwrap();
    let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut operands = Vec::new();
    let mut wrt = Vec::new();
    let mut draw = |shape: Vec<usize>, lo: f64, hi: f64| {
        let n = shape.iter().product();
        Tensor::f32(shape, (0..n).map(|_| d.uniform_range(lo, hi) as f32).collect())
    };
    for n in &model.inputs {
        let name = format!("in.{n}");
        inputs.insert(name.clone(), draw(vec![1, 1, s, c], -1.0, 1.0));
        operands.push(g.input(&name, ValueType::f32([1, 1, s, c].map(|x| x as u64))));
        wrt.push(name);
    }
    for n in &model.params {
        let name = format!("par.{n}");
        params.insert(name.clone(), draw(vec![c], -1.0, 1.0));
        operands.push(g.param(&name, ValueType::f32([c as u64])).unwrap());
    }
    for sv in &model.state {
        let name = format!("init.{}", sv.name);
        inputs.insert(name.clone(), draw(vec![1, c], -0.5, 0.5));
        operands.push(g.input(&name, ValueType::f32([1u64, c as u64])));
        wrt.push(name);
    }
    let emit_s: Vec<String> = emit.iter().map(|e| e.to_string()).collect();
    let res = g.add(Op::Scan { neuron: model.name.clone(), emit: emit_s, scope: StateScope::Sequence }, &operands, "scan").unwrap();
    let mut loss = None;
    let mut weights = Vec::new();
    for (o, name) in emit.iter().enumerate() {
        g.set_output(&format!("out.{name}"), res[o]);
        let rname = format!("r.{name}");
        let r = draw(vec![1, 1, s, c], -1.0, 1.0);
        weights.push(r.to_f32_vec().iter().map(|&x| x as f64).collect::<Vec<f64>>());
        inputs.insert(rname.clone(), r);
        let rv = g.input(&rname, ValueType::f32([1, 1, s, c].map(|x| x as u64)));
        let y = g.add1(Op::Map { expr: pe(&format!("x0 * x1 * {:?}", (s * c) as f64)) }, &[res[o], rv], &format!("w.{name}")).unwrap();
        let m = g.add1(Op::Mean, &[y], &format!("mean.{name}")).unwrap();
        loss = Some(match loss {
            None => m,
            Some(l) => g.add1(Op::Map { expr: pe("x0 + x1") }, &[l, m], &format!("sum.{name}")).unwrap(),
        });
    }
    g.set_output("loss", loss.unwrap());
    let wrt_refs: Vec<&str> = wrt.iter().map(|s| s.as_str()).collect();
    let dg = differentiate(&g, "loss", &wrt_refs).unwrap();
    let out = run_graph(&dg, &inputs, &params);

    let f64s = |t: &Tensor| t.to_f32_vec().iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let reference = |inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>, patch: Option<(&str, usize, f64)>| {
        let get = |map: &BTreeMap<String, Tensor>, name: &str| {
            let mut v = f64s(&map[name]);
            if let Some((p, i, x)) = patch {
                if p == name {
                    v[i] = x;
                }
            }
            v
        };
        let ins: Vec<Vec<f64>> = model.inputs.iter().map(|n| get(inputs, &format!("in.{n}"))).collect();
        let ps: Vec<Vec<f64>> = model.params.iter().map(|n| get(params, &format!("par.{n}"))).collect();
        let init: Vec<Vec<f64>> = model.state.iter().map(|sv| get(inputs, &format!("init.{}", sv.name))).collect();
        let (outs, _) = reference_scan(model, emit, StateScope::Sequence, &ins, &ps, &init, (1, s, s, c));
        let loss: f64 = outs.iter().zip(&weights).map(|(o, r)| o.iter().zip(r).map(|(a, b)| a * b).sum::<f64>()).sum();
        (outs, loss)
    };
    let (ref_outs, _) = reference(&inputs, &params, None);
    let mut fwd_err: f64 = 0.0;
    let mut detail = String::new();
    for (o, name) in emit.iter().enumerate() {
        let got = f64s(&out[&format!("out.{name}")]);
        for (i, (a, b)) in got.iter().zip(&ref_outs[o]).enumerate() {
            if (a - b).abs() > fwd_err {
                fwd_err = (a - b).abs();
                detail = format!("worst forward: output `{name}`[{i}] kernel {a}, reference {b}");
            }
        }
    }
    let mut grad_err: f64 = 0.0;
    for name in wrt.iter().chain(params.keys()) {
        let t = inputs.get(name).or(params.get(name)).unwrap();
        let ad = f64s(&out[&format!("{GRAD_PREFIX}{name}")]);
        for (i, &x0) in f64s(t).iter().enumerate() {
            let h = 1e-5;
            let lp = reference(&inputs, &params, Some((name, i, x0 + h))).1;
            let lm = reference(&inputs, &params, Some((name, i, x0 - h))).1;
            let fd = (lp - lm) / (2.0 * h);
            if (ad[i] - fd).abs() > grad_err {
                grad_err = (ad[i] - fd).abs();
                detail += &format!("; worst gradient: grad.{name}[{i}] autodiff {}, reference {fd}", ad[i]);
            }
        }
    }
    (fwd_err, grad_err, detail)
}

/// A two-stage synaptic delay line: x enters q, q moves to p, p feeds the membrane. `order`
/// is the declaration order of the state variables (it must not matter).
fn delay_line(order: &[&str], p_from_q: &str) -> NeuronModel {
    NeuronModel {
        name: "delay".into(),
        params: vec![],
        inputs: vec!["x".into()],
        state: order.iter().map(|n| StateVar { name: n.to_string(), init: 0.0 }).collect(),
        lets: vec![],
        charge: vec![bind("v", pe("0.5 * v + p")), bind("p", pe(p_from_q)), bind("q", pe("x"))],
        membrane: "v".into(),
        threshold: cst(1000.0),
        fire: FireCmp::Ge,
        reset: Reset::None,
        detach_reset: true,
        surrogate: Surrogate::sigmoid(4.0),
        outputs: vec![bind("vpost", var("v")), bind("pout", var("p"))],
    }
}

/// Control: with `p = 0.9 * q` (no bare copy between states) kernels and reference agree in
/// every declaration order.
#[test]
fn scan_kernels_match_reference_on_a_scaled_delay_line() {
    for order in [["v", "p", "q"], ["v", "q", "p"], ["q", "p", "v"]] {
        let m = delay_line(&order, "0.9 * q");
        let (fwd, grad, detail) = single_scan_vs_reference(&m, &["vpost", "pout"], 5, 3, 11);
        assert!(fwd < 1e-5 && grad < 1e-3, "order {order:?}: forward error {fwd}, gradient error {grad}; {detail}");
    }
}

/// BUG (backends/cpu/src/kernels/scan.rs, `CompiledScanAdjoint::run`): the carried state
/// adjoints are written back one by one (`regs.copy(carry[j], state_grads[j])`), but a state's
/// gradient binding can *be* another state's carry register: with `charge p = q` and nothing
/// else reading the new p, grad_q compiles to the register of `a_p` (the compiler returns the
/// bound register for a bare variable). When p is declared before q, carry_p is overwritten
/// with grad_p before carry_q reads it, so the gradient that should flow from p back into q
/// (and on into x) is replaced by p's own gradient.
#[test]
fn delay_line_gradient_state_order_v_p_q() {
    let m = delay_line(&["v", "p", "q"], "q");
    let (fwd, grad, detail) = single_scan_vs_reference(&m, &["vpost"], 5, 3, 12);
    assert!(fwd < 1e-5, "forward error {fwd}: {detail}");
    assert!(grad < 1e-3, "gradient error {grad}: {detail}");
}

/// BUG (backends/cpu/src/kernels/scan.rs, `compile`): the forward step writes the new state
/// back one variable at a time in declaration order (`c.copy(state[i], cur)`). With
/// `charge p = q` the new p *is* q's state register; declared as [.., q, p], q's new value is
/// copied in first and p then reads the new q instead of the old one (the delay collapses).
#[test]
fn delay_line_forward_state_order_v_q_p() {
    let m = delay_line(&["v", "q", "p"], "q");
    let (fwd, _, detail) = single_scan_vs_reference(&m, &["vpost"], 5, 3, 13);
    assert!(fwd < 1e-5, "forward error {fwd}: {detail}");
}

/// BUG (backends/cpu/src/kernels/scan.rs, `compile` / `CompiledScan::run`): an output that is a
/// bare name bound to a state register (here `let prev = v`, the membrane before the step) is
/// read from that register after the state write-back, so it emits the new v, not the old one.
#[test]
fn scan_output_reading_the_previous_state() {
    let m = NeuronModel {
        name: "prev".into(),
        params: vec![],
        inputs: vec!["x".into()],
        state: vec![StateVar { name: "v".into(), init: 0.0 }],
        lets: vec![bind("prev", var("v"))],
        charge: vec![bind("v", pe("0.5 * v + x"))],
        membrane: "v".into(),
        threshold: cst(1000.0),
        fire: FireCmp::Ge,
        reset: Reset::None,
        detach_reset: true,
        surrogate: Surrogate::sigmoid(4.0),
        outputs: vec![bind("vpost", var("v")), bind("prev", var("prev"))],
    };
    let (fwd, grad, detail) = single_scan_vs_reference(&m, &["vpost", "prev"], 4, 2, 14);
    assert!(fwd < 1e-5 && grad < 1e-3, "forward error {fwd}, gradient error {grad}: {detail}");
}
