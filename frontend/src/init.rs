//! Seeded initialisation of a NeuronSpark model, following spec §10.
//!
//! Each parameter draws from its own stream `Rng::derive(seed, key)`, so a tensor's values depend
//! only on (seed, key, config), not on which other tensors exist or in which order they are built.
//! That also lets the tensors be generated in parallel without changing a single byte.
//!
//! The original draws from PyTorch's generator, so the values differ from `torch.manual_seed`; the
//! distributions (and therefore every statistic) are the same.

use crate::config::NeuronSparkConfig;
use crate::params::{param_specs, Init, ParamSpec, SnnInitTables};
use sparkc_ir::rng::Rng;
use sparkc_ir::tensor::Tensor;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// A freshly initialised parameter set, keyed by raw key (no `model.` prefix), all F32.
pub fn init_params(cfg: &NeuronSparkConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let specs = param_specs(cfg);
    let tables = SnnInitTables::new(cfg.n, cfg.v_th_min);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(specs.len().max(1));
    let next = AtomicUsize::new(0);
    let done = Mutex::new(BTreeMap::new());
    // A shared work index instead of fixed chunks: the tensor sizes differ by orders of magnitude.
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(spec) = specs.get(i) else { break };
                let t = init_param_with(spec, cfg, &tables, seed);
                // A poisoned lock only means another worker panicked; keep the data regardless.
                done.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.key.clone(), t);
            });
        }
    });
    done.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// One parameter, initialised exactly as [`init_params`] would.
pub fn init_param(spec: &ParamSpec, cfg: &NeuronSparkConfig, seed: u64) -> Tensor {
    init_param_with(spec, cfg, &SnnInitTables::new(cfg.n, cfg.v_th_min), seed)
}

/// Fan-in and fan-out of a weight shaped `(out, in)`, as `torch.nn.init` computes them.
fn fans(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (*n, *n),
        [out, inp, rest @ ..] => {
            let rf: usize = rest.iter().product();
            (inp * rf, out * rf)
        }
    }
}

fn init_param_with(spec: &ParamSpec, cfg: &NeuronSparkConfig, tables: &SnnInitTables, seed: u64) -> Tensor {
    let numel: usize = spec.shape.iter().product();
    let mut rng = Rng::derive(seed, &spec.key);
    let (fan_in, fan_out) = fans(&spec.shape);
    let ku_bound = |scale: f64| scale / (fan_in.max(1) as f64).sqrt();
    let n = cfg.n.max(1);
    let data: Vec<f32> = match &spec.init {
        Init::Normal { mean, std } => (0..numel).map(|_| rng.normal(*mean, *std) as f32).collect(),
        Init::Uniform { lo, hi } => (0..numel).map(|_| rng.uniform_range(*lo, *hi) as f32).collect(),
        Init::Ones => vec![1.0; numel],
        Init::Zeros => vec![0.0; numel],
        Init::Constant(v) => vec![*v as f32; numel],
        Init::KaimingUniform { scale } => {
            let b = ku_bound(*scale);
            (0..numel).map(|_| rng.uniform_range(-b, b) as f32).collect()
        }
        Init::XavierUniform { scale } => {
            let b = scale * (6.0 / (fan_in + fan_out).max(1) as f64).sqrt();
            (0..numel).map(|_| rng.uniform_range(-b, b) as f32).collect()
        }
        // The DN axis is indexed j = d·N + n, so the pattern over n repeats every N entries.
        Init::SnnBetaBias { std } => (0..numel).map(|j| rng.normal(tables.b_beta[j % n], *std) as f32).collect(),
        // The perturbation comes after the floor, so b_th may start slightly negative (spec §10).
        Init::SnnThresholdBias { std } => (0..numel).map(|j| rng.normal(tables.b_th[j % n], *std) as f32).collect(),
        Init::SnnInputRows => {
            // (DN, D): row j scaled by √(1 − β_{j mod N}²).
            let b = ku_bound(1.0);
            let cols = fan_in.max(1);
            (0..numel).map(|i| (rng.uniform_range(-b, b) * tables.w_in_scale[(i / cols) % n]) as f32).collect()
        }
        Init::SnnOutputColumns => {
            // (D, DN): column j scaled by s_{j mod N}.
            let b = ku_bound(1.0);
            let cols = fan_in.max(1);
            (0..numel).map(|i| (rng.uniform_range(-b, b) * tables.w_out_scale[(i % cols) % n]) as f32).collect()
        }
    };
    Tensor::f32(spec.shape.clone(), data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Boundary;

    fn cfg(d: usize, n: usize) -> NeuronSparkConfig {
        NeuronSparkConfig {
            vocab_size: 16,
            d,
            n,
            k: 16,
            num_layers: 1,
            d_ff: 16,
            v_th_min: 0.1,
            boundary: Boundary::Leak,
        }
    }

    fn spec_of(cfg: &NeuronSparkConfig, suffix: &str) -> ParamSpec {
        param_specs(cfg).into_iter().find(|s| s.key.ends_with(suffix)).expect("key exists")
    }

    fn per_n_mean(v: &[f32], n: usize) -> Vec<f64> {
        let rows = v.len() / n;
        (0..n).map(|k| (0..rows).map(|r| v[r * n + k] as f64).sum::<f64>() / rows as f64).collect()
    }

    #[test]
    fn snn_block_statistics_match_the_spec_for_n8() {
        // D = 896, N = 8: the spec's verified statistics.
        let c = cfg(896, 8);
        let b_beta = init_param(&spec_of(&c, "snn_block.b_beta"), &c, 1).into_f32().expect("f32");
        let mean = b_beta.iter().map(|&x| x as f64).sum::<f64>() / b_beta.len() as f64;
        assert!((mean - 2.445).abs() < 0.005, "b_beta mean {mean}");
        let b_th = init_param(&spec_of(&c, "snn_block.b_th"), &c, 1).into_f32().expect("f32");
        let mean = b_th.iter().map(|&x| x as f64).sum::<f64>() / b_th.len() as f64;
        assert!((mean - 0.0966).abs() < 0.001, "b_th mean {mean}");
        let t = SnnInitTables::new(8, 0.1);
        for (got, want) in per_n_mean(&b_th, 8).iter().zip(&t.b_th) {
            assert!((got - want).abs() < 0.004, "{got} vs {want}");
        }
        let w_in = init_param(&spec_of(&c, "W_in.weight"), &c, 1).into_f32().expect("f32");
        let max = w_in.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let bound = 0.6 / 896f64.sqrt(); // 0.0334 × 0.6 = 0.02004
        assert!(max as f64 <= bound * (1.0 + 1e-6) && max as f64 > bound * 0.9999, "W_in max {max}");
        // Rows of the last n are scaled by √(1 − 0.99²) = 0.1411.
        let row_max = |n: usize| {
            (0..896).map(|d| d * 8 + n).flat_map(|j| &w_in[j * 896..(j + 1) * 896]).fold(0f32, |m, &x| m.max(x.abs()))
        };
        assert!((row_max(7) as f64 / (0.14107 / 896f64.sqrt()) - 1.0).abs() < 1e-3);
    }

    #[test]
    fn w_out_columns_are_scaled_per_n() {
        let c = cfg(32, 4);
        let t = SnnInitTables::new(4, 0.1);
        let w = init_param(&spec_of(&c, "W_out.weight"), &c, 3).into_f32().expect("f32");
        let bound = 1.0 / 128f64.sqrt();
        for k in 0..4 {
            let max = (0..32)
                .flat_map(|r| (0..32).map(move |d| r * 128 + d * 4 + k))
                .fold(0f64, |m, i| m.max(w[i].abs() as f64));
            let lim = bound * t.w_out_scale[k];
            assert!(max <= lim * (1.0 + 1e-6) && max > lim * 0.95, "n={k}: {max} vs {lim}");
        }
    }

    #[test]
    fn deterministic_per_seed_and_order_independent() {
        let c = NeuronSparkConfig::tiny();
        let a = init_params(&c, 42);
        let b = init_params(&c, 42);
        let other = init_params(&c, 43);
        assert_eq!(a.len(), 67);
        assert_eq!(a, b);
        for (k, t) in &a {
            let bytes = |t: &Tensor| t.as_f32().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            assert_eq!(bytes(t), bytes(&b[k]), "{k}");
            assert_eq!(t.shape, other[k].shape);
        }
        // Random tensors differ with the seed; the constant ones do not.
        assert_ne!(a["embed_tokens.weight"], other["embed_tokens.weight"]);
        assert_ne!(a["layers.1.snn_block.b_th"], other["layers.1.snn_block.b_th"]);
        assert_eq!(a["norm.gain"], other["norm.gain"]);
        // One tensor on its own equals the same tensor built with the whole set.
        let spec = spec_of(&c, "layers.1.snn_ffn.down_proj.weight");
        assert_eq!(init_param(&spec, &c, 42), a[&spec.key]);
    }

    #[test]
    fn simple_rules() {
        let c = NeuronSparkConfig::tiny();
        let p = init_params(&c, 0);
        let f = |k: &str| p[k].as_f32().expect("f32").to_vec();
        assert!(f("layers.0.block_halt.bias").iter().all(|&x| x == -3.5));
        assert!(f("decode_proj.bias").iter().all(|&x| x == 0.0));
        assert!(f("layers.1.ffn_norm.weight").iter().all(|&x| x == 1.0));
        assert!(f("layers.0.input_neuron2.v_th").iter().all(|&x| (0.25..0.75).contains(&x)));
        assert!(f("layers.0.snn_ffn.up_neuron.v_th").iter().all(|&x| (0.075..0.225).contains(&x)));
        assert!(f("output_neuron.v_th").iter().all(|&x| (0.15..0.45).contains(&x)));
        let halt_bound = 0.01 * (6.0f32 / 65.0).sqrt();
        assert!(f("layers.1.ffn_halt.weight").iter().all(|&x| x.abs() <= halt_bound));
        let down_bound = 1.0 / (128f32.sqrt() * 2f32.sqrt());
        assert!(f("layers.0.snn_ffn.down_proj.weight").iter().all(|&x| x.abs() <= down_bound));
        let w_beta_bound = 0.1 / 8.0;
        assert!(f("layers.0.snn_block.W_beta_x.weight").iter().all(|&x| x.abs() <= w_beta_bound));
    }
}
