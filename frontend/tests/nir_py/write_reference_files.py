"""Write NIR files with the reference `nir` package (gzip and plain, float32 and float64,
nested graphs, metadata), each with a JSON description, and for two networks the spikes of a
numpy simulation of NIR's documented dynamics (forward Euler, dt = 1e-4, reset to v_reset)."""
import json, pathlib, sys
import numpy as np
import nir
from common import describe

d = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
f32 = lambda *s: rng.uniform(-1, 1, s).astype(np.float32)
DT, T = 1e-4, 80


def lif_net(dtype):
    n = 5
    w, b = f32(n, 3), (0.05 * np.arange(n)).astype(np.float32)
    lif = nir.LIF(tau=np.linspace(2e-3, 6e-3, n).astype(dtype), r=np.linspace(2, 4, n).astype(dtype),
                  v_leak=np.zeros(n, dtype), v_threshold=np.full(n, 0.3, dtype), v_reset=np.zeros(n, dtype))
    g = nir.NIRGraph(nodes={"input": nir.Input(np.array([3])), "fc": nir.Affine(w, b), "lif": lif,
                            "output": nir.Output(np.array([n]))},
                     edges=[("input", "fc"), ("fc", "lif"), ("lif", "output")])
    return g


def cuba_net(dtype):
    n = 4
    w = f32(n, 3)
    cuba = nir.CubaLIF(tau_syn=np.full(n, 1e-3, dtype), tau_mem=np.linspace(2e-3, 5e-3, n).astype(dtype),
                       r=np.full(n, 3.0, dtype), v_leak=np.zeros(n, dtype), v_threshold=np.full(n, 0.2, dtype),
                       w_in=np.full(n, 2.0, dtype))
    return nir.NIRGraph(nodes={"input": nir.Input(np.array([3])), "fc": nir.Linear(w), "cuba": cuba,
                               "output": nir.Output(np.array([n]))},
                        edges=[("input", "fc"), ("fc", "cuba"), ("cuba", "output")])


def simulate(g, x):
    """NIR semantics: Euler steps of the ODEs, spike if v > v_threshold, then v = v_reset."""
    fc = g.nodes["fc"]
    drive = x @ fc.weight.astype(np.float64).T + (fc.bias if isinstance(fc, nir.Affine) else 0)
    neuron = [n for n in g.nodes.values() if isinstance(n, (nir.LIF, nir.CubaLIF))][0]
    p = {k: np.asarray(getattr(neuron, k), np.float32).astype(np.float64) for k in PARAMS[type(neuron).__name__]}
    v = np.zeros(drive.shape[1]); i = np.zeros_like(v); out = []
    for t in range(len(drive)):
        if isinstance(neuron, nir.LIF):
            v = v + DT / p["tau"] * (p["v_leak"] - v + p["r"] * drive[t])
        else:
            i0 = i
            i = i + DT / p["tau_syn"] * (p["w_in"] * drive[t] - i)
            v = v + DT / p["tau_mem"] * (p["v_leak"] - v + p["r"] * i0)
        z = v > p["v_threshold"]
        v = np.where(z, p["v_reset"], v)
        out.append(z.astype(np.float64).tolist())
    return out


PARAMS = {"LIF": ["tau", "r", "v_leak", "v_threshold", "v_reset"],
          "CubaLIF": ["tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in"]}

sub = nir.NIRGraph(nodes={"in": nir.Input(np.array([4])), "scale": nir.Scale(np.array([1.0, 2.0, 3.0, 4.0])),
                          "out": nir.Output(np.array([4]))}, edges=[("in", "scale"), ("scale", "out")])
mixed = nir.NIRGraph(
    nodes={"input": nir.Input(np.array([3])), "lin": nir.Linear(f32(4, 3)), "sub": sub,
           "thr": nir.Threshold(np.full(4, 0.25)), "li": nir.LI(np.full(4, 1e-3), np.ones(4), np.zeros(4)),
           "output": nir.Output(np.array([4])), "membrane": nir.Output(np.array([4]))},
    edges=[("input", "lin"), ("lin", "sub"), ("sub", "thr"), ("thr", "output"), ("sub", "li"), ("li", "membrane")],
    metadata={"author": "nir test", "dt": 1e-4, "nested": {"ints": np.array([1, 2, 3])}})

x = rng.uniform(0, 1.0, (T, 3))
cases = {
    "ref_lif_gzip_f32": (lif_net(np.float32), "gzip", True),
    "ref_lif_plain_f64": (lif_net(np.float64), None, True),
    "ref_cubalif_gzip": (cuba_net(np.float32), "gzip", True),
    "ref_mixed_nested": (mixed, "gzip", False),
}
for name, (g, comp, sim) in cases.items():
    nir.write(str(d / f"{name}.nir"), g, compression=comp)
    desc = describe(nir.read(str(d / f"{name}.nir")))
    if sim:
        desc["input"] = x.tolist()
        desc["spikes"] = simulate(g, x)
    (d / f"{name}.json").write_text(json.dumps(desc))
print(f"wrote {len(cases)} files with nir {nir.version}")
