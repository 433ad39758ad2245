//! Who reads a node's results: the reverse of `Graph::operands`.

use sparkc_ir::{Graph, NodeIndex, Port};

/// (reader, edge weight) for every edge leaving `n`, in edge order.
pub fn readers(g: &Graph, n: NodeIndex) -> Vec<(NodeIndex, Port)> {
    g.g.edge_indices()
        .filter_map(|e| {
            let (src, dst) = g.g.edge_endpoints(e)?;
            (src == n).then(|| (dst, g.g[e]))
        })
        .collect()
}

/// Every node's readers at once (one pass over the edges).
pub fn all_readers(g: &Graph) -> std::collections::HashMap<NodeIndex, Vec<(NodeIndex, Port)>> {
    let mut out: std::collections::HashMap<NodeIndex, Vec<(NodeIndex, Port)>> = std::collections::HashMap::new();
    for e in g.g.edge_indices() {
        if let Some((src, dst)) = g.g.edge_endpoints(e) {
            out.entry(src).or_default().push((dst, g.g[e]));
        }
    }
    out
}
