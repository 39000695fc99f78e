"""The answer users came for, per test image: prediction, pixel map, influencers with TFA maps, flags.

An ``Explanation`` bundles a query result (who) with the pixel map on the test
image (where it looked) and a TFA map on each influential training image (where
on them), plus warnings on the influencers such as "likely mislabelled".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from influence._inputs import as_batch
from influence.errors import BadSpecError
from influence.query import Influence, Influencer, QueryResult
from influence.recipe import Recipe

DEFAULT_ATTRIBUTION = "integrated_gradients"
MISLABEL_QUANTILE = 0.9


@dataclass
class Explanation:
    result: QueryResult
    image: torch.Tensor
    pixel_map: torch.Tensor
    tfa_maps: dict[int, torch.Tensor]
    train_images: dict[int, torch.Tensor]
    flags: dict[int, list[str]] = field(default_factory=dict)
    attribution: str = DEFAULT_ATTRIBUTION
    tfa: str = ""
    similar: list[Influencer] = field(default_factory=list)
    similar_method: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: maps are summarised by their peak (row, col); the report holds the pictures."""
        doc = self.result.to_json()
        doc["attribution"], doc["tfa"] = self.attribution, self.tfa
        doc["pixel_map_peak"] = _peak(self.pixel_map)
        if self.similar_method:
            doc["similar"] = [asdict(p) for p in self.similar]
            doc["similar_method"] = self.similar_method
        for side in ("proponents", "opponents", "similar"):
            for item in doc.get(side, []):
                i = item["train_id"]
                item["flags"] = self.flags.get(i, [])
                if i in self.tfa_maps:
                    item["tfa_peak"] = _peak(self.tfa_maps[i])
        return doc


def _peak(m: torch.Tensor) -> list[int]:
    a = m.detach().float().abs().sum(0) if m.ndim == 3 else m.detach().float().abs()
    r, c = np.unravel_index(int(a.argmax()), tuple(a.shape))
    return [int(r), int(c)]


def influencer_flags(session: Influence, ids: Sequence[int], score: np.ndarray | None = None) -> dict[int, list[str]]:
    """"likely mislabelled" where an example is in the top 10% of the mislabel ranking (``influence flag``'s default,
    ``mislabel_method``) and the final model gives its label p < 0.5.

    Only the conjunction is a tag: high self-influence alone also marks rare but correct examples, and on the
    digits demo it tagged most influencers of a failure (docs/BENCHMARKS.md, "explain defaults"). ``score``: that
    ranking's scores when the caller has them (``explain`` reads them once for all its images).
    """
    from influence.flag import mislabel_method
    from influence.mislabel_rank import mislabel_scores

    if score is None:
        score = mislabel_scores(session, mislabel_method(session))
    cut = float(np.quantile(score, MISLABEL_QUANTILE))
    prob = session.label_probability()
    flags: dict[int, list[str]] = {}
    for i in ids:
        if score[i] >= cut and prob[i] < 0.5:
            flags[int(i)] = ["likely mislabelled"]
    return flags


def explain(
    session: Influence, inputs: torch.Tensor, *, targets: Sequence[int] | None = None, labels: Sequence[int] | None = None,
    test_ids: Sequence[int] | None = None, k: int = 5, method: str = "auto",
    attribution: str = DEFAULT_ATTRIBUTION, tfa: str | None = None, progress: bool = True,
    exact_recipe: Recipe | None = None,
) -> list[Explanation]:
    """Explain each input: top-``k`` proponents and opponents with TFA maps, a pixel map, and flags.

    ``method="auto"`` (default) answers each question with the method measured best for it on the digits demo
    (scripts/eval_explain_default.py, docs/BENCHMARKS.md "explain defaults"): proponents and opponents by TracIn
    (flipped labels among the top 5: 46 proponents and 55 opponents over 12 failures, against 3 and 33 for
    Grad-Cos), plus ``similar``, the top-``k`` proponents by Grad-Cos, which finds a learned shortcut's training
    images where TracIn cannot (their loss is near zero): 745 patched images among 795 for 159 patched failures,
    against 0 for TracIn and TRAK. A store without one of the two methods falls back to what it has.
    Any other ``method`` lists proponents and opponents by that method only.
    ``exact_recipe``: the recipe that trained the store's checkpoints; proponents and opponents then come from
    exact mode (:meth:`Influence.exact_scores`, replayed training) instead of the store, marked ``exact``.
    ``progress``: a bar over the inputs on stderr, shown only when stderr is a terminal.
    """
    from influence.attribution import run_attribute
    from influence.flag import mislabel_method
    from influence.mislabel_rank import mislabel_scores
    from influence.tfa import DEFAULT_TFA, get_tfa

    tfa = tfa or DEFAULT_TFA
    tfa_cls = get_tfa(tfa)
    x = as_batch(inputs, session.input_shape, single=True).float()
    main, alt = auto_methods(session) if method == "auto" else (method, None)
    results = session.query(x, targets, k=k, method=main, labels=labels, test_ids=test_ids)
    if exact_recipe is not None:
        results = exact_results(session, x, results, k, exact_recipe, progress=progress)
    similar = ([r.proponents for r in session.query(x, [r.target for r in results], k=k, method=alt)] if alt
               else [[] for _ in results])
    model = session.model_at(-1)  # this call's own copy of the final checkpoint: nothing else touches it
    explainer = tfa_cls(model, task=session.task)
    suspicion = mislabel_scores(session, mislabel_method(session), progress=progress)  # the flags' input, read once
    out = []
    for xi, r, sim in tqdm(list(zip(x, results, similar)), desc="explain", unit="image", disable=None if progress else True):
        pixel_map, _ = run_attribute(model, xi, method=attribution, target=r.target)
        tfa_maps: dict[int, torch.Tensor] = {}
        train_images: dict[int, torch.Tensor] = {}
        for side, cls in ((r.proponents, r.target), (r.opponents, r.opponents_target), (sim, r.target)):
            ids = [p.train_id for p in side if p.train_id not in tfa_maps]
            if not ids:
                continue
            tx, ty = session.training_examples(ids)
            maps = explainer.attribute(tx, target=ty, query=(xi, cls))  # maps for the class each side answers
            tfa_maps.update({i: m.cpu() for i, m in zip(ids, maps)})
            train_images.update({i: t for i, t in zip(ids, tx)})
        ids = list(tfa_maps)
        out.append(Explanation(
            result=r, image=xi.cpu(), pixel_map=pixel_map.detach().cpu(),
            tfa_maps=tfa_maps, train_images=train_images,
            flags=influencer_flags(session, ids, suspicion), attribution=attribution, tfa=tfa, similar=sim, similar_method=alt or "",
        ))
    return out


def exact_results(
    session: Influence, x: torch.Tensor, results: list[QueryResult], k: int, recipe: Recipe, *, progress: bool = True,
) -> list[QueryResult]:
    """``results`` with proponents (top-``k`` exact scores for the target) and opponents (bottom-``k`` for the
    opponents' target) from one replay of ``recipe``; the classes asked about stay those of the fast query."""
    differ = [r for r, q in enumerate(results) if q.opponents_target != q.target]
    cols = torch.cat([x, x[differ]]) if differ else x
    col_targets = [q.target for q in results] + [results[r].opponents_target for r in differ]
    scores = session.exact_scores(cols, col_targets, recipe=recipe, progress=progress)
    opp_col = {r: len(results) + j for j, r in enumerate(differ)}
    labels = session.training_labels()
    k = min(k, scores.shape[0])
    out = []
    for r, q in enumerate(results):
        pro, opp = scores[:, r], scores[:, opp_col.get(r, r)]
        top = np.argsort(-pro, kind="stable")[:k]
        bottom = np.argsort(opp, kind="stable")[:k]
        out.append(replace(
            q, method="exact", exact=True, search_ms=0.0,
            proponents=[session._influencer(int(i), float(pro[i]), labels) for i in top],
            opponents=[session._influencer(int(i), float(opp[i]), labels) for i in bottom],
        ))
    return out


def auto_methods(session: Influence) -> tuple[str, str | None]:
    """``method="auto"``'s pair: the method for proponents and opponents, and the one for the ``similar`` list."""
    have = session.methods
    main = next((m for m in ("tracin", "trak", "gradcos") if m in have), None)
    if main is None:
        raise BadSpecError(f"store has no scoring index (has {have}); rebuild it with --method tracin,gradcos")
    return main, ("gradcos" if "gradcos" in have and main != "gradcos" else None)
