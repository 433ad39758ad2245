//! Integration tests of the IR: expression and graph text round trips, a parser fuzz, verifier
//! diagnostics and snapshots of the NeuronSpark graph's text form.

use proptest::prelude::*;
use proptest::sample::{select, Index};
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::NeuronSparkConfig;
use sparkc_ir::neuron::{self, Binding, FireCmp, NeuronModel, Reset, StateVar, Surrogate, SurrogateKind};
use sparkc_ir::{parse_expr, text, verify, BinOp, DType, Dim, Expr, Graph, IrError, Op, Shape, StateScope, UnOp, Value, ValueType};
use std::panic::{catch_unwind, AssertUnwindSafe};

// ------------------------------------------------------------------ helpers

/// SplitMix64: a small deterministic generator for the graph builder (proptest picks the seeds).
#[derive(Clone)]
struct R(u64);

impl R {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.next() % n as u64) as usize
    }

    fn range(&mut self, lo: usize, hi_incl: usize) -> usize {
        lo + self.below(hi_incl - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Constants that stress the printer: signs, zeros, tiny, huge, subnormal, non-round.
const SPECIAL_CONSTS: [f64; 16] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-30,
    -1e-30,
    3.5e20,
    -3.5e20,
    2.5e-7,
    88.0,
    0.1,
    f64::MAX,
    f64::MIN_POSITIVE,
    5e-324,
    1e16,
];

fn rand_const(r: &mut R) -> f64 {
    match r.below(3) {
        0 => r.pick(&SPECIAL_CONSTS),
        1 => (r.unit() - 0.5) * 20.0,
        _ => {
            // Any bit pattern, made finite.
            let c = f64::from_bits(r.next());
            if c.is_nan() {
                1.5
            } else {
                c.clamp(f64::MIN, f64::MAX)
            }
        }
    }
}

fn rand_expr(r: &mut R, vars: &[String], depth: u32) -> Expr {
    if depth == 0 || r.chance(0.3) {
        if !vars.is_empty() && r.chance(0.7) {
            Expr::Var(r.pick(vars))
        } else {
            Expr::c(rand_const(r))
        }
    } else if r.chance(0.35) {
        Expr::un(r.pick(&UnOp::ALL), rand_expr(r, vars, depth - 1))
    } else {
        Expr::bin(r.pick(&BinOp::ALL), rand_expr(r, vars, depth - 1), rand_expr(r, vars, depth - 1))
    }
}

fn same_f64(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// An f32 type from dim names; numerals are constant sizes (`Dim::from("64")` would be a symbol).
fn f32t(dims: &[&str]) -> ValueType {
    ValueType::new(DType::F32, Shape(dims.iter().map(|d| d.parse::<u64>().map(Dim::Const).unwrap_or_else(|_| Dim::sym(d))).collect()))
}

fn must<T>(r: Result<T, IrError>, what: &str) -> T {
    match r {
        Ok(t) => t,
        Err(e) => panic!("{what}: {e}"),
    }
}

// ------------------------------------------------------- 1. expressions

const VAR_NAMES: [&str; 14] =
    ["x0", "x1", "x2", "v", "beta", "v_th", "e", "E", "e1", "_t", "info", "nanny", "inf_x", "x_1e5"];

fn const_strategy() -> impl Strategy<Value = f64> {
    use prop::num::f64 as pf;
    prop_oneof![
        -1000.0f64..1000.0,
        pf::POSITIVE | pf::NEGATIVE | pf::NORMAL | pf::SUBNORMAL | pf::ZERO,
        select(SPECIAL_CONSTS.to_vec()),
    ]
}

fn expr_strategy() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        select(VAR_NAMES.to_vec()).prop_map(Expr::var),
        const_strategy().prop_map(Expr::c),
    ];
    leaf.prop_recursive(7, 64, 2, |inner| {
        prop_oneof![
            (select(UnOp::ALL.to_vec()), inner.clone()).prop_map(|(op, a)| Expr::un(op, a)),
            (select(BinOp::ALL.to_vec()), inner.clone(), inner).prop_map(|(op, a, b)| Expr::bin(op, a, b)),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn expr_print_parse_round_trip(e in expr_strategy(), vals in prop::collection::vec(-4.0f64..4.0, VAR_NAMES.len())) {
        let text = e.to_string();
        let back = parse_expr(&text).map_err(|err| TestCaseError::fail(format!("`{text}` does not parse: {err}")))?;
        prop_assert_eq!(&back, &e, "text `{}`", text);
        prop_assert_eq!(back.to_string(), text.clone());
        let lookup = |v: &str| vals[VAR_NAMES.iter().position(|n| *n == v).expect("known variable")];
        let (a, b) = (e.eval(&lookup), back.eval(&lookup));
        prop_assert!(same_f64(a, b), "`{}`: {} vs {}", text, a, b);
    }

    /// Printing is canonical: any text the parser accepts prints to a fixed point.
    #[test]
    fn expr_parse_is_idempotent(e in expr_strategy()) {
        let once = parse_expr(&e.to_string()).expect("printed text parses").to_string();
        let twice = parse_expr(&once).expect("reprinted text parses").to_string();
        prop_assert_eq!(once, twice);
    }
}

#[test]
fn expr_edge_cases_round_trip() {
    let x = || Expr::var("x");
    let cases = vec![
        Expr::un(UnOp::Neg, Expr::var("info")),
        Expr::un(UnOp::Neg, Expr::var("inf_x")),
        Expr::bin(BinOp::Sub, Expr::c(1.0), Expr::un(UnOp::Neg, Expr::var("infinity"))),
        Expr::un(UnOp::Neg, Expr::c(1.0)),
        Expr::un(UnOp::Neg, Expr::c(-1.0)),
        Expr::un(UnOp::Neg, Expr::un(UnOp::Neg, x())),
        Expr::c(-0.0),
        Expr::bin(BinOp::Mul, Expr::c(-1.0), x()),
        Expr::bin(BinOp::Sub, x(), Expr::c(-1e-30)),
        Expr::bin(BinOp::Ge, x(), Expr::c(-3.5e20)),
        Expr::bin(BinOp::Gt, Expr::bin(BinOp::Gt, x(), x()), x()),
        Expr::bin(BinOp::Gt, x(), Expr::bin(BinOp::Ge, x(), x())),
        Expr::bin(BinOp::Sub, x(), Expr::bin(BinOp::Sub, x(), x())),
        Expr::bin(BinOp::Div, x(), Expr::bin(BinOp::Mul, x(), x())),
        Expr::bin(BinOp::Min, Expr::c(f64::MAX), Expr::c(5e-324)),
        Expr::c(f64::INFINITY),
        Expr::c(f64::NEG_INFINITY),
        Expr::un(UnOp::Neg, Expr::c(f64::INFINITY)),
    ];
    for e in cases {
        let text = e.to_string();
        let back = parse_expr(&text).unwrap_or_else(|err| panic!("`{text}`: {err}"));
        assert_eq!(back, e, "`{text}`");
        assert_eq!(back.to_string(), text);
    }
    // NaN prints and parses back (not `==`, so compare the text).
    let nan = Expr::bin(BinOp::Add, Expr::c(f64::NAN), x());
    assert_eq!(parse_expr(&nan.to_string()).unwrap().to_string(), nan.to_string());
}

#[test]
fn expr_parser_rejects_garbage_without_panicking() {
    for bad in ["", "(", ")", "a +", "foo(1)", "1..2", "a $ b", "min(a)", "max(a,)", "-", "--", "1e", "1e+", "exp()", "a b", "é", "x0 >", "(a))"] {
        assert!(parse_expr(bad).is_err(), "`{bad}` should not parse");
    }
}

#[test]
fn expr_parser_limits_nesting_depth() {
    const N: usize = 100_000;
    let deep = [
        format!("{}1{}", "(".repeat(N), ")".repeat(N)),
        format!("{}x", "-".repeat(N)),
        format!("{}x", "- ".repeat(N)),
        format!("{}x{}", "exp(".repeat(N), ")".repeat(N)),
        format!("{}x{}", "min(x, ".repeat(N), ")".repeat(N)),
        format!("{}x", "x + (".repeat(N)),
        "(".repeat(N),
        format!("{}1", "-(".repeat(N)),
        // Flat chains nest no brackets but build a tree as deep as they are long.
        vec!["x"; N].join(" + "),
        vec!["x"; N].join(" * "),
        vec!["x"; N].join(" >= "),
    ];
    for src in &deep {
        let err = parse_expr(src).expect_err("deep nesting is rejected");
        assert!(err.msg.contains("deep") || err.msg.contains("expected"), "{}", err.msg);
    }
    // Moderate nesting still parses.
    let ok = format!("{}x{}", "(".repeat(50), ")".repeat(50));
    assert_eq!(parse_expr(&ok).unwrap(), Expr::var("x"));
    // Long flat chains parse up to the tree-depth limit, and print back flat.
    let flat = vec!["x"; 900].join(" + ");
    let e = parse_expr(&flat).unwrap();
    assert_eq!(e.size(), 1799);
    assert_eq!(e.to_string(), flat);
}

// ------------------------------------------------------ 2. random graphs

/// Names with characters the text form must quote.
const ODD_NAMES: [&str; 15] = [
    "in",
    "a\"quote",
    "back\\slash",
    "new\nline",
    "tab\there",
    "ünïcödé",
    "// not a comment",
    "`tick`",
    "sp ace",
    "",
    "layers.0.x",
    "trailing\\",
    "cr\r",
    "crlf\r\n",
    " padded ",
];

const CHANNELS: [u64; 4] = [1, 2, 3, 5];

fn chan(r: &mut R) -> Dim {
    if r.chance(0.15) {
        Dim::sym("C")
    } else {
        Dim::Const(r.pick(&CHANNELS))
    }
}

fn rand_dim(r: &mut R) -> Dim {
    match r.below(6) {
        0 => Dim::sym("B"),
        1 => Dim::sym("T"),
        2 => Dim::sym("K"),
        _ => chan(r),
    }
}

fn float_dtype(r: &mut R) -> DType {
    r.pick(&[DType::F32, DType::F32, DType::F32, DType::F64, DType::BF16])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Embedding,
    RepeatFrames,
    MeanFrames,
    Linear,
    RmsNorm,
    LateralInhibition,
    Map,
    Scan,
    PonderWeights,
    FrameWeightedSum,
    CenterLast,
    CrossEntropy,
    MaskedMean,
    Mean,
    Cast,
    Output,
}

const KINDS: [Kind; 16] = [
    Kind::Embedding,
    Kind::RepeatFrames,
    Kind::MeanFrames,
    Kind::Linear,
    Kind::RmsNorm,
    Kind::LateralInhibition,
    Kind::Map,
    Kind::Scan,
    Kind::PonderWeights,
    Kind::FrameWeightedSum,
    Kind::CenterLast,
    Kind::CrossEntropy,
    Kind::MaskedMean,
    Kind::Mean,
    Kind::Cast,
    Kind::Output,
];

/// A random neuron model over fresh names; valid by construction.
fn rand_model(r: &mut R, name: &str) -> NeuronModel {
    let params: Vec<String> = (0..r.range(0, 2)).map(|i| format!("{}{i}", r.pick(&["p", "W_", "gain"]))).collect();
    let inputs: Vec<String> = (0..r.range(1, 3)).map(|i| format!("{}{i}", r.pick(&["in", "x", "I_"]))).collect();
    let state: Vec<StateVar> = (0..r.range(1, 2))
        .map(|i| StateVar { name: format!("{}{i}", r.pick(&["v", "s", "Mem"])), init: rand_const(r) })
        .collect();
    let mut defined: Vec<String> = params.iter().chain(&inputs).cloned().collect();
    defined.extend(state.iter().map(|s| s.name.clone()));
    let mut lets = Vec::new();
    for i in 0..r.range(0, 2) {
        let expr = rand_expr(r, &defined, 3);
        let name = format!("tmp_{i}");
        lets.push(Binding { name: name.clone(), expr });
        defined.push(name);
    }
    let charge = (0..r.range(1, 2))
        .map(|_| Binding { name: r.pick(&state).name, expr: rand_expr(r, &defined, 3) })
        .collect();
    let threshold = rand_expr(r, &defined, 2);
    defined.push(neuron::SPIKE.to_string());
    let outputs = (0..r.range(1, 3))
        .map(|i| Binding { name: format!("{}{i}", r.pick(&["o", "spike", "Out_"])), expr: rand_expr(r, &defined, 3) })
        .collect();
    let m = NeuronModel {
        name: name.to_string(),
        params,
        inputs,
        membrane: r.pick(&state).name,
        state,
        lets,
        charge,
        threshold,
        fire: r.pick(&[FireCmp::Ge, FireCmp::Gt]),
        reset: match r.below(3) {
            0 => Reset::Subtract,
            1 => Reset::ToValue(rand_const(r)),
            _ => Reset::None,
        },
        detach_reset: r.chance(0.5),
        surrogate: Surrogate {
            kind: r.pick(&[SurrogateKind::Sigmoid, SurrogateKind::Atan, SurrogateKind::Triangle]),
            alpha: r.pick(&[4.0, 2.0, 0.5, 1e-3, 17.25]),
        },
        outputs,
    };
    m.validate().unwrap_or_else(|e| panic!("generated model is invalid: {e}\n{m}"));
    m
}

struct Gen {
    g: Graph,
    r: R,
    vals: Vec<Value>,
    counter: usize,
    k: u64,
}

impl Gen {
    fn new(seed: u64, n_custom: usize) -> Gen {
        let mut r = R(seed);
        let name = r.pick(&["g", "random_graph", "G.1", "_x"]).to_string();
        let mut g = Graph::new(&name);
        let k = r.range(1, 4) as u64;
        g.bind_dim("K", k);
        if r.chance(0.3) {
            g.bind_dim("T", r.range(1, 7) as u64);
        }
        for m in [neuron::plif(), neuron::selective_plif(), neuron::lif()] {
            must(g.add_neuron(m), "builtin neuron");
        }
        for i in 0..n_custom {
            let m = rand_model(&mut r, &format!("custom{i}"));
            must(g.add_neuron(m), "custom neuron");
        }
        Gen { g, r, vals: Vec::new(), counter: 0, k }
    }

    fn ty(&self, v: Value) -> ValueType {
        self.g.value_type(v).clone()
    }

    fn fresh_name(&mut self) -> String {
        self.counter += 1;
        format!("{}{}", self.r.pick(&ODD_NAMES), self.counter)
    }

    fn node_name(&mut self) -> String {
        if self.r.chance(0.2) {
            String::new()
        } else {
            self.fresh_name()
        }
    }

    fn input(&mut self, ty: ValueType) -> Value {
        let name = self.fresh_name();
        let v = self.g.input(&name, ty);
        self.vals.push(v);
        v
    }

    fn param(&mut self, dims: Vec<Dim>) -> Value {
        let name = format!("{}.weight", self.fresh_name());
        let v = must(self.g.param(&name, ValueType::new(DType::F32, Shape(dims))), "param");
        self.vals.push(v);
        v
    }

    fn add(&mut self, op: Op, operands: &[Value]) -> Vec<Value> {
        let name = self.node_name();
        let shown = format!("{op:?} on {:?}", operands.iter().map(|&v| self.ty(v).to_string()).collect::<Vec<_>>());
        let out = must(self.g.add(op, operands, &name), &shown);
        self.vals.extend(&out);
        out
    }

    /// An existing value satisfying `pred` (with probability `p_reuse`), else `make()`.
    fn pick_or(&mut self, p_reuse: f64, pred: impl Fn(&ValueType) -> bool, make: impl FnOnce(&mut Gen) -> Value) -> Value {
        let cands: Vec<Value> = self.vals.iter().copied().filter(|&v| pred(self.g.value_type(v))).collect();
        if !cands.is_empty() && self.r.chance(p_reuse) {
            self.r.pick(&cands)
        } else {
            make(self)
        }
    }

    fn frames_dim(&mut self) -> Dim {
        let k = self.k;
        self.r.pick(&[Dim::sym("K"), Dim::sym("K"), Dim::Const(k), Dim::Const(2)])
    }

    fn float_any(&mut self, min_rank: usize) -> Value {
        self.pick_or(
            0.8,
            |t| t.dtype.is_float() && t.shape.rank() >= min_rank,
            |s| {
                let rank = s.r.range(min_rank.max(1), 4);
                let dims = (0..rank).map(|_| rand_dim(&mut s.r)).collect();
                let dt = float_dtype(&mut s.r);
                s.input(ValueType::new(dt, Shape(dims)))
            },
        )
    }

    fn float_rank4(&mut self) -> Value {
        self.pick_or(
            0.7,
            |t| t.dtype.is_float() && t.shape.rank() == 4,
            |s| {
                let (f, c) = (s.frames_dim(), chan(&mut s.r));
                let dt = float_dtype(&mut s.r);
                s.input(ValueType::new(dt, Shape(vec![Dim::sym("B"), Dim::sym("T"), f, c])))
            },
        )
    }

    fn exact(&mut self, ty: ValueType) -> Value {
        let want = ty.clone();
        self.pick_or(0.6, move |t| *t == want, move |s| s.input(ty))
    }

    fn step(&mut self, kind: Kind) {
        match kind {
            Kind::Embedding => {
                let ids = self.pick_or(
                    0.5,
                    |t| t.dtype.is_int(),
                    |s| {
                        let dt = s.r.pick(&[DType::I64, DType::I32]);
                        s.input(ValueType::new(dt, Shape::new(["B", "T"])))
                    },
                );
                let vocab = Dim::Const(self.r.range(3, 10) as u64);
                let d = chan(&mut self.r);
                let table = self.param(vec![vocab, d]);
                self.add(Op::Embedding, &[table, ids]);
            }
            Kind::RepeatFrames => {
                let x = self.pick_or(
                    0.7,
                    |t| t.shape.rank() == 3,
                    |s| {
                        let c = chan(&mut s.r);
                        s.input(ValueType::new(DType::F32, Shape(vec![Dim::sym("B"), Dim::sym("T"), c])))
                    },
                );
                let frames = self.frames_dim();
                self.add(Op::RepeatFrames { frames }, &[x]);
            }
            Kind::MeanFrames => {
                let x = self.float_rank4();
                self.add(Op::MeanFrames, &[x]);
            }
            Kind::Linear => {
                let x = self.float_any(1);
                let i = self.ty(x).shape.last().expect("rank >= 1").clone();
                let o = chan(&mut self.r);
                let w = self.param(vec![o.clone(), i]);
                if self.r.chance(0.5) {
                    let b = self.param(vec![o]);
                    self.add(Op::Linear { bias: true }, &[x, w, b]);
                } else {
                    self.add(Op::Linear { bias: false }, &[x, w]);
                }
            }
            Kind::RmsNorm | Kind::LateralInhibition => {
                let x = self.float_any(1);
                let d = self.ty(x).shape.last().expect("rank >= 1").clone();
                let w = self.param(vec![d]);
                let eps = self.r.pick(&[1e-6, 1e-5, 0.001, 1.0, 2.5e-12, 0.0]);
                let op = if kind == Kind::RmsNorm { Op::RmsNorm { eps } } else { Op::LateralInhibition { eps } };
                self.add(op, &[x, w]);
            }
            Kind::Map => {
                let n = self.r.range(1, 3);
                let first = self.float_any(0);
                let mut operands = vec![first];
                let mut shape = self.ty(first).shape;
                for _ in 1..n {
                    let dims = self.g.dims.clone();
                    let cur = shape.clone();
                    let v = self.pick_or(
                        0.5,
                        |t| t.dtype.is_float() && sparkc_ir::op::broadcast_shapes(&[&cur, &t.shape], &dims).is_some(),
                        |s| {
                            // A trailing slice of the current shape, some dims made 1, maybe a new leading dim.
                            let keep = s.r.range(0, cur.rank());
                            let mut d: Vec<Dim> = cur.0[cur.rank() - keep..]
                                .iter()
                                .map(|d| if s.r.chance(0.3) { Dim::Const(1) } else { d.clone() })
                                .collect();
                            if s.r.chance(0.2) {
                                d.insert(0, Dim::Const(1));
                            }
                            let dt = float_dtype(&mut s.r);
                            s.input(ValueType::new(dt, Shape(d)))
                        },
                    );
                    shape = sparkc_ir::op::broadcast_shapes(&[&shape, &self.ty(v).shape], &self.g.dims).expect("broadcasts");
                    operands.push(v);
                }
                let vars: Vec<String> = (0..n).map(|i| format!("x{i}")).collect();
                let expr = rand_expr(&mut self.r, &vars, 4);
                self.add(Op::Map { expr }, &operands);
            }
            Kind::Scan => {
                let models: Vec<String> = self.g.neurons.keys().cloned().collect();
                let model = self.g.neurons[&self.r.pick(&models)].clone();
                let x = self.float_rank4();
                let frames = self.ty(x).shape;
                let (b, c) = (frames.0[0].clone(), frames.0[3].clone());
                let mut operands = vec![x];
                for _ in 1..model.inputs.len() {
                    let fr = frames.clone();
                    let v = self.pick_or(
                        0.5,
                        |t| t.dtype.is_float() && t.shape == fr,
                        |s| {
                            let dt = float_dtype(&mut s.r);
                            s.input(ValueType::new(dt, fr.clone()))
                        },
                    );
                    operands.push(v);
                }
                for _ in &model.params {
                    let p = self.param(vec![c.clone()]);
                    operands.push(p);
                }
                for _ in &model.state {
                    let v = self.exact(ValueType::new(DType::F32, Shape(vec![b.clone(), c.clone()])));
                    operands.push(v);
                }
                let mut emit: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
                // A random non-empty subset in random order.
                for i in (1..emit.len()).rev() {
                    let j = self.r.below(i + 1);
                    emit.swap(i, j);
                }
                emit.truncate(self.r.range(1, emit.len()));
                let scope = self.r.pick(&[StateScope::Sequence, StateScope::Token]);
                self.add(Op::Scan { neuron: model.name.clone(), emit, scope }, &operands);
            }
            Kind::PonderWeights => {
                let logits = self.pick_or(
                    0.5,
                    |t| t.dtype.is_float() && t.shape.rank() == 4 && t.shape.0[3] == Dim::Const(1),
                    |s| {
                        let x = s.float_rank4();
                        let c = s.ty(x).shape.0[3].clone();
                        let w = s.param(vec![Dim::Const(1), c]);
                        let b = s.param(vec![Dim::Const(1)]);
                        s.add(Op::Linear { bias: true }, &[x, w, b])[0]
                    },
                );
                let clamp = self.r.pick(&[1e-7, 0.0, 0.25]);
                let eps = self.r.pick(&[1e-8, 1e-30, 0.5]);
                self.add(Op::PonderWeights { clamp, eps }, &[logits]);
            }
            Kind::FrameWeightedSum => {
                let x = self.float_rank4();
                let f = self.ty(x).shape;
                let want = Shape(vec![f.0[0].clone(), f.0[1].clone(), f.0[2].clone(), Dim::Const(1)]);
                let w = self.pick_or(
                    0.5,
                    |t| t.shape == want,
                    |s| {
                        let dt = float_dtype(&mut s.r);
                        s.input(ValueType::new(dt, want.clone()))
                    },
                );
                self.add(Op::FrameWeightedSum, &[x, w]);
            }
            Kind::CenterLast => {
                let x = self.float_any(0);
                self.add(Op::CenterLast, &[x]);
            }
            Kind::CrossEntropy => {
                let logits = self.float_any(1);
                let s = self.ty(logits).shape;
                let want = Shape(s.0[..s.rank() - 1].to_vec());
                let targets = self.pick_or(
                    0.5,
                    |t| t.dtype.is_int() && t.shape == want,
                    |s| {
                        let dt = s.r.pick(&[DType::I64, DType::I32]);
                        s.input(ValueType::new(dt, want.clone()))
                    },
                );
                let ignore_index = self.r.pick(&[0, -100, 7, i64::MIN, i64::MAX]);
                self.add(Op::CrossEntropy { ignore_index }, &[logits, targets]);
            }
            Kind::MaskedMean => {
                let x = self.float_any(0);
                let want = self.ty(x).shape;
                let mask = self.pick_or(
                    0.5,
                    |t| t.shape == want,
                    |s| {
                        let dt = s.r.pick(&[DType::F32, DType::Spike, DType::I64]);
                        s.input(ValueType::new(dt, want.clone()))
                    },
                );
                self.add(Op::MaskedMean, &[x, mask]);
            }
            Kind::Mean => {
                let x = self.float_any(0);
                self.add(Op::Mean, &[x]);
            }
            Kind::Cast => {
                let x = if self.vals.is_empty() { self.float_any(0) } else { self.r.pick(&self.vals) };
                let to = self.r.pick(&[DType::F32, DType::F64, DType::BF16, DType::I64, DType::I32]);
                self.add(Op::Cast { to }, &[x]);
            }
            Kind::Output => {
                if !self.vals.is_empty() {
                    let v = self.r.pick(&self.vals);
                    let name = self.fresh_name();
                    self.g.set_output(&name, v);
                }
            }
        }
    }

    fn finish(mut self) -> Graph {
        if let Some(&v) = self.vals.last() {
            self.g.set_output("last", v);
        }
        self.g
    }
}

fn build_random(seed: u64, n_custom: usize, steps: &[(usize, u64)]) -> Graph {
    let mut gen = Gen::new(seed, n_custom);
    for &(k, s) in steps {
        gen.r = R(gen.r.next() ^ s);
        gen.step(KINDS[k % KINDS.len()]);
    }
    gen.finish()
}

/// A graph that uses every op kind (twice, in two orders).
fn every_op_graph(seed: u64) -> Graph {
    let mut steps: Vec<(usize, u64)> = (0..KINDS.len()).map(|k| (k, seed)).collect();
    steps.extend((0..KINDS.len()).rev().map(|k| (k, seed.wrapping_mul(31))));
    build_random(seed, 2, &steps)
}

fn check_round_trips(g: &Graph) -> Result<String, TestCaseError> {
    check_round_trips_opt(g, true)
}

/// `json`: also round-trip through serde JSON (which has no representation for non-finite floats).
fn check_round_trips_opt(g: &Graph, json: bool) -> Result<String, TestCaseError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| TestCaseError::fail(format!("{what}: {e}"));
    verify::verify(g).map_err(|e| fail("built graph does not verify", &e))?;
    let t1 = text::print(g).map_err(|e| fail("print", &e))?;
    let g2 = text::parse(&t1).map_err(|e| fail(&format!("printed text does not parse\n{t1}"), &e))?;
    verify::verify(&g2).map_err(|e| fail("parsed graph does not verify", &e))?;
    let t2 = text::print(&g2).map_err(|e| fail("reprint", &e))?;
    prop_assert_eq!(&t1, &t2, "print -> parse -> print changed the text");
    prop_assert_eq!(g.len(), g2.len());
    prop_assert_eq!(g.neurons.clone(), g2.neurons.clone(), "neuron models changed in the text round trip");
    // Ops (and so every attribute and expression) survive exactly, in print order.
    let ops = |g: &Graph| -> Vec<(Op, Vec<ValueType>, String, bool)> {
        g.topo_order()
            .expect("acyclic")
            .into_iter()
            .map(|n| (g.node(n).op.clone(), g.node(n).results.clone(), g.node(n).name.clone(), g.node(n).recompute))
            .collect()
    };
    prop_assert_eq!(ops(g), ops(&g2), "nodes changed in the text round trip");
    if !json {
        return Ok(t1);
    }

    let json = serde_json::to_string(g).map_err(|e| fail("to JSON", &e))?;
    let g3: Graph = serde_json::from_str(&json).map_err(|e| fail("from JSON", &e))?;
    verify::verify(&g3).map_err(|e| fail("JSON graph does not verify", &e))?;
    let t3 = text::print(&g3).map_err(|e| fail("print JSON graph", &e))?;
    prop_assert_eq!(&t1, &t3, "JSON round trip changed the text");
    Ok(t1)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_round_trip(
        seed in any::<u64>(),
        n_custom in 0usize..3,
        steps in prop::collection::vec((0..KINDS.len(), any::<u64>()), 1..40),
    ) {
        let g = build_random(seed, n_custom, &steps);
        check_round_trips(&g)?;
    }
}

#[test]
fn every_op_graph_round_trips_and_covers_all_ops() {
    for seed in 0..16u64 {
        let g = every_op_graph(seed);
        let mut seen: Vec<&'static str> = g.g.node_weights().map(|n| n.op.name()).collect();
        seen.sort_unstable();
        seen.dedup();
        for name in [
            "input",
            "param",
            "embedding",
            "repeat_frames",
            "mean_frames",
            "linear",
            "rms_norm",
            "lateral_inhibition",
            "map",
            "scan",
            "ponder_weights",
            "frame_weighted_sum",
            "center_last",
            "cross_entropy",
            "masked_mean",
            "mean",
            "cast",
        ] {
            assert!(seen.contains(&name), "seed {seed}: no `{name}` op in the graph");
        }
        if let Err(e) = check_round_trips(&g) {
            panic!("seed {seed}: {e}");
        }
    }
}

#[test]
fn round_trip_of_awkward_attributes() {
    // Floats that print without a `.`, non-finite eps, big integers and reserved-looking names.
    let mut g = Graph::new("awkward");
    let mut m = neuron::lif();
    m.name = "nanometer".into();
    m.outputs[0].name = "inf".into();
    m.outputs[1].name = "nan".into();
    must(g.add_neuron(m), "model");
    let x = g.input("x", ValueType::f32(["B", "T", "inf", "nan"]));
    let w = must(g.param("w", ValueType::f32(["nan"])), "param");
    for eps in [1e20, 1e-300, f64::INFINITY, f64::NEG_INFINITY, 5e-324, -0.0, f64::MAX] {
        must(g.add1(Op::RmsNorm { eps }, &[x, w], &format!("norm {eps}")), "rms_norm");
    }
    let mf = must(g.add1(Op::MeanFrames, &[x], ""), "mf");
    let r = must(g.add1(Op::RepeatFrames { frames: Dim::sym("inf") }, &[mf], "rep"), "rep");
    let beta = must(g.param("beta", ValueType::f32(["nan"])), "beta");
    let vth = must(g.param("v_th", ValueType::f32(["nan"])), "vth");
    let s0 = g.input("s0", ValueType::f32(["B", "nan"]));
    let outs = must(
        g.add(Op::Scan { neuron: "nanometer".into(), emit: vec!["nan".into(), "inf".into()], scope: StateScope::Token }, &[r, beta, vth, s0], "scan"),
        "scan",
    );
    g.set_output("out", outs[0]);
    if let Err(e) = check_round_trips_opt(&g, false) {
        panic!("{e}");
    }

    // NaN attributes print and parse back to the same text (NaN != NaN, so compare text only).
    let mut g = Graph::new("nan_eps");
    let x = g.input("x", ValueType::f32([4u64]));
    let w = must(g.param("w", ValueType::f32([4u64])), "param");
    let y = must(g.add1(Op::LateralInhibition { eps: f64::NAN }, &[x, w], "li"), "li");
    g.set_output("y", y);
    let t1 = text::print(&g).unwrap();
    let t2 = text::print(&text::parse(&t1).unwrap_or_else(|e| panic!("{e}\n{t1}"))).unwrap();
    assert_eq!(t1, t2);
}

// --------------------------------------------------------- 3. parser fuzz

fn tiny_text() -> String {
    let g = build_graph(&NeuronSparkConfig::tiny(), &GraphOptions { with_loss: true, ..GraphOptions::default() }).expect("tiny graph builds");
    text::print(&g).expect("prints")
}

fn every_op_text() -> String {
    text::print(&every_op_graph(7)).expect("prints")
}

thread_local! {
    static BASES: Vec<String> = vec![tiny_text(), every_op_text()];
}

const TOKENS: [&str; 48] = [
    "%", "%0", "%1", "=", ",", "(", ")", "{", "}", "[", "]", "`", "\"", "\\", ":", "@", "//", "\n", " ", "f32", "i64",
    "spike", "B", "K", "-", "1e999", "-inf", "nan", "inf", "18446744073709551616", "0", "-1", "graph", "neuron", "dim ",
    "output ", "scan", "emit", "map", "x0", ">=", "é", "\0", "\r", "fire v >", "state ", "reset to ", "surrogate atan(",
];

fn token() -> impl Strategy<Value = String> {
    prop_oneof![select(TOKENS.to_vec()).prop_map(String::from), ".{0,3}", "[%,=()\\[\\]{}`\"0-9a-z ]{0,6}"]
}

#[derive(Clone, Debug)]
enum Mutation {
    Delete(Index, usize),
    Insert(Index, String),
    Replace(Index, String),
    Truncate(Index),
    SwapLines(Index, Index),
    DuplicateLine(Index),
    DeleteLine(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1usize..12).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<Index>(), token()).prop_map(|(i, s)| Mutation::Insert(i, s)),
        (any::<Index>(), token()).prop_map(|(i, s)| Mutation::Replace(i, s)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        any::<Index>().prop_map(Mutation::DuplicateLine),
        any::<Index>().prop_map(Mutation::DeleteLine),
    ]
}

fn apply(text: &str, muts: &[Mutation]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for m in muts {
        let n = chars.len().max(1);
        match m {
            Mutation::Delete(i, len) => {
                let at = i.index(n).min(chars.len());
                let end = (at + len).min(chars.len());
                chars.drain(at..end);
            }
            Mutation::Insert(i, s) => {
                let at = i.index(n + 1).min(chars.len());
                chars.splice(at..at, s.chars());
            }
            Mutation::Replace(i, s) => {
                if !chars.is_empty() {
                    let at = i.index(chars.len());
                    chars.splice(at..at + 1, s.chars());
                }
            }
            Mutation::Truncate(i) => chars.truncate(i.index(n)),
            Mutation::SwapLines(..) | Mutation::DuplicateLine(_) | Mutation::DeleteLine(_) => {
                let s: String = chars.iter().collect();
                let mut lines: Vec<&str> = s.split('\n').collect();
                let l = lines.len();
                match m {
                    Mutation::SwapLines(a, b) => lines.swap(a.index(l), b.index(l)),
                    Mutation::DuplicateLine(a) => {
                        let i = a.index(l);
                        lines.insert(i, lines[i]);
                    }
                    Mutation::DeleteLine(a) => {
                        lines.remove(a.index(l));
                    }
                    _ => unreachable!("line mutations only"),
                }
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

/// `parse` must not panic; when it accepts a text, that text's graph prints to a fixed point.
fn parse_never_panics(src: &str) -> Result<(), TestCaseError> {
    let res = catch_unwind(AssertUnwindSafe(|| text::parse(src)));
    let parsed = match res {
        Ok(r) => r,
        Err(_) => return Err(TestCaseError::fail(format!("text::parse panicked on {src:?}"))),
    };
    if let Ok(g) = parsed {
        let t1 = catch_unwind(AssertUnwindSafe(|| text::print(&g)))
            .map_err(|_| TestCaseError::fail(format!("print panicked on the graph of {src:?}")))?
            .map_err(|e| TestCaseError::fail(format!("accepted graph does not print: {e}\n{src}")))?;
        let g2 = text::parse(&t1).map_err(|e| TestCaseError::fail(format!("reprinted text does not parse: {e}\n{t1}")))?;
        let t2 = text::print(&g2).expect("prints");
        prop_assert_eq!(t1, t2, "accepted text does not print to a fixed point:\n{}", src);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_parse_arbitrary_strings(s in any::<String>()) {
        parse_never_panics(&s)?;
    }

    #[test]
    fn fuzz_parse_token_soup(toks in prop::collection::vec(token(), 0..40), header in any::<bool>()) {
        let body: String = toks.concat();
        let src = if header { format!("graph g {{\n{body}\n}}\n") } else { body };
        parse_never_panics(&src)?;
    }

    #[test]
    fn fuzz_parse_mutated_graphs(which in 0usize..2, muts in prop::collection::vec(mutation(), 1..6)) {
        let src = BASES.with(|b| apply(&b[which], &muts));
        parse_never_panics(&src)?;
    }
}

#[test]
fn unmutated_bases_parse() {
    BASES.with(|b| {
        for t in b {
            parse_never_panics(t).unwrap();
            assert!(text::parse(t).is_ok());
        }
    });
}

#[test]
fn every_truncation_of_a_graph_is_handled() {
    let t = every_op_text();
    let cuts: Vec<usize> = t.char_indices().map(|(i, _)| i).step_by(7).collect();
    for i in cuts {
        parse_never_panics(&t[..i]).unwrap();
        parse_never_panics(&t[i..]).unwrap();
    }
}

#[test]
fn deep_nesting_in_graph_text_does_not_overflow() {
    const N: usize = 100_000;
    let open = "(".repeat(N);
    let close = ")".repeat(N);
    let srcs = [
        // Expression attribute.
        format!("graph g {{\n  %0 = input{{name=\"x\"}}() : f32[4]\n  %1 = map{{f=`{open}x0{close}`}}(%0) : f32[4]\n}}\n"),
        format!("graph g {{\n  %0 = input{{name=\"x\"}}() : f32[4]\n  %1 = map{{f=`{}`}}(%0) : f32[4]\n}}\n", vec!["x0"; N].join(" - ")),
        // List attribute.
        format!("graph g {{\n  %0 = input{{name=\"x\"}}() : f32[4]\n  %1 = scan{{neuron=plif, emit={}, scope=token}}(%0) : f32[4]\n}}\n", "[".repeat(N)),
        format!("graph g {{\n  %0 = mean{{a={}{}}}() : f32[]\n}}\n", "[".repeat(N), "]".repeat(N)),
        // Neuron expression.
        format!("graph g {{\n  neuron m {{\n    input x\n    state v = 0.0\n    charge v = {open}x{close}\n    fire v >= 1.0\n    output o = z\n  }}\n}}\n"),
        format!("graph g {{\n  neuron m {{\n    fire v >= {}v\n  }}\n}}\n", "-".repeat(N)),
        format!("graph g {{\n  neuron m {{\n    input x\n    state v = 0.0\n    let a = {}\n    fire v >= 1.0\n    output o = z\n  }}\n}}\n", vec!["x"; N].join(" + ")),
        // Many unclosed neuron blocks and braces.
        format!("graph g {{\n{}", "  neuron m {\n".repeat(N / 10)),
        format!("graph g {{\n{}\n}}\n", "{".repeat(N)),
        "[".repeat(N),
        format!("graph g {{\n  %0 = input{{name=\"{}\"}}() : f32[{}]\n}}\n", "\\\"".repeat(N), "B,".repeat(N)),
    ];
    for src in &srcs {
        let res = catch_unwind(AssertUnwindSafe(|| text::parse(src)));
        let res = res.unwrap_or_else(|_| panic!("panic on deep input starting {:?}", &src[..60.min(src.len())]));
        assert!(res.is_err(), "deep input accepted: {:?}", &src[..60.min(src.len())]);
    }
}

// ---------------------------------------------------- 4. verifier errors

const HEADER: &str = "graph bad {\n  dim K = 4\n";

fn parse_err(body: &str) -> String {
    let src = format!("{HEADER}{body}}}\n");
    match text::parse(&src) {
        Ok(_) => panic!("bad graph accepted:\n{src}"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error `{msg}` does not mention `{n}`");
    }
}

#[test]
fn error_wrong_declared_type() {
    let msg = parse_err(
        "  %0 = input{name=\"a\"}() : f32[B,4]\n  %1 = input{name=\"b\"}() : f32[4]\n  %2 = map{f=`x0 + x1`}(%0, %1) : f32[B,3] @\"sum_node\"\n  output \"y\" = %2\n",
    );
    assert_mentions(&msg, &["map", "sum_node", "f32[B,3]", "f32[B,4]"]);
    // Wrong dtype on the second result of a multi-result op.
    let msg = parse_err(
        "  %0 = input{name=\"l\"}() : f32[B,T,K,1]\n  %1, %2 = ponder_weights{clamp=1e-7, eps=1e-8}(%0) : f32[B,T,K,1], f64[B,T,1] @\"halt\"\n",
    );
    assert_mentions(&msg, &["ponder_weights", "halt", "result 1", "f64[B,T,1]"]);
    // Wrong number of results.
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1, %2 = mean(%0) : f32[], f32[] @\"avg\"\n");
    assert_mentions(&msg, &["mean", "avg", "2 results"]);
    // Bound dims resolve: K written as 4 is accepted.
    let ok = format!("{HEADER}  %0 = input{{name=\"x\"}}() : f32[B,T,3]\n  %1 = repeat_frames{{frames=K}}(%0) : f32[B,T,4,3]\n}}\n");
    text::parse(&ok).unwrap();
}

#[test]
fn error_operand_used_before_definition() {
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = mean(%7) : f32[]\n  %7 = mean(%0) : f32[]\n");
    assert_mentions(&msg, &["mean", "%7", "line 4"]);
    let msg = parse_err("  %0 = center_last(%0) : f32[3]\n");
    assert_mentions(&msg, &["center_last", "%0"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  output \"y\" = %9\n");
    assert_mentions(&msg, &["%9"]);
}

#[test]
fn error_unknown_op_and_attributes() {
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = frobnicate(%0) : f32[3]\n");
    assert_mentions(&msg, &["frobnicate"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = mean{colour=3}(%0) : f32[]\n");
    assert_mentions(&msg, &["mean", "colour"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = param{name=\"w\"}() : f32[3]\n  %2 = rms_norm(%0, %1) : f32[3]\n");
    assert_mentions(&msg, &["rms_norm", "eps"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = cast{to=spike}(%0) : spike[3] @\"to_spikes\"\n");
    assert_mentions(&msg, &["cast", "to_spikes"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = cast{to=f16}(%0) : f32[3]\n");
    assert_mentions(&msg, &["f16"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = mean{}(%0) : f32[] @\"m\" trailing\n");
    assert_mentions(&msg, &["trailing"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = linear{bias=maybe}(%0, %0) : f32[3]\n");
    assert_mentions(&msg, &["bias", "maybe"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = mean{a=1, a=2}(%0) : f32[]\n");
    assert_mentions(&msg, &["`a`"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f33[3]\n");
    assert_mentions(&msg, &["f33"]);
}

#[test]
fn error_trailing_text_on_header_lines() {
    let msg = parse_err("  dim T = 8 junk\n");
    assert_mentions(&msg, &["dim T = 8"]);
    let msg = parse_err("  dim T = -1\n");
    assert_mentions(&msg, &["-1"]);
    let msg = parse_err(&plif_block().replacen("neuron plif {", "neuron plif { param q", 1));
    assert_mentions(&msg, &["neuron plif"]);
    let src = format!("{HEADER}}}\n  %0 = input{{name=\"x\"}}() : f32[3]\n");
    assert_mentions(&text::parse(&src).unwrap_err().to_string(), &["after the end"]);
    let src = format!("{HEADER}  %0 = input{{name=\"x\"}}() : f32[3]\n");
    assert_mentions(&text::parse(&src).unwrap_err().to_string(), &["closing"]);
    // Comments are allowed, also after a header line; `//` inside strings and expressions is not one.
    let src = format!(
        "// leading\n{HEADER}  dim T = 8 // frames\n  %0 = input{{name=\"a//b\"}}() : f32[T] // the input\n  %1 = map{{f=`x0 / 2.0`}}(%0) : f32[T]\n  output \"o//\" = %1\n}}\n"
    );
    let g = text::parse(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    assert_eq!(g.inputs()[0].1, "a//b");
    assert!(g.output("o//").is_some());
}

#[test]
fn error_duplicate_names() {
    let msg = parse_err("  %0 = input{name=\"tokens\"}() : i64[B,T]\n  %1 = input{name=\"tokens\"}() : i64[B,T]\n");
    assert_mentions(&msg, &["input", "tokens"]);
    let msg = parse_err("  %0 = param{name=\"w.weight\"}() : f32[3]\n  %1 = param{name=\"w.weight\"}() : f32[3]\n");
    assert_mentions(&msg, &["parameter", "w.weight"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %0 = input{name=\"y\"}() : f32[3]\n");
    assert_mentions(&msg, &["%0"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  output \"o\" = %0\n  output \"o\" = %0\n");
    assert_mentions(&msg, &["`o`"]);
    // Builder API: the same parameter key with two types.
    let mut g = Graph::new("g");
    g.param("p", ValueType::f32([3u64])).unwrap();
    let err = g.param("p", ValueType::f32([4u64])).unwrap_err().to_string();
    assert_mentions(&err, &["p", "f32[3]", "f32[4]"]);
    // Verifier on a built graph with duplicate input names.
    let mut g = Graph::new("g");
    let a = g.input("dup", ValueType::f32([3u64]));
    g.input("dup", ValueType::f32([3u64]));
    g.set_output("a", a);
    assert_mentions(&verify::verify(&g).unwrap_err().to_string(), &["input", "dup"]);
}

const SCAN_PRELUDE: &str = "  %0 = input{name=\"x\"}() : f32[B,T,K,8]\n  %1 = param{name=\"w\"}() : f32[8]\n  %2 = param{name=\"th\"}() : f32[8]\n  %3 = input{name=\"v0\"}() : f32[B,8]\n";

fn plif_block() -> String {
    neuron::plif().to_string().lines().map(|l| format!("  {l}\n")).collect()
}

#[test]
fn error_scan_neuron_and_emit() {
    let ok = format!(
        "{HEADER}{}{SCAN_PRELUDE}  %4, %5 = scan{{neuron=plif, emit=[spike], scope=sequence}}(%0, %1, %2, %3) : f32[B,T,K,8], f32[B,8] @\"n1\"\n}}\n",
        plif_block()
    );
    text::parse(&ok).unwrap_or_else(|e| panic!("{e}\n{ok}"));

    let msg = parse_err(&format!(
        "{SCAN_PRELUDE}  %4, %5 = scan{{neuron=no_such_model, emit=[spike], scope=sequence}}(%0, %1, %2, %3) : f32[B,T,K,8], f32[B,8] @\"n1\"\n"
    ));
    assert_mentions(&msg, &["scan", "n1", "no_such_model"]);

    let msg = parse_err(&format!(
        "{}{SCAN_PRELUDE}  %4, %5 = scan{{neuron=plif, emit=[bogus_out], scope=sequence}}(%0, %1, %2, %3) : f32[B,T,K,8], f32[B,8] @\"n1\"\n",
        plif_block()
    ));
    assert_mentions(&msg, &["scan", "n1", "bogus_out", "plif"]);

    let msg = parse_err(&format!(
        "{}{SCAN_PRELUDE}  %4, %5 = scan{{neuron=plif, emit=[spike], scope=forever}}(%0, %1, %2, %3) : f32[B,T,K,8], f32[B,8] @\"n1\"\n",
        plif_block()
    ));
    assert_mentions(&msg, &["scope", "forever"]);

    // Wrong initial-state shape names the state variable.
    let msg = parse_err(&format!(
        "{}{SCAN_PRELUDE}  %4 = input{{name=\"bad_state\"}}() : f32[B,9]\n  %5, %6 = scan{{neuron=plif, emit=[spike], scope=sequence}}(%0, %1, %2, %4) : f32[B,T,K,8], f32[B,8] @\"n2\"\n",
        plif_block()
    ));
    assert_mentions(&msg, &["scan", "n2", "`v`", "f32[B,9]"]);

    // Builder API: unknown neuron model.
    let mut g = Graph::new("g");
    let x = g.input("x", f32t(&["B", "T", "K", "8"]));
    let err = g.add(Op::Scan { neuron: "ghost".into(), emit: vec!["spike".into()], scope: StateScope::Token }, &[x], "layer.n").unwrap_err();
    assert_mentions(&err.to_string(), &["scan", "layer.n", "ghost"]);
}

#[test]
fn error_mismatched_linear_shapes() {
    let msg = parse_err(
        "  %0 = input{name=\"x\"}() : f32[B,T,64]\n  %1 = param{name=\"proj.weight\"}() : f32[32,48]\n  %2 = linear{bias=false}(%0, %1) : f32[B,T,32] @\"proj\"\n",
    );
    assert_mentions(&msg, &["linear", "proj", "64", "f32[32,48]"]);
    let msg = parse_err(
        "  %0 = input{name=\"x\"}() : f32[B,64]\n  %1 = param{name=\"w\"}() : f32[32,64]\n  %2 = param{name=\"b\"}() : f32[31]\n  %3 = linear{bias=true}(%0, %1, %2) : f32[B,32] @\"biased\"\n",
    );
    assert_mentions(&msg, &["linear", "biased", "f32[31]"]);
    let msg = parse_err(
        "  %0 = input{name=\"x\"}() : f32[B,64]\n  %1 = param{name=\"w\"}() : f32[32,64]\n  %2 = linear{bias=true}(%0, %1) : f32[B,32] @\"two_operands\"\n",
    );
    assert_mentions(&msg, &["linear", "two_operands", "3 operands"]);

    let mut g = Graph::new("g");
    let x = g.input("x", f32t(&["B", "64"]));
    let w = g.param("w", ValueType::f32([32u64, 48])).unwrap();
    let err = g.add1(Op::Linear { bias: false }, &[x, w], "layers.3.up").unwrap_err();
    assert!(matches!(err, IrError::Type { .. }));
    assert_mentions(&err.to_string(), &["linear", "layers.3.up"]);
}

#[test]
fn error_neuron_model_reads_undefined_name() {
    let model = "  neuron leaky {\n    param w\n    input x\n    state v = 0.0\n    charge v = w * v + x + ghost_var\n    fire v >= 1.0\n    reset subtract\n    surrogate sigmoid(4.0)\n    output spike = z\n  }\n";
    let msg = parse_err(model);
    assert_mentions(&msg, &["leaky", "ghost_var", "charge"]);
    let msg = parse_err("  neuron leaky {\n    input x\n    state v = 0.0\n    fire v >= theta\n    output spike = z\n  }\n");
    assert_mentions(&msg, &["leaky", "theta", "threshold"]);
    let msg = parse_err("  neuron leaky {\n    input x\n    state v = 0.0\n    fire v >= 1.0\n    output spike = z + late\n    output late = v\n  }\n");
    assert_mentions(&msg, &["leaky", "late"]);
    let msg = parse_err("  neuron leaky {\n    input x\n    state v = 0.0\n    fire u >= 1.0\n    output o = z\n  }\n");
    assert_mentions(&msg, &["leaky", "`u`"]);
    let msg = parse_err("  neuron leaky {\n    input x\n    state v = 0.0\n    fire v >= 1.0\n    blink twice\n    output o = z\n  }\n");
    assert_mentions(&msg, &["leaky", "blink"]);

    // The verifier re-validates models put into a graph directly.
    let mut g = Graph::new("g");
    let mut m = neuron::plif();
    m.name = "broken".into();
    m.outputs.push(Binding { name: "extra".into(), expr: Expr::var("undefined_thing") });
    g.neurons.insert(m.name.clone(), m);
    assert_mentions(&verify::verify(&g).unwrap_err().to_string(), &["broken", "undefined_thing"]);

    // Names the text form cannot carry: they would read back as numbers, or not at all.
    for (edit, needle) in [
        (&(|m: &mut NeuronModel| m.params[0] = "inf".into()) as &dyn Fn(&mut NeuronModel), "`inf`"),
        (&|m: &mut NeuronModel| m.params[1] = "nan".into(), "`nan`"),
        (&|m: &mut NeuronModel| m.inputs[0] = "2x".into(), "`2x`"),
        (&|m: &mut NeuronModel| m.outputs[0].name = "my out".into(), "`my out`"),
        (&|m: &mut NeuronModel| m.name = "9lives".into(), "9lives"),
        (&|m: &mut NeuronModel| m.name = "two words".into(), "two words"),
    ] {
        let mut m = neuron::lif();
        m.name = "named".into();
        edit(&mut m);
        // Keep the expressions reading the renamed variables.
        let (p0, p1, i0) = (m.params[0].clone(), m.params[1].clone(), m.inputs[0].clone());
        m.charge[0].expr = Expr::bin(BinOp::Add, Expr::bin(BinOp::Mul, Expr::var(&p0), Expr::var("v")), Expr::var(&i0));
        m.threshold = Expr::var(&p1);
        let mut g = Graph::new("g");
        g.neurons.insert(m.name.clone(), m);
        let msg = verify::verify(&g).expect_err("rejected").to_string();
        assert_mentions(&msg, &[needle]);
    }
}

#[test]
fn error_map_and_other_typing_rules() {
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = map{f=`x0 + x1`}(%0) : f32[3] @\"adder\"\n");
    assert_mentions(&msg, &["map", "adder", "x1"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = map{f=`x01 * 2.0`}(%0, %0) : f32[3] @\"leading_zero\"\n");
    assert_mentions(&msg, &["map", "leading_zero", "x01"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[3]\n  %1 = input{name=\"y\"}() : f32[4]\n  %2 = map{f=`x0 * x1`}(%0, %1) : f32[4] @\"bc\"\n");
    assert_mentions(&msg, &["map", "bc", "broadcast"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[B,T,3]\n  %1 = repeat_frames{frames=0}(%0) : f32[B,T,0,3] @\"rf\"\n");
    assert_mentions(&msg, &["frames"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[B,T,5]\n  %1 = input{name=\"t\"}() : f32[B,T]\n  %2 = cross_entropy{ignore_index=0}(%0, %1) : f32[B,T] @\"ce\"\n");
    assert_mentions(&msg, &["cross_entropy", "ce", "integers"]);
    let msg = parse_err("  %0 = input{name=\"x\"}() : f32[B,T,K,5]\n  %1 = input{name=\"w\"}() : f32[B,T,K,2]\n  %2 = frame_weighted_sum(%0, %1) : f32[B,T,5] @\"fws\"\n");
    assert_mentions(&msg, &["frame_weighted_sum", "fws"]);

    // Builder API: a map reading a non-canonical operand name is rejected.
    let mut g = Graph::new("g");
    let x = g.input("x", ValueType::f32([3u64]));
    for bad in ["x01", "x+1", "x 0", "y0", "x1"] {
        let err = g.add1(Op::Map { expr: Expr::var(bad) }, &[x, x], "m").err();
        if bad == "x1" {
            assert!(err.is_none(), "x1 is a valid operand");
        } else {
            assert_mentions(&err.expect("rejected").to_string(), &["map", bad]);
        }
    }
    // A frame count of zero is rejected where it is built, not only when parsed.
    let y = g.input("y", f32t(&["B", "T", "3"]));
    let err = g.add1(Op::RepeatFrames { frames: Dim::Const(0) }, &[y], "zero_frames").unwrap_err();
    assert_mentions(&err.to_string(), &["repeat_frames", "zero_frames"]);
}

#[test]
fn verifier_checks_built_graphs() {
    let mut g = build_graph(&NeuronSparkConfig::tiny(), &GraphOptions::default()).unwrap();
    verify::verify(&g).unwrap();
    // Corrupt a declared result type and the verifier names the node.
    let n = g.g.node_indices().find(|&n| g.g[n].name == "layers.1.ffn_out_proj.center").expect("node exists");
    g.g[n].results[0] = f32t(&["B", "T", "63"]);
    let msg = verify::verify(&g).unwrap_err().to_string();
    assert_mentions(&msg, &["center_last", "layers.1.ffn_out_proj.center", "f32[B,T,63]"]);
    // An output pointing at a port that does not exist.
    let mut g = build_graph(&NeuronSparkConfig::tiny(), &GraphOptions::default()).unwrap();
    let v = g.output("logits").unwrap();
    g.set_output("ghost", Value { node: v.node, port: 5 });
    assert_mentions(&verify::verify(&g).unwrap_err().to_string(), &["ghost"]);
    assert!(text::print(&g).is_err());
}

// ------------------------------------------------------- 5. snapshots

#[test]
fn snapshot_neuronspark_tiny() {
    let g = build_graph(&NeuronSparkConfig::tiny(), &GraphOptions::default()).unwrap();
    let t = text::print(&g).unwrap();
    assert_eq!(text::print(&text::parse(&t).unwrap()).unwrap(), t);
    insta::assert_snapshot!("neuronspark_tiny", t);
}

#[test]
fn snapshot_neuronspark_tiny_with_loss() {
    let g = build_graph(&NeuronSparkConfig::tiny(), &GraphOptions { with_loss: true, ..GraphOptions::default() }).unwrap();
    let t = text::print(&g).unwrap();
    assert_eq!(text::print(&text::parse(&t).unwrap()).unwrap(), t);
    insta::assert_snapshot!("neuronspark_tiny_with_loss", t);
}

/// Found by the round-trip tests last session: a numeric string is a constant dimension, and a
/// graph whose name is not an identifier prints text that parses back to the same name.
#[test]
fn numeric_dims_are_constants_and_any_graph_name_round_trips() {
    use sparkc_ir::types::Dim;
    assert_eq!(Dim::from("64"), Dim::Const(64));
    assert_eq!(Dim::from("B"), Dim::Sym("B".into()));
    for name in ["plain", "with space", "quote\"and\\slash", "layer-1/ffn", ""] {
        let g = sparkc_ir::Graph::new(name);
        let text = sparkc_ir::text::print(&g).unwrap();
        let back = sparkc_ir::text::parse(&text).unwrap_or_else(|e| panic!("`{name}`: {e}\n{text}"));
        assert_eq!(back.name, name, "{text}");
    }
}

// ------------------------------------------------------------------ recompute marker and execution order

/// Two "layers" (a, c in layer 0; b in layer 1) and a "backward" that reads recomputed copies:
/// `gb` reads b', then `gc` reads c' (which reads a'). Returns the graph and [a', c', b', gb, gc].
fn recompute_graph() -> (Graph, [sparkc_ir::NodeIndex; 5]) {
    let mut g = Graph::new("rc");
    let x = g.input("x", ValueType::new(DType::F32, Shape(vec![Dim::sym("B"), Dim::Const(4)])));
    let e = |s: &str| Op::Map { expr: parse_expr(s).unwrap() };
    let a = must(g.add1(e("x0 * 2.0"), &[x], "layers.0.a"), "a");
    let c = must(g.add1(e("x0 + 1.0"), &[a], "layers.0.c"), "c");
    let b = must(g.add1(e("x0 * 3.0"), &[c], "layers.1.b"), "b");
    let y = must(g.add1(e("x0 * x0"), &[b], "y"), "y");
    let seed = must(g.add1(e("1.0"), &[y], "y.seed"), "seed");
    let a2 = must(g.add_recompute(e("x0 * 2.0"), &[x], "layers.0.a.recompute"), "a'")[0];
    let c2 = must(g.add_recompute(e("x0 + 1.0"), &[a2], "layers.0.c.recompute"), "c'")[0];
    let b2 = must(g.add_recompute(e("x0 * 3.0"), &[c], "layers.1.b.recompute"), "b'")[0];
    let gb = must(g.add1(e("x0 * x1"), &[seed, b2], "b.grad"), "gb");
    let gc = must(g.add1(e("x0 * x1"), &[gb, c2], "c.grad"), "gc");
    g.set_output("y", y);
    g.set_output("dx", gc);
    (g, [a2.node, c2.node, b2.node, gb.node, gc.node])
}

#[test]
fn recompute_marker_round_trips_through_text_and_json() {
    let (g, [a2, c2, b2, gb, _]) = recompute_graph();
    assert!(g.node(a2).recompute && g.node(c2).recompute && g.node(b2).recompute && !g.node(gb).recompute);
    let t = check_round_trips(&g).unwrap_or_else(|e| panic!("{e}"));
    assert!(t.contains("= recompute map{"), "{t}");
    assert_eq!(t.matches("recompute map").count(), 3, "{t}");
    let back = text::parse(&t).unwrap();
    assert_eq!(back.g.node_weights().filter(|n| n.recompute).count(), 3);
    // JSON written before the marker existed still reads (the field defaults to false).
    let (plain, _) = {
        let mut g = Graph::new("old");
        let x = g.input("x", ValueType::f32([2u64]));
        let y = must(g.add1(Op::Map { expr: parse_expr("x0 + 1.0").unwrap() }, &[x], "y"), "y");
        g.set_output("y", y);
        (g, ())
    };
    let json = serde_json::to_string(&plain).unwrap().replace(",\"recompute\":false", "");
    assert!(!json.contains("recompute"), "{json}");
    let old: Graph = serde_json::from_str(&json).unwrap();
    assert!(old.g.node_weights().all(|n| !n.recompute));
    // An op is never called `recompute`, so the marker cannot be mistaken for one.
    let err = text::parse("graph g {\n  %0 = recompute(%0) : f32[]\n}\n").unwrap_err();
    assert!(matches!(err, IrError::Parse { .. }), "{err}");
}

#[test]
fn execution_order_runs_recompute_nodes_just_before_their_reader() {
    let (g, [a2, c2, b2, gb, gc]) = recompute_graph();
    let order = g.execution_order().unwrap();
    assert_eq!(order.len(), g.len());
    let pos = |order: &[sparkc_ir::NodeIndex], n| order.iter().position(|&m| m == n).unwrap();
    for n in g.g.node_indices() {
        for v in g.operands(n) {
            assert!(pos(&order, v.node) < pos(&order, n), "`{}` runs before its operand `{}`", g.node(n).name, g.node(v.node).name);
        }
    }
    let at = |ns: [sparkc_ir::NodeIndex; 5], order: &[sparkc_ir::NodeIndex]| ns.map(|n| pos(order, n));
    // b' right before gb; a', c' (depth first) right before gc.
    let [pa, pc, pb, pgb, pgc] = at([a2, c2, b2, gb, gc], &order);
    assert_eq!((pb + 1, pgb + 1, pa + 1, pc + 1), (pgb, pa, pc, pgc), "{order:?}");
    // topo_order runs every ready copy first (lowest index first), before the backward.
    let [ta, tc, tb, tgb, _] = at([a2, c2, b2, gb, gc], &g.topo_order().unwrap());
    assert!(ta < tgb && tc < tgb && tb < tgb);

    // Unmarked, the two orders are the same.
    let mut plain = g.clone();
    for w in plain.g.node_weights_mut() {
        w.recompute = false;
    }
    assert_eq!(plain.execution_order().unwrap(), plain.topo_order().unwrap());
}
