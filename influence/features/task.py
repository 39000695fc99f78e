"""What is model-specific about attribution: the per-example output, the loss, and their link.

The store keeps gradients of the *output* (for classification, the margin
``m = logit_y − logsumexp_{j≠y} logit_j``, what TRAK needs). Cross-entropy is a
scalar function of it, ``ℓ = softplus(−m)``, so loss gradients follow exactly
as ``∇ℓ = (dℓ/dm)·∇m = −(1 − p_y)·∇m = −σ(−m)·∇m`` and one feature array serves TracIn,
Grad-Cos and TRAK. A Task for another head supplies the same three functions; a store records
it by import path and a session is opened with an instance of it (``Influence.open(path, task=MyTask())``).
"""

from __future__ import annotations

import torch


class Task:
    """Per-example output, loss and ``dloss/doutput`` from logits and targets (all shaped (B,))."""

    name = "task"

    def output(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``dloss/doutput`` per example: the loss gradient is this times the output gradient."""
        raise NotImplementedError

    def probability(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Model probability of ``y`` (reported; TRAK's Q = 1 − p is read as −loss_weight, which does not round to 0)."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Softmax classification with cross-entropy: the default, needs no subclassing."""

    name = "classification"

    def output(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        picked = logits.gather(-1, y[..., None])[..., 0]
        others = logits.scatter(-1, y[..., None], float("-inf"))
        return picked - torch.logsumexp(others, dim=-1)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    def loss_weight(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # −σ(−m), not −(1 − p): for a well-fit example p rounds to 1.0 in float32 and 1 − p to exactly 0, which
        # zeroed the loss gradients of confidently fit training images (a planted shortcut's, in particular).
        return -torch.sigmoid(-self.output(logits, y))

    def probability(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1).gather(-1, y[..., None])[..., 0]

