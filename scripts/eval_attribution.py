"""Evaluate the pixel-attribution methods on scikit-learn digits (Adebayo et al. 2018; Petsiuk et al. 2018), CPU-sized.

Protocols: grid pointing game (with and without VAR), cascading model-parameter
randomisation (MPRT), insertion/deletion AUC and μ-fidelity (pixels, and wavelet
coefficients for WAM), and seed-to-seed stability of the stochastic samplers.

Run:  python scripts/eval_attribution.py          # writes its section of docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from influence.evaluation.attribution_study import (
    HEADS, accuracy, faithfulness, load_data, mprt, pointing_game, stability, train,
)
from influence.evaluation.docs import write_section
from influence.models import DigitsCNN




def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write the section to")
    parser.add_argument("--doc", default="docs/BENCHMARKS.md", help="benchmarks page whose section is rewritten")
    parser.add_argument("--grids", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--images", type=int, default=100, help="test images for MPRT / faithfulness / stability")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    x_train, y_train, x_test, y_test = load_data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # module init draws from the global generator
        model = train(DigitsCNN(), x_train, y_train, epochs=20, seed=args.seed)
    acc = accuracy(model, x_test, y_test)
    xs, ys = x_test[: args.images], y_test[: args.images]

    out = [
        "## Pixel attribution",
        "",
        f"Command: `python scripts/eval_attribution.py{' --out ' + str(args.out) if args.out else ''}` "
        f"(settings: --grids {args.grids} --images {args.images} --seed {args.seed} --threads {args.threads}); torch {torch.__version__}, "
        f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s). Data: scikit-learn digits, 8×8 → 16×16 bilinear, "
        f"values in [0, 1], `train_test_split(test_size=0.2, random_state=0, stratify=y)` (1,437 / 360). "
        f"DigitsCNN trained 20 epochs, Adam lr 3e-3, batch 64, seed {args.seed}: test accuracy {acc:.3f}.",
        "",
    ]
    pointing = {}
    for head in HEADS:
        section, pointing[head] = pointing_game(x_train, y_train, x_test, y_test, args.grids, args.seed, head)
        out += section
        print("\n".join(section), flush=True)
    section, mprt_last = mprt(model, xs, ys, args.seed)
    out += section
    print("\n".join(section), flush=True)
    section, faith = faithfulness(model, xs, args.seed)
    out += section
    print("\n".join(section), flush=True)
    section, stable = stability(model, xs, (args.seed, args.seed + 1))
    out += section
    print("\n".join(section), flush=True)

    var_lines = []
    for head, res in pointing.items():
        improved = [name for name, ((b, _), (v, _)) in res.items() if v > b]
        improved_15 = [name for name, ((b, _), (v, _)) in res.items() if v >= 1.5 * b]
        var_lines.append(
            f"- VAR improves pointing of ≥ 3 base methods (ideally ≥ 1.5×), `GridCNN(head={head!r})`: improved "
            f"{len(improved)} ({', '.join(improved) or 'none'}); ≥ 1.5× for {len(improved_15)} "
            f"({', '.join(improved_15) or 'none'}). **{'met' if len(improved) >= 3 else 'not met'}**"
            f"{'' if len(improved_15) >= 3 else ' (the 1.5× ideal is not met)'}."
        )
    failing_mprt = {k: v for k, v in mprt_last.items() if v >= 0.5}
    ig_gap = faith["IntegratedGradients (linear_path, n=50)"]
    wam_gaps = {k: v for k, v in faith.items() if k.startswith("WAM")}
    out += [
        "### Targets",
        "",
        *var_lines,
        "- Every method's similarity < 0.5 once all layers are randomised: "
        + ("**met**." if not failing_mprt else "**not met** for " + ", ".join(f"{k} ({v:.2f})" for k, v in failing_mprt.items()) + "."),
        f"- WAM insertion − deletion ≥ IG's ({ig_gap:.3f}): "
        + "; ".join(f"{k}: {v:.3f} ({'met' if v >= ig_gap else 'not met'})" for k, v in wam_gaps.items()) + ".",
        "- Suppression at least as stable as noise at equal n (foreground Spearman, noise ×x as the like-for-like "
        "reference): "
        + "; ".join(
            f"n={n}: suppression {stable[('suppression (per pixel)', n)][1]:.3f} vs noise ×x "
            f"{stable[('noise ×x', n)][1]:.3f} / noise {stable[('noise', n)][1]:.3f} "
            f"(**{'met' if stable[('suppression (per pixel)', n)][1] >= max(stable[('noise ×x', n)][1], stable[('noise', n)][1]) else 'not met'}**)"
            for n in (10, 25)
        ) + ".",
        "",
        f"Total runtime: {time.time() - start:.0f} s.",
        "",
    ]
    text = "\n".join(out)
    print("\n".join(out[-(8 + len(var_lines)):]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        write_section("attribution", text, args.doc)


if __name__ == "__main__":
    main()
