//! Build a small two-layer LIF network with the builder API, print its IR, and run it on the
//! CPU backend for a few time steps, carrying the neuron state across two calls.
//!
//!     cargo run --release --example lif_network

use sparkc_backend_cpu::CpuProgram;
use sparkc_ir::rng::Rng;
use sparkc_ir::{neuron, Dim, Graph, Op, StateScope, Tensor, ValueType};
use sparkc_runtime::Session;
use std::collections::BTreeMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (inputs, hidden, outputs) = (4usize, 8usize, 2usize);
    let mut g = Graph::new("lif_network");
    g.bind_dim("K", 1); // one frame per time step
    g.add_neuron(neuron::lif())?;
    let x = g.input("x", ValueType::f32([Dim::sym("B"), Dim::sym("T"), Dim::sym("K"), Dim::from(inputs)]));
    let layer = |g: &mut Graph, x, name: &str, i: usize, o: usize| -> Result<_, sparkc_ir::IrError> {
        let w = g.param(&format!("{name}.weight"), ValueType::f32([o, i]))?;
        let current = g.add1(Op::Linear { bias: false }, &[x, w], name)?;
        let beta = g.param(&format!("{name}.beta"), ValueType::f32([o]))?;
        let v_th = g.param(&format!("{name}.v_th"), ValueType::f32([o]))?;
        let v0 = g.input(&format!("state.{name}.v"), ValueType::f32([Dim::sym("B"), Dim::from(o)]));
        let scan = Op::Scan { neuron: "lif".into(), emit: vec!["spike".into()], scope: StateScope::Sequence };
        let r = g.add(scan, &[current, beta, v_th, v0], &format!("{name}.lif"))?;
        g.set_output(&format!("state.{name}.v"), r[1]);
        Ok(r[0])
    };
    let h = layer(&mut g, x, "hidden", inputs, hidden)?;
    let y = layer(&mut g, h, "out", hidden, outputs)?;
    g.set_output("spikes", y);
    println!("{}", sparkc_ir::text::print(&g)?);

    let mut rng = Rng::new(1);
    let mut params = BTreeMap::new();
    for (name, i, o) in [("hidden", inputs, hidden), ("out", hidden, outputs)] {
        params.insert(format!("{name}.weight"), Tensor::f32(vec![o, i], (0..o * i).map(|_| rng.normal(0.25, 0.5) as f32).collect()));
        params.insert(format!("{name}.beta"), Tensor::f32(vec![o], vec![0.9; o]));
        params.insert(format!("{name}.v_th"), Tensor::f32(vec![o], vec![1.0; o]));
    }
    let mut session = Session::new(CpuProgram::compile(&g)?, params);
    session.reset(1);
    for call in 0..2 {
        let t = 24;
        let drive = Tensor::f32(vec![1, t, 1, inputs], (0..t * inputs).map(|_| rng.uniform() as f32).collect());
        let out = session.step(BTreeMap::from([("x".to_string(), drive)]))?;
        let spikes = out["spikes"].to_f32_vec();
        let raster: Vec<String> = (0..outputs)
            .map(|n| (0..t).map(|s| if spikes[s * outputs + n] > 0.0 { '|' } else { '.' }).collect())
            .collect();
        println!("call {call}: output spikes per neuron over {t} steps: {raster:?}");
    }
    Ok(())
}
