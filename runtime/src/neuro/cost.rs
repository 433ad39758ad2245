//! Operation counts of the work that management cores and the host do (IR ops in floating
//! point), for their energy and time in the report. One count is one arithmetic operation or
//! one element moved, the unit the per-op energy figures use.

use sparkc_ir::Op;

/// Operations of one op, from its concrete operand and result shapes.
pub fn op_count(op: &Op, ins: &[Vec<usize>], outs: &[Vec<usize>]) -> u64 {
    let numel = |s: &Vec<usize>| s.iter().product::<usize>() as u64;
    let out = outs.first().map(numel).unwrap_or(0);
    let inp = ins.first().map(numel).unwrap_or(0);
    match op {
        Op::Linear { bias } => {
            let (o, i) = match ins.get(1).map(|w| w.as_slice()) {
                Some([o, i]) => (*o as u64, *i as u64),
                _ => (0, 0),
            };
            let rows = inp.checked_div(i).unwrap_or(0);
            2 * rows * i * o + if *bias { rows * o } else { 0 }
        }
        Op::RmsNorm { .. } | Op::LateralInhibition { .. } => 4 * out,
        Op::Map { expr } => expr.size() as u64 * out,
        Op::PonderWeights { .. } => 12 * inp,
        Op::FrameWeightedSum => 2 * inp,
        Op::CenterLast => 2 * out,
        Op::CrossEntropy { .. } => 4 * inp,
        Op::MaskedMean | Op::Mean => 2 * inp,
        Op::MeanFrames => inp,
        Op::GradedSpike { .. } => 2 * out,
        _ => out,
    }
}
