"""VAR: keep only the evidence that is specific to the explained class.

A base map often lights up the same object for every class. VAR computes the base map
for each class in a set C and, pixel by pixel, asks which class the evidence belongs to:
P_c = softmax_c(T·|A_c| / max|A_c|). The output A_t·P_t is kept only where the target's
share beats the uniform share 1/|C| by more than τ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch

from influence._inputs import TargetLike, as_batch
from influence.attribution._base import METHODS, AttributionMethod, evaluating, get_method, logits_of, resolve_target
from influence.errors import BadSpecError

ClassesLike: TypeAlias = int | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class ClassShares:
    """Per-class base maps and the share of each pixel's evidence that each class holds.

    ``classes`` (B, K) with the target in column 0; ``valid`` (B, K) marks real entries
    (rows with fewer classes are padded); ``maps`` and ``shares`` are (B, K, C, H, W).
    """

    classes: torch.Tensor
    valid: torch.Tensor
    maps: torch.Tensor
    shares: torch.Tensor


class VAR(AttributionMethod, name="var"):
    """Wraps any base method; costs |C| base calls. ``classes``: None (top-``k`` predicted + target),
    an int k, a list of classes for every example, or a (B, K) LongTensor. ``temperature`` may be
    a sequence (shares averaged over T, e.g. (1, 5, 100)).
    """

    def __init__(
        self,
        base_method: AttributionMethod,
        classes: ClassesLike = None,
        temperature: float | Sequence[float] = 10.0,
        tau: float = 0.01,
        k: int = 3,
    ) -> None:
        if not isinstance(base_method, AttributionMethod) or isinstance(base_method, VAR):
            raise BadSpecError(f"VAR wraps a base attribution method instance (e.g. Saliency(model)); got {base_method!r}")
        temps = [float(temperature)] if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
        if not temps or any(t <= 0 for t in temps):
            raise BadSpecError(f"temperature must be positive; got {temperature!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise BadSpecError(f"k must be an int >= 1; got {k!r}")
        super().__init__(base_method.model)
        self.base = base_method
        self.classes = classes
        self.temperatures = temps
        self.tau = float(tau)
        self.k = k

    @classmethod
    def from_model(cls, model: Any, base: str = "integrated_gradients") -> "VAR":
        """VAR around the base method registered as ``base``."""
        base_cls = get_method(base)
        if base_cls is VAR:
            raise BadSpecError("VAR cannot wrap VAR; choose a base method: " + ", ".join(n for n in sorted(METHODS) if n != "var"))
        return cls(base_cls.from_model(model))

    def class_shares(self, inputs: Any, target: TargetLike = None, classes: ClassesLike = None, **base_options: Any) -> ClassShares:
        """The base map of each class in C and each class's share of the evidence."""
        x = as_batch(inputs)
        with evaluating(self.model):
            t = resolve_target(self.model, x, target)
            return self._shares(x, t, self.classes if classes is None else classes, base_options)

    def attribute(self, inputs: Any, target: TargetLike = None, *, classes: ClassesLike = None, **base_options: Any) -> torch.Tensor:
        """A_t·P_t where P_t − 1/|C| > τ, else 0; ``base_options`` go to the base method."""
        shares = self.class_shares(inputs, target, classes, **base_options)
        p_t = shares.shares[:, 0]
        size = shares.valid.sum(dim=1).to(p_t.dtype).reshape(-1, 1, 1, 1)
        keep = (p_t - 1.0 / size) > self.tau
        return torch.where(keep, shares.maps[:, 0] * p_t, torch.zeros_like(p_t))

    def _class_table(self, x: torch.Tensor, target: torch.Tensor, classes: ClassesLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) classes with the target first, and which entries are real."""
        b = x.shape[0]
        if classes is None or isinstance(classes, int) and not isinstance(classes, bool):
            k = self.k if classes is None else classes
            if k < 1:
                raise BadSpecError(f"classes as a count must be >= 1; got {k}")
            with torch.no_grad():
                logits = logits_of(self.model, x)
            table = logits.topk(min(k, logits.shape[1]), dim=1).indices
        else:
            table = torch.as_tensor(classes, device=x.device)
            if table.is_floating_point():
                raise BadSpecError(f"classes must be integer class indices; got dtype {table.dtype}")
            table = table.long()
            if table.dim() == 1:
                table = table.expand(b, -1)
            if table.dim() != 2 or table.shape[0] != b or table.shape[1] == 0:
                raise BadSpecError(f"classes must be a list of classes or a (B={b}, K) tensor; got shape {tuple(table.shape)}")
        rows = []
        for i in range(b):
            rest = [c for c in dict.fromkeys(table[i].tolist()) if c != int(target[i])]
            rows.append([int(target[i])] + rest)
        width = max(len(r) for r in rows)
        valid = torch.tensor([[j < len(r) for j in range(width)] for r in rows], device=x.device)
        padded = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], device=x.device)
        return padded, valid

    def _shares(self, x: torch.Tensor, target: torch.Tensor, classes: ClassesLike, base_options: dict[str, Any]) -> ClassShares:
        table, valid = self._class_table(x, target, classes)
        maps = torch.stack([self.base.attribute(x, table[:, j], **base_options) for j in range(table.shape[1])], dim=1)
        magnitude = maps.abs()
        scale = magnitude.flatten(2).amax(dim=2).clamp_min(torch.finfo(maps.dtype).tiny)
        normalised = magnitude / scale.reshape(*scale.shape, 1, 1, 1)
        mask = valid.reshape(*valid.shape, 1, 1, 1)
        shares = torch.zeros_like(maps)
        for temp in self.temperatures:
            logits = (temp * normalised).masked_fill(~mask, float("-inf"))
            shares = shares + logits.softmax(dim=1)
        return ClassShares(table, valid, maps, shares / len(self.temperatures))
