//! NeuronSpark (spec §2–§6) as an IR graph.
//!
//! Layout is `[B, T, K, C]` (batch, tokens, frames per token, channels); the frame order s =
//! t·K + k of the original is the row-major order of (T, K). Every scan's state is an explicit
//! graph input `state.<neuron>.<var>` and its final value the output of the same name, so a
//! runtime carries state across calls (incremental generation) without knowing the model.

use crate::config::{Boundary, NeuronSparkConfig};
use sparkc_ir::neuron;
use sparkc_ir::{parse_expr, DType, Dim, Graph, IrError, Op, Shape, StateScope, Value, ValueType};

/// What to build besides the forward pass.
#[derive(Clone, Debug)]
pub struct GraphOptions {
    /// Add `target_ids` / `loss_mask` inputs and the `ce_per_token`, `lm_loss`, `total_loss` outputs.
    pub with_loss: bool,
    /// Weight of the ponder cost in `total_loss` (spec §14: 0.01).
    pub ponder_weight: f64,
    /// Also output the residual stream after the embedding and after every layer.
    pub debug_outputs: bool,
}

impl Default for GraphOptions {
    fn default() -> Self {
        GraphOptions { with_loss: false, ponder_weight: 0.01, debug_outputs: false }
    }
}

/// Prefix of the graph inputs/outputs that carry neuron state.
pub const STATE_PREFIX: &str = "state.";

pub const RMS_EPS: f64 = 1e-6;

struct Builder<'a> {
    g: Graph,
    cfg: &'a NeuronSparkConfig,
    emit: &'static str,
}

impl Builder<'_> {
    fn param(&mut self, key: &str, dims: &[usize]) -> Result<Value, IrError> {
        self.g.param(key, ValueType::f32(dims.iter().copied()))
    }

    fn map(&mut self, expr: &str, operands: &[Value], name: &str) -> Result<Value, IrError> {
        let e = parse_expr(expr)?;
        self.g.add1(Op::Map { expr: e }, operands, name)
    }

    fn linear(&mut self, x: Value, key: &str, out: usize, inp: usize, name: &str) -> Result<Value, IrError> {
        let w = self.param(&format!("{key}.weight"), &[out, inp])?;
        self.g.add1(Op::Linear { bias: false }, &[x, w], name)
    }

    fn rms_norm(&mut self, x: Value, key: &str) -> Result<Value, IrError> {
        let w = self.param(key, &[self.cfg.d])?;
        self.g.add1(Op::RmsNorm { eps: RMS_EPS }, &[x, w], key)
    }

    /// A scan whose every state variable is fed from and returned to the graph boundary.
    fn scan(
        &mut self,
        model: &str,
        path: &str,
        inputs: &[Value],
        params: &[Value],
        channels: usize,
        emit: &str,
    ) -> Result<Value, IrError> {
        let state_vars: Vec<String> = self.g.neurons[model].state.iter().map(|s| s.name.clone()).collect();
        let mut operands = inputs.to_vec();
        operands.extend_from_slice(params);
        for var in &state_vars {
            let ty = ValueType::new(DType::F32, Shape(vec![Dim::sym("B"), Dim::from(channels)]));
            operands.push(self.g.input(&format!("{STATE_PREFIX}{path}.{var}"), ty));
        }
        let op = Op::Scan { neuron: model.into(), emit: vec![emit.into()], scope: StateScope::Sequence };
        let results = self.g.add(op, &operands, path)?;
        for (i, var) in state_vars.iter().enumerate() {
            self.g.set_output(&format!("{STATE_PREFIX}{path}.{var}"), results[1 + i]);
        }
        Ok(results[0])
    }

    /// A fixed-parameter PLIF (`<path>.w`, `<path>.v_th`) emitting the boundary activation.
    fn plif(&mut self, x: Value, path: &str, channels: usize) -> Result<Value, IrError> {
        let w = self.param(&format!("{path}.w"), &[channels])?;
        let v_th = self.param(&format!("{path}.v_th"), &[channels])?;
        self.scan("plif", path, &[x], &[w, v_th], channels, self.emit)
    }

    /// PonderNet aggregation, out-projection, residual centering and the residual add (§2.2, §6).
    /// Returns the new residual stream and the sub-layer's mean E[K].
    fn ponder_residual(&mut self, h: Value, c: Value, prefix: &str, halt: &str, out_proj: &str) -> Result<(Value, Value), IrError> {
        let d = self.cfg.d;
        let hw = self.param(&format!("{prefix}.{halt}.weight"), &[1, d])?;
        let hb = self.param(&format!("{prefix}.{halt}.bias"), &[1])?;
        let logits = self.g.add1(Op::Linear { bias: true }, &[c, hw, hb], &format!("{prefix}.{halt}"))?;
        let pw = self.g.add(Op::PonderWeights { clamp: 1e-7, eps: 1e-8 }, &[logits], &format!("{prefix}.{halt}.ponder"))?;
        let y = self.g.add1(Op::FrameWeightedSum, &[c, pw[0]], &format!("{prefix}.{halt}.aggregate"))?;
        let r = self.linear(y, &format!("{prefix}.{out_proj}"), d, d, &format!("{prefix}.{out_proj}"))?;
        let r = self.g.add1(Op::CenterLast, &[r], &format!("{prefix}.{out_proj}.center"))?;
        let r = self.g.add1(Op::RepeatFrames { frames: Dim::sym("K") }, &[r], &format!("{prefix}.{out_proj}.broadcast"))?;
        let h = self.map("x0 + x1", &[h, r], &format!("{prefix}.{out_proj}.residual"))?;
        let cost = self.g.add1(Op::Mean, &[pw[1]], &format!("{prefix}.{halt}.cost"))?;
        Ok((h, cost))
    }

    fn snn_block(&mut self, a: Value, p: &str) -> Result<Value, IrError> {
        let (d, dn) = (self.cfg.d, self.cfg.dn());
        let b = format!("{p}.snn_block");
        let i = self.linear(a, &format!("{b}.W_in"), dn, d, &format!("{b}.W_in"))?;
        let rb = self.linear(a, &format!("{b}.W_beta_x"), dn, d, &format!("{b}.W_beta_x"))?;
        let ra = self.linear(a, &format!("{b}.W_alpha_x"), dn, d, &format!("{b}.W_alpha_x"))?;
        let rt = self.linear(a, &format!("{b}.W_th_x"), dn, d, &format!("{b}.W_th_x"))?;
        let bb = self.param(&format!("{b}.b_beta"), &[dn])?;
        let ba = self.param(&format!("{b}.b_alpha"), &[dn])?;
        let bt = self.param(&format!("{b}.b_th"), &[dn])?;
        let beta = self.map("sigmoid(x0 + x1)", &[rb, bb], &format!("{b}.beta"))?;
        let u = self.map("softplus(x0 + x1) * x2", &[ra, ba, i], &format!("{b}.u"))?;
        let vmin = format!("{:?}", self.cfg.v_th_min);
        let theta = self.map(&format!("{vmin} + abs(x0 + x1)"), &[rt, bt], &format!("{b}.theta"))?;
        let vpost = self.scan("selective_plif", &format!("{b}.hidden_neuron"), &[beta, u, theta], &[], dn, "vpost")?;
        let gate = self.linear(a, &format!("{b}.W_gate"), d, d, &format!("{b}.W_gate"))?;
        let skip = self.linear(a, &format!("{b}.W_skip"), d, d, &format!("{b}.W_skip"))?;
        let out = self.linear(vpost, &format!("{b}.W_out"), d, dn, &format!("{b}.W_out"))?;
        self.map("x0 * sigmoid(x1) + x2", &[out, gate, skip], &format!("{b}.output"))
    }

    fn snn_ffn(&mut self, a: Value, p: &str) -> Result<Value, IrError> {
        let (d, dff) = (self.cfg.d, self.cfg.d_ff);
        let f = format!("{p}.snn_ffn");
        let g = self.linear(a, &format!("{f}.gate_proj"), dff, d, &format!("{f}.gate_proj"))?;
        let u = self.linear(a, &format!("{f}.up_proj"), dff, d, &format!("{f}.up_proj"))?;
        let skip = self.linear(a, &format!("{f}.skip_proj"), d, d, &format!("{f}.skip_proj"))?;
        let gate = self.plif(g, &format!("{f}.gate_neuron"), dff)?;
        let up = self.plif(u, &format!("{f}.up_neuron"), dff)?;
        let prod = self.map("x0 * x1", &[gate, up], &format!("{f}.gate_up"))?;
        let down = self.linear(prod, &format!("{f}.down_proj"), d, dff, &format!("{f}.down_proj"))?;
        self.map("x0 + x1", &[down, skip], &format!("{f}.output"))
    }
}

/// Build the NeuronSpark graph for `cfg`.
///
/// Inputs: `input_ids` i64[B,T], the `state.*` inputs, and with loss `target_ids` i64[B,T] and
/// `loss_mask` f32[B,T]. Outputs: `logits` [B,T,V], `ponder_cost` [], the `state.*` finals, and
/// with loss `ce_per_token` [B,T], `lm_loss` [], `total_loss` [].
pub fn build_graph(cfg: &NeuronSparkConfig, opts: &GraphOptions) -> Result<Graph, IrError> {
    cfg.validate().map_err(IrError::Graph)?;
    let emit = match cfg.boundary {
        Boundary::Leak => "leak",
        Boundary::Vpost => "vpost",
    };
    let mut g = Graph::new(&format!("neuronspark_{}", cfg.boundary.name()));
    g.bind_dim("K", cfg.k as u64);
    g.add_neuron(neuron::plif())?;
    g.add_neuron(neuron::selective_plif())?;
    let mut bld = Builder { g, cfg, emit };
    let (v, d) = (cfg.vocab_size, cfg.d);

    let ids = bld.g.input("input_ids", ValueType::i64(["B", "T"]));
    let table = bld.param("embed_tokens.weight", &[v, d])?;
    let e = bld.g.add1(Op::Embedding, &[table, ids], "embed")?;
    let mut h = bld.g.add1(Op::RepeatFrames { frames: Dim::sym("K") }, &[e], "embed.frames")?;
    if opts.debug_outputs {
        bld.g.set_output("h_embed", h);
    }
    let mut layer_costs = Vec::new();
    for i in 0..cfg.num_layers {
        let p = format!("layers.{i}");
        let x = bld.rms_norm(h, &format!("{p}.block_norm.weight"))?;
        let a = bld.plif(x, &format!("{p}.input_neuron1"), d)?;
        let c = bld.snn_block(a, &p)?;
        let (h1, pc1) = bld.ponder_residual(h, c, &p, "block_halt", "block_out_proj")?;
        let x = bld.rms_norm(h1, &format!("{p}.ffn_norm.weight"))?;
        let a = bld.plif(x, &format!("{p}.input_neuron2"), d)?;
        let c = bld.snn_ffn(a, &p)?;
        let (h2, pc2) = bld.ponder_residual(h1, c, &p, "ffn_halt", "ffn_out_proj")?;
        h = h2;
        layer_costs.push(bld.map("(x0 + x1) / 2.0", &[pc1, pc2], &format!("{p}.ponder_cost"))?);
        if opts.debug_outputs {
            bld.g.set_output(&format!("h_after_layer{i}"), h);
        }
    }
    let terms: Vec<String> = (0..layer_costs.len()).map(|i| format!("x{i}")).collect();
    let mean = format!("({}) / {:?}", terms.join(" + "), layer_costs.len() as f64);
    let ponder = bld.map(&mean, &layer_costs, "ponder_cost")?;

    let z = bld.rms_norm(h, "output_norm.weight")?;
    let z = bld.plif(z, "output_neuron", d)?;
    let zm = bld.g.add1(Op::MeanFrames, &[z], "decode.frame_mean")?;
    let dw = bld.param("decode_proj.weight", &[d, d])?;
    let db = bld.param("decode_proj.bias", &[d])?;
    let q = bld.g.add1(Op::Linear { bias: true }, &[zm, dw, db], "decode_proj")?;
    let gain = bld.param("norm.gain", &[d])?;
    let q = bld.g.add1(Op::LateralInhibition { eps: RMS_EPS }, &[q, gain], "lateral_inhibition")?;
    // The tied head reads the embedding table itself.
    let logits = bld.g.add1(Op::Linear { bias: false }, &[q, table], "lm_head")?;
    bld.g.set_output("logits", logits);
    bld.g.set_output("ponder_cost", ponder);

    if opts.with_loss {
        let targets = bld.g.input("target_ids", ValueType::i64(["B", "T"]));
        let mask = bld.g.input("loss_mask", ValueType::f32(["B", "T"]));
        let ce = bld.g.add1(Op::CrossEntropy { ignore_index: 0 }, &[logits, targets], "cross_entropy")?;
        let lm = bld.g.add1(Op::MaskedMean, &[ce, mask], "lm_loss")?;
        let total = bld.map(&format!("x0 + {:?} * x1", opts.ponder_weight), &[lm, ponder], "total_loss")?;
        bld.g.set_output("ce_per_token", ce);
        bld.g.set_output("lm_loss", lm);
        bld.g.set_output("total_loss", total);
    }
    sparkc_ir::verify::verify(&bld.g)?;
    Ok(bld.g)
}

/// The recurrent state of one sequence, in floats (spec §16).
pub fn state_floats_per_sequence(cfg: &NeuronSparkConfig) -> u64 {
    (cfg.num_layers * (2 * cfg.d + cfg.dn() + 2 * cfg.d_ff) + cfg.d) as u64
}

/// The parameters whose gradients [`compensate_gradients`] reads and rewrites.
pub fn compensated_keys(cfg: &NeuronSparkConfig) -> Vec<String> {
    (0..cfg.num_layers).flat_map(|i| ["b_beta", "b_alpha", "b_th"].map(|n| format!("layers.{i}.snn_block.{n}"))).collect()
}

/// Natural-gradient compensation of spec §7, applied to parameter gradients before clipping.
///
/// Phase 1 rescales the gradients of the static modulation biases by the saturation of their
/// activations (b_β by max(σ(b_β)(1−σ(b_β)), 1/C_max), b_α by max(σ(b_α), 0.1)); phase 2
/// equalises b_β, b_α and b_th across layers towards the geometric mean of their norms, with
/// the ratio clamped to [1/C_max, C_max].
pub fn compensate_gradients(
    grads: &mut std::collections::BTreeMap<String, sparkc_ir::Tensor>,
    params: &std::collections::BTreeMap<String, sparkc_ir::Tensor>,
    cfg: &NeuronSparkConfig,
    c_max: f64,
) -> Result<(), String> {
    let sigmoid = |x: f32| 1.0 / (1.0 + (-(x as f64)).exp());
    let key = |i: usize, name: &str| format!("layers.{i}.snn_block.{name}");
    let slice = |map: &mut std::collections::BTreeMap<String, sparkc_ir::Tensor>, k: &str| -> Result<Vec<f64>, String> {
        let t = map.get(k).ok_or_else(|| format!("no gradient for `{k}`"))?;
        Ok(t.as_f32().ok_or_else(|| format!("gradient `{k}` is not f32"))?.iter().map(|&v| v as f64).collect())
    };
    let store = |map: &mut std::collections::BTreeMap<String, sparkc_ir::Tensor>, k: &str, v: Vec<f64>| {
        if let Some(t) = map.get_mut(k).and_then(|t| t.as_f32_mut()) {
            t.iter_mut().zip(v).for_each(|(a, b)| *a = b as f32);
        }
    };
    for i in 0..cfg.num_layers {
        for (name, floor) in [("b_beta", None), ("b_alpha", Some(0.1))] {
            let k = key(i, name);
            let p = params.get(&k).and_then(|t| t.as_f32()).ok_or_else(|| format!("no parameter `{k}`"))?;
            let g = slice(grads, &k)?;
            let scaled = g
                .iter()
                .zip(p)
                .map(|(&g, &b)| {
                    let s = sigmoid(b);
                    let denom = match floor {
                        None => (s * (1.0 - s)).max(1.0 / c_max),
                        Some(f) => s.max(f),
                    };
                    g / denom
                })
                .collect();
            store(grads, &k, scaled);
        }
    }
    for name in ["b_beta", "b_alpha", "b_th"] {
        let layers: Vec<(String, Vec<f64>)> = (0..cfg.num_layers)
            .map(|i| {
                let k = key(i, name);
                slice(grads, &k).map(|g| (k, g))
            })
            .collect::<Result<_, _>>()?;
        let norms: Vec<(usize, f64)> = layers
            .iter()
            .enumerate()
            .map(|(i, (_, g))| (i, g.iter().map(|v| v * v).sum::<f64>().sqrt()))
            .filter(|(_, n)| *n > 1e-12)
            .collect();
        if norms.len() < 2 {
            continue;
        }
        let geo = (norms.iter().map(|(_, n)| n.ln()).sum::<f64>() / norms.len() as f64).exp();
        for (i, n) in norms {
            let scale = (geo / n).clamp(1.0 / c_max, c_max);
            let (k, g) = &layers[i];
            store(grads, k, g.iter().map(|v| v * scale).collect());
        }
    }
    Ok(())
}
