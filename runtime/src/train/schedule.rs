//! The learning-rate schedule of spec §14: linear warmup, then cosine to base/10, evaluated at
//! every micro-batch.

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub base: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
}

impl Schedule {
    pub fn lr(&self, it: u64) -> f64 {
        let min = self.base * self.min_ratio;
        if it < self.warmup {
            return self.base * it as f64 / self.warmup as f64;
        }
        if it > self.total || self.total <= self.warmup {
            return min;
        }
        let r = (it - self.warmup) as f64 / (self.total - self.warmup) as f64;
        min + 0.5 * (1.0 + (std::f64::consts::PI * r).cos()) * (self.base - min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule { base: 1e-3, warmup: 10, total: 110, min_ratio: 0.1 };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-12);
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        assert!((s.lr(500) - 1e-4).abs() < 1e-12);
    }
}
