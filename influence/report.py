"""Pictures a person would rather look at than read: PNG figures and one self-contained HTML page.

The page references only the files this module writes into the same folder. Figures are
plain ``matplotlib.figure.Figure`` objects saved without pyplot, so writing a report never
changes the host program's matplotlib backend or its list of open figures.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from index.atomic import atomic_write
from influence.data import Preprocessing
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
    ax.imshow(g, cmap="gray" if g.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    if m is not None:
        a, cmap, lo, hi = _heat(m)
        im = ax.imshow(a, cmap=cmap, vmin=lo, vmax=hi, alpha=np.clip(np.abs(a) / hi * 1.6, 0, 0.85), interpolation="nearest")
        bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)  # the legend of this map: sign and scale
        bar.set_ticks([lo, hi] if lo < 0 else [0, hi])
        bar.set_ticklabels(["against", "for"] if lo < 0 else ["0", "max"])
        bar.ax.tick_params(labelsize=5, length=1)
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
    ax.set_title(title, fontsize=7)
    ax.axis("off")


EXACT_MARK = "exact (replayed training)"
"""How the report labels influencers from exact mode (Influence.exact_scores) rather than the store's features."""


def _save(fig: Figure, path: Path) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=150, bbox_inches="tight")


def explanation_figure(e: Explanation, path: Path) -> None:
    """Test image with its pixel map, then proponents, opponents and (method "auto") Grad-Cos-similar rows with TFA overlays."""
    r = e.result
    how = EXACT_MARK if r.exact else r.method
    rows = [(f"proponents of {_name(r.target_name, r.target)}\n({how})", r.proponents),
            (f"opponents of {_name(r.opponents_target_name, r.opponents_target)}\n({how})", r.opponents)]
    if e.similar_method:
        rows.append((f"similar, for {_name(r.target_name, r.target)}\n({e.similar_method})", e.similar))
    k = max(max(len(items) for _, items in rows), 1)
    fig = Figure(figsize=(1.9 * (k + 1.4), 2.2 * len(rows) + 0.3))
    axes = fig.subplots(len(rows), k + 2, gridspec_kw={"width_ratios": [1, 0.35] + [1] * k}, squeeze=False)
    true = f" true {_name(r.label_name, r.label)}" if r.label is not None else ""
    _overlay(axes[0, 0], e.image, None, f"test{'' if r.test_id is None else ' ' + str(r.test_id)}\npred {_name(r.predicted_name, r.predicted)}{true}")
    _overlay(axes[1, 0], e.image, e.pixel_map, f"{e.attribution}\nclass {_name(r.target_name, r.target)}")
    for row in range(2, len(rows)):
        axes[row, 0].axis("off")
    for row, (side, items) in enumerate(rows):
        axes[row, 1].text(0.5, 0.5, side, ha="center", va="center", fontsize=8, rotation=90)
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
    away = f" What pulled it away from {_name(r.opponents_target_name, r.opponents_target)}?" if r.opponents_target != r.target else ""
    fig.suptitle(f"Why class {_name(r.target_name, r.target)}?{away} (TFA: {e.tfa}; red = pushes towards the class, blue = against)",
                 fontsize=9)
    _save(fig, path)


def _name(name: str | None, index: int) -> str:
    """A class's name, or its index for a result made without names."""
    return name if name else str(index)


def _influencer_table(e: Explanation) -> str:
    """Proponents, opponents (and similar) as an HTML table: id, class name, file path (where known), score, tag."""
    r = e.result
    sides = [("proponent", r.proponents), ("opponent", r.opponents)] + ([(f"similar ({e.similar_method})", e.similar)] if e.similar_method else [])
    rows = "".join(
        f"<tr><td>{html.escape(side)}</td><td>{p.train_id}</td><td>{html.escape(_name(p.label_name, p.label))}</td>"
        f"<td>{html.escape(p.path or '')}</td><td>{p.score:+.4g}</td><td>{html.escape(', '.join(e.flags.get(p.train_id, [])))}</td></tr>"
        for side, items in sides for p in items
    )
    return f"<table border=1><tr><th></th><th>train id</th><th>class</th><th>file</th><th>score</th><th>tag</th></tr>{rows}</table>"


def thumbnails_figure(images: torch.Tensor, captions: Sequence[str], path: Path) -> None:
    """One row of training images, upscaled without smoothing, each with its caption (lines split by newlines)."""
    n = max(len(images), 1)
    fig = Figure(figsize=(1.6 * n, 2.0))
    axes = fig.subplots(1, n, squeeze=False)
    for j in range(n):
        if j < len(images):
            _overlay(axes[0, j], images[j], None, captions[j])
        else:
            axes[0, j].axis("off")
    _save(fig, path)


def shortcut_figure(shortcut: dict[str, Any], images: torch.Tensor, path: Path, limit: int = 8) -> None:
    """One row: the shortcut's supporting training images with its box drawn on each."""
    n = min(limit, len(images))
    fig = Figure(figsize=(1.6 * max(n, 1), 2.0))
    axes = fig.subplots(1, max(n, 1), squeeze=False)
    for j in range(n):
        _overlay(axes[0, j], images[j], None, f"#{shortcut['train_ids'][j]}", shortcut["box"])
    for j in range(n, max(n, 1)):
        axes[0, j].axis("off")
    fig.suptitle(f"shortcut for class {shortcut.get('class_name', shortcut['class'])}: the box {shortcut['box']} (green) on its supporting "
                 f"training images (score {shortcut['score']:.2f})", fontsize=8)
    _save(fig, path)


def write_report(
    out: str | os.PathLike[str], explanations: Sequence[Explanation], *, flags: dict[str, Any] | None = None,
    shortcut_images: dict[int, torch.Tensor] | None = None, title: str = "influence report", notes: Sequence[str] = (),
    mislabel_images: dict[int, torch.Tensor] | None = None, preprocessing: Preprocessing | None = None,
) -> Path:
    """Write ``index.html``, ``explanations.json`` and the PNG figures into ``out``; returns the HTML path.

    Images are model inputs; ``preprocessing`` (the store's) undoes a ``--mean``/``--std`` normalisation so that
    they are drawn as the photos they are, not as clipped normalised values.

    The page opens with a summary (``<section id="summary">``): failures explained, likely mislabels with
    thumbnails (``flags["mislabel"]`` with ``mislabel_images`` by train id, else the influencers tagged
    "likely mislabelled"), and each detected shortcut drawn as a box on its supporting images
    (``shortcut_images`` by shortcut index). Then one section per explanation, then the flag tables.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if preprocessing is not None:
        show = preprocessing.unnormalise
        explanations = [replace(e, image=show(e.image), train_images={i: show(t) for i, t in e.train_images.items()})
                        for e in explanations]
        shortcut_images = {i: show(t) for i, t in (shortcut_images or {}).items()}
        mislabel_images = {i: show(t) for i, t in (mislabel_images or {}).items()}
    summary = _summary(out, explanations, flags, shortcut_images or {}, mislabel_images or {})
    parts = [f"<h1>{html.escape(title)}</h1>", summary] + [f"<p>{html.escape(n)}</p>" for n in notes]
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
        true += f"; influencers {EXACT_MARK}" if r.exact else ""
        parts.append(f"<h2 id='explain-{n}'>{html.escape(head)}: predicted {html.escape(_name(r.predicted_name, r.predicted))} (p={r.probability:.2f})"
                     f"{html.escape(true)}</h2><img src='{name}' alt='{html.escape(head)}'>")
        parts.append(_influencer_table(e))
    if flags:
        parts.append("<h2>Flags</h2>")
        for kind in ("mislabel", "harmful"):
            if kind in flags:
                rows = "".join(f"<tr><td>{f['train_id']}</td><td>{html.escape(str(f.get('label_name', f['label'])))}</td>"
                               f"<td>{html.escape(f.get('path') or '')}</td><td>{f['score']:.4g}</td></tr>" for f in flags[kind][:20])
                parts.append(f"<h3>{kind}</h3><table border=1><tr><th>train id</th><th>label</th><th>file</th><th>score</th></tr>{rows}</table>")
    with atomic_write(out / "explanations.json") as f:
        f.write(json.dumps({"explanations": docs, "flags": flags or {}}, indent=1).encode())
    page = ("<!doctype html><meta charset='utf-8'><title>influence report</title><style>body{font-family:sans-serif;max-width:1200px;"
            "margin:auto}img{max-width:100%;image-rendering:pixelated}#summary{background:#f4f4f4;padding:0.5em 1em}</style>"
            + "\n".join(parts))
    path = out / "index.html"
    with atomic_write(path) as f:
        f.write(page.encode())
    return path


def _summary(
    out: Path, explanations: Sequence[Explanation], flags: dict[str, Any] | None, shortcut_images: dict[int, torch.Tensor],
    mislabel_images: dict[int, torch.Tensor],
) -> str:
    """The report's first screen: what failed, which labels look wrong, which shortcuts were found (with pictures)."""
    failures = [e for e in explanations if e.result.label is not None and e.result.label != e.result.predicted]
    parts = ["<section id='summary'><h2>Summary</h2><ul>"]
    if failures:
        parts.append(f"<li>{len(failures)} misclassified test image(s) explained"
                     + (f" (of {len(explanations)})" if len(failures) != len(explanations) else "") + ": "
                     + ", ".join(f"<a href='#explain-{explanations.index(e)}'>{html.escape(_test_name(e))}</a>" for e in failures) + ".</li>")
    else:
        parts.append(f"<li>{len(explanations)} test image(s) explained.</li>")
    figs = []
    ids, captions = _likely_mislabels(explanations, flags)
    images = {**{i: t for e in explanations for i, t in e.train_images.items()}, **mislabel_images}
    if ids:
        if flags and flags.get("mislabel"):
            ranking = flags.get("mislabel_method")
            source = "flagged by influence flag" + (f" (ranking: {ranking})" if ranking else "")
        else:
            source = "tagged among the influencers (top 10% of influence flag's mislabel ranking, model p(label) < 0.5)"
        parts.append(f"<li class='mislabels'>{len(ids)} likely mislabelled training image(s), {source}: "
                     + html.escape("; ".join(c.replace("\n", " ") for c in captions[:10])) + ".</li>")
        shown = [i for i in ids if i in images][:8]
        if shown:
            thumbnails_figure(torch.stack([images[i] for i in shown]), [captions[ids.index(i)] for i in shown],
                              out / "summary_mislabels.png")
            figs.append("<img src='summary_mislabels.png' alt='likely mislabelled training images'>")
    else:
        parts.append("<li class='mislabels'>No likely mislabelled training image among these answers.</li>")
    shortcuts = (flags or {}).get("shortcuts")
    if shortcuts is None:
        parts.append("<li class='shortcuts'>Shortcuts not searched (run <code>influence flag STORE --test SPEC</code> "
                     "and pass its JSON with <code>--flags</code>).</li>")
    elif not shortcuts:
        parts.append("<li class='shortcuts'>No patch shortcut found.</li>")
    for n, sc in enumerate(shortcuts or []):
        cls = html.escape(str(sc.get("class_name", sc["class"])))
        parts.append(f"<li class='shortcut'>Detected shortcut: class {cls}, box {sc['box']} (x0, y0, x1, y1), "
                     f"{len(sc['train_ids'])} supporting training images, score {sc['score']:.3g}.</li>")
        imgs = shortcut_images.get(n)
        if imgs is not None:
            name = f"shortcut_{n:02d}.png"
            shortcut_figure(sc, imgs, out / name)
            figs.append(f"<img src='{name}' class='shortcut' alt='shortcut {n}: box {sc['box']} on its supporting images'>")
    parts.append("</ul>" + "".join(figs) + "</section>")
    return "".join(parts)


def _test_name(e: Explanation) -> str:
    r = e.result
    return (f"test {r.test_id}" if r.test_id is not None else "image") + (f" ({r.test_path})" if r.test_path else "")


def _caption(train_id: int, class_name: str, path: str | None, suggested: str | None = None) -> str:
    """A training image's caption: "#id y=class", then the model's suggestion for a flagged mislabel and the file path,
    each on a line of its own (on one line they run into the next thumbnail's caption)."""
    return f"#{train_id} y={class_name}" + (f"\nmodel: {suggested}" if suggested is not None else "") + (f"\n{path}" if path else "")


def _suggested(flag: dict[str, Any]) -> str | None:
    """A mislabel flag's suggested class, by name where the flags file has it (class 0 is a suggestion too)."""
    name = flag.get("suggested_label_name", flag.get("suggested_label"))
    return None if name is None else str(name)


def _likely_mislabels(explanations: Sequence[Explanation], flags: dict[str, Any] | None) -> tuple[list[int], list[str]]:
    """Train ids and captions: the flag list when given, else the influencers tagged "likely mislabelled"."""
    if flags and flags.get("mislabel"):
        recs = flags["mislabel"]
        return [int(f["train_id"]) for f in recs], [_caption(f["train_id"], str(f.get("label_name", f["label"])), f.get("path"),
                                                                 _suggested(f)) for f in recs]
    seen: dict[int, str] = {}
    for e in explanations:
        for p in [*e.result.proponents, *e.result.opponents, *e.similar]:
            if "likely mislabelled" in e.flags.get(p.train_id, []) and p.train_id not in seen:
                seen[p.train_id] = _caption(p.train_id, _name(p.label_name, p.label), p.path)
    return list(seen), list(seen.values())
