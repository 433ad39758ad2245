//! The neuromorphic backend end to end: spike programs round-trip and the loader rejects
//! corrupt files; the simulated chip is bit-exact with the CPU backend running the same
//! quantized IR in integer mode (tiny NeuronSpark, plain LIF networks from the builder API,
//! split and multi-chip placements); legalization names the layer and the limit; the
//! quantization report behaves.

use proptest::prelude::*;
use sparkc_backend_cpu::CpuProgram;
use sparkc_backend_neuro::format::{from_bytes, to_bytes, FormatError};
use sparkc_backend_neuro::pipeline::{compile, CompileOptions, Compiled};
use sparkc_backend_neuro::program::StageKind;
use sparkc_backend_neuro::{dump, NeuroError, Target};
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::{init::init_params, NeuronSparkConfig};
use sparkc_ir::neuron::{self, Binding, FireCmp, NeuronModel, Reset, StateVar, Surrogate};
use sparkc_ir::rng::Rng;
use sparkc_ir::tensor::TensorData;
use sparkc_ir::{parse_expr, Graph, Op, StateScope, Tensor, ValueType};
use sparkc_runtime::neuro::ChipSimulator;
use sparkc_runtime::{generate, GenerateOptions, Sampler, Session};
use std::collections::BTreeMap;
use std::sync::OnceLock;

fn target(name: &str) -> Target {
    Target::load(std::path::Path::new(&format!("{}/../../targets/{name}.toml", env!("CARGO_MANIFEST_DIR")))).unwrap()
}

fn ids(rng: &mut Rng, b: usize, t: usize, vocab: u64) -> Tensor {
    Tensor::i64(vec![b, t], (0..b * t).map(|_| rng.below(vocab) as i64).collect())
}

fn tiny() -> (Graph, BTreeMap<String, Tensor>) {
    let cfg = NeuronSparkConfig::tiny();
    (build_graph(&cfg, &GraphOptions::default()).unwrap(), init_params(&cfg, 3))
}

/// The tiny NeuronSpark compiled for Loihi 2 at `bits` (cached: several tests share it).
fn tiny_compiled(bits: u32) -> &'static Compiled {
    static C8: OnceLock<Compiled> = OnceLock::new();
    static C4: OnceLock<Compiled> = OnceLock::new();
    let cell = if bits == 8 { &C8 } else { &C4 };
    cell.get_or_init(|| {
        let (g, p) = tiny();
        let calib = BTreeMap::from([("input_ids".to_string(), ids(&mut Rng::new(11), 2, 12, 256))]);
        compile(&g, p.clone(), &calib, &target("loihi2"), &CompileOptions { leak_bits: bits, ..Default::default() }).unwrap()
    })
}

fn bind(name: &str, src: &str) -> Binding {
    Binding { name: name.into(), expr: parse_expr(src).unwrap() }
}

/// Loihi's CUBA-LIF as data: current u and voltage v decay, v > θ fires, v resets to 0.
fn cuba_lif() -> NeuronModel {
    NeuronModel {
        name: "cuba_lif".into(),
        params: vec!["du".into(), "dv".into(), "v_th".into()],
        inputs: vec!["x".into()],
        state: vec![StateVar { name: "u".into(), init: 0.0 }, StateVar { name: "v".into(), init: 0.0 }],
        lets: vec![],
        charge: vec![bind("u", "du * u + x"), bind("v", "dv * v + u")],
        membrane: "v".into(),
        threshold: parse_expr("v_th").unwrap(),
        fire: FireCmp::Gt,
        reset: Reset::ToValue(0.0),
        detach_reset: false,
        surrogate: Surrogate::sigmoid(4.0),
        outputs: vec![bind("spike", "z"), bind("vpost", "v")],
    }
}

/// A plain spiking network from the builder API: input currents → LIF population → dense →
/// LIF → dense → LIF, every state carried as a graph input/output pair.
fn lif_net(model: NeuronModel, sizes: &[usize], emit_vpost: bool, seed: u64) -> (Graph, BTreeMap<String, Tensor>) {
    let mut g = Graph::new("lif_net");
    g.bind_dim("K", 3);
    g.add_neuron(model.clone()).unwrap();
    let mut rng = Rng::new(seed);
    let mut params = BTreeMap::new();
    let mut uniform = |n: usize, lo: f32, hi: f32| (0..n).map(|_| lo + (hi - lo) * rng.below(1_000_001) as f32 / 1e6).collect::<Vec<f32>>();
    let mut x = g.input("x", ValueType::f32(["B".into(), "T".into(), "K".into(), sparkc_ir::Dim::from(sizes[0])]));
    for (l, &c) in sizes.iter().enumerate() {
        if l > 0 {
            let w = g.param(&format!("w{l}"), ValueType::f32([c, sizes[l - 1]])).unwrap();
            let scale = 2.5 / (sizes[l - 1] as f32).sqrt();
            params.insert(format!("w{l}"), Tensor::f32(vec![c, sizes[l - 1]], uniform(c * sizes[l - 1], -scale, 1.6 * scale)));
            x = g.add1(Op::Linear { bias: false }, &[x, w], &format!("dense{l}")).unwrap();
        }
        let mut operands = vec![x];
        for p in &model.params {
            let name = format!("lif{l}.{p}");
            operands.push(g.param(&name, ValueType::f32([c])).unwrap());
            let values = match p.as_str() {
                "v_th" => uniform(c, 0.5, 1.0),
                _ => uniform(c, 0.6, 0.95),
            };
            params.insert(name, Tensor::f32(vec![c], values));
        }
        for s in &model.state {
            operands.push(g.input(&format!("state.lif{l}.{}", s.name), ValueType::f32(["B".into(), sparkc_ir::Dim::from(c)])));
        }
        let last = l + 1 == sizes.len();
        let emit: Vec<String> = if last && emit_vpost { vec!["spike".into(), "vpost".into()] } else { vec!["spike".into()] };
        let r = g.add(Op::Scan { neuron: model.name.clone(), emit: emit.clone(), scope: StateScope::Sequence }, &operands, &format!("lif{l}")).unwrap();
        for (i, s) in model.state.iter().enumerate() {
            g.set_output(&format!("state.lif{l}.{}", s.name), r[emit.len() + i]);
        }
        x = r[0];
        if last {
            g.set_output("spikes", r[0]);
            if emit_vpost {
                g.set_output("vpost", r[1]);
            }
        }
    }
    sparkc_ir::verify::verify(&g).unwrap();
    (g, params)
}

fn currents(rng: &mut Rng, b: usize, t: usize, k: usize, c: usize) -> Tensor {
    // Sparse positive drive: most inputs are zero, as spikes would be.
    Tensor::f32(vec![b, t, k, c], (0..b * t * k * c).map(|_| if rng.below(3) == 0 { rng.below(1000) as f32 / 400.0 } else { 0.0 }).collect())
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.shape == b.shape
        && match (&a.data, &b.data) {
            (TensorData::F32(x), TensorData::F32(y)) => x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            (TensorData::I64(x), TensorData::I64(y)) => x == y,
            _ => false,
        }
}

/// Run `calls` on the CPU (integer mode, the quantized IR) and on the simulated chip (the
/// program after a trip through its binary form), state carried across calls, and require
/// identical outputs. Returns the simulator (for its report).
fn assert_bit_exact(c: &Compiled, calls: &[BTreeMap<String, Tensor>], batch: usize) -> ChipSimulator {
    let program = from_bytes(&to_bytes(&c.program)).unwrap();
    let mut cpu = Session::new(CpuProgram::compile(&c.quantized.graph).unwrap(), c.quantized.params.clone());
    let mut chip = Session::new(ChipSimulator::new(program).unwrap(), BTreeMap::new());
    cpu.reset(batch);
    chip.reset(batch);
    for (i, inputs) in calls.iter().enumerate() {
        let a = cpu.step(inputs.clone()).unwrap();
        let b = chip.step(inputs.clone()).unwrap();
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, v) in &a {
            assert!(same(v, &b[k]), "call {i}: output `{k}` differs between the CPU integer mode and the simulated chip");
        }
    }
    // Session has no accessor for its executor by value; rebuild the counts from a fresh run.
    let mut sim = ChipSimulator::new(from_bytes(&to_bytes(&c.program)).unwrap()).unwrap();
    let mut s = Session::new(ChipSimulatorRef(&mut sim), BTreeMap::new());
    s.reset(batch);
    for inputs in calls {
        s.step(inputs.clone()).unwrap();
    }
    drop(s);
    sim
}

struct ChipSimulatorRef<'a>(&'a mut ChipSimulator);

impl sparkc_runtime::Executor for ChipSimulatorRef<'_> {
    fn graph(&self) -> &Graph {
        self.0.signature()
    }
    fn execute(&mut self, i: &BTreeMap<String, Tensor>, p: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, sparkc_runtime::RuntimeError> {
        sparkc_runtime::Executor::execute(self.0, i, p)
    }
}

#[test]
fn tiny_neuronspark_is_bit_exact_on_the_simulated_chip() {
    let c = tiny_compiled(8);
    let mut rng = Rng::new(7);
    // A prefill, then single tokens as in generation: state carries across calls.
    let calls: Vec<_> = [5usize, 1, 1, 3].iter().map(|&t| BTreeMap::from([("input_ids".to_string(), ids(&mut rng, 2, t, 256))])).collect();
    let sim = assert_bit_exact(c, &calls, 2);
    let r = sim.report();
    assert_eq!(r.tokens, 2 * 10);
    assert!(r.totals.synops > 0 && r.totals.events > 0 && r.totals.energy.total_pj > 0.0);
    assert!(r.totals.events <= r.totals.payloads);
    assert!(r.totals.management_ops > 0 && r.totals.host_ops > 0, "non-native work is costed");
    assert!(r.totals.energy.management_pj > 0.0 && r.totals.energy.host_pj > 0.0);
    let sum: f64 = r.layers.iter().map(|l| l.energy_pj).sum::<f64>() + r.management.iter().map(|m| m.energy_pj).sum::<f64>() + r.host.iter().map(|h| h.energy_pj).sum::<f64>();
    assert!((sum - r.totals.energy.total_pj).abs() <= 1e-6 * r.totals.energy.total_pj, "layers + management + host = total");
    let core_synops: u64 = r.cores_detail.iter().map(|c| c.synops).sum();
    assert_eq!(core_synops, r.totals.synops);
    assert!(r.totals.time_per_token_s > 0.0);
}

#[test]
fn generation_on_the_chip_matches_the_cpu_integer_mode() {
    let c = tiny_compiled(8);
    let prompt = vec![vec![72i64, 101, 108, 108, 111], vec![32, 116, 104, 101, 32]];
    let opts = GenerateOptions { max_new_tokens: 6, eos_id: None };
    let mut cpu = Session::new(CpuProgram::compile(&c.quantized.graph).unwrap(), c.quantized.params.clone());
    let on_cpu = generate(&mut cpu, &prompt, &opts, &mut Sampler::new(0.8, Some(20), None, 5), |_| {}).unwrap();
    let mut chip = Session::new(ChipSimulator::new(c.program.clone()).unwrap(), BTreeMap::new());
    let on_chip = generate(&mut chip, &prompt, &opts, &mut Sampler::new(0.8, Some(20), None, 5), |_| {}).unwrap();
    assert_eq!(on_cpu, on_chip);
    assert_eq!(on_chip[0].len(), 11);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_token_inputs_are_bit_exact(seed in 0u64..1_000_000, t in 1usize..6) {
        let c = tiny_compiled(4);
        let mut rng = Rng::new(seed);
        let calls = vec![BTreeMap::from([("input_ids".to_string(), ids(&mut rng, 1, t, 256))])];
        assert_bit_exact(c, &calls, 1);
    }

    #[test]
    fn random_currents_into_a_lif_network_are_bit_exact(seed in 0u64..1_000_000) {
        let (g, p) = lif_net(neuron::lif(), &[24, 40, 16], true, seed);
        let mut rng = Rng::new(seed ^ 0x5eed);
        let calib = BTreeMap::from([("x".to_string(), currents(&mut rng, 2, 6, 3, 24))]);
        let c = compile(&g, p.clone(), &calib, &target("loihi2"), &CompileOptions::default()).unwrap();
        let calls: Vec<_> = (0..2).map(|_| BTreeMap::from([("x".to_string(), currents(&mut rng, 2, 4, 3, 24))])).collect();
        let sim = assert_bit_exact(&c, &calls, 2);
        prop_assert!(sim.report().totals.events > 0);
    }
}

#[test]
fn a_cuba_lif_network_runs_on_loihi1_with_binary_spikes() {
    let (g, p) = lif_net(cuba_lif(), &[16, 32, 8], false, 4);
    let mut rng = Rng::new(9);
    let calib = BTreeMap::from([("x".to_string(), currents(&mut rng, 2, 8, 3, 16))]);
    let c = compile(&g, p.clone(), &calib, &target("loihi1"), &CompileOptions::default()).unwrap();
    // Spikes travel as one-bit payloads; the CUBA step is a handful of supported instructions.
    for grp in &c.program.groups {
        assert!(grp.outputs.iter().all(|o| o.bits == 1), "{}", grp.name);
        assert!(grp.microcode.instrs.len() <= 8, "{}: {} instructions", grp.name, grp.microcode.instrs.len());
    }
    let calls: Vec<_> = (0..3).map(|_| BTreeMap::from([("x".to_string(), currents(&mut rng, 2, 3, 3, 16))])).collect();
    assert_bit_exact(&c, &calls, 2);
}

#[test]
fn split_fan_in_and_many_chips_stay_bit_exact() {
    // A target with tiny cores and chips: neurons split over cores and chips, inputs over
    // several cores per neuron (partial sums).
    let mut t = target("loihi2");
    t.core.neurons = 8;
    t.core.max_fan_in = 10;
    t.chip.cores = 8;
    t.chip.tile_mesh = [2, 2];
    t.board.chips = 4;
    t.board.chip_mesh = [2, 2];
    t.validate().unwrap();
    let (g, p) = lif_net(neuron::lif(), &[24, 40, 16], true, 2);
    let mut rng = Rng::new(5);
    let calib = BTreeMap::from([("x".to_string(), currents(&mut rng, 2, 6, 3, 24))]);
    let c = compile(&g, p.clone(), &calib, &t, &CompileOptions::default()).unwrap();
    assert!(c.program.placement.chips > 1, "spread over {} chip(s)", c.program.placement.chips);
    assert!(c.program.placement.groups.iter().any(|gp| gp.parts > 1), "some neuron's inputs are split");
    assert!(c.notes.iter().any(|n| n.limit == "core.max_fan_in" && n.layer == "lif1"), "{:?}", c.notes);
    let calls: Vec<_> = (0..2).map(|_| BTreeMap::from([("x".to_string(), currents(&mut rng, 1, 4, 3, 24))])).collect();
    let sim = assert_bit_exact(&c, &calls, 1);
    let r = sim.report();
    assert!(r.totals.partial_sums > 0 && r.totals.chip_hops > 0);
}

#[test]
fn legalization_names_the_layer_and_the_limit() {
    // NeuronSpark's selective neurons need sigmoid/softplus and graded spikes: not on Loihi 1.
    let (g, p) = tiny();
    let calib = BTreeMap::from([("input_ids".to_string(), ids(&mut Rng::new(1), 1, 4, 256))]);
    let err = compile(&g, p.clone(), &calib, &target("loihi1"), &CompileOptions::default()).err().expect("Loihi 1 cannot run NeuronSpark");
    let NeuroError::Legalize { diagnostics, .. } = &err else { panic!("expected a legalization error, got {err}") };
    let text = err.to_string();
    assert!(diagnostics.iter().any(|d| d.layer.contains("layers.0.snn_block.hidden_neuron") && d.limit == "core.microcode_ops" && d.message.contains("`sigmoid`")), "{text}");
    assert!(diagnostics.iter().any(|d| d.limit == "numerics.graded_spike_bits" && d.message.contains("binary spikes only")), "{text}");
    assert!(text.contains("loihi1"), "{text}");

    // A neuron whose inputs cannot be split enough.
    let mut t = target("loihi2");
    t.core.max_fan_in = 10;
    t.core.max_fan_in_split = 2;
    let (g, p) = lif_net(neuron::lif(), &[24, 40, 16], false, 1);
    let calib = BTreeMap::from([("x".to_string(), currents(&mut Rng::new(2), 1, 4, 3, 24))]);
    let err = compile(&g, p.clone(), &calib, &t, &CompileOptions::default()).err().expect("does not fit").to_string();
    assert!(err.contains("layer `lif1`") && err.contains("core.max_fan_in_split") && err.contains("24 inputs"), "{err}");

    // Too few instructions per neuron program.
    let mut t = target("loihi2");
    t.core.max_microcode = 2;
    let err = compile(&g, p.clone(), &calib, &t, &CompileOptions::default()).err().expect("does not fit").to_string();
    assert!(err.contains("core.max_microcode") && err.contains("layer `lif0`"), "{err}");
}

#[test]
fn programs_round_trip_and_show_what_runs_where() {
    let c = tiny_compiled(8);
    let bytes = to_bytes(&c.program);
    let back = from_bytes(&bytes).unwrap();
    assert_eq!(back, c.program);
    assert_eq!(to_bytes(&back), bytes, "the encoding is deterministic");
    let path = std::env::temp_dir().join(format!("sparkc-neuro-{}.spk", std::process::id()));
    sparkc_backend_neuro::write_program(&path, &c.program).unwrap();
    assert_eq!(sparkc_backend_neuro::read_program(&path).unwrap(), c.program);
    let _ = std::fs::remove_file(&path);
    // Non-native work is explicit: RMSNorm and PonderNet on management cores, the head on the host.
    let text = dump::dump(&c.program);
    let mgmt: Vec<&str> = c.program.stages.iter().filter(|s| matches!(s.kind, StageKind::Management { .. })).map(|s| s.ir.as_str()).collect();
    let host: Vec<&str> = c.program.stages.iter().filter(|s| matches!(s.kind, StageKind::Host)).map(|s| s.ir.as_str()).collect();
    assert!(mgmt.iter().any(|ir| ir.contains("rms_norm")) && mgmt.iter().any(|ir| ir.contains("ponder_weights")));
    assert!(host.iter().any(|ir| ir.contains("lateral_inhibition")) && host.iter().any(|ir| ir.contains("embedding")));
    assert!(text.contains("on the management core") && text.contains("on the host") && text.contains("microcode"));
    assert!(text.contains("r0 = ") || text.contains("= mul r"), "microcode is listed");
}

#[test]
fn the_loader_rejects_bad_headers() {
    let c = tiny_compiled(8);
    let bytes = to_bytes(&c.program);
    assert!(matches!(from_bytes(b"not a program at all"), Err(FormatError::Magic)));
    let mut v = bytes.clone();
    v[8] = 99;
    let e = from_bytes(&v).unwrap_err();
    assert!(matches!(e, FormatError::Version { found: 99 }) && e.to_string().contains("version"), "{e}");
    assert!(matches!(from_bytes(&bytes[..bytes.len() - 1]), Err(FormatError::Length { .. })));
    let mut v = bytes.clone();
    let last = v.len() - 10;
    v[last] ^= 0x40;
    assert!(matches!(from_bytes(&v), Err(FormatError::Checksum { .. })));
}

/// A small program for fuzzing the loader.
fn small_program_bytes() -> &'static Vec<u8> {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| {
        let (g, p) = lif_net(neuron::lif(), &[6, 5, 4], true, 3);
        let calib = BTreeMap::from([("x".to_string(), currents(&mut Rng::new(4), 1, 3, 3, 6))]);
        to_bytes(&compile(&g, p.clone(), &calib, &target("loihi2"), &CompileOptions::default()).unwrap().program)
    })
}

/// Replace the checksum so that a mutation reaches the structural checks.
fn reseal(v: &mut [u8]) {
    let crc = sparkc_backend_neuro::format::crc32(&v[28..]);
    v[24..28].copy_from_slice(&crc.to_le_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn corrupt_files_are_errors_not_panics(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let good = small_program_bytes();
        let mut v = good.clone();
        for (i, b) in &edits {
            let at = i.index(v.len());
            v[at] = *b;
        }
        if truncate {
            v.truncate(cut.index(v.len()));
        }
        // With the stored checksum, any change is caught.
        if v != *good {
            prop_assert!(from_bytes(&v).is_err());
        }
        // With a fixed-up checksum, the structural checks must hold without panicking; what
        // loads must also run (or fail) cleanly.
        if v.len() >= 28 {
            reseal(&mut v);
            if let Ok(p) = from_bytes(&v) {
                if let Ok(mut sim) = ChipSimulator::new(p) {
                    let x = currents(&mut Rng::new(1), 1, 2, 3, 6);
                    let inputs = BTreeMap::from([
                        ("x".to_string(), x),
                        ("state.lif0.v".to_string(), Tensor::zeros(vec![1, 6])),
                        ("state.lif1.v".to_string(), Tensor::zeros(vec![1, 5])),
                        ("state.lif2.v".to_string(), Tensor::zeros(vec![1, 4])),
                    ]);
                    let _ = sim.run(&inputs);
                }
            }
        }
    }
}

#[test]
fn the_quantization_report_improves_with_bits() {
    let (r4, r8) = (&tiny_compiled(4).quantized.report, &tiny_compiled(8).quantized.report);
    let leak = |r: &sparkc_passes::quantize::QuantReport| r.layers.iter().filter(|l| l.kind == "leak").cloned().collect::<Vec<_>>();
    let (l4, l8) = (leak(r4), leak(r8));
    assert!(!l4.is_empty() && l4.len() == l8.len());
    for (a, b) in l4.iter().zip(&l8) {
        assert_eq!(a.name, b.name);
        assert_eq!((a.bits, b.bits), (4, 8));
        assert!(b.mean_abs_error < a.mean_abs_error && b.snr_db > a.snr_db, "{}: 4-bit {:?} vs 8-bit {:?}", a.name, a, b);
        let (s4, s8) = (a.suppressed.unwrap(), b.suppressed.unwrap());
        assert!((0.0..=1.0).contains(&s4) && (0.0..=1.0).contains(&s8) && s4 >= s8, "{}: suppressed {s4} at 4 bits, {s8} at 8", a.name);
        assert!(b.max_abs_error >= b.mean_abs_error && b.snr_db > 20.0, "{b:?}");
    }
    // Every synapse layer's weights are reported.
    let weights = r8.layers.iter().filter(|l| l.kind == "weights").count();
    assert_eq!(weights, tiny_compiled(8).program.synapses.len());
}
