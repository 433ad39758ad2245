"""Export Spyx networks to NIR with Spyx's own `to_nir` (dt = 1), and record the spikes of
Spyx's own simulation of the same networks on fixed inputs."""
import json, pathlib, sys
import numpy as np
import jax, jax.numpy as jnp
from flax import nnx
import nir
import spyx
import spyx.nn as snn
from spyx.nir import to_nir

d = pathlib.Path(sys.argv[1])
T, B = 60, 2
rng = np.random.default_rng(1)


def net(kind, seed):
    r = nnx.Rngs(seed)
    if kind == "lif":
        layers = [nnx.Linear(4, 6, rngs=r), snn.LIF((6,), threshold=1.0, rngs=r), nnx.Linear(6, 3, rngs=r), snn.LIF((3,), threshold=0.8, rngs=r)]
    elif kind == "if":
        layers = [nnx.Linear(4, 5, rngs=r), snn.IF((5,), threshold=1.0), nnx.Linear(5, 3, rngs=r), snn.IF((3,), threshold=1.0)]
    else:
        layers = [nnx.Linear(4, 6, rngs=r), snn.CuBaLIF((6,), threshold=1.0, rngs=r), nnx.Linear(6, 3, rngs=r), snn.LIF((3,), threshold=1.0, rngs=r)]
    return snn.Sequential(*layers)


for kind in ["lif", "if", "cubalif"]:
    model = net(kind, {"lif": 0, "if": 1, "cubalif": 2}[kind])
    x = rng.uniform(0, 1.5, (T, B, 4)).astype(np.float32)
    spikes, _ = snn.run(model, jnp.asarray(x))
    g = to_nir(model, {"input": np.array([4])}, {"output": np.array([3])}, dt=1.0)
    nir.write(str(d / f"spyx_{kind}.nir"), g)
    s = np.asarray(spikes)
    (d / f"spyx_{kind}.json").write_text(json.dumps({
        "input": x.transpose(1, 0, 2).tolist(),  # [B][T][4]
        "spikes": s.transpose(1, 0, 2).tolist(),  # [B][T][3]
        "count": float(s.sum()),
    }))
    print(f"spyx {kind}: {int(s.sum())} output spikes over {T} steps x {B} rows")
print(f"spyx {spyx.__version__ if hasattr(spyx, '__version__') else ''} jax {jax.__version__} nir {nir.version}")
