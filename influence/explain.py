"""The answer users came for, per test image: prediction, pixel map, influencers with TFA maps, flags.

An ``Explanation`` bundles a query result (who) with the pixel map on the test
image (where it looked) and a TFA map on each influential training image (where
on them), plus warnings on the influencers such as "likely mislabelled".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from influence._inputs import as_batch
from influence.query import Influence, QueryResult

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

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: maps are summarised by their peak (row, col); the report holds the pictures."""
        doc = self.result.to_json()
        doc["attribution"], doc["tfa"] = self.attribution, self.tfa
        doc["pixel_map_peak"] = _peak(self.pixel_map)
        for side in ("proponents", "opponents"):
            for item in doc[side]:
                i = item["train_id"]
                item["flags"] = self.flags.get(i, [])
                if i in self.tfa_maps:
                    item["tfa_peak"] = _peak(self.tfa_maps[i])
        return doc


def _peak(m: torch.Tensor) -> list[int]:
    a = m.detach().float().abs().sum(0) if m.ndim == 3 else m.detach().float().abs()
    r, c = np.unravel_index(int(a.argmax()), tuple(a.shape))
    return [int(r), int(c)]


def influencer_flags(session: Influence, ids: Sequence[int]) -> dict[int, list[str]]:
    """Warnings per training example: high self-influence, and a label the final model disagrees with."""
    from influence.flag import mislabel_method

    selfinf = session.self_influence(mislabel_method(session))
    cut = float(np.quantile(selfinf, MISLABEL_QUANTILE))
    prob = session.label_probability()
    flags: dict[int, list[str]] = {}
    for i in ids:
        f = []
        if selfinf[i] >= cut and prob[i] < 0.5:
            f.append("likely mislabelled")
        elif selfinf[i] >= cut:
            f.append("high self-influence")
        if f:
            flags[int(i)] = f
    return flags


def explain(
    session: Influence, inputs: torch.Tensor, *, targets: Sequence[int] | None = None, labels: Sequence[int] | None = None,
    test_ids: Sequence[int] | None = None, k: int = 5, method: str = "tracin",
    attribution: str = DEFAULT_ATTRIBUTION, tfa: str | None = None, progress: bool = True,
) -> list[Explanation]:
    """Explain each input: top-``k`` proponents and opponents with TFA maps, a pixel map, and flags.

    ``progress``: a bar over the inputs on stderr, shown only when stderr is a terminal.
    """
    from influence.attribution import run_attribute
    from influence.flag import mislabel_method
    from influence.tfa import DEFAULT_TFA, get_tfa

    tfa = tfa or DEFAULT_TFA
    tfa_cls = get_tfa(tfa)
    x = as_batch(inputs, session.input_shape, single=True).float()
    results = session.query(x, targets, k=k, method=method, labels=labels, test_ids=test_ids)
    model = session.model_at(-1)  # this call's own copy of the final checkpoint: nothing else touches it
    explainer = tfa_cls(model, task=session.task)
    session.self_influence(mislabel_method(session), progress=progress)  # the flags' input, loaded once, before the bar
    out = []
    for xi, r in tqdm(list(zip(x, results)), desc="explain", unit="image", disable=None if progress else True):
        pixel_map, _ = run_attribute(model, xi, method=attribution, target=r.target)
        tfa_maps: dict[int, torch.Tensor] = {}
        train_images: dict[int, torch.Tensor] = {}
        for side, cls in ((r.proponents, r.target), (r.opponents, r.opponents_target)):
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
            flags=influencer_flags(session, ids), attribution=attribution, tfa=tfa,
        ))
    return out
