"""Pictures a person would rather look at than read: PNG figures and one self-contained HTML page.

The page references only the files this module writes into the same folder. Figures are
plain ``matplotlib.figure.Figure`` objects saved without pyplot, so writing a report never
changes the host program's matplotlib backend or its list of open figures.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from index.atomic import atomic_write
from influence.explain import Explanation
from influence.query import QueryResult


def _gray(img: torch.Tensor) -> np.ndarray:
    a = img.detach().float().cpu().numpy()
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0)).clip(0, 1)


def _heat(m: torch.Tensor) -> tuple[np.ndarray, str, float, float]:
    a = m.detach().float().cpu().numpy()
    a = a.sum(0) if a.ndim == 3 else a
    lim = float(np.abs(a).max()) or 1.0
    if a.min() < 0:
        return a, "bwr", -lim, lim
    return a, "inferno", 0.0, lim


def _overlay(ax: Any, image: torch.Tensor, m: torch.Tensor | None, title: str, box: Sequence[int] | None = None) -> None:
    g = _gray(image)
    ax.imshow(g, cmap="gray" if g.ndim == 2 else None, vmin=0, vmax=1)
    if m is not None:
        a, cmap, lo, hi = _heat(m)
        ax.imshow(a, cmap=cmap, vmin=lo, vmax=hi, alpha=np.clip(np.abs(a) / hi * 1.6, 0, 0.85))
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def _save(fig: Figure, path: Path) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def explanation_figure(e: Explanation, path: Path) -> None:
    """Test image with its pixel map, then proponents (top row) and opponents (bottom row) with TFA overlays."""
    k = max(len(e.result.proponents), len(e.result.opponents), 1)
    fig = Figure(figsize=(1.5 * (k + 1.3), 3.8))
    axes = fig.subplots(2, k + 2, gridspec_kw={"width_ratios": [1, 0.3] + [1] * k})
    r = e.result
    true = f" true {_name(r.label_name, r.label)}" if r.label is not None else ""
    _overlay(axes[0, 0], e.image, None, f"test{'' if r.test_id is None else ' ' + str(r.test_id)}\npred {_name(r.predicted_name, r.predicted)}{true}")
    _overlay(axes[1, 0], e.image, e.pixel_map, f"{e.attribution}\nclass {_name(r.target_name, r.target)}")
    sides = ((f"proponents of {_name(r.target_name, r.target)}", r.proponents),
             (f"opponents of {_name(r.opponents_target_name, r.opponents_target)}", r.opponents))
    for row, (side, items) in enumerate(sides):
        axes[row, 1].text(0.5, 0.5, side, ha="center", va="center", fontsize=9, rotation=90)
        axes[row, 1].axis("off")
        for j in range(k):
            ax = axes[row, j + 2]
            if j >= len(items):
                ax.axis("off")
                continue
            p = items[j]
            flag = "\n" + ", ".join(e.flags[p.train_id]) if p.train_id in e.flags else ""
            _overlay(ax, e.train_images[p.train_id], e.tfa_maps.get(p.train_id),
                     f"#{p.train_id} y={_name(p.label_name, p.label)}\n{p.score:+.3g}{flag}")
    away = f"; what pulled it away from {_name(r.opponents_target_name, r.opponents_target)}?" if r.opponents_target != r.target else ""
    fig.suptitle(f"why class {_name(r.target_name, r.target)}?{away} ({r.method}; TFA: {e.tfa})", fontsize=9, y=1.06)
    _save(fig, path)


def _name(name: str | None, index: int) -> str:
    """A class's name, or its index for a result made without names."""
    return name if name else str(index)


def _influencer_table(r: QueryResult) -> str:
    """Proponents and opponents as an HTML table: id, class name, file path (where known), score."""
    rows = "".join(
        f"<tr><td>{side}</td><td>{p.train_id}</td><td>{html.escape(_name(p.label_name, p.label))}</td>"
        f"<td>{html.escape(p.path or '')}</td><td>{p.score:+.4g}</td></tr>"
        for side, items in (("proponent", r.proponents), ("opponent", r.opponents)) for p in items
    )
    return f"<table border=1><tr><th></th><th>train id</th><th>class</th><th>file</th><th>score</th></tr>{rows}</table>"


def shortcut_figure(shortcut: dict[str, Any], images: torch.Tensor, path: Path, limit: int = 8) -> None:
    """One row: the shortcut's supporting training images with its box drawn on each."""
    n = min(limit, len(images))
    fig = Figure(figsize=(1.4 * max(n, 1), 1.8))
    axes = fig.subplots(1, max(n, 1), squeeze=False)
    for j in range(n):
        _overlay(axes[0, j], images[j], None, f"#{shortcut['train_ids'][j]}", shortcut["box"])
    fig.suptitle(f"shortcut for class {shortcut.get('class_name', shortcut['class'])} at {shortcut['box']} (score {shortcut['score']:.2f})", fontsize=8)
    _save(fig, path)


def write_report(
    out: str | os.PathLike[str], explanations: Sequence[Explanation], *, flags: dict[str, Any] | None = None,
    shortcut_images: dict[int, torch.Tensor] | None = None, title: str = "influence report", notes: Sequence[str] = (),
) -> Path:
    """Write ``index.html``, ``explanations.json`` and the PNG figures into ``out``; returns the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(n)}</p>" for n in notes]
    docs = []
    for n, e in enumerate(explanations):
        name = f"explain_{n:03d}.png"
        explanation_figure(e, out / name)
        doc = e.to_json()
        doc["figure"] = name
        docs.append(doc)
        r = e.result
        head = f"Test {r.test_id}" if r.test_id is not None else f"Image {n}"
        head += f" ({r.test_path})" if r.test_path else ""
        true = f", true label {_name(r.label_name, r.label)}" if r.label is not None else ""
        parts.append(f"<h2>{html.escape(head)}: predicted {html.escape(_name(r.predicted_name, r.predicted))} (p={r.probability:.2f})"
                     f"{html.escape(true)}</h2><img src='{name}' alt='{html.escape(head)}'>")
        parts.append(_influencer_table(r))
        flagged = [f"#{i}: {', '.join(f)}" for i, f in e.flags.items()]
        if flagged:
            parts.append("<p>Flags: " + html.escape("; ".join(flagged)) + "</p>")
    if flags:
        parts.append("<h2>Flags</h2>")
        for kind in ("mislabel", "harmful"):
            if kind in flags:
                rows = "".join(f"<tr><td>{f['train_id']}</td><td>{html.escape(str(f.get('label_name', f['label'])))}</td>"
                               f"<td>{html.escape(f.get('path') or '')}</td><td>{f['score']:.4g}</td></tr>" for f in flags[kind][:20])
                parts.append(f"<h3>{kind}</h3><table border=1><tr><th>train id</th><th>label</th><th>file</th><th>score</th></tr>{rows}</table>")
        if "shortcuts" in flags:
            if not flags["shortcuts"]:
                parts.append("<h3>shortcuts</h3><p>No patch shortcut found.</p>")
            for n, s in enumerate(flags["shortcuts"]):
                name = f"shortcut_{n:02d}.png"
                imgs = (shortcut_images or {}).get(n)
                if imgs is not None:
                    shortcut_figure(s, imgs, out / name)
                parts.append(f"<h3>shortcut: class {html.escape(str(s.get('class_name', s['class'])))}, box {s['box']}, {len(s['train_ids'])} training images, score {s['score']:.3g}</h3>"
                             + (f"<img src='{name}' alt='shortcut {n}'>" if imgs is not None else ""))
    with atomic_write(out / "explanations.json") as f:
        f.write(json.dumps({"explanations": docs, "flags": flags or {}}, indent=1).encode())
    page = "<!doctype html><meta charset='utf-8'><title>influence report</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}</style>" + "\n".join(parts)
    path = out / "index.html"
    with atomic_write(path) as f:
        f.write(page.encode())
    return path
