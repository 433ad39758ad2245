//! Adam / AdamW with per-parameter learning-rate scale and weight decay (parameter groups).

use sparkc_ir::Tensor;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam; weight decay, if any, is added to the gradient (L2), as torch.optim.Adam does.
    Adam,
    /// AdamW: decoupled weight decay.
    Adamw,
}

/// The group a parameter belongs to: a multiplier on the learning rate and its weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub lr_scale: f64,
    pub weight_decay: f64,
}

#[derive(Clone, Debug)]
pub struct Adam {
    pub kind: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken (t in the bias corrections).
    pub t: u64,
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

impl Adam {
    pub fn new(kind: OptimizerKind) -> Adam {
        Adam { kind, beta1: 0.9, beta2: 0.999, eps: 1e-8, t: 0, m: BTreeMap::new(), v: BTreeMap::new() }
    }

    /// One update of every parameter that has a gradient, at base learning rate `lr`.
    pub fn step(&mut self, params: &mut BTreeMap<String, Tensor>, grads: &BTreeMap<String, Tensor>, lr: f64, groups: &BTreeMap<String, Group>) {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (name, g) in grads {
            let (Some(p), Some(g)) = (params.get_mut(name).and_then(|t| t.as_f32_mut()), g.as_f32()) else { continue };
            let group = groups.get(name).copied().unwrap_or(Group { lr_scale: 1.0, weight_decay: 0.0 });
            let lr = lr * group.lr_scale;
            let m = self.m.entry(name.clone()).or_insert_with(|| vec![0.0; p.len()]);
            let v = self.v.entry(name.clone()).or_insert_with(|| vec![0.0; p.len()]);
            for i in 0..p.len() {
                let mut gi = g[i] as f64;
                if self.kind == OptimizerKind::Adam && group.weight_decay != 0.0 {
                    gi += group.weight_decay * p[i] as f64;
                }
                let mi = b1 * m[i] as f64 + (1.0 - b1) * gi;
                let vi = b2 * v[i] as f64 + (1.0 - b2) * gi * gi;
                m[i] = mi as f32;
                v[i] = vi as f32;
                let mut pi = p[i] as f64;
                if self.kind == OptimizerKind::Adamw && group.weight_decay != 0.0 {
                    pi *= 1.0 - lr * group.weight_decay;
                }
                let denom = (vi / bc2).sqrt() + self.eps;
                p[i] = (pi - lr * (mi / bc1) / denom) as f32;
            }
        }
    }

    /// The state as tensors (`m.<name>`, `v.<name>`) for a checkpoint; `t` is stored apart.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (prefix, map) in [("m.", &self.m), ("v.", &self.v)] {
            for (k, v) in map {
                out.insert(format!("{prefix}{k}"), Tensor::f32(vec![v.len()], v.clone()));
            }
        }
        out
    }

    pub fn load_state(&mut self, t: u64, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
        self.t = t;
        self.m.clear();
        self.v.clear();
        for (k, v) in tensors {
            let data = v.as_f32().ok_or_else(|| format!("optimizer state `{k}` is not f32"))?.to_vec();
            if let Some(name) = k.strip_prefix("m.") {
                self.m.insert(name.to_string(), data);
            } else if let Some(name) = k.strip_prefix("v.") {
                self.v.insert(name.to_string(), data);
            } else {
                return Err(format!("unexpected optimizer state `{k}`"));
            }
        }
        Ok(())
    }
}

/// Scale all gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> f64 {
    let norm = grads
        .values()
        .filter_map(|t| t.as_f32())
        .flat_map(|v| v.iter())
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    // torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), applied when < 1.
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for t in grads.values_mut() {
            if let Some(v) = t.as_f32_mut() {
                v.iter_mut().for_each(|g| *g = (*g as f64 * coef) as f32);
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_first_step_moves_by_lr() {
        let mut p = BTreeMap::from([("w".to_string(), Tensor::f32(vec![2], vec![1.0, -1.0]))]);
        let g = BTreeMap::from([("w".to_string(), Tensor::f32(vec![2], vec![0.5, -2.0]))]);
        let mut opt = Adam::new(OptimizerKind::Adam);
        opt.step(&mut p, &g, 0.1, &BTreeMap::new());
        let w = p["w"].as_f32().unwrap();
        // First Adam step: m̂ = g, v̂ = g², update = lr·sign(g) (up to eps).
        assert!((w[0] - 0.9).abs() < 1e-6 && (w[1] + 0.9).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn clipping() {
        let mut g = BTreeMap::from([("a".to_string(), Tensor::f32(vec![2], vec![3.0, 4.0]))]);
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        let v = g["a"].as_f32().unwrap();
        assert!(((v[0] * v[0] + v[1] * v[1]).sqrt() - 1.0).abs() < 1e-5);
    }
}
