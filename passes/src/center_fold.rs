//! Fold a residual centering (`center_last`) into the linear layer that feeds it.
//!
//! x·Wᵀ + b − mean_O(x·Wᵀ + b) = x·(W − 1·mean_O W)ᵀ + (b − mean b): centering over the output
//! channels is linear, so it becomes part of the weights. A neuromorphic core has no reduction
//! across neurons; after folding, the centering costs nothing on the chip.

use sparkc_ir::{Graph, IrError, Op, Tensor, Value, ValueType};
use std::collections::BTreeMap;

/// Returns the folded graph and the layers that were folded (node names of the linears); the
/// centered weights are added to `params` as `<name>.centered` (the originals stay).
pub fn fold_centering(graph: &Graph, params: &mut BTreeMap<String, Tensor>) -> Result<(Graph, Vec<String>), IrError> {
    let mut g = graph.clone();
    let mut folded = Vec::new();
    for n in graph.topo_order()? {
        if !matches!(g.node(n).op, Op::CenterLast) {
            continue;
        }
        let src = g.operands(n)[0];
        let lin = src.node;
        let Op::Linear { bias } = g.node(lin).op else { continue };
        // Only when the linear feeds nothing but this centering.
        if crate::users::readers(&g, lin).len() != 1 || g.outputs.iter().any(|(_, v)| v.node == lin) {
            continue;
        }
        let ops = g.operands(lin);
        let replace = |slot: usize, g: &mut Graph, params: &mut BTreeMap<String, Tensor>, f: &dyn Fn(&Tensor) -> Tensor| -> Result<(), IrError> {
            let v = ops[slot];
            let Op::Param { name } = &g.node(v.node).op else {
                return Err(IrError::Graph(format!("`{}`: the weights to fold are not a parameter", g.node(lin).name)));
            };
            let t = params.get(name).ok_or_else(|| IrError::Graph(format!("missing parameter `{name}`")))?;
            let new_name = format!("{name}.centered");
            params.insert(new_name.clone(), f(t));
            let ty: ValueType = g.value_type(v).clone();
            let nv = g.param(&new_name, ty)?;
            let e = g.g.find_edge(v.node, lin).expect("operand edge exists");
            let port = g.g[e];
            g.g.remove_edge(e);
            g.g.add_edge(nv.node, lin, port);
            Ok(())
        };
        replace(1, &mut g, params, &|w: &Tensor| {
            let (o, i) = (w.shape[0], w.shape[1]);
            let d = w.as_f32().unwrap_or_default();
            // Column means accumulated row by row (in row order, as before), so the matrix is
            // read contiguously.
            let mut mean = vec![0f64; i];
            for row in d.chunks_exact(i.max(1)) {
                mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64);
            }
            mean.iter_mut().for_each(|m| *m /= o as f64);
            let out: Vec<f32> = d.chunks_exact(i.max(1)).flat_map(|row| row.iter().zip(&mean).map(|(&x, m)| (x as f64 - m) as f32)).collect();
            Tensor::f32(w.shape.clone(), out)
        })?;
        if bias {
            replace(2, &mut g, params, &|b: &Tensor| {
                let d = b.as_f32().unwrap_or_default();
                let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len().max(1) as f64;
                Tensor::f32(b.shape.clone(), d.iter().map(|&x| (x as f64 - mean) as f32).collect())
            })?;
        }
        // Readers of the centering now read the linear.
        for (dst, port) in crate::users::readers(&g, n) {
            g.g.add_edge(lin, dst, port);
        }
        for (_, v) in g.outputs.iter_mut() {
            if v.node == n {
                *v = Value { node: lin, port: 0 };
            }
        }
        g.g.remove_node(n);
        folded.push(g.node(lin).name.clone());
    }
    // Drop parameter nodes nothing reads any more (the uncentered weights).
    let readers = crate::users::all_readers(&g);
    let dead: Vec<_> = g.g.node_indices().filter(|&n| matches!(g.node(n).op, Op::Param { .. }) && !readers.contains_key(&n)).collect();
    for n in dead {
        g.g.remove_node(n);
    }
    sparkc_ir::verify::verify(&g)?;
    Ok((g, folded))
}
