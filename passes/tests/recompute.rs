//! Tests of the rewrites that save memory or work without changing results: activation
//! recompute (`sparkc_passes::recompute`), the execution order that runs recomputed nodes late
//! (`Graph::execution_order`), and pruning a graph to the outputs generation uses
//! (`sparkc_passes::prune`).
//!
//! A copy evaluates the same f32 operations on the same operands as its original, so on the CPU
//! interpreter the recomputed training graph must give bit-identical losses and gradients.

mod common;

use common::{bits_equal, run};
use sparkc_frontend::init::init_params;
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::NeuronSparkConfig;
use sparkc_ir::rng::Rng;
use sparkc_ir::types::DimBindings;
use sparkc_ir::{parse_expr, Graph, NodeIndex, Op, Tensor, ValueType};
use sparkc_passes::autodiff::{differentiate, GRAD_PREFIX};
use sparkc_passes::recompute::{layer_of, peak_live_bytes, recompute_layers, recompute_layers_where, RECOMPUTE_SUFFIX};
use sparkc_passes::scan_fusion::fuse_scans;
use std::collections::{BTreeMap, HashMap};

/// The training graph the CUDA path runs: build, fuse scans, differentiate.
fn training_graph(cfg: &NeuronSparkConfig) -> Graph {
    let g = build_graph(cfg, &GraphOptions { with_loss: true, ..GraphOptions::default() }).unwrap();
    let (fused, _) = fuse_scans(&g).unwrap();
    differentiate(&fused, "total_loss", &[]).unwrap()
}

/// Random token ids and a mask of ones for B×T.
fn random_inputs(g: &Graph, b: usize, t: usize, seed: u64, vocab: u64) -> BTreeMap<String, Tensor> {
    common::random_inputs(g, b, t, &mut Rng::new(seed), vocab, 0.5)
}

fn recompute_count(g: &Graph) -> usize {
    g.g.node_weights().filter(|n| n.recompute).count()
}

/// `order` holds every node once and runs each after its operands.
fn assert_topological(g: &Graph, order: &[NodeIndex]) {
    assert_eq!(order.len(), g.len());
    let pos: HashMap<NodeIndex, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    assert_eq!(pos.len(), g.len(), "a node appears twice");
    for &n in order {
        for v in g.operands(n) {
            assert!(pos[&v.node] < pos[&n], "`{}` runs before its operand `{}`", g.node(n).name, g.node(v.node).name);
        }
    }
}

fn dims(b: u64, t: u64) -> DimBindings {
    [("B".to_string(), b), ("T".to_string(), t)].into_iter().collect()
}

#[test]
fn tiny_neuronspark_recompute_gives_bit_identical_loss_and_gradients() {
    let cfg = NeuronSparkConfig::tiny();
    let train = training_graph(&cfg);
    let (rc, rep) = recompute_layers(&train).unwrap();
    eprintln!("{} nodes -> {} nodes\n{rep}", train.len(), rc.len());
    assert_eq!(rep.total(), rc.len() - train.len());
    assert_eq!(rep.total(), recompute_count(&rc));
    assert_eq!(rep.copied.keys().copied().collect::<Vec<_>>(), (0..cfg.num_layers).collect::<Vec<_>>());
    // Only what leaves each layer (the residual stream and the scalar ponder cost) and what lies
    // outside the layers (embedding, decode, loss) is read by the backward directly.
    for v in &rep.live {
        let layer_output = v.ends_with(".ffn_out_proj.residual") || v.ends_with(".ponder_cost");
        assert!(layer_of(v).is_none() || layer_output, "`{v}` stays live\n{rep}");
    }
    // Every copy is named after, and sits in the same layer as, its original.
    for n in rc.g.node_indices().filter(|&n| rc.node(n).recompute) {
        let name = &rc.node(n).name;
        let orig = name.strip_suffix(RECOMPUTE_SUFFIX).unwrap_or_else(|| panic!("`{name}`"));
        assert!(train.g.node_weights().any(|w| w.name == orig), "`{name}` copies no node");
        assert!(layer_of(name).is_some());
    }
    // Graph outputs read the originals.
    assert_eq!(rc.outputs, train.outputs);

    let params = init_params(&cfg, 5);
    let inputs = random_inputs(&train, 2, 6, 17, cfg.vocab_size as u64);
    let want = run(&train, &inputs, &params);
    let got = run(&rc, &inputs, &params);
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    let grads = want.keys().filter(|k| k.starts_with(GRAD_PREFIX)).count();
    assert_eq!(grads, train.params().len());
    for (name, w) in &want {
        assert!(bits_equal(w, &got[name]), "`{name}` differs after recompute");
    }
    let loss = want["total_loss"].to_f32_vec()[0];
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    eprintln!("total_loss {loss} and {grads} gradients bit-identical");
}

/// Each `scan_adjoint` still pairs (as the CUDA backend pairs them: same neuron, emit, scope and
/// scan operands, the last such scan winning) with a forward scan, now a recompute copy that
/// runs late: right before the first node that needs it.
#[test]
fn scan_adjoints_pair_with_recomputed_scans_that_run_just_before_them() {
    let cfg = NeuronSparkConfig::tiny();
    let train = training_graph(&cfg);
    let (rc, _) = recompute_layers(&train).unwrap();
    let order = rc.execution_order().unwrap();
    let pos: HashMap<NodeIndex, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut scans = HashMap::new();
    for n in rc.g.node_indices().filter(|&n| matches!(rc.node(n).op, Op::Scan { .. })) {
        scans.insert(rc.scan_pair_key(n).unwrap(), n);
    }
    let mut adjoints = 0;
    for a in rc.g.node_indices().filter(|&n| matches!(rc.node(n).op, Op::ScanAdjoint { .. })) {
        adjoints += 1;
        let name = &rc.node(a).name;
        let s = *scans.get(&rc.scan_pair_key(a).unwrap()).unwrap_or_else(|| panic!("`{name}` has no forward scan"));
        if layer_of(name).is_none() {
            assert!(!rc.node(s).recompute, "`{name}` lies outside the layers");
            continue;
        }
        assert!(rc.node(s).recompute, "`{name}` pairs with the original scan");
        assert!(pos[&s] < pos[&a]);
        // Between the copy and the first node that needs it (a reader of its results, or the
        // adjoint) run only other copies.
        let first_need = order.iter().position(|&n| n == a || rc.operands(n).iter().any(|v| v.node == s)).unwrap();
        assert!(order[pos[&s] + 1..first_need].iter().all(|&n| rc.node(n).recompute), "`{name}`");
    }
    assert_eq!(adjoints, 5 * cfg.num_layers + 1, "two input PLIFs, the selective PLIF and two FFN PLIFs per layer; the output neuron");
}

#[test]
fn execution_order_is_topological_and_equals_topo_order_without_recompute_nodes() {
    let cfg = NeuronSparkConfig::tiny();
    let train = training_graph(&cfg);
    assert_eq!(recompute_count(&train), 0);
    assert_eq!(train.execution_order().unwrap(), train.topo_order().unwrap());
    let fwd = build_graph(&cfg, &GraphOptions::default()).unwrap();
    assert_eq!(fwd.execution_order().unwrap(), fwd.topo_order().unwrap());

    let (rc, _) = recompute_layers(&train).unwrap();
    let order = rc.execution_order().unwrap();
    assert_topological(&rc, &order);
    // The plain nodes keep their relative topological order; each copy runs right before a run
    // of copies that ends at its first reader.
    let plain: Vec<NodeIndex> = order.iter().copied().filter(|&n| !rc.node(n).recompute).collect();
    assert_topological_subset(&rc, &plain);
    for (i, &n) in order.iter().enumerate().filter(|(_, &n)| rc.node(n).recompute) {
        let next_plain = order[i + 1..].iter().find(|&&m| !rc.node(m).recompute).copied();
        let first_reader = order.iter().copied().find(|&m| rc.operands(m).iter().any(|v| v.node == n));
        if let (Some(p), Some(r)) = (next_plain, first_reader) {
            let reader_pos = order.iter().position(|&m| m == r).unwrap();
            let plain_pos = order.iter().position(|&m| m == p).unwrap();
            assert!(reader_pos <= plain_pos, "`{}` runs before plain node `{}`, earlier than needed", rc.node(n).name, rc.node(p).name);
        }
    }
    // No forward node runs after the loss seed in the plain order but before in the new one:
    // all copies run after the seed.
    let seed = order.iter().position(|&n| rc.node(n).name == "total_loss.seed").unwrap();
    assert!(order.iter().position(|&n| rc.node(n).recompute).unwrap() > seed);
}

fn assert_topological_subset(g: &Graph, plain: &[NodeIndex]) {
    let pos: HashMap<NodeIndex, usize> = plain.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    for &n in plain {
        for v in g.operands(n) {
            if let Some(&p) = pos.get(&v.node) {
                assert!(p < pos[&n]);
            }
        }
    }
}

#[test]
fn recompute_lowers_peak_live_bytes_of_a_deep_long_sequence_model() {
    let cfg = NeuronSparkConfig { num_layers: 8, ..NeuronSparkConfig::tiny() };
    let train = training_graph(&cfg);
    let (rc, rep) = recompute_layers(&train).unwrap();
    let d = dims(2, 1024);
    let plain = peak_live_bytes(&train, &d).unwrap();
    let recomputed = peak_live_bytes(&rc, &d).unwrap();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "{} layers, B=2, T=1024: peak live bytes {plain} ({:.1} MiB) plain, {recomputed} ({:.1} MiB) with recompute: {:.3}x; {} copies, {} values live",
        cfg.num_layers,
        mib(plain),
        mib(recomputed),
        recomputed as f64 / plain as f64,
        rep.total(),
        rep.live.len()
    );
    assert!((recomputed as f64) < 0.6 * plain as f64, "{recomputed} vs {plain}");
    // Without the late order the copies would all run at the start of the backward.
    let mut early = rc.clone();
    for w in early.g.node_weights_mut() {
        w.recompute = false;
    }
    let unscheduled = peak_live_bytes(&early, &d).unwrap();
    eprintln!("the same graph in topo_order: {unscheduled} ({:.1} MiB)", mib(unscheduled));
    assert!(unscheduled > recomputed);
}

/// Layers left out of recompute keep their activations: no copies there, the same results,
/// and a peak between full recompute and none.
#[test]
fn layers_left_out_of_recompute_trade_memory_for_work() {
    let cfg = NeuronSparkConfig { num_layers: 4, ..NeuronSparkConfig::tiny() };
    let train = training_graph(&cfg);
    let (all, _) = recompute_layers(&train).unwrap();
    let (part, rep) = recompute_layers_where(&train, &|l| l < 2).unwrap();
    assert_eq!(rep.copied.keys().copied().collect::<Vec<_>>(), [0, 1], "{rep}");
    assert!(rep.live.iter().any(|v| layer_of(v) == Some(3)), "{rep}");
    let d = dims(2, 256);
    let (plain, full, half) = (peak_live_bytes(&train, &d).unwrap(), peak_live_bytes(&all, &d).unwrap(), peak_live_bytes(&part, &d).unwrap());
    eprintln!("peak live bytes: none {plain}, half {half}, all {full}");
    assert!(full < half && half < plain, "{full} < {half} < {plain}");
    let params = init_params(&cfg, 3);
    let inputs = random_inputs(&train, 2, 5, 9, cfg.vocab_size as u64);
    let (want, got) = (run(&train, &inputs, &params), run(&part, &inputs, &params));
    for (name, w) in &want {
        assert!(bits_equal(w, &got[name]), "`{name}` differs with layers 2 and 3 kept");
    }
}

#[test]
fn peak_live_bytes_of_a_chain() {
    // x → a → b → c: at most two f32[B,4] values are live at once (an operand and its result).
    let mut g = Graph::new("chain");
    let x = g.input("x", ValueType::f32(["B", "4"]));
    let m = |s: &str| Op::Map { expr: parse_expr(s).unwrap() };
    let a = g.add1(m("x0 * 2.0"), &[x], "a").unwrap();
    let b = g.add1(m("x0 + 1.0"), &[a], "b").unwrap();
    let c = g.add1(m("x0 * x0"), &[b], "c").unwrap();
    g.set_output("c", c);
    assert_eq!(peak_live_bytes(&g, &dims(3, 1)).unwrap(), 2 * 3 * 4 * 4);
    let err = peak_live_bytes(&g, &DimBindings::new()).unwrap_err();
    assert!(err.to_string().contains("dimension B"), "{err}");
}

#[test]
fn recompute_twice_and_without_layers_changes_nothing() {
    let cfg = NeuronSparkConfig::tiny();
    let train = training_graph(&cfg);
    let (once, rep1) = recompute_layers(&train).unwrap();
    let (twice, rep2) = recompute_layers(&once).unwrap();
    assert!(rep1.total() > 0);
    assert_eq!(rep2.total(), 0, "{rep2}");
    assert_eq!(twice.len(), once.len());
    assert_eq!(rep2.live, rep1.live);
    assert_eq!(sparkc_ir::text::print(&twice).unwrap(), sparkc_ir::text::print(&once).unwrap());

    // A forward graph has no backward to rewire.
    let fwd = build_graph(&cfg, &GraphOptions { with_loss: true, ..GraphOptions::default() }).unwrap();
    let (same, rep) = recompute_layers(&fwd).unwrap();
    assert_eq!((rep.total(), same.len(), rep.live.len()), (0, fwd.len(), 0));

    // A small trained graph without `layers.<i>.` names.
    let mut g = Graph::new("no_layers");
    let x = g.input("x", ValueType::f32(["B", "4"]));
    let w = g.param("w", ValueType::f32(["4"])).unwrap();
    let m = |s: &str| Op::Map { expr: parse_expr(s).unwrap() };
    let h = g.add1(m("tanh(x0 * x1)"), &[x, w], "h").unwrap();
    let y = g.add1(m("x0 * x0"), &[h], "y").unwrap();
    let loss = g.add1(Op::Mean, &[y], "loss").unwrap();
    g.set_output("loss", loss);
    let dg = differentiate(&g, "loss", &[]).unwrap();
    let (same, rep) = recompute_layers(&dg).unwrap();
    assert_eq!((rep.total(), same.len()), (0, dg.len()));
    assert_eq!(rep.live, ["h", "y"]);
    assert_eq!(same.execution_order().unwrap(), dg.topo_order().unwrap());
}

/// Generation's graph keeps the logits and the carried state, drops the ponder cost and the
/// nodes only it needed, and computes the same logits and state.
#[test]
fn generation_graph_keeps_logits_and_state_and_their_values() {
    let cfg = NeuronSparkConfig::tiny();
    let g = build_graph(&cfg, &GraphOptions::default()).unwrap();
    let pruned = sparkc_passes::prune::for_generation(&g);
    assert!(pruned.output("ponder_cost").is_none() && pruned.output("logits").is_some());
    let state = |g: &Graph| g.outputs.iter().filter(|(n, _)| n.starts_with("state.")).count();
    assert_eq!(state(&pruned), state(&g));
    let means = |g: &Graph| g.g.node_indices().filter(|&n| matches!(g.node(n).op, Op::Mean)).count();
    assert!(means(&g) > 0 && means(&pruned) == 0, "the ponder-cost means are gone");
    assert_eq!(pruned.inputs().len(), g.inputs().len(), "the interface is unchanged");
    sparkc_ir::verify::verify(&pruned).unwrap();
    let params = init_params(&cfg, 3);
    let inputs = random_inputs(&g, 2, 5, 11, cfg.vocab_size as u64);
    let (full, small) = (run(&g, &inputs, &params), run(&pruned, &inputs, &params));
    for (name, t) in &small {
        assert!(bits_equal(t, &full[name]), "`{name}` changed");
    }
    // Pruning to nothing leaves only sources.
    let empty = sparkc_passes::prune::keep_outputs(&g, &|_| false);
    assert!(empty.g.node_indices().all(|n| empty.node(n).op.is_source()));
}
