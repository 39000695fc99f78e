"""Peak memory of `influence build` as N grows: it should stay flat (bounded by batch size and k, not N).

Each build runs in its own process (digits tiled with small noise to N examples, the digits CNN, one
checkpoint, sparse k=2048, all three methods with exact indexes); peak RSS comes from getrusage.
The exact FAISS index itself holds N×k float32 per method, so that part grows with N by design; the
table reports it separately.

    python scripts/bench_memory.py          # writes its table into docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from influence.evaluation.docs import write_section

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from influence.evaluation.digits import load_digits_split
from influence.models import DigitsCNN
import influence
n, work, methods = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
torch.set_num_threads(2)
train, _ = load_digits_split()
reps = -(-n // len(train))
g = torch.Generator().manual_seed(0)
x = train.x.repeat(reps, 1, 1, 1)[:n]
x = (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)
y = train.y.repeat(reps)[:n]
np.savez(f"{work}/data.npz", x=x.numpy(), y=y.numpy())
del x, y
torch.manual_seed(0)
torch.save(DigitsCNN().state_dict(), f"{work}/ckpt.pt")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
influence.build("digits-cnn", f"{work}/data.npz", [f"{work}/ckpt.pt"], f"{work}/store", methods=methods, progress=False)
print(json.dumps({"n": n, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mb": base / 1024, "seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,8000,32000")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--doc", default="docs/BENCHMARKS.md", help="benchmarks page whose section is rewritten")
    args = ap.parse_args()
    rows = []
    for methods in ("tracin", "tracin,gradcos,trak"):
        for n in [int(s) for s in args.sizes.split(",")]:
            with tempfile.TemporaryDirectory() as work:
                out = subprocess.run([sys.executable, "-c", CHILD, str(n), work, methods], check=True, capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["methods"] = methods
                r["index_mb"] = n * 2048 * 4 / 2**20  # indexes are built and saved one at a time
                rows.append(r)
                print(r, flush=True)
    lines = [
        "## Peak memory of a build against N",
        "",
        f"Command: `python scripts/bench_memory.py --sizes {args.sizes}` (digits CNN, digits tiled with noise to N, one checkpoint, "
        "sparse k=2048, batch 64, float16 store, exact indexes; peak RSS of the build process, which includes the data set "
        "held in memory as an .npz-backed array, N×1×16×16 float32, and one exact FAISS index at a time, N×k float32). "
        "'rest' (peak − index − data) is what featurization and the store need: it should not grow with N.",
        "",
        "| methods | N | peak RSS MB | one exact index MB | data MB | rest MB | build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        data_mb = r["n"] * 256 * 4 / 2**20
        lines.append(f"| {r['methods']} | {r['n']:,} | {r['peak_mb']:.0f} | {r['index_mb']:.0f} | {data_mb:.0f} | "
                     f"{r['peak_mb'] - r['index_mb'] - data_mb:.0f} | {r['seconds']:.1f} |")
    if not args.no_write:
        write_section("bench_memory", "\n".join(lines), args.doc)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
