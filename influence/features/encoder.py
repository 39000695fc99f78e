"""Test-time features from immutable checkpoints: per checkpoint φ_c(t), dℓ/dm and p_y, exactly as the store's rows.

A checkpoint is a read-only parameter dict used through ``functional_call``; the encoder never loads weights into
a module, so there is no "current checkpoint" and any order of calls gives the same answers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from influence.features.layer_grads import forward
from influence.features.projectors import Projector
from influence.features.task import Task


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint's parameters and buffers by name (read-only) and its store id."""

    id: str
    state: Mapping[str, torch.Tensor]

    @classmethod
    def of(cls, id: str, model: nn.Module) -> "Checkpoint":
        """A detached copy of ``model``'s current parameters and buffers (later changes to the model do not leak in)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(id, MappingProxyType(state))


@dataclass(frozen=True)
class QueryFeatures:
    """Per checkpoint id: projected output gradients (B, k), ``dloss/doutput`` (B,) and p_y (B,)."""

    features: dict[str, np.ndarray]
    loss_weights: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]


class QueryEncoder:
    """(task, projector, checkpoints) → per-checkpoint query features.

    ``model`` is only the architecture: the encoder takes it over (pass a copy if you keep using yours), and
    every forward swaps in one checkpoint's tensors.
    """

    def __init__(self, model: nn.Module, task: Task, projector: Projector, names: list[str], checkpoints: Sequence[Checkpoint]) -> None:
        self._template = model.eval()  # owned by the encoder: parameters come from a checkpoint on every call
        self.task, self.projector, self.names = task, projector, list(names)
        self.checkpoints = tuple(checkpoints)

    def logits(self, x: torch.Tensor, checkpoint: int = -1) -> torch.Tensor:
        with torch.no_grad():
            return forward(self._template, x, self.checkpoints[checkpoint].state)

    def encode(self, x: torch.Tensor, y: torch.Tensor, last_logits: torch.Tensor | None = None) -> QueryFeatures:
        """``last_logits``: the final checkpoint's logits of ``x`` when the caller has them (a query predicts first),
        so that forward pass is not repeated."""
        feats, weights, probs = {}, {}, {}
        last = len(self.checkpoints) - 1
        for i, ckpt in enumerate(self.checkpoints):
            logits = last_logits if i == last and last_logits is not None else self.logits(x, i)
            weights[ckpt.id] = self.task.loss_weight(logits, y).float().cpu().numpy()
            probs[ckpt.id] = self.task.probability(logits, y).float().cpu().numpy()
            phi = self.projector.featurize(self._template, self.task, self.names, x, y, state=ckpt.state)
            feats[ckpt.id] = phi.detach().float().cpu().numpy()
        return QueryFeatures(feats, weights, probs)

    def model_at(self, checkpoint: int = -1) -> nn.Module:
        """A new module (eval mode) holding checkpoint ``checkpoint``'s weights; the caller owns it."""
        model = copy.deepcopy(self._template)
        model.load_state_dict(dict(self.checkpoints[checkpoint].state))
        return model.eval()
