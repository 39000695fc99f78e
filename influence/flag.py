"""What to fix: likely mislabels, net-harmful training examples, and patch shortcuts.

- mislabel: rank by a per-example suspicion score (``influence.mislabel_rank``): the training loss, self-influence
  S(i, i) (large for mislabelled and atypical examples), or a rank combination of the two;
- harmful: over the misclassified test images, sum each training example's negative influence on
  the true-label loss (how much it pushes those images away from their true class);
- shortcut: for test images predicted as class c, map the top proponents with TFA and look for one
  small region that recurs across them (``influence.shortcut``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from influence.errors import BadSpecError, InfluenceError
from influence.mislabel_rank import DEFAULT_RANKING, RANKINGS, check_ranking, mislabel_scores
from influence.query import Influence
from influence.scoring import METHOD_NAMES
from influence.shortcut import Shortcut

KINDS = ("mislabel", "harmful", "shortcut")


@dataclass(frozen=True)
class Flag:
    """One flagged training example: its row id, the ranking score and its stored label."""

    train_id: int
    score: float
    label: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MislabelFlag(Flag):
    """A likely mislabel: ``score`` is the ranking's score (higher = more suspect); the final model's probability of
    the stored label; ``suggested_label``, the final model's most likely class other than the stored one, and its
    probability (None where the training images could not be read)."""

    model_prob_of_label: float
    suggested_label: int | None = None
    suggested_prob: float | None = None


@dataclass(frozen=True)
class HarmfulFlag(Flag):
    """A net-harmful example: ``score`` = Σ max(0, −S) over the failures; how many of ``of_failures`` it harms."""

    harms: int
    of_failures: int


def flag_mislabels(session: Influence, *, method: str | None = None, top: int = 20, progress: bool = True) -> list[MislabelFlag]:
    """Training examples by descending mislabel score, with the final model's probability of their label.

    ``method``: a ranking of ``influence.mislabel_rank.RANKINGS``; None (default) is ``mislabel_method(session)``,
    the final checkpoint's training loss, the measured best (see there). ``trak`` and ``tracin`` rank by
    self-influence S(i, i), the detector this function used before that measurement.
    """
    values = mislabel_scores(session, method or mislabel_method(session), progress=progress)
    prob = session.label_probability()
    labels = session.training_labels()
    order = np.argsort(-values, kind="stable")[:top]
    suggested = suggest_labels(session, [int(i) for i in order], progress=progress)
    return [MislabelFlag(int(i), float(values[i]), int(labels[i]), round(float(prob[i]), 4), *suggested.get(int(i), (None, None)))
            for i in order]


def suggest_labels(session: Influence, ids: Sequence[int], *, batch: int = 256,
                   progress: bool = False) -> dict[int, tuple[int, float]]:
    """Per training row: the final model's most likely class other than the stored label, and its probability.

    What a user relabelling a flag wants to see first (``influence repair --action relabel`` picks the same class,
    :func:`influence.repair.relabel_targets`). The store keeps only p(stored label), so the images are read again,
    ``batch`` rows at a time; where they cannot be (data moved, code spec not trusted) the flags are still given,
    without suggestions, and stderr says why.
    """
    from influence.repair import relabel_targets

    out: dict[int, tuple[int, float]] = {}
    chunks = [list(ids[s:s + batch]) for s in range(0, len(ids), batch)]
    for chunk in tqdm(chunks, desc="suggested labels", unit="batch", disable=None if progress and len(chunks) > 1 else True):
        try:
            x, y = session.training_examples(chunk)
        except (InfluenceError, OSError) as e:
            print(f"flag: no suggested labels ({e})", file=sys.stderr)
            return {}
        probs = session.predict(x).cpu()
        guess = relabel_targets(probs, y.tolist(), range(len(chunk)))
        out.update({i: (guess[j], round(float(probs[j, guess[j]]), 4)) for j, i in enumerate(chunk)})
    return out


def flag_harmful(
    session: Influence, x: torch.Tensor, y: torch.Tensor, *, method: str = "tracin", top: int = 20, progress: bool = True,
) -> list[HarmfulFlag]:
    """Training examples ranked by Σ_t max(0, −S(i, t)) over misclassified test images t, explained for their true label."""
    probs = session.predict(x)
    wrong = torch.nonzero(probs.argmax(-1).cpu() != y.cpu()).flatten()
    if len(wrong) == 0:
        return []
    scores = session.scores(x[wrong], y[wrong], method=method, progress=progress)
    harm = np.clip(-scores, 0, None).sum(1)
    count = (scores < 0).sum(1)
    labels = session.training_labels()
    order = np.argsort(-harm, kind="stable")[:top]
    return [HarmfulFlag(int(i), float(harm[i]), int(labels[i]), int(count[i]), int(len(wrong))) for i in order if harm[i] > 0]


def flag_shortcuts(
    session: Influence, x: torch.Tensor, y: torch.Tensor | None = None, *, method: str = "gradcos", k: int = 10,
    tfa: str | None = None, max_queries_per_class: int = 20, min_queries: int = 3, progress: bool = True,
) -> list[Shortcut]:
    """Patch shortcuts: per predicted class, TFA maps of the top same-class proponents, clustered by peak location.

    Proponents are ranked by Grad-Cos by default: a learned shortcut fits its training images to near-zero
    loss, so TracIn and TRAK (whose weights scale with the loss) rank them at chance (AUPRC 0.057 for TracIn
    and 0.053 for TRAK against 0.720 for Grad-Cos in scripts/eval_shortcut.py).
    """
    from influence.shortcut import detect_shortcuts
    from influence.tfa import DEFAULT_TFA, get_tfa

    probs = session.predict(x)
    pred = probs.argmax(-1).cpu()
    pool = torch.nonzero(pred != y.cpu()).flatten() if y is not None else torch.arange(len(x))
    model = session.model_at(-1)  # this call's own copy of the final checkpoint: nothing else touches it
    explainer = get_tfa(tfa or DEFAULT_TFA)(model, task=session.task)
    found = []
    for c in tqdm(sorted(set(pred[pool].tolist())), desc="shortcuts", unit="class", disable=None if progress else True):
        queries = pool[pred[pool] == c][:max_queries_per_class]
        if len(queries) < min_queries:
            continue
        results = session.query(x[queries], [c] * len(queries), k=k, method=method)
        maps: dict[int, list[torch.Tensor]] = {}
        images: dict[int, torch.Tensor] = {}
        for q, r in zip(queries.tolist(), results):
            ids = [p.train_id for p in r.proponents if p.label == c]
            if not ids:
                continue
            tx, ty = session.training_examples(ids)
            m = explainer.attribute(tx, target=ty, query=(x[q], c))
            for i, xi, mi in zip(ids, tx, m):
                maps.setdefault(i, []).append(mi)
                images[i] = xi
        if not maps:
            continue
        ids = sorted(maps)
        stacked = torch.stack([torch.stack(maps[i]).mean(0) for i in ids])
        tx = torch.stack([images[i] for i in ids])
        found += detect_shortcuts(stacked, tx, ids, [c] * len(ids))
    return sorted(found, key=lambda s: -s.score)


def run_flags(
    session: Influence, test: tuple[torch.Tensor, torch.Tensor] | None = None, *, kinds: Sequence[str] = KINDS,
    top: int = 20, method: str | None = None, tfa: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    """The JSON document of ``influence flag``: the typed results' ``to_json()``, keyed mislabel, harmful, shortcuts,
    and ``mislabel_method``, the ranking of the mislabel list.

    ``method`` overrides the measured defaults (mislabel: ``mislabel_method``, harmful: tracin, shortcut: gradcos).
    A ranking that is not a scoring method (``loss``, ``combined``, ...) ranks mislabels only: with harmful or
    shortcut asked for too it is an error.
    Without ``test`` only the mislabel check runs (harmful and shortcut are skipped; asked for alone they are an error).
    ``progress``: bars on stderr for the slow steps, shown only when stderr is a terminal.
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise BadSpecError(f"unknown --kind {bad}; choose from {', '.join(KINDS)} or all")
    if test is None and not any(k == "mislabel" for k in kinds):  # before any work, so it fails fast
        raise BadSpecError("--kind harmful and shortcut need test images: pass --test SPEC (e.g. your failing images)")
    out: dict[str, Any] = {}
    if method is not None and "mislabel" in kinds:
        check_ranking(method)  # gradcos or unknown: the error naming the choices, before any work
    if method in RANKINGS and method not in METHOD_NAMES and test is not None and any(k != "mislabel" for k in kinds):
        raise BadSpecError(f"--method {method} ranks mislabels only; add --kind mislabel (harmful and shortcut take "
                           f"{', '.join(METHOD_NAMES)})")
    if "mislabel" in kinds:
        out["mislabel"] = [f.to_json() for f in flag_mislabels(session, method=method, top=top,
                                                               progress=progress)]
        out["mislabel_method"] = method or mislabel_method(session)  # the ranking behind that list, for readers
    if "harmful" in kinds and test is not None:
        out["harmful"] = [f.to_json() for f in flag_harmful(session, *test, method=method or "tracin", top=top, progress=progress)]
    if "shortcut" in kinds and test is not None:
        out["shortcuts"] = [s.to_json() for s in flag_shortcuts(session, *test, method=method or "gradcos", tfa=tfa, progress=progress)]
    return out


def name_flags(session: Influence, doc: dict[str, Any]) -> dict[str, Any]:
    """Each flagged example of a ``run_flags`` document (or a flags file) gains ``label_name`` and ``path`` (a
    mislabel with a suggestion also ``suggested_label_name``), each shortcut ``class_name`` and ``paths``, in place;
    existing keys kept (what ``influence flag --json`` prints)."""
    for kind in ("mislabel", "harmful"):
        for f in doc.get(kind, []):
            f["label_name"], f["path"] = session.class_name(int(f["label"])), session.train_path(int(f["train_id"]))
            if f.get("suggested_label") is not None:
                f["suggested_label_name"] = session.class_name(int(f["suggested_label"]))
    for s in doc.get("shortcuts", []):
        s["class_name"] = session.class_name(int(s["class"]))
        s["paths"] = [session.train_path(int(i)) for i in s["train_ids"]]
    return doc


def mislabel_method(session: Influence) -> str:
    """The mislabel ranking ``flag``, ``self-influence``, ``explain``'s tags and ``repair`` use by default: ``loss``.

    Chosen over five settings, not one (docs/BENCHMARKS.md, "Every ranking of influence flag"): the final training
    loss had the highest worst-case and mean AUC. Digits, 3 seeds: uniform flips 0.9993 (TRAK self-influence
    0.9965, 4-fold CV confidence 0.9996), class-dependent flips 0.987 (TRAK 0.949, CV 0.983). CIFAR-10 10,000-image
    subset, narrow ResNet, one run each: 10% uniform 0.953 (TRAK 0.937, margin over checkpoints 0.959, CV 0.957 in
    an earlier run), 20% uniform 0.951 (TRAK 0.919, margin 0.960, CV 0.953 in an earlier run), 10% class-dependent 0.874 (TRAK 0.732, margin 0.848, CV 0.827).
    Self-influence ranked below the loss in every setting. ``loss-margin`` (added later) has a higher mean (0.955)
    but a lower worst case (0.868), so it is an option, not the default. Eight fresh noise draws, made after this
    choice, kept it: the loss is up to 0.010 AUC below the CV confidence on uniform flips and above it on
    class-dependent ones (0.857–0.876 vs 0.825–0.828), and loss-margin's worst case stays lower (0.855). ``DEFAULT_RANKING`` of ``influence.mislabel_rank``: every
    store has the loss column, so the default does not depend on the store's methods.
    """
    return DEFAULT_RANKING
