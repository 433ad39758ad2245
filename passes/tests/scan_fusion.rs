//! Tests of the scan-fusion pass (`sparkc_passes::scan_fusion`).
//!
//! The pass only regroups evaluation (a map's expression moves into the neuron step), so the
//! oracle is the unfused graph itself: both run through the f32 CPU interpreter, which evaluates
//! the same f32 operations in the same order either way, so forward results must be
//! bit-identical. Gradients (autodiff of the fused vs the unfused graph) differ only in the order
//! in which per-channel parameter gradients are summed, and are compared with a relative L2
//! tolerance.
//!
//! Random graphs are deterministic: proptest runs with a fixed seed and everything else comes
//! from `sparkc_ir::rng::Rng` seeded by the generated spec.

mod common;

use common::{bits_equal, run, text};
use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};
use sparkc_frontend::init::init_params;
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::NeuronSparkConfig;
use sparkc_ir::neuron::{self, Binding, FireCmp, NeuronModel, Reset, StateVar, Surrogate, SurrogateKind};
use sparkc_ir::rng::Rng;
use sparkc_ir::{parse_expr, BinOp, DType, Dim, Expr, Graph, Op, Shape, StateScope, Tensor, UnOp, Value, ValueType};
use sparkc_passes::autodiff::{differentiate, GRAD_PREFIX};
use sparkc_passes::scan_fusion::{fuse_scans, fuse_scans_with, FusionOptions, FusionReport};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn pe(src: &str) -> Expr {
    parse_expr(src).unwrap_or_else(|e| panic!("test expression `{src}`: {e}"))
}

/// ‖a − b‖ / max(‖a‖, ‖b‖) in f64 (0 when both are zero).
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (x, y) = (a.to_f32_vec(), b.to_f32_vec());
    let d: f64 = x.iter().zip(&y).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum::<f64>().sqrt();
    let n = |v: &[f32]| v.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
    let den = n(&x).max(n(&y));
    if den == 0.0 {
        d
    } else {
        d / den
    }
}

/// Every output of `got` equals `want`: forward values bit for bit (or within `fwd_tol` relative
/// L2), `grad.*` within `grad_tol`. Returns the number of outputs that were bit-identical.
fn compare(want: &BTreeMap<String, Tensor>, got: &BTreeMap<String, Tensor>, fwd_tol: f64, grad_tol: f64) -> Result<usize, String> {
    if want.keys().collect::<Vec<_>>() != got.keys().collect::<Vec<_>>() {
        return Err(format!("outputs differ: {:?} vs {:?}", want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>()));
    }
    let mut exact = 0;
    for (name, w) in want {
        let g = &got[name];
        if bits_equal(w, g) {
            exact += 1;
            continue;
        }
        if w.shape != g.shape {
            return Err(format!("`{name}`: shape {:?} vs {:?}", w.shape, g.shape));
        }
        let tol = if name.starts_with(GRAD_PREFIX) { grad_tol } else { fwd_tol };
        let err = rel_l2(g, w);
        if !(err <= tol) {
            return Err(format!("`{name}`: relative L2 error {err:e} > {tol:e}"));
        }
    }
    Ok(exact)
}

fn step_ty() -> ValueType {
    ValueType::new(DType::F32, Shape(vec![Dim::sym("B"), Dim::sym("T"), Dim::sym("K"), Dim::sym("C")]))
}

fn chan_ty() -> ValueType {
    ValueType::new(DType::F32, Shape(vec![Dim::sym("C")]))
}

fn state_ty() -> ValueType {
    ValueType::new(DType::F32, Shape(vec![Dim::sym("B"), Dim::sym("C")]))
}

/// Random data for every input and parameter of `g` (ids for integer inputs, a mask of ones for
/// `loss_mask`), with the free dims B and T given.
fn random_data(g: &Graph, b: usize, t: usize, seed: u64, vocab: u64) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let mut r = Rng::new(seed);
    let inputs = common::random_inputs(g, b, t, &mut r, vocab, 0.7);
    let env = common::dims_bt(g, b, t);
    let mut params = BTreeMap::new();
    for (_, name, ty) in g.params() {
        let shape = ty.shape.concrete(&env).expect("all dims bound");
        let n: usize = shape.iter().product();
        params.insert(name.to_string(), Tensor::f32(shape, (0..n).map(|_| r.uniform_range(0.2, 0.9) as f32).collect()));
    }
    (inputs, params)
}

fn node_names(g: &Graph) -> BTreeSet<String> {
    g.g.node_indices().map(|n| g.node(n).name.clone()).collect()
}

fn map_names(g: &Graph) -> BTreeSet<String> {
    g.g.node_indices().filter(|&n| matches!(g.node(n).op, Op::Map { .. })).map(|n| g.node(n).name.clone()).collect()
}

fn scan_node(g: &Graph, name: &str) -> (String, Vec<String>) {
    let n = g.g.node_indices().find(|&n| g.node(n).name == name).unwrap_or_else(|| panic!("no node `{name}`"));
    match &g.node(n).op {
        Op::Scan { neuron, emit, .. } => (neuron.clone(), emit.clone()),
        other => panic!("`{name}` is a {}", other.name()),
    }
}

/// print → parse → print is a fixed point.
fn assert_round_trip(g: &Graph) {
    let t = text(g);
    let back = sparkc_ir::text::parse(&t).unwrap_or_else(|e| panic!("fused graph does not parse: {e}\n{t}"));
    sparkc_ir::verify::verify(&back).unwrap();
    assert_eq!(text(&back), t, "print/parse round trip changed the graph");
}

// ------------------------------------------------------------------------------------------
// The tiny NeuronSpark model
// ------------------------------------------------------------------------------------------

#[test]
fn tiny_neuronspark_fuses_every_selective_plif_prologue() {
    let cfg = NeuronSparkConfig::tiny();
    let g = build_graph(&cfg, &GraphOptions::default()).unwrap();
    let start = std::time::Instant::now();
    let (f, rep) = fuse_scans(&g).unwrap();
    eprintln!("fusion took {:?}\n{rep}", start.elapsed());

    let selective: Vec<String> = g
        .g
        .node_indices()
        .filter(|&n| matches!(&g.node(n).op, Op::Scan { neuron, .. } if neuron == "selective_plif"))
        .map(|n| g.node(n).name.clone())
        .collect();
    assert_eq!(selective.len(), cfg.num_layers);
    for name in &selective {
        let s = rep.scan(name).unwrap_or_else(|| panic!("scan `{name}` fused nothing\n{rep}"));
        let fed: Vec<&str> = s.prologue.iter().map(|p| p.input.as_str()).collect();
        assert_eq!(fed, ["beta", "u", "theta"], "{rep}");
        assert!(s.epilogue.is_empty());
        assert_eq!(scan_node(&f, name).0, "selective_plif_fused_0", "repeated layers share one model");
    }
    assert_eq!(rep.scans.len(), cfg.num_layers, "only the selective PLIFs have fusable maps\n{rep}");
    assert_eq!(rep.prologue_count(), 3 * cfg.num_layers);
    assert_eq!(rep.epilogue_count(), 0);
    assert_eq!(rep.new_models, ["selective_plif_fused_0"]);
    assert_eq!(rep.removed_models, ["selective_plif"]);
    assert!(!f.neurons.contains_key("selective_plif") && f.neurons.contains_key("plif"));
    // The gate·up product reads two scans: reported, not fused.
    assert!(rep.skipped.iter().any(|s| s.map.ends_with("snn_ffn.gate_up")), "{rep}");

    // The removed maps are really gone; every other node is still there.
    assert_eq!(f.len(), g.len() - 3 * cfg.num_layers);
    let (before, after) = (node_names(&g), node_names(&f));
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    let want: BTreeSet<String> = (0..cfg.num_layers)
        .flat_map(|i| ["beta", "u", "theta"].map(|m| format!("layers.{i}.snn_block.{m}")))
        .collect();
    assert_eq!(gone, want);
    assert!(after.is_subset(&before));
    assert_eq!(f.outputs.iter().map(|(n, _)| n).collect::<Vec<_>>(), g.outputs.iter().map(|(n, _)| n).collect::<Vec<_>>());

    let m = &f.neurons["selective_plif_fused_0"];
    eprintln!("{m}");
    assert_eq!(m.inputs, ["beta_x0", "u_x0", "u_x2", "theta_x0"]);
    assert_eq!(m.params, ["beta_x1", "u_x1", "theta_x1"]);
    let lets: BTreeMap<&str, String> = m.lets.iter().map(|b| (b.name.as_str(), b.expr.to_string())).collect();
    assert_eq!(lets["beta"], "sigmoid(beta_x0 + beta_x1)");
    assert_eq!(lets["u"], "softplus(u_x0 + u_x1) * u_x2");
    assert_eq!(lets["theta"], "0.1 + abs(theta_x0 + theta_x1)");
    assert_round_trip(&f);

    // Same outputs on the CPU, bit for bit.
    let params = init_params(&cfg, 7);
    let (inputs, _) = random_data(&g, 2, 5, 11, cfg.vocab_size as u64);
    let t0 = std::time::Instant::now();
    let want = run(&g, &inputs, &params);
    let t1 = std::time::Instant::now();
    let got = run(&f, &inputs, &params);
    eprintln!("unfused {:?}, fused {:?}", t1 - t0, t1.elapsed());
    let exact = compare(&want, &got, 1e-6, 1e-5).unwrap();
    assert_eq!(exact, want.len(), "the CPU evaluates the fused model bit-identically");
}

/// The released 0.9B shape (20 layers): the graph alone, to see that the pass scales.
#[test]
fn neuronspark_0_9b_graph_fuses_quickly() {
    let cfg = NeuronSparkConfig::neuronspark_0_9b();
    let g = build_graph(&cfg, &GraphOptions { with_loss: true, ..GraphOptions::default() }).unwrap();
    let start = std::time::Instant::now();
    let (f, rep) = fuse_scans(&g).unwrap();
    let took = start.elapsed();
    eprintln!("{} nodes: fused {} maps in {took:?}", g.len(), rep.maps_removed());
    assert_eq!(rep.prologue_count(), 3 * cfg.num_layers);
    assert_eq!(rep.new_models.len(), 1);
    assert_eq!(f.len(), g.len() - 3 * cfg.num_layers);
    assert!(took.as_secs_f64() < 5.0, "{took:?}");
}

#[test]
fn tiny_neuronspark_gradients_match_after_fusion() {
    let cfg = NeuronSparkConfig::tiny();
    let g = build_graph(&cfg, &GraphOptions { with_loss: true, ..GraphOptions::default() }).unwrap();
    let (f, rep) = fuse_scans(&g).unwrap();
    assert_eq!(rep.prologue_count(), 3 * cfg.num_layers);
    let dg = differentiate(&g, "total_loss", &[]).unwrap();
    let df = differentiate(&f, "total_loss", &[]).unwrap();
    let adjoints: Vec<&str> = df
        .g
        .node_indices()
        .filter_map(|n| match &df.node(n).op {
            Op::ScanAdjoint { neuron, .. } if neuron.contains("fused") => Some(neuron.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(adjoints.len(), cfg.num_layers, "the backward runs through the fused model's adjoint");
    let params = init_params(&cfg, 3);
    let (inputs, _) = random_data(&g, 2, 4, 5, cfg.vocab_size as u64);
    let want = run(&dg, &inputs, &params);
    let got = run(&df, &inputs, &params);
    let grads = want.keys().filter(|k| k.starts_with(GRAD_PREFIX)).count();
    assert_eq!(grads, g.params().len());
    let mut worst = (0.0f64, String::new());
    for (name, w) in &want {
        if name.starts_with(GRAD_PREFIX) {
            let e = rel_l2(&got[name], w);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
    }
    eprintln!("{grads} parameter gradients; worst relative L2 {:e} (`{}`)", worst.0, worst.1);
    compare(&want, &got, 0.0, 1e-5).unwrap();
    // The fused biases' gradients are non-trivial (they now come out of the scan adjoint).
    for i in 0..cfg.num_layers {
        for b in ["b_beta", "b_alpha", "b_th"] {
            let t = &got[&format!("{GRAD_PREFIX}layers.{i}.snn_block.{b}")];
            assert!(t.to_f32_vec().iter().any(|&x| x != 0.0), "{b} gradient is zero");
        }
    }
}

// ------------------------------------------------------------------------------------------
// Hand-built cases
// ------------------------------------------------------------------------------------------

/// A selective-PLIF block: beta = σ(r + b), u = softplus(a + c) · i, θ = 0.1 + |t + d|.
struct Block {
    g: Graph,
    beta: Value,
    scan: Vec<Value>,
}

fn selective_block() -> Block {
    let mut g = Graph::new("block");
    g.bind_dim("K", 2);
    g.bind_dim("C", 3);
    g.add_neuron(neuron::selective_plif()).unwrap();
    let [r, a, i, t] = ["r", "a", "i", "t"].map(|n| g.input(n, step_ty()));
    let [b, c, d] = ["b", "c", "d"].map(|n| g.param(n, chan_ty()).unwrap());
    let beta = g.add1(Op::Map { expr: pe("sigmoid(x0 + x1)") }, &[r, b], "beta").unwrap();
    let u = g.add1(Op::Map { expr: pe("softplus(x0 + x1) * x2") }, &[a, c, i], "u").unwrap();
    let th = g.add1(Op::Map { expr: pe("0.1 + abs(x0 + x1)") }, &[t, d], "theta").unwrap();
    let v0 = g.input("v0", state_ty());
    let op = Op::Scan { neuron: "selective_plif".into(), emit: vec!["vpost".into()], scope: StateScope::Sequence };
    let scan = g.add(op, &[beta, u, th, v0], "hidden").unwrap();
    g.set_output("vpost", scan[0]);
    g.set_output("v", scan[1]);
    Block { g, beta, scan }
}

/// Fuse, check the round trip and that the CPU results are bit-identical; returns the report.
fn fuse_and_check(g: &Graph) -> (Graph, FusionReport) {
    let (f, rep) = fuse_scans(g).unwrap_or_else(|e| panic!("fuse: {e}\n{}", text(g)));
    assert_round_trip(&f);
    let (inputs, params) = random_data(g, 2, 3, 1, 2);
    let want = run(g, &inputs, &params);
    let got = run(&f, &inputs, &params);
    let exact = compare(&want, &got, 1e-6, 1e-5).unwrap();
    assert_eq!(exact, want.len(), "not bit-identical\n{rep}\n{}", text(&f));
    (f, rep)
}

#[test]
fn map_read_by_two_nodes_is_not_fused() {
    let mut blk = selective_block();
    let other = blk.g.add1(Op::Map { expr: pe("2.0 * x0") }, &[blk.beta], "other").unwrap();
    blk.g.set_output("other", other);
    let (f, rep) = fuse_and_check(&blk.g);
    let s = rep.scan("hidden").unwrap();
    assert_eq!(s.prologue.iter().map(|p| p.map.as_str()).collect::<Vec<_>>(), ["u", "theta"]);
    assert!(map_names(&f).contains("beta"));
    let skip = rep.skipped.iter().find(|k| k.map == "beta").expect("reported");
    assert!(skip.reason.contains("read by 2 nodes"), "{}", skip.reason);
    assert_eq!(f.neurons[&s.to_model].inputs[0], "beta", "the unfused input keeps its slot and name");
}

#[test]
fn map_that_is_a_graph_output_is_not_fused() {
    let mut blk = selective_block();
    blk.g.set_output("beta", blk.beta);
    let (f, rep) = fuse_and_check(&blk.g);
    assert_eq!(rep.prologue_count(), 2);
    assert!(map_names(&f).contains("beta"));
    let skip = rep.skipped.iter().find(|k| k.map == "beta").expect("reported");
    assert!(skip.reason.contains("graph output `beta`"), "{}", skip.reason);
}

#[test]
fn map_feeding_two_slots_of_the_scan_is_not_fused() {
    let mut g = Graph::new("twice");
    g.bind_dim("K", 2);
    g.bind_dim("C", 3);
    g.add_neuron(neuron::selective_plif()).unwrap();
    let x = g.input("x", step_ty());
    let m = g.add1(Op::Map { expr: pe("sigmoid(x0)") }, &[x], "m").unwrap();
    let v0 = g.input("v0", state_ty());
    let op = Op::Scan { neuron: "selective_plif".into(), emit: vec!["vpost".into()], scope: StateScope::Sequence };
    let s = g.add(op, &[m, m, x, v0], "n").unwrap();
    g.set_output("vpost", s[0]);
    let (f, rep) = fuse_and_check(&g);
    assert_eq!(rep.maps_removed(), 0);
    assert!(rep.skipped[0].reason.contains("2 operand slots"), "{rep}");
    assert_eq!(text(&f), text(&g), "nothing fused: graph unchanged");
}

#[test]
fn scalar_and_other_broadcast_operands_are_not_fused() {
    let mut g = Graph::new("bcast");
    g.bind_dim("K", 2);
    g.bind_dim("C", 3);
    g.add_neuron(neuron::selective_plif()).unwrap();
    let x = g.input("x", step_ty());
    let s = g.param("s", ValueType::f32(Vec::<u64>::new())).unwrap();
    let kc = g.param("kc", ValueType::new(DType::F32, Shape(vec![Dim::sym("K"), Dim::sym("C")]))).unwrap();
    let row = g.input("row", ValueType::new(DType::F32, Shape(vec![Dim::sym("B"), Dim::sym("T"), Dim::Const(1), Dim::sym("C")])));
    let beta = g.add1(Op::Map { expr: pe("sigmoid(x0 * x1)") }, &[x, s], "beta").unwrap();
    let u = g.add1(Op::Map { expr: pe("x0 + x1") }, &[x, kc], "u").unwrap();
    let th = g.add1(Op::Map { expr: pe("0.5 + abs(x0 - x1)") }, &[x, row], "theta").unwrap();
    let v0 = g.input("v0", state_ty());
    let op = Op::Scan { neuron: "selective_plif".into(), emit: vec!["spike".into()], scope: StateScope::Token };
    let r = g.add(op, &[beta, u, th, v0], "n").unwrap();
    g.set_output("spike", r[0]);
    let (_, rep) = fuse_and_check(&g);
    assert_eq!(rep.maps_removed(), 0, "{rep}");
    assert_eq!(rep.skipped.len(), 3, "{rep}");
    assert!(rep.skipped.iter().all(|k| k.reason.contains("neither the per-step shape")), "{rep}");
}

/// PLIF emitting vpost; `(1 − σ(w))·vpost` computed after the scan is its `leak` output.
fn plif_with_epilogue() -> (Graph, Value, Vec<Value>) {
    let mut g = Graph::new("epi");
    g.bind_dim("K", 3);
    g.bind_dim("C", 4);
    g.add_neuron(neuron::plif()).unwrap();
    let x = g.input("x", step_ty());
    let w = g.param("w", chan_ty()).unwrap();
    let th = g.param("v_th", chan_ty()).unwrap();
    let v0 = g.input("v0", state_ty());
    let op = Op::Scan { neuron: "plif".into(), emit: vec!["vpost".into()], scope: StateScope::Sequence };
    let s = g.add(op, &[x, w, th, v0], "neuron").unwrap();
    let leak = g.add1(Op::Map { expr: pe("(1.0 - sigmoid(x1)) * x0") }, &[s[0], w], "leak").unwrap();
    (g, leak, s)
}

#[test]
fn epilogue_becomes_a_model_output_and_readers_are_rewired() {
    let (mut g, leak, s) = plif_with_epilogue();
    let w2 = g.param("proj", ValueType::f32([4u64, 4])).unwrap();
    let y = g.add1(Op::Linear { bias: false }, &[leak, w2], "proj").unwrap();
    g.set_output("y", y);
    g.set_output("leak", leak);
    g.set_output("v", s[1]);
    let (f, rep) = fuse_and_check(&g);
    let sf = rep.scan("neuron").unwrap();
    assert_eq!(sf.epilogue.len(), 1);
    assert_eq!((sf.epilogue[0].map.as_str(), sf.epilogue[0].replaces.as_str()), ("leak", "vpost"));
    let (model, emit) = scan_node(&f, "neuron");
    assert_eq!(emit, [sf.epilogue[0].output.clone()]);
    let out = f.neurons[&model].output(&emit[0]).unwrap();
    assert_eq!(out.expr.to_string(), "(1.0 - sigmoid(w)) * v");
    assert!(!map_names(&f).contains("leak"));
    // The graph output and the linear now read the scan's result directly.
    let scan_idx = f.g.node_indices().find(|&n| f.node(n).name == "neuron").unwrap();
    assert_eq!(f.output("leak"), Some(Value { node: scan_idx, port: 0 }));
    let proj = f.g.node_indices().find(|&n| f.node(n).name == "proj" && matches!(f.node(n).op, Op::Linear { .. })).unwrap();
    assert_eq!(f.operands(proj)[0], Value { node: scan_idx, port: 0 });
}

#[test]
fn epilogue_of_an_output_read_twice_is_not_fused() {
    let (mut g, leak, s) = plif_with_epilogue();
    g.set_output("leak", leak);
    g.set_output("vpost", s[0]);
    let (_, rep) = fuse_and_check(&g);
    assert_eq!(rep.maps_removed(), 0);
    assert!(rep.skipped[0].reason.contains("graph output `vpost`"), "{rep}");

    let (mut g, leak, s) = plif_with_epilogue();
    let other = g.add1(Op::Map { expr: pe("x0 * x0") }, &[s[0]], "square").unwrap();
    g.set_output("leak", leak);
    g.set_output("square", other);
    let (_, rep) = fuse_and_check(&g);
    assert_eq!(rep.maps_removed(), 0);
    assert!(rep.skipped.iter().all(|k| k.reason.contains("read by 2 nodes")), "{rep}");
}

#[test]
fn epilogue_reading_a_foreign_value_is_not_fused() {
    let (mut g, _, s) = plif_with_epilogue();
    let other = g.input("other", step_ty());
    let m = g.add1(Op::Map { expr: pe("x0 * x1") }, &[s[0], other], "mix").unwrap();
    // `leak` stays unread: drop it so the product is the only reader of vpost.
    let leak = g.g.node_indices().find(|&n| g.node(n).name == "leak").unwrap();
    g.g.remove_node(leak);
    g.set_output("mix", m);
    let (_, rep) = fuse_and_check(&g);
    assert_eq!(rep.maps_removed(), 0);
    assert!(rep.skipped[0].reason.contains("neither `vpost` nor"), "{rep}");
}

#[test]
fn chains_fuse_and_an_epilogue_frees_a_prologue_map() {
    let mut g = Graph::new("chain");
    g.bind_dim("K", 2);
    g.bind_dim("C", 3);
    g.add_neuron(neuron::plif()).unwrap();
    let [a, b] = ["a", "b"].map(|n| g.input(n, step_ty()));
    let [w, th, p] = ["w", "v_th", "p"].map(|n| g.param(n, chan_ty()).unwrap());
    // inner → outer → scan: both fuse (the inner one once the outer is gone).
    let inner = g.add1(Op::Map { expr: pe("tanh(x0) * x1") }, &[a, p], "inner").unwrap();
    let outer = g.add1(Op::Map { expr: pe("x0 + 0.5 * x1 - x2") }, &[inner, b, w], "outer").unwrap();
    let v0 = g.input("v0", state_ty());
    let op = Op::Scan { neuron: "plif".into(), emit: vec!["leak".into()], scope: StateScope::Sequence };
    let s = g.add(op, &[outer, w, th, v0], "neuron").unwrap();
    // The epilogue also reads the prologue map's value: until it is fused, `outer` has two readers.
    let e1 = g.add1(Op::Map { expr: pe("x0 * x1 + x2") }, &[s[0], outer, th], "epi1").unwrap();
    let e2 = g.add1(Op::Map { expr: pe("max(x0, 0.0) - x1") }, &[e1, w], "epi2").unwrap();
    g.set_output("y", e2);
    let (f, rep) = fuse_and_check(&g);
    let sf = rep.scan("neuron").unwrap();
    assert_eq!(sf.epilogue.iter().map(|e| e.map.as_str()).collect::<Vec<_>>(), ["epi1", "epi2"], "{rep}");
    assert_eq!(sf.prologue.iter().map(|p| p.map.as_str()).collect::<Vec<_>>(), ["outer", "inner"], "{rep}");
    assert!(map_names(&f).is_empty());
    let m = &f.neurons[&sf.to_model];
    eprintln!("{m}");
    // Operands deduplicated: `w` is the model's param and an operand of `outer`.
    assert_eq!(m.params, ["w", "v_th", "x_x0_x1"]);
    assert_eq!(m.inputs, ["x_x0_x0", "x_x1"]);
    assert_eq!(m.lets[0].name, "x_x0", "a later (chained) prologue let comes first");
    assert_eq!(rep.skipped, []);

    // Gradients agree as well.
    let mut gl = g.clone();
    let y = gl.output("y").unwrap();
    let loss = gl.add1(Op::Mean, &[y], "loss").unwrap();
    gl.set_output("loss", loss);
    let (fl, _) = fuse_scans(&gl).unwrap();
    let (inputs, params) = random_data(&gl, 2, 3, 9, 2);
    let want = run(&differentiate(&gl, "loss", &["a", "b"]).unwrap(), &inputs, &params);
    let got = run(&differentiate(&fl, "loss", &["a", "b"]).unwrap(), &inputs, &params);
    compare(&want, &got, 0.0, 1e-5).unwrap();
}

#[test]
fn options_select_prologue_or_epilogue() {
    let (mut g, leak, _) = plif_with_epilogue();
    g.set_output("leak", leak);
    let only_pro = FusionOptions { prologue: true, epilogue: false };
    let (_, rep) = fuse_scans_with(&g, &only_pro).unwrap();
    assert_eq!(rep.maps_removed(), 0);
    let (_, rep) = fuse_scans_with(&selective_block().g, &FusionOptions { prologue: false, epilogue: true }).unwrap();
    assert_eq!(rep.maps_removed(), 0);
}

#[test]
fn fusing_again_changes_nothing() {
    let blk = selective_block();
    let (f, rep) = fuse_scans(&blk.g).unwrap();
    assert_eq!(rep.prologue_count(), 3);
    let (f2, rep2) = fuse_scans(&f).unwrap();
    assert_eq!(rep2.maps_removed(), 0);
    assert!(rep2.new_models.is_empty() && rep2.removed_models.is_empty());
    assert_eq!(text(&f2), text(&f));
    // The input graph itself is untouched.
    assert_eq!(text(&blk.g), text(&selective_block().g));
    let _ = blk.scan;
}

#[test]
fn malformed_graphs_are_errors_not_panics() {
    // A scan whose model is missing from the neuron table.
    let mut blk = selective_block();
    blk.g.neurons.clear();
    assert!(fuse_scans(&blk.g).is_err());
    // A scan that lost an operand edge.
    let mut blk = selective_block();
    let e = blk.g.g.find_edge(blk.beta.node, blk.scan[0].node).unwrap();
    blk.g.g.remove_edge(e);
    let err = fuse_scans(&blk.g).unwrap_err();
    assert!(err.to_string().contains("hidden"), "{err}");
}

// ------------------------------------------------------------------------------------------
// Random graphs
// ------------------------------------------------------------------------------------------

/// Two inputs and two states; `x` and `gate` are read through lets, so a fused prologue let
/// must come before them. Hard, non-detached reset with an atan surrogate.
fn mixed_model() -> NeuronModel {
    let bind = |n: &str, e: &str| Binding { name: n.into(), expr: pe(e) };
    NeuronModel {
        name: "mixed".into(),
        params: vec!["tau".into(), "th".into()],
        inputs: vec!["x".into(), "gate".into()],
        state: vec![StateVar { name: "v".into(), init: 0.0 }, StateVar { name: "q".into(), init: 0.1 }],
        lets: vec![bind("beta", "sigmoid(tau)"), bind("g", "sigmoid(gate)")],
        charge: vec![bind("q", "0.5 * q + x"), bind("v", "beta * v + (1.0 - beta) * g * q")],
        membrane: "v".into(),
        threshold: pe("th"),
        fire: FireCmp::Gt,
        reset: Reset::ToValue(0.0),
        detach_reset: false,
        surrogate: Surrogate { kind: SurrogateKind::Atan, alpha: 2.0 },
        outputs: vec![bind("vpost", "v"), bind("spike", "z"), bind("leak", "(1.0 - beta) * v"), bind("gated", "g * q")],
    }
}

/// A random expression reading every one of `vars`: smooth and kinked unary / binary ops,
/// nothing that can produce NaN or infinity from finite inputs.
fn rand_expr(r: &mut Rng, vars: &[String]) -> Expr {
    fn go(r: &mut Rng, vars: &[String], depth: u32) -> Expr {
        if depth == 0 || r.uniform() < 0.25 {
            return if r.uniform() < 0.85 {
                Expr::var(&vars[r.below(vars.len() as u64) as usize])
            } else {
                Expr::c(((r.uniform_range(-1.5, 1.5)) * 100.0).round() / 100.0)
            };
        }
        let a = go(r, vars, depth - 1);
        match r.below(13) {
            0 => Expr::un(UnOp::Sigmoid, a),
            1 => Expr::un(UnOp::Tanh, a),
            2 => Expr::un(UnOp::Softplus, a),
            3 => Expr::un(UnOp::Abs, a),
            4 => Expr::un(UnOp::Neg, a),
            5 => Expr::un(UnOp::Atan, a),
            6 => Expr::un(UnOp::Exp, Expr::bin(BinOp::Mul, Expr::c(0.5), Expr::un(UnOp::Tanh, a))),
            7 => Expr::bin(BinOp::Add, a, go(r, vars, depth - 1)),
            8 => Expr::bin(BinOp::Sub, a, go(r, vars, depth - 1)),
            9 => Expr::bin(BinOp::Mul, a, go(r, vars, depth - 1)),
            10 => Expr::bin(BinOp::Min, a, go(r, vars, depth - 1)),
            11 => Expr::bin(BinOp::Max, a, go(r, vars, depth - 1)),
            _ => {
                let b = go(r, vars, depth - 1);
                Expr::bin(BinOp::Div, a, Expr::bin(BinOp::Add, Expr::c(1.0), Expr::bin(BinOp::Mul, b.clone(), b)))
            }
        }
    }
    let mut e = go(r, vars, 3);
    for v in vars {
        if !e.vars().contains(v) {
            e = Expr::bin(BinOp::Add, e, Expr::bin(BinOp::Mul, Expr::c(0.5), Expr::un(UnOp::Tanh, Expr::var(v))));
        }
    }
    e
}

fn xs(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("x{i}")).collect()
}

#[derive(Clone, Debug)]
struct Spec {
    seed: u64,
    b: usize,
    t: usize,
    k: usize,
    c: usize,
    model: usize,
    grads: bool,
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (any::<u64>(), 1usize..=2, 1usize..=3, 1usize..=3, 1usize..=4, 0usize..4, any::<bool>())
        .prop_map(|(seed, b, t, k, c, model, grads)| Spec { seed, b, t, k, c, model, grads })
}

/// A prologue map as generated, and what the generator knows about it.
struct ProMap {
    name: String,
    value: Value,
    /// All operands per-step or [C].
    good: bool,
    /// Also a graph output or read by an extra node.
    shared: bool,
    inner: Option<Box<ProMap>>,
    /// Epilogue maps (by name) that also read this map's value.
    epi_readers: Vec<String>,
}

struct EpiMap {
    name: String,
    /// Reads only the scan's output plus scan operands.
    good: bool,
    /// The emitted output (or previous epilogue) it reads has another reader or is an output.
    shared_src: bool,
    /// The previous epilogue map in a chain.
    prev: Option<String>,
}

struct Case {
    g: Graph,
    inputs: BTreeMap<String, Tensor>,
    params: BTreeMap<String, Tensor>,
    expect_fused: BTreeSet<String>,
    expect_kept: BTreeSet<String>,
    expect_prologue: usize,
    expect_epilogue: usize,
    step_inputs: Vec<String>,
    /// Expected fusions of chain links (inner prologue maps) and of prologue maps that only
    /// become fusable once an epilogue reading them is gone.
    expect_chained: usize,
    expect_freed: usize,
}

fn build_case(spec: &Spec) -> Case {
    let mut r = Rng::new(spec.seed);
    let model = [neuron::plif(), neuron::selective_plif(), neuron::lif(), mixed_model()][spec.model].clone();
    let mut g = Graph::new("fuzz");
    g.bind_dim("K", spec.k as u64);
    g.bind_dim("C", spec.c as u64);
    g.add_neuron(model.clone()).unwrap();
    let n_pool = 2 + r.below(2) as usize;
    let pool: Vec<Value> = (0..n_pool).map(|i| g.input(&format!("x{i}"), step_ty())).collect();
    let n_chan = 2 + r.below(2) as usize;
    let mut chans: Vec<Value> = (0..n_chan).map(|i| g.param(&format!("p{i}"), chan_ty()).unwrap()).collect();
    let scalar = g.param("s", ValueType::f32(Vec::<u64>::new())).unwrap();
    let kc = g.param("kc", ValueType::new(DType::F32, Shape(vec![Dim::sym("K"), Dim::sym("C")]))).unwrap();
    let foreign = g.input("foreign", step_ty());

    // Model params: own params, or sometimes a pool channel param (dedupe with map operands).
    let mparams: Vec<Value> = model
        .params
        .iter()
        .map(|p| if r.uniform() < 0.25 { chans[r.below(chans.len() as u64) as usize] } else { g.param(&format!("mp.{p}"), chan_ty()).unwrap() })
        .collect();
    chans.extend(mparams.iter().copied());

    let make_map = |g: &mut Graph, r: &mut Rng, name: &str, first: Option<&ProMap>| -> ProMap {
        let arity = 1 + r.below(4) as usize;
        let mut ops = vec![match first {
            Some(inner) => inner.value,
            None => pool[r.below(pool.len() as u64) as usize],
        }];
        let mut good = true;
        for _ in 1..arity {
            let u = r.uniform();
            let v = if u < 0.1 {
                ops[r.below(ops.len() as u64) as usize]
            } else if u < 0.4 {
                pool[r.below(pool.len() as u64) as usize]
            } else if u < 0.88 {
                chans[r.below(chans.len() as u64) as usize]
            } else {
                good = false;
                if r.uniform() < 0.5 {
                    scalar
                } else {
                    kc
                }
            };
            ops.push(v);
        }
        let expr = rand_expr(r, &xs(ops.len()));
        let value = g.add1(Op::Map { expr }, &ops, name).unwrap();
        let u = r.uniform();
        let shared = u < 0.16;
        if u < 0.08 {
            g.set_output(name, value);
        } else if shared {
            let o = g.add1(Op::Map { expr: pe("0.5 * x0") }, &[value], &format!("{name}.other")).unwrap();
            g.set_output(&format!("{name}.other"), o);
        }
        ProMap { name: name.to_string(), value, good, shared, inner: None, epi_readers: Vec::new() }
    };

    // Per-step inputs of the scan.
    let mut pros: Vec<ProMap> = Vec::new();
    let mut operands = Vec::new();
    for (j, _) in model.inputs.iter().enumerate() {
        if r.uniform() < 0.75 {
            let inner = (r.uniform() < 0.3).then(|| make_map(&mut g, &mut r, &format!("pro.{j}.inner"), None));
            let mut p = make_map(&mut g, &mut r, &format!("pro.{j}"), inner.as_ref());
            p.inner = inner.map(Box::new);
            operands.push(p.value);
            pros.push(p);
        } else {
            operands.push(pool[r.below(pool.len() as u64) as usize]);
        }
    }
    operands.extend(mparams.iter().copied());
    let scan_operands = operands.clone();
    for s in &model.state {
        operands.push(g.input(&format!("state.{}", s.name), state_ty()));
    }
    let mut names: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
    let n_emit = 1 + r.below(2.min(names.len() as u64)) as usize;
    let mut emit = Vec::new();
    for _ in 0..n_emit {
        emit.push(names.remove(r.below(names.len() as u64) as usize));
    }
    let scope = if r.uniform() < 0.5 { StateScope::Sequence } else { StateScope::Token };
    let op = Op::Scan { neuron: model.name.clone(), emit: emit.clone(), scope };
    let res = g.add(op, &operands, "neuron").unwrap();
    for (i, s) in model.state.iter().enumerate() {
        g.set_output(&format!("final.{}", s.name), res[emit.len() + i]);
    }

    // Epilogues.
    let mut epis: Vec<EpiMap> = Vec::new();
    let mut emitted_readers: Vec<usize> = vec![0; emit.len()];
    let mut emitted_is_output = vec![false; emit.len()];
    let mut plan: Vec<(usize, bool)> = Vec::new(); // (emitted index, has epilogue)
    for e in 0..emit.len() {
        plan.push((e, r.uniform() < 0.6));
    }
    for &(e, has) in &plan {
        if !has {
            g.set_output(&format!("emitted.{e}"), res[e]);
            emitted_is_output[e] = true;
            continue;
        }
        let mut chain_src = res[e];
        let mut prev: Option<String> = None;
        let chain = if r.uniform() < 0.3 { 2 } else { 1 };
        for link in 0..chain {
            let name = if link == 0 { format!("epi.{e}") } else { format!("epi.{e}.{link}") };
            let mut ops = vec![chain_src];
            let mut good = true;
            for _ in 0..r.below(3) {
                let u = r.uniform();
                let v = if u < 0.12 {
                    good = false;
                    foreign
                } else if u < 0.2 && emit.len() > 1 && link == 0 {
                    good = false;
                    let other = (e + 1) % emit.len();
                    emitted_readers[other] += 1;
                    res[other]
                } else {
                    let v = scan_operands[r.below(scan_operands.len() as u64) as usize];
                    if let Some(p) = pros.iter_mut().find(|p| p.value == v) {
                        if !p.epi_readers.contains(&name) {
                            p.epi_readers.push(name.clone());
                        }
                    }
                    v
                };
                ops.push(v);
            }
            let expr = rand_expr(&mut r, &xs(ops.len()));
            let value = g.add1(Op::Map { expr }, &ops, &name).unwrap();
            if link == 0 {
                emitted_readers[e] += 1;
            }
            // Sometimes the value this map reads is also a graph output.
            let shared_src = r.uniform() < 0.15;
            if shared_src {
                g.set_output(&format!("src.{name}"), chain_src);
                if link == 0 {
                    emitted_is_output[e] = true;
                }
            }
            epis.push(EpiMap { name: name.clone(), good, shared_src, prev: prev.clone() });
            prev = Some(name);
            chain_src = value;
        }
        g.set_output(&format!("out.{e}"), chain_src);
    }
    // Eligibility, in the order the pass can see it.
    let mut epi_ok: BTreeMap<String, bool> = BTreeMap::new();
    for m in &epis {
        let ok = match &m.prev {
            None => {
                let e: usize = m.name.trim_start_matches("epi.").parse().unwrap();
                m.good && !emitted_is_output[e] && emitted_readers[e] == 1
            }
            Some(p) => epi_ok[p] && m.good && !m.shared_src,
        };
        epi_ok.insert(m.name.clone(), ok);
    }
    let mut expect_fused = BTreeSet::new();
    let mut expect_kept = BTreeSet::new();
    let (mut n_pro, mut n_epi, mut chained, mut freed) = (0, 0, 0, 0);
    for (name, ok) in &epi_ok {
        if *ok {
            expect_fused.insert(name.clone());
            n_epi += 1;
        } else {
            expect_kept.insert(name.clone());
        }
    }
    for p in &pros {
        let ok = p.good && !p.shared && p.epi_readers.iter().all(|e| epi_ok[e]);
        let inner_ok = p.inner.as_ref().map(|i| ok && i.good && !i.shared);
        chained += inner_ok.unwrap_or(false) as usize;
        freed += (ok && !p.epi_readers.is_empty()) as usize;
        for (name, fused) in [(Some(&p.name), Some(ok)), (p.inner.as_ref().map(|i| &i.name), inner_ok)] {
            let (Some(name), Some(fused)) = (name, fused) else { continue };
            if fused {
                expect_fused.insert(name.clone());
                n_pro += 1;
            } else {
                expect_kept.insert(name.clone());
            }
        }
    }
    let (inputs, params) = random_data(&g, spec.b, spec.t, spec.seed ^ 0x5eed, 2);
    let step_inputs = (0..n_pool).map(|i| format!("x{i}")).collect();
    Case {
        g,
        inputs,
        params,
        expect_fused,
        expect_kept,
        expect_prologue: n_pro,
        expect_epilogue: n_epi,
        step_inputs,
        expect_chained: chained,
        expect_freed: freed,
    }
}

/// A scalar loss over every float graph output: Σ cᵢ·mean(outᵢ).
fn with_loss(g: &Graph, seed: u64) -> Graph {
    let mut g = g.clone();
    let mut r = Rng::new(seed);
    let outs: Vec<(String, Value)> = g.outputs.clone();
    let mut means = Vec::new();
    for (name, v) in outs {
        means.push(g.add1(Op::Mean, &[v], &format!("loss.{name}")).unwrap());
    }
    let terms: Vec<String> = (0..means.len()).map(|i| format!("{:?} * x{i}", (r.uniform_range(0.5, 1.5) * 100.0).round() / 100.0)).collect();
    let loss = g.add1(Op::Map { expr: pe(&terms.join(" + ")) }, &means, "loss").unwrap();
    g.set_output("loss", loss);
    g
}

#[derive(Default, Debug)]
struct Stats {
    cases: usize,
    prologue: usize,
    epilogue: usize,
    kept: usize,
    chained: usize,
    freed: usize,
    /// Fused prologue maps that added at least two model inputs / params at once.
    multi_inputs: usize,
    multi_params: usize,
    grad_cases: usize,
    grads: usize,
    grads_bit_exact: usize,
}

fn check(spec: &Spec, stats: &mut Stats) -> Result<(), String> {
    let case = build_case(spec);
    let g = &case.g;
    let (f, rep) = fuse_scans(g).map_err(|e| format!("fuse: {e}\n{}", text(g)))?;
    let ctx = || format!("{rep}\n--- unfused:\n{}\n--- fused:\n{}", text(g), text(&f));
    if rep.prologue_count() != case.expect_prologue || rep.epilogue_count() != case.expect_epilogue {
        return Err(format!(
            "expected {} prologue / {} epilogue fusions, got {} / {}\n{}",
            case.expect_prologue,
            case.expect_epilogue,
            rep.prologue_count(),
            rep.epilogue_count(),
            ctx()
        ));
    }
    let (before, after) = (map_names(g), map_names(&f));
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    if gone != case.expect_fused || !case.expect_kept.is_subset(&after) {
        return Err(format!("fused maps {gone:?}, expected {:?} (kept {:?})\n{}", case.expect_fused, case.expect_kept, ctx()));
    }
    if node_names(&f) != node_names(g).difference(&gone).cloned().collect() {
        return Err(format!("other nodes changed\n{}", ctx()));
    }
    let t = text(&f);
    let back = sparkc_ir::text::parse(&t).map_err(|e| format!("parse: {e}\n{}", ctx()))?;
    if text(&back) != t {
        return Err(format!("round trip changed the graph\n{}", ctx()));
    }
    let want = run(g, &case.inputs, &case.params);
    let got = run(&f, &case.inputs, &case.params);
    let exact = compare(&want, &got, 1e-6, 1e-5).map_err(|e| format!("{e}\n{}", ctx()))?;
    if exact != want.len() {
        return Err(format!("only {exact} of {} outputs bit-identical\n{}", want.len(), ctx()));
    }
    stats.cases += 1;
    stats.prologue += rep.prologue_count();
    stats.epilogue += rep.epilogue_count();
    stats.kept += case.expect_kept.len();
    stats.chained += case.expect_chained;
    for p in rep.scans.iter().flat_map(|s| &s.prologue) {
        stats.multi_inputs += (p.new_inputs.len() >= 2) as usize;
        stats.multi_params += (p.new_params.len() >= 2) as usize;
    }
    stats.freed += case.expect_freed;

    if spec.grads {
        let gl = with_loss(g, spec.seed);
        let (fl, rl) = fuse_scans(&gl).map_err(|e| format!("fuse with loss: {e}"))?;
        if rl.maps_removed() != rep.maps_removed() {
            return Err(format!("the loss changed what fuses: {rl}\n{}", ctx()));
        }
        let wrt: Vec<&str> = case.step_inputs.iter().map(|s| s.as_str()).collect();
        let dg = differentiate(&gl, "loss", &wrt).map_err(|e| format!("autodiff: {e}"))?;
        let df = differentiate(&fl, "loss", &wrt).map_err(|e| format!("autodiff fused: {e}"))?;
        let want = run(&dg, &case.inputs, &case.params);
        let got = run(&df, &case.inputs, &case.params);
        let exact = compare(&want, &got, 0.0, 1e-5).map_err(|e| format!("gradients: {e}\n{}", ctx()))?;
        stats.grad_cases += 1;
        stats.grads_bit_exact += exact - (want.len() - want.keys().filter(|k| k.starts_with(GRAD_PREFIX)).count());
        stats.grads += want.keys().filter(|k| k.starts_with(GRAD_PREFIX)).count();
    }
    Ok(())
}

#[test]
fn random_graphs_fuse_and_match_unfused() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let config = ProptestConfig {
        cases: 96 * env("SPARKC_FUSION_SCALE").unwrap_or(1) as u32,
        rng_seed: RngSeed::Fixed(env("SPARKC_FUSION_SEED").unwrap_or(0xF05E)),
        failure_persistence: None,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    };
    let stats = RefCell::new(Stats::default());
    let mut runner = TestRunner::new(config);
    let result = runner.run(&spec_strategy(), |spec| check(&spec, &mut stats.borrow_mut()).map_err(TestCaseError::fail));
    if let Err(e) = result {
        panic!("{e}");
    }
    let st = stats.into_inner();
    eprintln!("{st:?}");
    // Not vacuous: plenty of both fusions, of maps left alone, and of gradient checks.
    assert!(st.prologue >= st.cases / 2 && st.epilogue >= st.cases / 4 && st.kept >= st.cases / 4, "{st:?}");
    assert!(st.grad_cases >= st.cases / 4, "{st:?}");
    assert!(st.chained > 0 && st.freed > 0, "chains and epilogue-freed prologues are exercised: {st:?}");
    assert!(st.multi_inputs > 0 && st.multi_params > 0, "{st:?}");
}
