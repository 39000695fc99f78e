"""Exact mode: replay a training run backwards to get d margin(test) / d w_i for every training example.

Metagradients (Ilyas & Engstrom 2025, "MAGIC: Near-Optimal Data Attribution for
Deep Learning"): give every training example a loss weight ``w_i`` (shared by all
the steps in which it appears), train with ``w = 1`` as :class:`~influence.recipe.Recipe`
does, and differentiate the final model's margin on the test point with respect to
``w`` by reverse mode through the unrolled optimizer steps. Each step is a pure
function ``(θ, optimizer state, w_batch) → (θ', state')``; ``torch.func.vjp`` of it
(it contains ``torch.func.grad`` of the batch loss, so the vjp is second order)
carries the adjoint back one step and yields that batch's ``∂/∂w``. Adam's moments
and BatchNorm's running statistics are part of the state, so their updates are
differentiated too (the running statistics reach the margin through the final
eval-mode model; each step's batch statistics depend on the parameters).

Memory: the forward pass keeps the state every ``K ≈ √T`` steps; the reverse pass
recomputes each segment's ``K`` states from its saved start, so at most about
``T/K + K ≈ 2√T`` states are held at once (``checkpoint_every=1`` keeps all ``T``).
Cost: one forward training pass, one recomputation, one reverse pass of
second-order vjps, about 3–4 trainings for one query or a batch of queries.

Sign: a positive score means up-weighting example i raises the margin (a proponent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from influence._inputs import TargetLike, as_batch, as_targets
from influence.data import SizedDataset
from influence.errors import BadDataError, BadSpecError
from influence.features.task import ClassificationTask
from influence.recipe import DTYPES, Recipe, State, prepare


@dataclass(frozen=True)
class Replay:
    """Metagradients for a batch of test points and what the replay held in memory."""

    scores: np.ndarray        # (n_train, n_test): d margin_t / d w_i at w = 1
    margins: np.ndarray       # (n_test,): the final model's margins
    steps: int                # optimizer steps replayed (T)
    checkpoint_every: int     # K: one state saved every K steps on the forward pass
    states_saved: int         # states kept by the forward pass (initial, every K-th, final)
    peak_states: int          # most state-sized arrays held at once (saved + one recomputed segment + the adjoint)
    step_evals: int           # forward steps run, recomputation included (T + recomputed)


def metagradient(
    recipe: Recipe,
    data: SizedDataset,
    test_x: Any,
    target: TargetLike,
    *,
    checkpoint_every: int | None = None,
    device: str | torch.device = "cpu",
    on_step: Callable[[], None] | None = None,
) -> Replay:
    """Exact-mode scores for a batch of test points (the reverse pass is vmapped over them).

    ``on_step``: called after each forward step and each reverse step (2·T calls in all), e.g. to advance a bar.
    """
    if checkpoint_every is not None and (
            isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise BadSpecError(f"checkpoint_every must be a positive int (or None for √T), got {checkpoint_every!r}")
    model, run = prepare(recipe, data, None, device)
    dtype = DTYPES[recipe.dtype]
    x_test = as_batch(test_x, single=True).to(run.device, dtype)
    try:  # check the test images and targets before the training run, not after it (in eval mode, as they are scored)
        model.eval()
        with torch.no_grad():
            num_classes = int(run.logits(run.initial_state()["p"], x_test).shape[-1])
    except RuntimeError as e:
        raise BadDataError(
            f"the model cannot run on test_x of shape {tuple(x_test.shape[1:])}: {str(e).strip().splitlines()[0][:160]}"
        ) from None
    finally:
        model.train()
    y_test = as_targets(target, len(x_test), num_classes).to(run.device)
    T = len(run.steps)
    K = checkpoint_every or max(1, round(math.sqrt(T)))

    # Forward: the ordinary training run, keeping every K-th state.
    saved: dict[int, State] = {0: run.initial_state()}
    state = saved[0]
    for t in range(T):
        state = run.step(state, t)
        if (t + 1) % K == 0 and t + 1 < T:
            saved[t + 1] = state
        if on_step is not None:
            on_step()
    states_saved = len(saved) + 1
    peak = states_saved
    step_evals = T

    # The final model's margins and their gradient (parameters and BatchNorm statistics), one row per test point.
    model.eval()
    task = ClassificationTask()
    final = {"p": state["p"], "b": state.get("b", {})}
    with torch.no_grad():
        margins = task.output(run.logits(final["p"], x_test, final["b"]), y_test)
    cot_final = torch.func.jacrev(lambda f: task.output(run.logits(f["p"], x_test, f["b"]), y_test))(final)
    model.train()
    cot: State = {key: (cot_final[key] if key in cot_final else
                        {k: torch.zeros((len(x_test),) + v.shape, dtype=v.dtype, device=v.device) for k, v in part.items()})
                  for key, part in state.items()}
    del state

    # Reverse: segment by segment from the end, recomputing each segment's states from its saved start.
    scores = torch.zeros(len(data), len(x_test), dtype=dtype, device=run.device)
    for start in sorted(saved, reverse=True):
        stop = min(start + K, T)
        seg = [saved.pop(start)]
        for t in range(start, stop - 1):
            seg.append(run.step(seg[-1], t))
        step_evals += stop - 1 - start
        peak = max(peak, len(saved) + len(seg) + 1)
        for t in range(stop - 1, start - 1, -1):
            s = seg.pop()
            idx = run.steps[t][1]
            _, pullback = torch.func.vjp(lambda s_, w_, t=t: run.step_with(s_, w_, t), s, run.weights[idx])  # type: ignore[misc]
            cot, cot_w = torch.func.vmap(pullback)(cot)
            scores.index_add_(0, idx.to(run.device), cot_w.T)
            if on_step is not None:
                on_step()
    return Replay(
        scores=scores.detach().cpu().numpy(), margins=margins.detach().cpu().numpy(), steps=T, checkpoint_every=K,
        states_saved=states_saved, peak_states=peak, step_evals=step_evals,
    )


def exact_scores(
    recipe: Recipe,
    data: SizedDataset,
    test_x: Any,
    target: TargetLike,
    *,
    checkpoint_every: int | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """d margin_target(test_x) / d w_i at w = 1 for every training example i: shape (n_train,).

    ``test_x`` is one image (C, H, W) or a batch of one; ``target`` the class whose
    margin is explained. Positive = up-weighting i raises the margin (a proponent).
    """
    x = as_batch(test_x, single=True)
    if len(x) != 1:
        raise BadDataError(
            f"exact_scores answers one test point, got a batch of {len(x)}; use influence.exact.metagradient for a batch"
        )
    return metagradient(recipe, data, x, target, checkpoint_every=checkpoint_every, device=device).scores[:, 0]
