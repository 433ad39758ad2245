//! The NeuronSpark parameter table: every key, its shape, its share of the parameter count, its
//! initialisation rule and its optimizer group (spec §10, §11, §14, §18 item 17).
//!
//! This module is the single source of truth for "which tensors make a NeuronSpark model". The
//! checkpoint loader validates against it, the initialiser ([`crate::init`]) draws from it and the
//! graph builder looks shapes up in it, so a key can only be renamed in one place.
//!
//! Keys are the raw state-dict names (no `model.` prefix). Weights use PyTorch's `(out, in)`
//! row-major layout.

use crate::config::NeuronSparkConfig;
use std::fmt;

/// Where a parameter belongs in the count breakdown of spec §11.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// SNNBlock `W_in`, `W_beta_x`, `W_alpha_x`, `W_th_x` (4 × D→DN).
    SnnBlockProjections,
    /// SNNBlock `W_out` (DN→D).
    SnnBlockOut,
    /// SNNBlock `W_gate` and `W_skip` (2 × D→D).
    SnnBlockGateSkip,
    /// SNNBlock `b_beta`, `b_alpha`, `b_th` (3 × DN).
    SnnBlockBiases,
    /// SNNFFN `gate_proj`, `up_proj`, `down_proj`.
    FfnProjections,
    /// SNNFFN `skip_proj` (D→D).
    FfnSkip,
    /// SNNFFN gate/up PLIF neurons (`w`, `v_th`, D_ff each).
    FfnNeurons,
    /// `block_out_proj` and `ffn_out_proj` (2 × D²).
    ResidualOutProj,
    /// Per-layer norms, the two input neurons and the two halt projections.
    NormsNeuronsHalts,
    /// The (tied) token embedding.
    Embedding,
    /// `decode_proj` weight and bias.
    DecodeProj,
    /// `norm.gain`, `output_norm.weight` and the output neuron.
    GlobalNormsNeuron,
}

impl Component {
    /// All components in the order of the spec §11 table.
    pub const ALL: [Component; 12] = [
        Component::SnnBlockProjections,
        Component::SnnBlockOut,
        Component::SnnBlockGateSkip,
        Component::SnnBlockBiases,
        Component::FfnProjections,
        Component::FfnSkip,
        Component::FfnNeurons,
        Component::ResidualOutProj,
        Component::NormsNeuronsHalts,
        Component::Embedding,
        Component::DecodeProj,
        Component::GlobalNormsNeuron,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Component::SnnBlockProjections => "SNNBlock: 4 projections D→DN",
            Component::SnnBlockOut => "SNNBlock: W_out DN→D",
            Component::SnnBlockGateSkip => "SNNBlock: W_gate + W_skip",
            Component::SnnBlockBiases => "SNNBlock: b_beta, b_alpha, b_th",
            Component::FfnProjections => "SNNFFN: gate + up + down",
            Component::FfnSkip => "SNNFFN: skip",
            Component::FfnNeurons => "SNNFFN: gate/up neurons (w, v_th)",
            Component::ResidualOutProj => "Residual out-projections",
            Component::NormsNeuronsHalts => "Norms + input neurons + halts",
            Component::Embedding => "Embedding (tied)",
            Component::DecodeProj => "decode_proj",
            Component::GlobalNormsNeuron => "norm.gain, output_norm, output neuron",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// An initialisation rule (spec §10). Fan-in/fan-out are read from the parameter's shape
/// `(out, in)`; the structured SNNBlock rules index the DN axis as `j = d·N + n`.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// Independent N(mean, std) entries.
    Normal {
        mean: f64,
        std: f64,
    },
    /// Independent U(lo, hi) entries.
    Uniform {
        lo: f64,
        hi: f64,
    },
    Ones,
    Zeros,
    /// Every entry equal to the value (the halt biases, −3.5).
    Constant(f64),
    /// PyTorch's default Linear init, `kaiming_uniform_(a = √5)`: U(−b, b) with
    /// b = scale / √fan_in.
    KaimingUniform {
        scale: f64,
    },
    /// `xavier_uniform_` then multiplied by `scale`: U(−b, b) with b = scale·√(6 / (fan_in + fan_out)).
    XavierUniform {
        scale: f64,
    },
    /// `b_beta`: logit(β_n) + N(0, std), β_n = linspace(0.80, 0.99, N).
    SnnBetaBias {
        std: f64,
    },
    /// `b_th`: max(σ_V,n·Φ⁻¹(1 − p_fire,n) − v_min, 0.05) + N(0, std).
    SnnThresholdBias {
        std: f64,
    },
    /// `W_in`: Kaiming-uniform with row j = d·N + n multiplied by √(1 − β_n²).
    SnnInputRows,
    /// `W_out`: Kaiming-uniform (fan_in = DN) with column j = d·N + n multiplied by s_n.
    SnnOutputColumns,
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Init::Normal { mean, std } => write!(f, "N({mean}, {std})"),
            Init::Uniform { lo, hi } => write!(f, "U({lo}, {hi})"),
            Init::Ones => f.write_str("ones"),
            Init::Zeros => f.write_str("zeros"),
            Init::Constant(v) => write!(f, "constant {v}"),
            Init::KaimingUniform { scale } => write!(f, "kaiming-uniform(a=√5) × {scale}"),
            Init::XavierUniform { scale } => write!(f, "xavier-uniform × {scale}"),
            Init::SnnBetaBias { std } => write!(f, "logit(β_n) + N(0, {std})"),
            Init::SnnThresholdBias { std } => write!(f, "b_th,n + N(0, {std})"),
            Init::SnnInputRows => f.write_str("kaiming-uniform(a=√5), rows × √(1−β_n²)"),
            Init::SnnOutputColumns => f.write_str("kaiming-uniform(a=√5), columns × s_n"),
        }
    }
}

/// One parameter tensor of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Raw state-dict key, e.g. `layers.3.snn_block.W_in.weight`.
    pub key: String,
    pub shape: Vec<usize>,
    pub component: Component,
    pub init: Init,
    /// In the neuron optimizer group (lr × 10, no weight decay in SFT): spec §14, §18 item 17.
    pub neuron_group: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&s| s as u64).product()
    }

    /// The layer index for per-layer keys, `None` for the globals.
    pub fn layer(&self) -> Option<usize> {
        let rest = self.key.strip_prefix("layers.")?;
        rest.split('.').next()?.parse().ok()
    }
}

// Constants of the structured SNNBlock init and the fixed neurons (spec §1, §10).
/// Lowest and highest hidden-neuron decay β_n.
pub const BETA_RANGE: (f64, f64) = (0.80, 0.99);
/// Reference frame count for the membrane-variance estimate. A constant of the original code, not
/// the config's K (checked against the golden tiny weights, which have K = 4).
pub const K_REF: u32 = 16;
/// Assumed input firing rate p.
pub const P_INPUT: f64 = 0.15;
/// Target firing rate range p_fire,n (from n = 0 to n = N−1).
pub const P_FIRE_RANGE: (f64, f64) = (0.25, 0.08);
/// Floor applied to the structured threshold bias before the perturbation.
pub const B_TH_FLOOR: f64 = 0.05;
/// b_alpha init mean: softplus(0.5413) ≈ 1.
pub const B_ALPHA_MEAN: f64 = 0.5413;
/// Halt-projection bias init.
pub const HALT_BIAS: f64 = -3.5;
/// PLIF time-constant init τ0; the `w` init mean is −ln(τ0 − 1) = 0.
pub const PLIF_TAU0: f64 = 2.0;
/// PLIF threshold init v0 per neuron kind.
pub const V0_INPUT: f64 = 0.5;
pub const V0_FFN: f64 = 0.15;
pub const V0_OUTPUT: f64 = 0.3;

/// `torch.linspace(lo, hi, n)` in f64 (a single point is `lo`).
pub fn linspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![lo],
        _ => (0..n).map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64).collect(),
    }
}

/// The N-dependent values of the structured SNNBlock init (spec §10), one entry per n.
#[derive(Clone, Debug, PartialEq)]
pub struct SnnInitTables {
    pub beta: Vec<f64>,
    /// logit(β_n), the mean of `b_beta`.
    pub b_beta: Vec<f64>,
    /// σ_V,n = √(p/3)·√(1 − β_n^{2·K_ref}).
    pub sigma_v: Vec<f64>,
    pub p_fire: Vec<f64>,
    /// The mean of `b_th` (before its perturbation).
    pub b_th: Vec<f64>,
    /// `W_in` row scale √(1 − β_n²).
    pub w_in_scale: Vec<f64>,
    /// `W_out` column scale s_n = (1/√p_fire,n) / mean(1/√p_fire).
    pub w_out_scale: Vec<f64>,
}

impl SnnInitTables {
    pub fn new(n: usize, v_th_min: f64) -> SnnInitTables {
        let beta = linspace(BETA_RANGE.0, BETA_RANGE.1, n);
        let p_fire = linspace(P_FIRE_RANGE.0, P_FIRE_RANGE.1, n);
        let b_beta = beta.iter().map(|&b| (b / (1.0 - b)).ln()).collect();
        let sigma_v: Vec<f64> =
            beta.iter().map(|&b| (P_INPUT / 3.0).sqrt() * (1.0 - b.powi(2 * K_REF as i32)).sqrt()).collect();
        let b_th = sigma_v
            .iter()
            .zip(&p_fire)
            .map(|(&s, &p)| (s * inverse_normal_cdf(1.0 - p) - v_th_min).max(B_TH_FLOOR))
            .collect();
        let w_in_scale = beta.iter().map(|&b| (1.0 - b * b).sqrt()).collect();
        let inv_sqrt: Vec<f64> = p_fire.iter().map(|&p| 1.0 / p.sqrt()).collect();
        let mean = inv_sqrt.iter().sum::<f64>() / n.max(1) as f64;
        let w_out_scale = inv_sqrt.iter().map(|&v| v / mean).collect();
        SnnInitTables { beta, b_beta, sigma_v, p_fire, b_th, w_in_scale, w_out_scale }
    }
}

/// Φ⁻¹(p), the standard normal quantile, for p in (0, 1); ±∞ at 0 and 1, NaN outside.
///
/// Acklam's rational approximation (relative error < 1.15e-9) polished by one Halley step
/// against an accurate Φ, which brings it to ~1e-15 where Φ is representable.
pub fn inverse_normal_cdf(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    // Work in the lower half so the Halley residual Φ(x) − p is computed without cancellation.
    if p > 0.5 {
        return -inverse_normal_cdf(1.0 - p);
    }
    let x = acklam(p);
    let e = normal_cdf(x) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    let refined = x - u / (1.0 + x * u / 2.0);
    if refined.is_finite() {
        refined
    } else {
        x
    }
}

/// Acklam's approximation of Φ⁻¹ (relative error < 1.15e-9) for p in (0, 1).
pub fn acklam(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.38357751867269e+02,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00];
    const P_LOW: f64 = 0.02425;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// Φ(x), the standard normal CDF, accurate to ~1e-15 relative in the lower tail.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The complementary error function.
///
/// For |z| < 3 it uses the all-positive series erf(z) = 2/√π·e^{−z²}·Σ 2ⁿz^{2n+1}/(2n+1)!!
/// (no cancellation); above that the continued fraction of erfc, evaluated by modified Lentz.
pub fn erfc(z: f64) -> f64 {
    if z.is_nan() {
        return f64::NAN;
    }
    if z < 0.0 {
        return 2.0 - erfc(-z);
    }
    let two_over_sqrt_pi = 2.0 / std::f64::consts::PI.sqrt();
    if z < 3.0 {
        let z2 = z * z;
        let mut term = z;
        let mut sum = z;
        let mut k = 0.0;
        while term > sum * 1e-17 {
            k += 1.0;
            term *= 2.0 * z2 / (2.0 * k + 1.0);
            sum += term;
        }
        return 1.0 - two_over_sqrt_pi * (-z2).exp() * sum;
    }
    // erfc(z) = e^{−z²}/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + 2/(z + ...))))).
    let tiny = 1e-300;
    let mut f = z;
    let mut c = z;
    let mut d = 0.0;
    for i in 1..300 {
        let a = i as f64 / 2.0;
        d = z + a * d;
        if d.abs() < tiny {
            d = tiny;
        }
        c = z + a / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    (-z * z).exp() / (std::f64::consts::PI.sqrt() * f)
}

fn spec(key: String, shape: Vec<usize>, component: Component, init: Init, neuron_group: bool) -> ParamSpec {
    ParamSpec { key, shape, component, init, neuron_group }
}

fn plif_neuron(out: &mut Vec<ParamSpec>, prefix: &str, width: usize, v0: f64, component: Component) {
    // w ~ N(−ln(τ0 − 1), 0.5), v_th ~ U(0.5·v0, 1.5·v0); both in the neuron group.
    out.push(spec(
        format!("{prefix}.w"),
        vec![width],
        component,
        Init::Normal { mean: -(PLIF_TAU0 - 1.0).ln(), std: 0.5 },
        true,
    ));
    out.push(spec(
        format!("{prefix}.v_th"),
        vec![width],
        component,
        Init::Uniform { lo: 0.5 * v0, hi: 1.5 * v0 },
        true,
    ));
}

/// Every parameter of the model, in a stable order: the 7 globals, then the 30 keys of each layer.
/// The keys of the neuron optimizer group (lr × 10; see [`ParamSpec::neuron_group`]).
pub fn neuron_group_keys(cfg: &NeuronSparkConfig) -> Vec<String> {
    param_specs(cfg).into_iter().filter(|s| s.neuron_group).map(|s| s.key).collect()
}

pub fn param_specs(cfg: &NeuronSparkConfig) -> Vec<ParamSpec> {
    use Component as C;
    let (v, d, dn, dff, l) = (cfg.vocab_size, cfg.d, cfg.dn(), cfg.d_ff, cfg.num_layers);
    let ku = |scale: f64| Init::KaimingUniform { scale };
    let mut out = Vec::with_capacity(7 + 30 * l);

    out.push(spec(
        "embed_tokens.weight".into(),
        vec![v, d],
        C::Embedding,
        Init::Normal { mean: 0.0, std: 0.02 },
        false,
    ));
    out.push(spec("norm.gain".into(), vec![d], C::GlobalNormsNeuron, Init::Ones, false));
    out.push(spec("decode_proj.weight".into(), vec![d, d], C::DecodeProj, Init::XavierUniform { scale: 1.0 }, false));
    out.push(spec("decode_proj.bias".into(), vec![d], C::DecodeProj, Init::Zeros, false));
    out.push(spec("output_norm.weight".into(), vec![d], C::GlobalNormsNeuron, Init::Ones, false));
    plif_neuron(&mut out, "output_neuron", d, V0_OUTPUT, C::GlobalNormsNeuron);

    let down_scale = 1.0 / (l as f64).sqrt();
    let out_proj_std = 0.02 / ((2 * l) as f64).sqrt();
    for i in 0..l {
        let p = format!("layers.{i}");
        let sb = format!("{p}.snn_block");
        out.push(spec(format!("{sb}.b_beta"), vec![dn], C::SnnBlockBiases, Init::SnnBetaBias { std: 0.1 }, true));
        out.push(spec(
            format!("{sb}.b_alpha"),
            vec![dn],
            C::SnnBlockBiases,
            Init::Normal { mean: B_ALPHA_MEAN, std: 0.1 },
            true,
        ));
        out.push(spec(format!("{sb}.b_th"), vec![dn], C::SnnBlockBiases, Init::SnnThresholdBias { std: 0.02 }, true));
        out.push(spec(format!("{sb}.W_in.weight"), vec![dn, d], C::SnnBlockProjections, Init::SnnInputRows, false));
        for name in ["W_beta_x", "W_alpha_x", "W_th_x"] {
            out.push(spec(format!("{sb}.{name}.weight"), vec![dn, d], C::SnnBlockProjections, ku(0.1), false));
        }
        for name in ["W_gate", "W_skip"] {
            out.push(spec(format!("{sb}.{name}.weight"), vec![d, d], C::SnnBlockGateSkip, ku(1.0), false));
        }
        out.push(spec(format!("{sb}.W_out.weight"), vec![d, dn], C::SnnBlockOut, Init::SnnOutputColumns, false));

        let ffn = format!("{p}.snn_ffn");
        out.push(spec(format!("{ffn}.gate_proj.weight"), vec![dff, d], C::FfnProjections, ku(1.0), false));
        out.push(spec(format!("{ffn}.up_proj.weight"), vec![dff, d], C::FfnProjections, ku(1.0), false));
        out.push(spec(format!("{ffn}.down_proj.weight"), vec![d, dff], C::FfnProjections, ku(down_scale), false));
        out.push(spec(format!("{ffn}.skip_proj.weight"), vec![d, d], C::FfnSkip, ku(1.0), false));
        plif_neuron(&mut out, &format!("{ffn}.gate_neuron"), dff, V0_FFN, C::FfnNeurons);
        plif_neuron(&mut out, &format!("{ffn}.up_neuron"), dff, V0_FFN, C::FfnNeurons);

        out.push(spec(format!("{p}.block_norm.weight"), vec![d], C::NormsNeuronsHalts, Init::Ones, false));
        out.push(spec(format!("{p}.ffn_norm.weight"), vec![d], C::NormsNeuronsHalts, Init::Ones, false));
        plif_neuron(&mut out, &format!("{p}.input_neuron1"), d, V0_INPUT, C::NormsNeuronsHalts);
        plif_neuron(&mut out, &format!("{p}.input_neuron2"), d, V0_INPUT, C::NormsNeuronsHalts);

        for name in ["block_out_proj", "ffn_out_proj"] {
            out.push(spec(
                format!("{p}.{name}.weight"),
                vec![d, d],
                C::ResidualOutProj,
                Init::Normal { mean: 0.0, std: out_proj_std },
                false,
            ));
        }
        for name in ["block_halt", "ffn_halt"] {
            out.push(spec(
                format!("{p}.{name}.weight"),
                vec![1, d],
                C::NormsNeuronsHalts,
                Init::XavierUniform { scale: 0.01 },
                false,
            ));
            out.push(spec(format!("{p}.{name}.bias"), vec![1], C::NormsNeuronsHalts, Init::Constant(HALT_BIAS), false));
        }
    }
    out
}

/// Parameter count per component, in the order of [`Component::ALL`] (spec §11).
pub fn count_by_component(cfg: &NeuronSparkConfig) -> Vec<(Component, u64)> {
    let specs = param_specs(cfg);
    Component::ALL.iter().map(|&c| (c, specs.iter().filter(|s| s.component == c).map(ParamSpec::numel).sum())).collect()
}

/// Total parameter count.
pub fn total_params(cfg: &NeuronSparkConfig) -> u64 {
    param_specs(cfg).iter().map(ParamSpec::numel).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_table(got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len());
        for (n, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 5.1e-5, "{what}[{n}] = {g}, spec table says {w}");
        }
    }

    #[test]
    fn full_model_count_matches_spec() {
        let cfg = NeuronSparkConfig::neuronspark_0_9b();
        let specs = param_specs(&cfg);
        assert_eq!(specs.len(), 607);
        assert_eq!(total_params(&cfg), 874_142_120);
        let by: std::collections::HashMap<_, _> = count_by_component(&cfg).into_iter().collect();
        let l = 20;
        assert_eq!(by[&Component::SnnBlockProjections], 25_690_112 * l);
        assert_eq!(by[&Component::SnnBlockOut], 6_422_528 * l);
        assert_eq!(by[&Component::SnnBlockGateSkip], 1_605_632 * l);
        assert_eq!(by[&Component::SnnBlockBiases], 21_504 * l);
        assert_eq!(by[&Component::FfnProjections], 7_225_344 * l);
        assert_eq!(by[&Component::FfnSkip], 802_816 * l);
        assert_eq!(by[&Component::FfnNeurons], 10_752 * l);
        assert_eq!(by[&Component::ResidualOutProj], 32_112_640);
        assert_eq!(by[&Component::NormsNeuronsHalts], 143_400);
        assert_eq!(by[&Component::Embedding], 5_505_024);
        assert_eq!(by[&Component::DecodeProj], 803_712);
        assert_eq!(by[&Component::GlobalNormsNeuron], 3_584);
        // Keys are unique, and each layer contributes exactly 30.
        let keys: std::collections::BTreeSet<_> = specs.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys.len(), 607);
        for i in 0..20 {
            assert_eq!(specs.iter().filter(|s| s.layer() == Some(i)).count(), 30);
        }
        assert_eq!(specs.iter().filter(|s| s.layer().is_none()).count(), 7);
    }

    #[test]
    fn neuron_group_is_exactly_the_plif_and_snn_biases() {
        let specs = param_specs(&NeuronSparkConfig::tiny());
        for s in &specs {
            let expected = s.key.ends_with(".w")
                || s.key.ends_with(".v_th")
                || s.key.ends_with(".b_beta")
                || s.key.ends_with(".b_alpha")
                || s.key.ends_with(".b_th");
            assert_eq!(s.neuron_group, expected, "{}", s.key);
        }
        // Per layer: 4 neurons × 2 + 3 biases; globally the output neuron's 2.
        assert_eq!(specs.iter().filter(|s| s.neuron_group).count(), 2 * 11 + 2);
    }

    #[test]
    fn structured_init_reproduces_the_n8_table() {
        let t = SnnInitTables::new(8, 0.1);
        assert_table(&t.beta, &[0.8000, 0.8271, 0.8543, 0.8814, 0.9086, 0.9357, 0.9629, 0.9900], "beta");
        assert_table(&t.b_beta, &[1.3863, 1.5655, 1.7686, 2.0060, 2.2963, 2.6780, 3.2551, 4.5951], "b_beta");
        assert_table(&t.sigma_v, &[0.2235, 0.2233, 0.2229, 0.2216, 0.2183, 0.2098, 0.1874, 0.1173], "sigma_v");
        assert_table(&t.p_fire, &[0.2500, 0.2257, 0.2014, 0.1771, 0.1529, 0.1286, 0.1043, 0.0800], "p_fire");
        assert_table(&t.b_th, &[0.0508, 0.0682, 0.0864, 0.1053, 0.1236, 0.1378, 0.1356, 0.0648], "b_th");
        assert_table(&t.w_in_scale, &[0.6000, 0.5620, 0.5198, 0.4723, 0.4177, 0.3528, 0.2700, 0.1411], "w_in");
        assert_table(&t.w_out_scale, &[0.7734, 0.8140, 0.8616, 0.9188, 0.9891, 1.0785, 1.1975, 1.3672], "w_out");
        // The means the spec observed after init.
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        // 2.445 was observed with the N(0, 0.1) noise; the noiseless mean is 2.4439.
        assert!((mean(&t.b_beta) - 2.445).abs() < 2e-3);
        assert!((mean(&t.b_th) - 0.0966).abs() < 1e-4);
        let s_mean = mean(&t.w_out_scale);
        assert!((s_mean - 1.0).abs() < 1e-12);
    }

    #[test]
    fn structured_init_handles_any_n() {
        for n in [1, 2, 3, 4, 16, 64] {
            let t = SnnInitTables::new(n, 0.1);
            assert_eq!(t.b_th.len(), n);
            assert!(t.b_th.iter().all(|&v| v.is_finite() && v >= B_TH_FLOOR));
            assert!(t.b_beta.iter().all(|v| v.is_finite()));
            assert!(t.w_out_scale.iter().all(|v| v.is_finite() && *v > 0.0));
        }
        assert_eq!(linspace(0.8, 0.99, 1), vec![0.8]);
    }

    #[test]
    fn inverse_normal_cdf_is_accurate() {
        // Reference values from Python's statistics.NormalDist (Wichura AS241, ~1e-16).
        let cases: [(f64, f64); 14] = [
            (1e-300, -37.0470962993612),
            (1e-20, -9.262340089798405),
            (1e-10, -6.361340902404056),
            (1e-5, -4.2648907939228256),
            (0.02425, -1.9729610513118845),
            (0.025, -1.9599639845400538),
            (0.1, -1.2815515655446008),
            (0.3, -0.5244005127080407),
            (0.5, 0.0),
            (0.75, 0.6744897501960817),
            (0.8, 0.8416212335729144),
            (0.9, 1.2815515655446008),
            (0.975, 1.9599639845400536),
            (0.99999, 4.26489079392384),
        ];
        for (p, want) in cases {
            let got = inverse_normal_cdf(p);
            let tol = 1e-12 * want.abs().max(1.0);
            assert!((got - want).abs() <= tol, "Φ⁻¹({p}) = {got}, want {want}");
            // The unrefined approximation must already be within Acklam's bound.
            let raw = acklam(p);
            assert!((raw - want).abs() <= 1.2e-9 * want.abs().max(1e-300) + 1e-15, "acklam({p}) = {raw}");
        }
        assert_eq!(inverse_normal_cdf(0.0), f64::NEG_INFINITY);
        assert_eq!(inverse_normal_cdf(1.0), f64::INFINITY);
        assert!(inverse_normal_cdf(1.5).is_nan());
        assert!(inverse_normal_cdf(f64::NAN).is_nan());
    }

    #[test]
    fn normal_cdf_round_trips() {
        for i in 1..200 {
            let p = i as f64 / 200.0;
            assert!((normal_cdf(inverse_normal_cdf(p)) - p).abs() < 1e-15, "{p}");
        }
        assert!((erfc(0.0) - 1.0).abs() < 1e-16);
        assert!((erfc(3.0) / 2.209_049_699_858_544e-5 - 1.0).abs() < 1e-13);
        assert!((erfc(1.0) / 0.157_299_207_050_285_13 - 1.0).abs() < 1e-14);
    }
}
