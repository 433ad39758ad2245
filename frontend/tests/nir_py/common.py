"""Shared helpers: a JSON description of a NIR graph that the Rust tests compare against."""
import numpy as np
import nir

PARAM_FIELDS = {
    "Input": [], "Output": [], "Affine": ["weight", "bias"], "Linear": ["weight"], "Scale": ["scale"],
    "Threshold": ["threshold"], "Delay": ["delay"], "I": ["r"], "IF": ["r", "v_threshold", "v_reset"],
    "LI": ["tau", "r", "v_leak"], "LIF": ["tau", "r", "v_leak", "v_threshold", "v_reset"],
    "CubaLI": ["tau_syn", "tau_mem", "r", "v_leak", "w_in"],
    "CubaLIF": ["tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in"],
    "Conv1d": ["weight", "bias"], "Conv2d": ["weight", "bias"], "SumPool2d": [], "AvgPool2d": [], "Flatten": [],
}


def describe(g):
    """Node types, parameters (shape, dtype, values) and edges of a graph, recursively."""
    nodes = {}
    for name, n in g.nodes.items():
        t = type(n).__name__
        if t == "NIRGraph":
            nodes[name] = {"type": t, "graph": describe(n)}
            continue
        params = {}
        for f in PARAM_FIELDS[t]:
            a = np.asarray(getattr(n, f))
            params[f] = {"shape": list(a.shape), "dtype": str(a.dtype), "data": a.astype(np.float64).ravel().tolist()}
        if t in ("Input",):
            params["shape"] = {"shape": [], "dtype": "int64", "data": [int(x) for x in n.input_type["input"]]}
        if t in ("Output",):
            params["shape"] = {"shape": [], "dtype": "int64", "data": [int(x) for x in n.output_type["output"]]}
        nodes[name] = {"type": t, "params": params, "metadata": {k: str(v) for k, v in n.metadata.items()}}
    return {"nodes": nodes, "edges": sorted([list(e) for e in g.edges])}


def same(a, b, path=""):
    """Compare two descriptions; returns a list of differences."""
    diffs = []
    if set(a["nodes"]) != set(b["nodes"]):
        return [f"{path}: nodes {sorted(a['nodes'])} vs {sorted(b['nodes'])}"]
    if a["edges"] != b["edges"]:
        diffs.append(f"{path}: edges {a['edges']} vs {b['edges']}")
    for k in a["nodes"]:
        x, y = a["nodes"][k], b["nodes"][k]
        if x["type"] != y["type"]:
            diffs.append(f"{path}{k}: type {x['type']} vs {y['type']}")
        elif x["type"] == "NIRGraph":
            diffs += same(x["graph"], y["graph"], f"{path}{k}.")
        else:
            for f, p in x["params"].items():
                q = y["params"].get(f)
                if q is None or p["data"] != q["data"]:
                    diffs.append(f"{path}{k}.{f}: {p} vs {q}")
                elif f != "shape" and p["shape"] != q["shape"]:
                    diffs.append(f"{path}{k}.{f}: shape {p['shape']} vs {q['shape']}")
    return diffs
