//! Next-token sampling (spec §16): temperature ≤ 0 is argmax; otherwise logits / temperature,
//! top-k (logits strictly below the k-th largest are dropped), top-p (smallest set of most
//! likely tokens whose probability reaches p), then a seeded multinomial draw.

use sparkc_ir::rng::Rng;

#[derive(Clone, Debug)]
pub struct Sampler {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    rng: Rng,
}

impl Sampler {
    pub fn new(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampler {
        Sampler { temperature, top_k, top_p, rng: Rng::new(seed) }
    }

    pub fn greedy() -> Sampler {
        Sampler::new(0.0, None, None, 0)
    }

    pub fn sample(&mut self, logits: &[f32]) -> usize {
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return argmax(logits);
        }
        let mut scaled: Vec<f32> = logits.iter().map(|&l| l / self.temperature).collect();
        if let Some(k) = self.top_k.filter(|&k| k > 0 && k < scaled.len()) {
            let mut sorted = scaled.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            scaled.iter_mut().filter(|v| **v < kth).for_each(|v| *v = f32::NEG_INFINITY);
        }
        let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f64> = scaled.iter().map(|&v| ((v - max) as f64).exp()).collect();
        if let Some(p) = self.top_p.filter(|&p| p > 0.0 && p < 1.0) {
            let total: f64 = probs.iter().sum();
            let mut idx: Vec<usize> = (0..probs.len()).collect();
            idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let mut acc = 0.0;
            let mut keep = vec![false; probs.len()];
            for &i in &idx {
                keep[i] = true;
                acc += probs[i] / total;
                if acc >= p as f64 {
                    break;
                }
            }
            probs.iter_mut().zip(&keep).filter(|(_, &k)| !k).for_each(|(v, _)| *v = 0.0);
        }
        let total: f64 = probs.iter().sum();
        if !(total > 0.0) || !total.is_finite() {
            return argmax(logits);
        }
        let mut r = self.rng.uniform() * total;
        for (i, &p) in probs.iter().enumerate() {
            if r < p {
                return i;
            }
            r -= p;
        }
        probs.iter().rposition(|&p| p > 0.0).unwrap_or(0)
    }
}

/// Index of the largest value (the first on ties; NaN never wins).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_topk() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::greedy().sample(&logits), 1);
        let mut s = Sampler::new(1.0, Some(2), None, 3);
        for _ in 0..200 {
            let t = s.sample(&logits);
            assert!(t == 1 || t == 2);
        }
        let mut s = Sampler::new(1.0, None, Some(0.01), 3);
        assert_eq!(s.sample(&logits), 1);
    }

    #[test]
    fn seeded() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<usize> = { let mut s = Sampler::new(0.8, Some(10), Some(0.9), 42); (0..20).map(|_| s.sample(&logits)).collect() };
        let b: Vec<usize> = { let mut s = Sampler::new(0.8, Some(10), Some(0.9), 42); (0..20).map(|_| s.sample(&logits)).collect() };
        assert_eq!(a, b);
    }
}
