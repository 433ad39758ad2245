//! NIR reading, writing, import and export: legacy files written by nir 0.1 / 0.2, files
//! written by the reference `nir` package and by a framework (Spyx), round trips, simulation
//! on the CPU backend against reference dynamics, bad input, and a fuzzed reader.
//!
//! The tests marked `python` build a venv under `target/nir-venv` (reused) with `nir` and
//! `spyx` from PyPI; they print why and pass when python3, pip or the network is missing.

use proptest::prelude::*;
use sparkc_backend_cpu::CpuProgram;
use sparkc_frontend::nir::{
    self, export_graph, import_graph, Array, ArrayData, Convention, Diagnostic, Discretisation, ExportOptions, ImportOptions, Imported, MetaValue,
    Mode, NirError, NirFile, NirGraph, NirNode, NodeKind, Padding, ReadOptions, Scheme, Severity,
};
use sparkc_ir::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// helpers

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nir").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sparkc-nir-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn strict() -> ReadOptions {
    ReadOptions { mode: Mode::Strict }
}

fn lenient() -> ReadOptions {
    ReadOptions { mode: Mode::Lenient }
}

fn f32a(v: &[f32]) -> Array {
    Array::vec_f32(v.to_vec())
}

fn f64a(v: &[f64]) -> Array {
    Array::f64(vec![v.len()], v.to_vec()).unwrap()
}

fn mat(rows: usize, cols: usize, seed: u64) -> Array {
    let mut s = seed;
    let v = (0..rows * cols)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Array::f32(vec![rows, cols], v).unwrap()
}

fn node(kind: NodeKind) -> NirNode {
    NirNode::new(kind)
}

fn graph(nodes: Vec<(&str, NodeKind)>, edges: &[(&str, &str)]) -> NirGraph {
    NirGraph {
        nodes: nodes.into_iter().map(|(k, n)| (k.to_string(), node(n))).collect(),
        edges: edges.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        metadata: Default::default(),
    }
}

fn file(g: NirGraph) -> NirFile {
    NirFile { version: nir::NIR_VERSION.into(), graph: g }
}

/// Write, read back strictly, and import.
fn import_file(f: &NirFile, disc: Discretisation) -> Result<Imported, NirError> {
    let bytes = nir::write_bytes(f, true)?;
    let r = nir::read_bytes(&bytes, "test", strict())?;
    import_graph(&r.file, &r.types, &ImportOptions { disc, ..ImportOptions::default() })
}

/// Run an imported network on `x` ([T][C] for one batch row) from zero state; the named
/// output as [T][N].
fn run(imp: &Imported, inputs: &[(&str, &[Vec<f32>])], output: &str) -> Vec<Vec<f32>> {
    let prog = CpuProgram::compile(&imp.graph).expect("compiles");
    let mut feed = BTreeMap::new();
    let t = inputs[0].1.len();
    for (name, x) in inputs {
        let c = x[0].len();
        feed.insert(name.to_string(), Tensor::f32(vec![1, t, 1, c], x.iter().flatten().copied().collect()));
    }
    for (name, row) in sparkc_runtime::session::carried_values(&imp.graph) {
        let mut shape = vec![1];
        shape.extend(row);
        feed.insert(name, Tensor::zeros(shape));
    }
    let out = prog.run(&feed, &imp.params).expect("runs");
    let y = &out[output];
    let n = *y.shape.last().unwrap();
    y.to_f32_vec().chunks(n).map(|c| c.to_vec()).collect()
}

/// Deterministic input currents [T][C].
fn currents(t: usize, c: usize, seed: u64, scale: f32) -> Vec<Vec<f32>> {
    let m = mat(t, c, seed);
    let v = m.to_f32_vec();
    v.chunks(c).map(|r| r.iter().map(|x| (x + 0.6) * scale).collect()).collect()
}

fn affine_ref(w: &Array, b: Option<&Array>, x: &[f64]) -> Vec<f64> {
    let (o, i) = (w.shape[0], w.shape[1]);
    let wv = w.to_f64_vec();
    let bv = b.map(|b| b.to_f64_vec()).unwrap_or(vec![0.0; o]);
    (0..o).map(|r| bv[r] + (0..i).map(|k| wv[r * i + k] * x[k]).sum::<f64>()).collect()
}

// ---------------------------------------------------------------------------------------------
// legacy files written by nir 0.1.1 / 0.2.0

#[test]
fn legacy_norse_file_reads_strictly_with_zero_v_reset() {
    let r = nir::read_file(&data("lif_norse.nir"), strict()).unwrap();
    assert_eq!(r.file.version, "0.1.1");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let g = &r.file.graph;
    assert_eq!(g.nodes.len(), 4);
    assert_eq!(g.edges, vec![("input".into(), "0".into()), ("0".into(), "1".into()), ("1".into(), "output".into())]);
    let NodeKind::LIF { tau, v_threshold, v_reset, .. } = &g.nodes["1"].kind else { panic!("node 1 is a LIF") };
    assert_eq!(tau.data, ArrayData::F32(vec![0.0025]));
    assert_eq!(v_threshold.data, ArrayData::F32(vec![0.1]));
    assert_eq!(v_reset.data, ArrayData::F32(vec![0.0]), "missing v_reset reads as zeros");
    assert_eq!(r.types.nodes["1"].input, Some(vec![1]));
}

#[test]
fn legacy_rockpool_file_is_refused_strictly_and_read_leniently() {
    let err = nir::read_file(&data("lif_rockpool.nir"), strict()).unwrap_err().to_string();
    assert!(err.contains("output") && err.contains("[1, 1, 1]") && err.contains("lenient"), "{err}");
    let r = nir::read_file(&data("lif_rockpool.nir"), lenient()).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("type mismatch")), "{:?}", r.warnings);
    // Lenient import accepts the [1] → [1,1,1] edge: both hold one element.
    let imp = import_graph(&r.file, &r.types, &ImportOptions { mode: Mode::Lenient, ..ImportOptions::default() }).unwrap();
    assert_eq!(imp.inputs, vec![("input".to_string(), 1)]);
    assert_eq!(imp.outputs, vec![("output".to_string(), 1)]);
}

#[test]
fn legacy_braille_file_reads_and_its_recurrence_is_named() {
    let r = nir::read_file(&data("braille_noDelay_bias_zero.nir"), strict()).unwrap();
    let g = &r.file.graph;
    assert!(g.nodes.contains_key("lif1.lif") && g.nodes.contains_key("lif1.w_rec"));
    let NodeKind::CubaLIF { tau_mem, w_in, .. } = &g.nodes["lif1.lif"].kind else { panic!("CubaLIF") };
    assert_eq!(tau_mem.dtype_name(), "float64");
    assert_eq!(w_in.shape, vec![38]);
    let err = import_graph(&r.file, &r.types, &ImportOptions::default()).unwrap_err().to_string();
    assert!(err.contains("lif1.lif") && err.contains("lif1.w_rec") && err.contains("recurrent"), "{err}");
}

#[test]
fn legacy_sinabs_cnn_types_are_inferred_and_convolutions_named() {
    let r = nir::read_file(&data("cnn_sinabs.nir"), strict()).unwrap();
    let t = &r.types.nodes;
    assert_eq!(t["0"].output, Some(vec![16, 16, 16]));
    assert_eq!(t["4"].output, Some(vec![16, 8, 8]), "SumPool2d output inferred from its input");
    assert_eq!(t["8"].output, Some(vec![128]), "Flatten");
    let NodeKind::Conv2d { padding, stride, .. } = &r.file.graph.nodes["0"].kind else { panic!("Conv2d") };
    assert_eq!((padding, stride), (&Padding::Explicit(vec![1, 1]), &[2, 2]));
    let err = import_graph(&r.file, &r.types, &ImportOptions::default()).unwrap_err();
    let NirError::Import(diags) = err else { panic!("an import error") };
    let named: Vec<&str> = diags.iter().map(|d| d.node.as_str()).collect();
    for n in ["0", "2", "4", "5", "7"] {
        assert!(named.contains(&n), "{named:?}");
    }
    assert!(diags.iter().any(|d| d.kind == "Conv2d" && d.message.contains("conv")), "{diags:?}");
}

#[test]
fn legacy_norse_network_runs_as_nir_euler_lif() {
    let r = nir::read_file(&data("lif_norse.nir"), strict()).unwrap();
    let disc = Discretisation::new(Convention::Nir, Some(1e-4), Some(Scheme::Euler)).unwrap();
    let imp = import_graph(&r.file, &r.types, &ImportOptions { disc, ..ImportOptions::default() }).unwrap();
    let x = currents(200, 1, 7, 2.0);
    let y = run(&imp, &[("input", &x)], "output");
    // τ v̇ = −v + R·x with τ = 0.0025, R = 1, θ = 0.1, reset to 0, Euler at dt = 1e-4.
    let (a, mut v) = (1e-4 / 0.0025, 0.0f64);
    let mut spikes = 0;
    for (t, xt) in x.iter().enumerate() {
        v += a * (xt[0] as f64 - v);
        let z = v > 0.1;
        if z {
            v = 0.0;
            spikes += 1;
        }
        assert_eq!(y[t][0], z as u8 as f32, "step {t}");
    }
    assert!(spikes > 3, "the test input makes it fire ({spikes})");
}

// ---------------------------------------------------------------------------------------------
// writing and reading back

/// Every primitive, a nested graph, metadata, f32 and f64 parameters.
fn all_primitives() -> NirFile {
    let p4 = |v: f32| f32a(&[v; 4]);
    let conv1 = NodeKind::Conv1d {
        input_shape: Some(8),
        weight: Array::f32(vec![2, 1, 3], vec![0.5; 6]).unwrap(),
        stride: 1,
        padding: Padding::Same,
        dilation: 1,
        groups: 1,
        bias: f32a(&[0.0, 0.1]),
    };
    let conv2 = NodeKind::Conv2d {
        input_shape: Some([4, 4]),
        weight: Array::f32(vec![1, 1, 3, 3], vec![0.1; 9]).unwrap(),
        stride: [1, 1],
        padding: Padding::Explicit(vec![1, 1]),
        dilation: [1, 1],
        groups: 1,
        bias: f32a(&[0.0]),
    };
    let sub = graph(
        vec![
            ("in", NodeKind::Input { shape: vec![4] }),
            ("lif", NodeKind::LIF { tau: p4(0.01), r: p4(1.0), v_leak: p4(0.0), v_threshold: p4(1.0), v_reset: p4(0.0) }),
            ("out", NodeKind::Output { shape: vec![4] }),
        ],
        &[("in", "lif"), ("lif", "out")],
    );
    let mut sub_node = node(NodeKind::Graph(sub));
    sub_node.metadata.insert("note".into(), MetaValue::Str("a nested graph".into()));
    let mut g = graph(
        vec![
            ("input", NodeKind::Input { shape: vec![3] }),
            ("affine", NodeKind::Affine { weight: mat(4, 3, 1), bias: f32a(&[0.1, 0.2, 0.3, 0.4]) }),
            ("linear", NodeKind::Linear { weight: mat(4, 4, 2) }),
            ("scale", NodeKind::Scale { scale: f64a(&[1.0, 2.0, 3.0, 4.0]) }),
            ("thr", NodeKind::Threshold { threshold: p4(0.5) }),
            ("delay", NodeKind::Delay { delay: p4(0.001) }),
            ("i", NodeKind::I { r: p4(1.0) }),
            ("if", NodeKind::IF { r: p4(1.0), v_threshold: p4(1.0), v_reset: p4(0.0) }),
            ("li", NodeKind::LI { tau: f64a(&[0.01; 4]), r: p4(1.0), v_leak: p4(0.0) }),
            ("cubali", NodeKind::CubaLI { tau_syn: p4(0.005), tau_mem: p4(0.01), r: p4(1.0), v_leak: p4(0.0), w_in: p4(1.0) }),
            (
                "cubalif",
                NodeKind::CubaLIF { tau_syn: p4(0.005), tau_mem: p4(0.01), r: p4(1.0), v_leak: p4(0.0), v_threshold: p4(1.0), v_reset: p4(0.0), w_in: p4(2.0) },
            ),
            ("input2", NodeKind::Input { shape: vec![1, 8] }),
            ("conv1", conv1),
            ("flat1", NodeKind::Flatten { input_type: None, start_dim: 0, end_dim: -1 }),
            ("out2", NodeKind::Output { shape: vec![16] }),
            ("input3", NodeKind::Input { shape: vec![1, 4, 4] }),
            ("conv2", conv2),
            ("sum", NodeKind::SumPool2d { kernel_size: [2, 2], stride: [2, 2], padding: [0, 0] }),
            ("avg", NodeKind::AvgPool2d { kernel_size: [2, 2], stride: [1, 1], padding: [0, 0] }),
            ("flat3", NodeKind::Flatten { input_type: Some(vec![1, 1, 1]), start_dim: 0, end_dim: -1 }),
            ("out3", NodeKind::Output { shape: vec![1] }),
            ("output", NodeKind::Output { shape: vec![4] }),
        ],
        &[
            ("input", "affine"),
            ("affine", "linear"),
            ("linear", "scale"),
            ("scale", "thr"),
            ("thr", "delay"),
            ("delay", "i"),
            ("i", "if"),
            ("if", "li"),
            ("li", "cubali"),
            ("cubali", "cubalif"),
            ("cubalif", "sub"),
            ("sub", "output"),
            ("input2", "conv1"),
            ("conv1", "flat1"),
            ("flat1", "out2"),
            ("input3", "conv2"),
            ("conv2", "sum"),
            ("sum", "avg"),
            ("avg", "flat3"),
            ("flat3", "out3"),
        ],
    );
    g.nodes.insert("sub".into(), sub_node);
    g.metadata.insert("dt".into(), MetaValue::Array(Array::scalar_f64(1e-3)));
    let mut inner = nir::Metadata::new();
    inner.insert("ints".into(), MetaValue::Array(Array::vec_i64(vec![1, 2, 3])));
    inner.insert("name".into(), MetaValue::Str("ünïcode ✓".into()));
    g.metadata.insert("x-sparkc".into(), MetaValue::Group(inner));
    file(g)
}

#[test]
fn all_primitives_round_trip_compressed_and_plain() {
    let f = all_primitives();
    let mut types: Vec<&str> = f.graph.nodes.values().map(|n| n.kind.type_name()).collect();
    types.push("LIF"); // inside the nested graph
    types.sort();
    types.dedup();
    let mut all = nir::model::TYPE_NAMES.to_vec();
    all.sort();
    assert_eq!(types, all, "every node type is exercised");
    for compress in [true, false] {
        let bytes = nir::write_bytes(&f, compress).unwrap();
        let r = nir::read_bytes(&bytes, "roundtrip", strict()).unwrap();
        assert_eq!(r.file, f, "compress = {compress}");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.types.nodes["avg"].output, Some(vec![1, 1, 1]));
        assert_eq!(r.types.nodes["conv1"].output, Some(vec![2, 8]));
        assert_eq!(r.types.nodes["sub"].output, Some(vec![4]));
    }
}

#[test]
fn writing_is_deterministic_and_compression_shrinks() {
    let f = all_primitives();
    let a = nir::write_bytes(&f, true).unwrap();
    let b = nir::write_bytes(&f, true).unwrap();
    assert_eq!(a, b);
    let mut big = f.clone();
    big.graph.nodes.insert("big".into(), node(NodeKind::Linear { weight: Array::f32(vec![64, 64], vec![0.25; 4096]).unwrap() }));
    big.graph.edges.push(("input".into(), "big".into()));
    big.graph.nodes.insert("input".into(), node(NodeKind::Input { shape: vec![64] }));
    big.graph.nodes.insert("affine".into(), node(NodeKind::Affine { weight: mat(4, 64, 1), bias: f32a(&[0.0; 4]) }));
    let (z, p) = (nir::write_bytes(&big, true).unwrap(), nir::write_bytes(&big, false).unwrap());
    assert!(z.len() + 8000 < p.len(), "gzip {} vs plain {}", z.len(), p.len());
    assert_eq!(nir::read_bytes(&z, "gzip", strict()).unwrap().file, big);
}

// ---------------------------------------------------------------------------------------------
// import and simulation against NIR's dynamics

/// NIR's neuron dynamics, written out per type in f64 (independent of the IR models).
#[derive(Clone)]
enum RefNeuron {
    I { r: Vec<f64> },
    IF { r: Vec<f64>, th: Vec<f64>, reset: Vec<f64> },
    LI { tau: Vec<f64>, r: Vec<f64>, leak: Vec<f64> },
    LIF { tau: Vec<f64>, r: Vec<f64>, leak: Vec<f64>, th: Vec<f64>, reset: Vec<f64> },
    CubaLI { ts: Vec<f64>, tm: Vec<f64>, r: Vec<f64>, leak: Vec<f64>, w: Vec<f64> },
    CubaLIF { ts: Vec<f64>, tm: Vec<f64>, r: Vec<f64>, leak: Vec<f64>, th: Vec<f64>, reset: Vec<f64>, w: Vec<f64> },
}

impl RefNeuron {
    fn kind(&self) -> NodeKind {
        let a = |v: &Vec<f64>| Array::vec_f32(v.iter().map(|&x| x as f32).collect());
        match self {
            RefNeuron::I { r } => NodeKind::I { r: a(r) },
            RefNeuron::IF { r, th, reset } => NodeKind::IF { r: a(r), v_threshold: a(th), v_reset: a(reset) },
            RefNeuron::LI { tau, r, leak } => NodeKind::LI { tau: a(tau), r: a(r), v_leak: a(leak) },
            RefNeuron::LIF { tau, r, leak, th, reset } => NodeKind::LIF { tau: a(tau), r: a(r), v_leak: a(leak), v_threshold: a(th), v_reset: a(reset) },
            RefNeuron::CubaLI { ts, tm, r, leak, w } => NodeKind::CubaLI { tau_syn: a(ts), tau_mem: a(tm), r: a(r), v_leak: a(leak), w_in: a(w) },
            RefNeuron::CubaLIF { ts, tm, r, leak, th, reset, w } => {
                NodeKind::CubaLIF { tau_syn: a(ts), tau_mem: a(tm), r: a(r), v_leak: a(leak), v_threshold: a(th), v_reset: a(reset), w_in: a(w) }
            }
        }
    }

    fn spiking(&self) -> bool {
        matches!(self, RefNeuron::IF { .. } | RefNeuron::LIF { .. } | RefNeuron::CubaLIF { .. })
    }

    /// The node's output per step: spikes for spiking types, the membrane otherwise.
    fn simulate(&self, x: &[Vec<f64>], dt: f64, scheme: Scheme) -> Vec<Vec<f64>> {
        let c = x[0].len();
        let (mut v, mut i) = (vec![0.0f64; c], vec![0.0f64; c]);
        // With per-channel v_reset the importer integrates u = v − v_reset from zero state,
        // so v starts at v_reset (documented).
        if let RefNeuron::IF { reset, .. } | RefNeuron::LIF { reset, .. } | RefNeuron::CubaLIF { reset, .. } = self {
            if reset.iter().any(|&r| r != reset[0]) {
                v = reset.iter().map(|&r| r as f32 as f64).collect();
            }
        }
        let f32r = |x: f64| x as f32 as f64; // parameters are stored as f32
        let decay = |tau: f64| match scheme {
            Scheme::Exact => (-dt / tau).exp(),
            Scheme::Euler => 1.0 - dt / tau,
        };
        x.iter()
            .map(|xt| {
                (0..c)
                    .map(|k| {
                        let (th, reset) = match self {
                            RefNeuron::I { r } | RefNeuron::IF { r, .. } => {
                                v[k] += dt * f32r(r[k]) * xt[k];
                                match self {
                                    RefNeuron::IF { th, reset, .. } => (f32r(th[k]), f32r(reset[k])),
                                    _ => return v[k],
                                }
                            }
                            RefNeuron::LI { tau, r, leak } | RefNeuron::LIF { tau, r, leak, .. } => {
                                let b = decay(f32r(tau[k]));
                                v[k] = b * v[k] + (1.0 - b) * (f32r(leak[k]) + f32r(r[k]) * xt[k]);
                                match self {
                                    RefNeuron::LIF { th, reset, .. } => (f32r(th[k]), f32r(reset[k])),
                                    _ => return v[k],
                                }
                            }
                            RefNeuron::CubaLI { ts, tm, r, leak, w } | RefNeuron::CubaLIF { ts, tm, r, leak, w, .. } => {
                                let (ts, tm, r, leak, w) = (f32r(ts[k]), f32r(tm[k]), f32r(r[k]), f32r(leak[k]), f32r(w[k]));
                                match scheme {
                                    Scheme::Euler => {
                                        let i0 = i[k];
                                        i[k] += dt / ts * (w * xt[k] - i0);
                                        v[k] += dt / tm * (leak - v[k] + r * i0);
                                    }
                                    Scheme::Exact => {
                                        // Solve τs İ = −I + I∞, τm v̇ = A − v + R (I − I∞) exactly.
                                        let (es, em) = ((-dt / ts).exp(), (-dt / tm).exp());
                                        let iinf = w * xt[k];
                                        let a = leak + r * iinf;
                                        let coef = if (ts - tm).abs() < 1e-12 { dt / tm * em } else { ts * (es - em) / (ts - tm) };
                                        v[k] = a + (v[k] - a) * em + r * (i[k] - iinf) * coef;
                                        i[k] = iinf + (i[k] - iinf) * es;
                                    }
                                }
                                match self {
                                    RefNeuron::CubaLIF { th, reset, .. } => (f32r(th[k]), f32r(reset[k])),
                                    _ => return v[k],
                                }
                            }
                        };
                        let z = v[k] > th;
                        if z {
                            v[k] = reset;
                        }
                        z as u8 as f64
                    })
                    .collect()
            })
            .collect()
    }
}

fn neurons(c: usize) -> Vec<(&'static str, RefNeuron)> {
    let lin = |a: f64, b: f64| (0..c).map(|k| a + b * k as f64).collect::<Vec<_>>();
    vec![
        ("I", RefNeuron::I { r: lin(50.0, 10.0) }),
        ("IF", RefNeuron::IF { r: lin(500.0, 100.0), th: lin(0.5, 0.1), reset: vec![0.0; c] }),
        ("IF-per-channel-reset", RefNeuron::IF { r: lin(500.0, 100.0), th: lin(0.5, 0.1), reset: lin(-0.2, 0.05) }),
        ("LI", RefNeuron::LI { tau: lin(2e-3, 1e-3), r: lin(1.0, 0.5), leak: lin(0.1, -0.05) }),
        ("LIF", RefNeuron::LIF { tau: lin(2e-3, 1e-3), r: lin(2.0, 0.5), leak: vec![0.0; c], th: lin(0.3, 0.05), reset: vec![0.0; c] }),
        ("LIF-reset-0.1", RefNeuron::LIF { tau: lin(2e-3, 1e-3), r: lin(2.0, 0.5), leak: lin(0.05, 0.0), th: lin(0.3, 0.05), reset: vec![0.1; c] }),
        ("LIF-per-channel-reset", RefNeuron::LIF { tau: lin(2e-3, 1e-3), r: lin(2.0, 0.5), leak: vec![0.0; c], th: lin(0.3, 0.05), reset: lin(-0.1, 0.04) }),
        ("CubaLI", RefNeuron::CubaLI { ts: lin(1e-3, 5e-4), tm: lin(3e-3, 1e-3), r: lin(1.0, 0.2), leak: vec![0.0; c], w: lin(2.0, 0.1) }),
        (
            "CubaLIF",
            RefNeuron::CubaLIF { ts: lin(1e-3, 5e-4), tm: lin(3e-3, 1e-3), r: lin(2.0, 0.2), leak: vec![0.0; c], th: lin(0.2, 0.05), reset: vec![0.0; c], w: lin(2.0, 0.1) },
        ),
        (
            "CubaLIF-equal-taus",
            RefNeuron::CubaLIF { ts: vec![2e-3; c], tm: vec![2e-3; c], r: lin(2.0, 0.2), leak: vec![0.0; c], th: lin(0.2, 0.05), reset: vec![0.0; c], w: lin(2.0, 0.1) },
        ),
    ]
}

/// Input(3) → Affine(3→C) → neuron(C) → Output(C).
fn neuron_net(kind: NodeKind, c: usize) -> (NirFile, Array, Array) {
    let (w, b) = (mat(c, 3, 11), f32a(&(0..c).map(|k| 0.05 * k as f32).collect::<Vec<_>>()));
    let g = graph(
        vec![
            ("input", NodeKind::Input { shape: vec![3] }),
            ("fc", NodeKind::Affine { weight: w.clone(), bias: b.clone() }),
            ("neuron", kind),
            ("output", NodeKind::Output { shape: vec![c as i64] }),
        ],
        &[("input", "fc"), ("fc", "neuron"), ("neuron", "output")],
    );
    (file(g), w, b)
}

#[test]
fn every_neuron_type_runs_on_the_cpu_as_nir_specifies_with_both_schemes() {
    let (c, t, dt) = (5, 120, 1e-4);
    let x = currents(t, 3, 3, 1.0);
    for (label, n) in neurons(c) {
        let (f, w, b) = neuron_net(n.kind(), c);
        let drive: Vec<Vec<f64>> = x.iter().map(|xt| affine_ref(&w, Some(&b), &xt.iter().map(|&v| v as f64).collect::<Vec<_>>())).collect();
        for scheme in [Scheme::Euler, Scheme::Exact] {
            let disc = Discretisation::new(Convention::Nir, Some(dt), Some(scheme)).unwrap();
            let imp = import_file(&f, disc).unwrap_or_else(|e| panic!("{label}: {e}"));
            let got = run(&imp, &[("input", &x)], "output");
            let want = n.simulate(&drive, dt, scheme);
            let mut fired = 0;
            for s in 0..t {
                for k in 0..c {
                    let (g, w) = (got[s][k] as f64, want[s][k]);
                    if n.spiking() {
                        assert_eq!(g, w, "{label} {scheme:?}: spike at step {s}, channel {k}");
                        fired += g as usize;
                    } else {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{label} {scheme:?}: v at step {s}, channel {k}: {g} vs {w}");
                    }
                }
            }
            assert!(!n.spiking() || fired > t / 10, "{label} {scheme:?} fires ({fired} spikes)");
        }
    }
}

#[test]
fn import_states_dt_and_scheme_in_the_ir_and_carries_state_across_calls() {
    let (c, t) = (4, 40);
    let n = &neurons(c)[4].1;
    let (f, _, _) = neuron_net(n.kind(), c);
    let disc = Discretisation::new(Convention::Nir, Some(2e-4), Some(Scheme::Exact)).unwrap();
    let imp = import_file(&f, disc).unwrap();
    let text = sparkc_ir::text::print(&imp.graph).unwrap();
    assert!(text.contains("neuron nir_lif_exact") && text.contains("exp(") && text.contains("0.0002"), "{text}");
    assert!(text.contains("fire v > v_threshold") && text.contains("reset to 0.0"), "{text}");
    assert_eq!(sparkc_ir::text::parse(&text).unwrap().neurons, imp.graph.neurons, "the text form round-trips");
    let keys: Vec<&str> = imp.params.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, vec!["fc.bias", "fc.weight", "neuron.r", "neuron.tau", "neuron.v_leak", "neuron.v_threshold"]);
    assert_eq!(format!("{}", imp.disc), "exact exponential, dt = 0.0002, convention nir");
    // Two calls of T/2 through a session equal one call of T.
    let x = currents(t, 3, 5, 1.5);
    let whole = run(&imp, &[("input", &x)], "output");
    let prog = CpuProgram::compile(&imp.graph).unwrap();
    let mut sess = sparkc_runtime::Session::new(prog, imp.params.clone());
    sess.reset(1);
    let mut halves = Vec::new();
    for part in x.chunks(t / 2) {
        let mut feed = BTreeMap::new();
        feed.insert("input".to_string(), Tensor::f32(vec![1, part.len(), 1, 3], part.iter().flatten().copied().collect()));
        let out = sess.step(feed).unwrap();
        halves.extend(out["output"].to_f32_vec().chunks(c).map(|r| r.to_vec()).collect::<Vec<_>>());
    }
    assert_eq!(halves, whole);
}

#[test]
fn scale_threshold_fan_in_and_nested_graphs_import() {
    let c = 3;
    let sub = graph(
        vec![
            ("in", NodeKind::Input { shape: vec![3] }),
            ("scale", NodeKind::Scale { scale: f32a(&[2.0, -1.0, 0.5]) }),
            ("out", NodeKind::Output { shape: vec![3] }),
        ],
        &[("in", "scale"), ("scale", "out")],
    );
    let mut g = graph(
        vec![
            ("a", NodeKind::Input { shape: vec![3] }),
            ("b", NodeKind::Input { shape: vec![3] }),
            ("lin", NodeKind::Linear { weight: mat(3, 3, 4) }),
            ("flat", NodeKind::Flatten { input_type: Some(vec![3]), start_dim: 0, end_dim: -1 }),
            ("thr", NodeKind::Threshold { threshold: f32a(&[0.1, 0.0, -0.1]) }),
            ("spikes", NodeKind::Output { shape: vec![3] }),
            ("scaled", NodeKind::Output { shape: vec![3] }),
        ],
        &[("a", "lin"), ("b", "lin"), ("lin", "flat"), ("flat", "sub"), ("sub", "scaled"), ("lin", "thr"), ("a", "thr"), ("thr", "spikes")],
    );
    g.nodes.insert("sub".into(), node(NodeKind::Graph(sub)));
    let imp = import_file(&file(g), Discretisation::default()).unwrap();
    assert!(imp.params.contains_key("sub.scale.scale"), "{:?}", imp.params.keys());
    let (xa, xb) = (currents(6, c, 1, 1.0), currents(6, c, 2, 1.0));
    let scaled = run(&imp, &[("a", &xa), ("b", &xb)], "scaled");
    let spikes = run(&imp, &[("a", &xa), ("b", &xb)], "spikes");
    let w = mat(3, 3, 4);
    for t in 0..6 {
        let s: Vec<f64> = (0..c).map(|k| xa[t][k] as f64 + xb[t][k] as f64).collect();
        let l = affine_ref(&w, None, &s);
        for k in 0..c {
            let sc = [2.0, -1.0, 0.5][k] * l[k];
            assert!((scaled[t][k] as f64 - sc).abs() < 1e-5, "scaled {t} {k}");
            let z = (l[k] + xa[t][k] as f64 > [0.1, 0.0, -0.1][k]) as u8 as f32;
            assert_eq!(spikes[t][k], z, "threshold {t} {k}");
        }
    }
}
