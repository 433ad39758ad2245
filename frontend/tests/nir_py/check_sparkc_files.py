"""Read every `<name>.nir` that sparkc wrote with the reference reader (type checking on) and
compare it with sparkc's own description `<name>.json`."""
import json, pathlib, sys
import nir
from common import describe, same

d = pathlib.Path(sys.argv[1])
failures = []
files = sorted(d.glob("*.nir"))
for f in files:
    want = json.loads(f.with_suffix(".json").read_text())
    g = nir.read(str(f))  # strict: type_check=True
    got = describe(g)
    diffs = same(want, got)
    # Node metadata sparkc wrote must come back.
    for k, n in want["nodes"].items():
        for mk, mv in n.get("metadata", {}).items():
            if got["nodes"][k].get("metadata", {}).get(mk) is None:
                diffs.append(f"{k}: metadata `{mk}` lost")
    if want.get("graph_metadata"):
        for mk in want["graph_metadata"]:
            if mk not in g.metadata:
                diffs.append(f"graph metadata `{mk}` lost")
    if diffs:
        failures.append(f"{f.name}: " + "; ".join(diffs[:5]))
print(f"checked {len(files)} sparkc-written files with nir {nir.version}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
