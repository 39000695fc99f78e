"""Model factories the tests address by MODEL SPEC (``tests/tiny_models.py:tiny_cnn``).

Small versions of the built-in digits models (1×16×16 inputs, 10 classes) so
builds take well under a second; ``slow_cnn`` sleeps in ``forward`` (length
from ``INFLUENCE_TEST_DELAY``) so a test can kill a build part-way through.
"""

from __future__ import annotations

import os
import time

import torch

from influence.models import DigitsCNN, DigitsMLP


def tiny_cnn() -> DigitsCNN:
    return DigitsCNN(width=4)


def tiny_mlp() -> DigitsMLP:
    return DigitsMLP(hidden=16)


class SlowCNN(DigitsCNN):
    """DigitsCNN(width=4) that sleeps ``INFLUENCE_TEST_DELAY`` seconds per forward (same numbers, slower)."""

    def __init__(self) -> None:
        super().__init__(width=4)
        self.delay = float(os.environ.get("INFLUENCE_TEST_DELAY", "0"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return super().forward(x)


def slow_cnn() -> SlowCNN:
    return SlowCNN()
