//! Helpers shared by the pass test binaries: random graph inputs, running on the CPU oracle,
//! bit equality.

#![allow(dead_code)]

use sparkc_backend_cpu::CpuProgram;
use sparkc_ir::rng::Rng;
use sparkc_ir::tensor::TensorData;
use sparkc_ir::{Graph, Tensor};
use std::collections::BTreeMap;

/// Random data for every input of `g` with the free dims B and T given: ids in 1..vocab for
/// integer inputs, ones for `loss_mask`, N(0, spread) otherwise; drawn from `r` in input order.
pub fn random_inputs(g: &Graph, b: usize, t: usize, r: &mut Rng, vocab: u64, spread: f64) -> BTreeMap<String, Tensor> {
    let env = dims_bt(g, b, t);
    let mut inputs = BTreeMap::new();
    for (_, name, ty) in g.inputs() {
        let shape = ty.shape.concrete(&env).expect("all dims bound");
        let n: usize = shape.iter().product();
        let t = if ty.dtype.is_int() {
            Tensor::i64(shape, (0..n).map(|_| 1 + r.below(vocab - 1) as i64).collect())
        } else if name == "loss_mask" {
            Tensor::f32(shape, vec![1.0; n])
        } else {
            Tensor::f32(shape, (0..n).map(|_| r.normal(0.0, spread) as f32).collect())
        };
        inputs.insert(name.to_string(), t);
    }
    inputs
}

/// The graph's fixed dims with B and T bound.
pub fn dims_bt(g: &Graph, b: usize, t: usize) -> sparkc_ir::types::DimBindings {
    let mut env = g.dims.clone();
    env.insert("B".into(), b as u64);
    env.insert("T".into(), t as u64);
    env
}

/// The IR text of `g`, for failure messages.
pub fn text(g: &Graph) -> String {
    sparkc_ir::text::print(g).unwrap_or_else(|e| format!("<graph does not print: {e}>"))
}

/// Run `g` on the CPU interpreter; a failure panics with the graph's text.
pub fn run(g: &Graph, inputs: &BTreeMap<String, Tensor>, params: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let p = CpuProgram::compile(g).unwrap_or_else(|e| panic!("compile: {e}\n{}", text(g)));
    p.run(inputs, params).unwrap_or_else(|e| panic!("run: {e}\n{}", text(g)))
}

pub fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    a.shape == b.shape
        && match (&a.data, &b.data) {
            (TensorData::F32(x), TensorData::F32(y)) => x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            (TensorData::I64(x), TensorData::I64(y)) => x == y,
            _ => false,
        }
}
