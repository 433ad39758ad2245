//! NIR reading, writing, import and export: legacy files written by nir 0.1 / 0.2, files
//! written by the reference `nir` package and by a framework (Spyx), round trips, simulation
//! on the CPU backend against reference dynamics, bad input, and a fuzzed reader.
//!
//! The tests marked `python` build a venv under `target/nir-venv` (reused) with `nir` and
//! `spyx` from PyPI; they print why and pass when python3, pip or the network is missing.

use proptest::prelude::*;
use sparkc_backend_cpu::CpuProgram;
use sparkc_frontend::nir::{
    self, export_graph, import_graph, Array, ArrayData, Convention, Discretisation, ExportOptions, ImportOptions, Imported, MetaValue,
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
#[allow(clippy::upper_case_acronyms)]
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

// ---------------------------------------------------------------------------------------------
// export

#[test]
fn nir_to_ir_to_nir_round_trip_is_exact() {
    let c = 4;
    for (label, n) in neurons(c) {
        let (f, _, _) = neuron_net(n.kind(), c);
        for scheme in [Scheme::Euler, Scheme::Exact] {
            let disc = Discretisation::new(Convention::Nir, Some(1e-4), Some(scheme)).unwrap();
            let imp = import_file(&f, disc).unwrap();
            let ex = export_graph(&imp.graph, &imp.params, &ExportOptions { dt: 1e-4, scheme, partial: false }).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert!(ex.diagnostics.is_empty(), "{label}: {:?}", ex.diagnostics);
            let g = &ex.file.graph;
            assert_eq!(g.edges.len(), 3, "{label}");
            assert_eq!(g.nodes["fc"].kind, f.graph.nodes["fc"].kind, "{label}");
            assert_eq!(g.nodes["neuron"].kind, f.graph.nodes["neuron"].kind, "{label} {scheme:?}");
            assert_eq!(g.nodes["neuron"].metadata.get("discretisation"), Some(&MetaValue::Str(scheme.name().into())));
            assert!(nir::read_bytes(&nir::write_bytes(&ex.file, true).unwrap(), "rt", strict()).is_ok());
        }
    }
}

/// The built-in IR `plif`: β = sigmoid(w), v ← β v + (1 − β) x, fire >=, subtract reset.
fn plif_graph(c: usize, emit: &str) -> (sparkc_ir::Graph, BTreeMap<String, Tensor>) {
    use sparkc_ir::{Dim, Op, Shape, StateScope, ValueType};
    let mut g = sparkc_ir::Graph::new("plif_net");
    g.add_neuron(sparkc_ir::neuron::plif()).unwrap();
    let x = g.input("x", ValueType::f32([Dim::sym("B"), Dim::sym("T"), Dim::Const(1), Dim::from(3usize)]));
    let w = g.param("fc.weight", ValueType::f32([c, 3])).unwrap();
    let h = g.add1(Op::Linear { bias: false }, &[x, w], "fc").unwrap();
    let pw = g.param("n.w", ValueType::f32([c])).unwrap();
    let th = g.param("n.v_th", ValueType::f32([c])).unwrap();
    let s0 = g.input("state.n.v", ValueType::new(sparkc_ir::DType::F32, Shape(vec![Dim::sym("B"), Dim::from(c)])));
    let r = g.add(Op::Scan { neuron: "plif".into(), emit: vec![emit.into()], scope: StateScope::Sequence }, &[h, pw, th, s0], "n").unwrap();
    g.set_output("y", r[0]);
    g.set_output("state.n.v", r[1]);
    let mut p = BTreeMap::new();
    p.insert("fc.weight".to_string(), Tensor::f32(vec![c, 3], mat(c, 3, 9).to_f32_vec()));
    p.insert("n.w".to_string(), Tensor::f32(vec![c], (0..c).map(|k| -1.0 + 0.5 * k as f32).collect()));
    p.insert("n.v_th".to_string(), Tensor::f32(vec![c], vec![0.5; c]));
    (g, p)
}

#[test]
fn plif_exports_as_lif_with_documented_tau_and_r() {
    let c = 4;
    let (g, p) = plif_graph(c, "spike");
    for scheme in [Scheme::Exact, Scheme::Euler] {
        let dt = 1e-3;
        let ex = export_graph(&g, &p, &ExportOptions { dt, scheme, partial: false }).unwrap();
        let NodeKind::LIF { tau, r, v_leak, v_threshold, v_reset } = &ex.file.graph.nodes["n"].kind else { panic!("a LIF") };
        for k in 0..c {
            let beta = 1.0 / (1.0 + (1.0 - 0.5 * k as f64).exp());
            let want_tau = match scheme {
                Scheme::Exact => -dt / beta.ln(),
                Scheme::Euler => dt / (1.0 - beta),
            };
            assert!((tau.to_f64_vec()[k] / want_tau - 1.0).abs() < 1e-5, "τ {scheme:?} {k}");
            assert!((r.to_f64_vec()[k] - 1.0).abs() < 1e-5, "R = 1 for the (1 − β)-scaled PLIF input");
            assert_eq!((v_leak.to_f64_vec()[k], v_threshold.to_f64_vec()[k], v_reset.to_f64_vec()[k]), (0.0, 0.5, 0.0));
        }
        let meta = &ex.file.graph.nodes["n"].metadata;
        assert_eq!(meta.get("reset"), Some(&MetaValue::Str("subtract".into())));
        assert_eq!(meta.get("fire"), Some(&MetaValue::Str(">=".into())));
        assert_eq!(meta.get("dt"), Some(&MetaValue::Array(Array::scalar_f64(dt))));
        assert!(ex.diagnostics.iter().all(|d| d.severity == Severity::Approximation && d.node == "n"), "{:?}", ex.diagnostics);
        assert!(ex.diagnostics.iter().any(|d| d.message.contains("subtract")));
        assert_eq!(ex.file.graph.nodes["fc"].kind, NodeKind::Linear { weight: mat(c, 3, 9) });
    }
}

#[test]
fn neuronspark_export_names_every_inexpressible_node_and_partial_export_loads() {
    let cfg = sparkc_frontend::NeuronSparkConfig::tiny();
    let g = sparkc_frontend::neuronspark::build_graph(&cfg, &Default::default()).unwrap();
    let params = sparkc_frontend::init::init_params(&cfg, 0);
    let err = export_graph(&g, &params, &ExportOptions::default()).unwrap_err();
    let NirError::Export(diags) = &err else { panic!("{err}") };
    let find = |node: &str| diags.iter().find(|d| d.node == node).unwrap_or_else(|| panic!("no diagnostic for {node}: {err}"));
    assert!(find("embed").message.contains("token ids"));
    assert!(find("layers.0.block_norm.weight").message.contains("RMS"));
    assert!(find("layers.0.snn_block.hidden_neuron").message.contains("β(t)"));
    assert!(find("layers.0.snn_block.output").message.contains("element-wise"));
    assert!(find("layers.0.block_halt.ponder").message.contains("PonderNet"));
    let approx = find("layers.0.input_neuron1");
    assert_eq!(approx.severity, Severity::Approximation);
    let ex = export_graph(&g, &params, &ExportOptions { partial: true, ..ExportOptions::default() }).unwrap();
    let lifs = ex.file.graph.nodes.values().filter(|n| matches!(n.kind, NodeKind::LIF { .. })).count();
    assert_eq!(lifs, cfg.num_layers * 4 + 1, "every fixed-parameter PLIF becomes a LIF");
    let bytes = nir::write_bytes(&ex.file, true).unwrap();
    nir::read_bytes(&bytes, "partial", strict()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// bad input

fn lif_file() -> NirFile {
    neuron_net(neurons(2)[4].1.kind(), 2).0
}

fn node_err(e: NirError) -> (String, String) {
    match e {
        NirError::Node { node, msg, .. } => (node, msg),
        other => panic!("expected a node error, got {other}"),
    }
}

/// Edit the HDF5 tree of a valid file, write it, read it.
fn read_edited(edit: impl FnOnce(&mut nir::h5::H5Group), opts: ReadOptions) -> Result<nir::ReadResult, NirError> {
    let mut tree = nir::schema::to_tree(&lif_file()).unwrap();
    edit(&mut tree);
    let bytes = nir::h5write::write_tree(&tree, false).unwrap();
    nir::read_bytes(&bytes, "edited", opts)
}

fn node_group<'a>(tree: &'a mut nir::h5::H5Group, name: &str) -> &'a mut nir::h5::H5Group {
    let nir::h5::H5Entry::Group(root) = tree.get_mut("node").unwrap() else { panic!() };
    let nir::h5::H5Entry::Group(nodes) = root.get_mut("nodes").unwrap() else { panic!() };
    let nir::h5::H5Entry::Group(n) = nodes.get_mut(name).unwrap() else { panic!() };
    n
}

#[test]
fn corrupt_and_non_nir_files_are_clear_errors() {
    for bytes in [&b""[..], b"not an hdf5 file at all", &[0u8; 4096][..]] {
        let e = nir::read_bytes(bytes, "junk.nir", strict()).unwrap_err().to_string();
        assert!(e.contains("junk.nir") && e.contains("HDF5"), "{e}");
    }
    let good = nir::write_bytes(&lif_file(), false).unwrap();
    let e = nir::read_bytes(&good[..good.len() / 2], "half.nir", strict()).unwrap_err().to_string();
    assert!(e.contains("half.nir"), "{e}");
    let e = nir::read_file(Path::new("/nonexistent/x.nir"), strict()).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/x.nir"), "{e}");
    // An HDF5 file that is not a NIR model.
    let mut tree = nir::h5::H5Group::new();
    tree.insert("data".into(), nir::h5::H5Entry::Dataset(nir::h5::H5Value::Array(f32a(&[1.0]))));
    let bytes = nir::h5write::write_tree(&tree, false).unwrap();
    let e = nir::read_bytes(&bytes, "other.h5", strict()).unwrap_err().to_string();
    assert!(e.contains("no `node` group"), "{e}");
}

#[test]
fn unknown_types_and_fields_name_the_node() {
    use nir::h5::{H5Entry, H5Value};
    let set_type = |t: &mut nir::h5::H5Group| {
        node_group(t, "neuron").insert("type".into(), H5Entry::Dataset(H5Value::Str("Izhikevich".into())));
    };
    let (node, msg) = node_err(read_edited(set_type, strict()).unwrap_err());
    assert_eq!(node, "neuron");
    assert!(msg.contains("unknown node type `Izhikevich`"), "{msg}");
    // Lenient reads it and the import names it.
    let r = read_edited(set_type, lenient()).unwrap();
    let e = import_graph(&r.file, &r.types, &ImportOptions { mode: Mode::Lenient, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("`neuron`") && e.contains("Izhikevich"), "{e}");

    let add_field = |t: &mut nir::h5::H5Group| {
        node_group(t, "neuron").insert("foo".into(), H5Entry::Dataset(H5Value::Array(f32a(&[1.0, 2.0]))));
    };
    let (node, msg) = node_err(read_edited(add_field, strict()).unwrap_err());
    assert_eq!(node, "neuron");
    assert!(msg.contains("no field `foo`"), "{msg}");
    let r = read_edited(add_field, lenient()).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("`foo`")), "{:?}", r.warnings);

    let (node, msg) = node_err(read_edited(|t| drop(node_group(t, "neuron").remove("tau")), lenient()).unwrap_err());
    assert_eq!((node.as_str(), msg.contains("missing required field `tau`")), ("neuron", true), "{msg}");
    let (_, msg) = node_err(
        read_edited(|t| drop(node_group(t, "neuron").insert("tau".into(), H5Entry::Dataset(H5Value::Str("fast".into())))), strict()).unwrap_err(),
    );
    assert!(msg.contains("`tau` must be a numeric array"), "{msg}");
    let (_, msg) = node_err(read_edited(|t| drop(node_group(t, "neuron").insert("tau".into(), H5Entry::Dataset(H5Value::Array(f32a(&[1.0; 3]))))), strict()).unwrap_err());
    assert!(msg.contains("one shape"), "{msg}");
}

#[test]
fn shape_mismatches_and_bad_edges_name_the_nodes() {
    let mut f = lif_file();
    f.graph.nodes.insert("neuron".into(), node(neurons(3)[4].1.kind()));
    let bytes = nir::write_bytes(&f, false).unwrap();
    let (node, msg) = node_err(nir::read_bytes(&bytes, "m", strict()).unwrap_err());
    assert_eq!(node, "neuron");
    assert!(msg.contains("`fc` outputs [2] but `neuron` takes [3]"), "{msg}");
    // Leniently read, the import refuses: the element counts differ.
    let r = nir::read_bytes(&bytes, "m", lenient()).unwrap();
    let e = import_graph(&r.file, &r.types, &ImportOptions { mode: Mode::Lenient, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("`neuron`") && e.contains("from `fc` carries 2 elements"), "{e}");

    let mut f = lif_file();
    f.graph.edges.push(("fc".into(), "nowhere".into()));
    let e = nir::write_bytes(&f, false).unwrap_err().to_string();
    assert!(e.contains("`nowhere`"), "{e}");
    let mut f = lif_file();
    f.graph.edges.push(("fc".into(), "neuron".into()));
    assert!(nir::write_bytes(&f, false).unwrap_err().to_string().contains("duplicate edge (`fc`, `neuron`)"));
}

#[test]
fn cycles_without_state_are_errors_naming_the_nodes() {
    let g = graph(
        vec![
            ("input", NodeKind::Input { shape: vec![2] }),
            ("a", NodeKind::Linear { weight: mat(2, 2, 1) }),
            ("b", NodeKind::Scale { scale: f32a(&[0.5, 0.5]) }),
            ("output", NodeKind::Output { shape: vec![2] }),
        ],
        &[("input", "a"), ("a", "b"), ("b", "a"), ("b", "output")],
    );
    let e = import_file(&file(g), Discretisation::default()).unwrap_err().to_string();
    assert!(e.contains("cycle without state") && e.contains("`a`") && e.contains("`b`"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// against the reference `nir` package and a framework (Spyx), through Python

/// What the venv provides.
struct PyEnv {
    python: PathBuf,
    spyx: bool,
}

const NIR_REQ: &str = "nir==1.0.8";
const SPYX_REQ: &str = "spyx==1.0.0";

fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?} failed: {}", text.chars().rev().take(2000).collect::<String>().chars().rev().collect::<String>()))
    }
}

/// The venv under target/nir-venv with nir (and Spyx where it installs), made once and reused.
fn py_env() -> Result<&'static PyEnv, &'static str> {
    static ENV: OnceLock<Result<PyEnv, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/nir-venv");
        let python = venv.join("bin/python");
        let marker = venv.join("sparkc-nir-ready");
        let want = format!("{NIR_REQ} {SPYX_REQ}");
        let ready = std::fs::read_to_string(&marker).ok();
        if ready.as_deref().map(|r| r.lines().next() == Some(want.as_str())).unwrap_or(false) {
            let spyx = ready.as_deref().is_some_and(|r| r.contains("spyx: yes"));
            return Ok(PyEnv { python, spyx });
        }
        sh(Command::new("python3").arg("--version")).map_err(|e| format!("python3 is not available ({e})"))?;
        let _ = std::fs::remove_dir_all(&venv);
        sh(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        let pip = |pkgs: &[&str]| {
            sh(Command::new(&python).args(["-m", "pip", "install", "--disable-pip-version-check", "-q", "--timeout", "60"]).args(pkgs))
        };
        pip(&[NIR_REQ]).map_err(|e| format!("cannot install {NIR_REQ} from PyPI (no network?): {e}"))?;
        let spyx = match pip(&[SPYX_REQ]) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("note: {SPYX_REQ} did not install, the framework test will be skipped: {e}");
                false
            }
        };
        let _ = std::fs::write(&marker, format!("{want}\nspyx: {}\n", if spyx { "yes" } else { "no" }));
        Ok(PyEnv { python, spyx })
    })
    .as_ref()
    .map_err(|e| e.as_str())
}

fn py_script(env: &PyEnv, script: &str, dir: &Path) -> String {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nir_py");
    sh(Command::new(&env.python).arg(scripts.join(script)).arg(dir).current_dir(&scripts)).unwrap_or_else(|e| panic!("{e}"))
}

/// sparkc's description of a graph, in the form `tests/nir_py/common.py` writes.
fn describe(g: &NirGraph) -> serde_json::Value {
    use serde_json::json;
    let arr = |a: &Array| json!({"shape": a.shape, "dtype": a.dtype_name(), "data": a.to_f64_vec()});
    let mut nodes = serde_json::Map::new();
    for (name, n) in &g.nodes {
        let v = match &n.kind {
            NodeKind::Graph(sub) => json!({"type": "NIRGraph", "graph": describe(sub)}),
            k => {
                let mut params = serde_json::Map::new();
                let fields: Vec<(&str, &Array)> = match k {
                    NodeKind::Affine { weight, bias } => vec![("weight", weight), ("bias", bias)],
                    NodeKind::Linear { weight } => vec![("weight", weight)],
                    NodeKind::Scale { scale } => vec![("scale", scale)],
                    NodeKind::Threshold { threshold } => vec![("threshold", threshold)],
                    NodeKind::Delay { delay } => vec![("delay", delay)],
                    NodeKind::I { r } => vec![("r", r)],
                    NodeKind::IF { r, v_threshold, v_reset } => vec![("r", r), ("v_threshold", v_threshold), ("v_reset", v_reset)],
                    NodeKind::LI { tau, r, v_leak } => vec![("tau", tau), ("r", r), ("v_leak", v_leak)],
                    NodeKind::LIF { tau, r, v_leak, v_threshold, v_reset } => {
                        vec![("tau", tau), ("r", r), ("v_leak", v_leak), ("v_threshold", v_threshold), ("v_reset", v_reset)]
                    }
                    NodeKind::CubaLI { tau_syn, tau_mem, r, v_leak, w_in } => {
                        vec![("tau_syn", tau_syn), ("tau_mem", tau_mem), ("r", r), ("v_leak", v_leak), ("w_in", w_in)]
                    }
                    NodeKind::CubaLIF { tau_syn, tau_mem, r, v_leak, v_threshold, v_reset, w_in } => vec![
                        ("tau_syn", tau_syn),
                        ("tau_mem", tau_mem),
                        ("r", r),
                        ("v_leak", v_leak),
                        ("v_threshold", v_threshold),
                        ("v_reset", v_reset),
                        ("w_in", w_in),
                    ],
                    NodeKind::Conv1d { weight, bias, .. } | NodeKind::Conv2d { weight, bias, .. } => vec![("weight", weight), ("bias", bias)],
                    _ => vec![],
                };
                for (f, a) in fields {
                    params.insert(f.into(), arr(a));
                }
                if let NodeKind::Input { shape } | NodeKind::Output { shape } = k {
                    params.insert("shape".into(), json!({"shape": [], "dtype": "int64", "data": shape.iter().map(|&x| x as f64).collect::<Vec<_>>()}));
                }
                let meta: serde_json::Map<String, serde_json::Value> = n.metadata.keys().map(|k| (k.clone(), json!("present"))).collect();
                json!({"type": k.type_name(), "params": params, "metadata": meta})
            }
        };
        nodes.insert(name.clone(), v);
    }
    let mut edges: Vec<Vec<String>> = g.edges.iter().map(|(a, b)| vec![a.clone(), b.clone()]).collect();
    edges.sort();
    json!({"nodes": nodes, "edges": edges})
}

/// Differences between two descriptions (params compared by value, shape and node type).
fn compare(want: &serde_json::Value, got: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    let (wn, gn) = (want["nodes"].as_object().unwrap(), got["nodes"].as_object().unwrap());
    let keys = |m: &serde_json::Map<String, serde_json::Value>| m.keys().cloned().collect::<Vec<_>>();
    if keys(wn) != keys(gn) {
        out.push(format!("{path}: nodes {:?} vs {:?}", keys(wn), keys(gn)));
        return;
    }
    if want["edges"] != got["edges"] {
        out.push(format!("{path}: edges {} vs {}", want["edges"], got["edges"]));
    }
    for (k, w) in wn {
        let g = &gn[k];
        if w["type"] != g["type"] {
            out.push(format!("{path}{k}: type {} vs {}", w["type"], g["type"]));
        } else if w["type"] == "NIRGraph" {
            compare(&w["graph"], &g["graph"], &format!("{path}{k}."), out);
        } else {
            for (f, p) in w["params"].as_object().unwrap() {
                let q = &g["params"][f];
                // serde_json's float parser may be one ulp off python's repr: compare values.
                let nums = |v: &serde_json::Value| v.as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
                let (a, b) = (nums(&p["data"]), nums(&q["data"]));
                let close = match (a, b) {
                    (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-14 * x.abs().max(1e-300)),
                    _ => false,
                };
                if !close || (f != "shape" && p["shape"] != q["shape"]) {
                    out.push(format!("{path}{k}.{f}: {p} vs {q}"));
                }
            }
        }
    }
}

macro_rules! python_or_skip {
    () => {
        match py_env() {
            Ok(env) => env,
            Err(why) => {
                // Straight to the stream: the harness captures eprintln!, and a skip must show.
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED (python): {why}");
                return;
            }
        }
    };
}

#[test]
fn python_reference_reader_loads_what_sparkc_writes() {
    let env = python_or_skip!();
    let dir = scratch("sparkc-written");
    let mut files: Vec<(String, NirFile)> = vec![("all_primitives".into(), all_primitives())];
    for (label, n) in neurons(3) {
        let (f, _, _) = neuron_net(n.kind(), 3);
        let imp = import_file(&f, Discretisation::default()).unwrap();
        let ex = export_graph(&imp.graph, &imp.params, &ExportOptions::default()).unwrap();
        files.push((format!("roundtrip_{label}"), ex.file));
    }
    let (g, p) = plif_graph(4, "spike");
    files.push(("plif".into(), export_graph(&g, &p, &ExportOptions { scheme: Scheme::Exact, ..Default::default() }).unwrap().file));
    let cfg = sparkc_frontend::NeuronSparkConfig::tiny();
    let ns = sparkc_frontend::neuronspark::build_graph(&cfg, &Default::default()).unwrap();
    let ex = export_graph(&ns, &sparkc_frontend::init::init_params(&cfg, 1), &ExportOptions { partial: true, ..Default::default() }).unwrap();
    files.push(("neuronspark_tiny_partial".into(), ex.file));
    for (i, (name, f)) in files.iter().enumerate() {
        nir::write_file(&dir.join(format!("{name}.nir")), f, i % 2 == 0).unwrap();
        let mut d = describe(&f.graph);
        d["graph_metadata"] = serde_json::json!(f.graph.metadata.keys().collect::<Vec<_>>());
        std::fs::write(dir.join(format!("{name}.json")), d.to_string()).unwrap();
    }
    let out = py_script(env, "check_sparkc_files.py", &dir);
    assert!(out.contains(&format!("checked {} sparkc-written files", files.len())), "{out}");
}

#[test]
fn python_written_files_load_in_sparkc_and_spike_as_numpy_simulates() {
    let env = python_or_skip!();
    let dir = scratch("nir-written");
    py_script(env, "write_reference_files.py", &dir);
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("nir") {
            continue;
        }
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap()).unwrap();
        let r = nir::read_file(&path, strict()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.file.version, "1.0.8");
        let mut diffs = Vec::new();
        compare(&want, &describe(&r.file.graph), "", &mut diffs);
        assert!(diffs.is_empty(), "{}: {diffs:?}", path.display());
        if let Some(spikes) = want.get("spikes") {
            let x: Vec<Vec<f32>> = serde_json::from_value(want["input"].clone()).unwrap();
            let spikes: Vec<Vec<f32>> = serde_json::from_value(spikes.clone()).unwrap();
            let disc = Discretisation::new(Convention::Nir, Some(1e-4), Some(Scheme::Euler)).unwrap();
            let imp = import_graph(&r.file, &r.types, &ImportOptions { disc, ..Default::default() }).unwrap();
            let got = run(&imp, &[("input", &x)], "output");
            assert_eq!(got, spikes, "{}", path.display());
            assert!(spikes.iter().flatten().sum::<f32>() > 10.0, "the network fires");
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn spyx_exports_load_in_sparkc_and_reproduce_spyx_spikes() {
    let env = python_or_skip!();
    if !env.spyx {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED (spyx): {SPYX_REQ} could not be installed from PyPI");
        return;
    }
    let dir = scratch("spyx");
    let log = py_script(env, "spyx_export.py", &dir);
    eprintln!("{log}");
    for kind in ["lif", "if", "cubalif"] {
        let path = dir.join(format!("spyx_{kind}.nir"));
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap()).unwrap();
        let r = nir::read_file(&path, strict()).unwrap_or_else(|e| panic!("{e}"));
        let disc = Discretisation::new(Convention::Spyx, None, None).unwrap();
        assert_eq!(disc.dt, 1.0);
        let imp = import_graph(&r.file, &r.types, &ImportOptions { disc, ..Default::default() }).unwrap_or_else(|e| panic!("{kind}: {e}"));
        let xs: Vec<Vec<Vec<f32>>> = serde_json::from_value(want["input"].clone()).unwrap();
        let spikes: Vec<Vec<Vec<f32>>> = serde_json::from_value(want["spikes"].clone()).unwrap();
        for (row, x) in xs.iter().enumerate() {
            let got = run(&imp, &[("input", x)], "output");
            assert_eq!(got, spikes[row], "spyx {kind}, batch row {row}");
        }
        assert!(want["count"].as_f64().unwrap() > 10.0, "spyx {kind} fires");
    }
}

// ---------------------------------------------------------------------------------------------
// fuzzing the reader: never a panic, only errors or a file

fn fuzz_seed_files() -> &'static [Vec<u8>] {
    static FILES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        vec![
            std::fs::read(data("lif_norse.nir")).unwrap(),
            nir::write_bytes(&lif_file(), false).unwrap(),
            nir::write_bytes(&all_primitives(), true).unwrap(),
        ]
    })
}

/// Reading (both modes) and importing whatever was read must return, not panic.
fn read_anything(bytes: &[u8]) {
    for opts in [strict(), lenient()] {
        if let Ok(r) = nir::read_bytes(bytes, "fuzz", opts) {
            let _ = import_graph(&r.file, &r.types, &ImportOptions { mode: opts.mode, ..Default::default() });
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        read_anything(&bytes);
    }

    #[test]
    fn fuzz_truncations(which in 0usize..3, cut in 0.0f64..1.0) {
        let f = &fuzz_seed_files()[which];
        read_anything(&f[..(f.len() as f64 * cut) as usize]);
    }

    #[test]
    fn fuzz_byte_flips(which in 0usize..3, flips in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 1..8)) {
        let mut f = fuzz_seed_files()[which].clone();
        for (pos, val) in flips {
            let i = ((f.len() - 1) as f64 * pos) as usize;
            f[i] ^= val.max(1);
        }
        read_anything(&f);
    }
}
