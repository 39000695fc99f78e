"""Random projections of per-example gradients to ``k`` dims (Johnson–Lindenstrauss).

Every projector is rebuilt from its :class:`ProjectorSpec` (kind, k, seed) plus
the model's selected parameters, so test-time queries are projected exactly
like the stored training features. None ever materialises a dense p×k matrix
beyond a bounded cache: dense kinds are regenerated block-wise from the seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from influence.errors import BadSpecError
from influence.features.grads import num_parameters, per_example_grads
from influence.features.layer_grads import LayerReuseError, capture_layer_grads, layer_grad_blocks, unfold_input
from influence.features.task import Task

DENSE_CACHE_BYTES = 512 * 2**20
DENSE_BLOCK_BYTES = 16 * 2**20


class ProjectorKind(str, Enum):
    NONE = "none"
    SPARSE = "sparse"
    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    FACTORIZED = "factorized"


@dataclass(frozen=True)
class ProjectorSpec:
    """What a store records so queries are projected identically: kind, target dims and seed."""

    kind: str = ProjectorKind.SPARSE.value
    k: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        kinds = [k.value for k in ProjectorKind]
        if self.kind not in kinds:
            raise BadSpecError(f"unknown projector {self.kind!r}; choose one of {', '.join(kinds)}")
        if self.kind != ProjectorKind.NONE.value and int(self.k) < 1:
            raise BadSpecError(f"--proj-dim must be a positive integer, got {self.k}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(stream)) % (2**63 - 1))


class Projector:
    """Turns a batch of examples into projected gradient features (B, dim).

    Gradients come from the layer-hook fast path where the model allows it
    (``gradients="auto"``), else from ``vmap(grad)``; both are exact.
    """

    spec: ProjectorSpec
    dim: int
    gradients: str = "auto"  # "auto" | "vmap"

    def featurize(
        self, model: nn.Module, task: Task, names: list[str], x: torch.Tensor, y: torch.Tensor,
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Projected output gradients (B, dim); ``state`` (a checkpoint's tensors by name) replaces the module's own."""
        blocks = layer_grad_blocks(model, task, names, x, y, state=state) if self.gradients == "auto" else None
        if blocks is None:
            return self.project(per_example_grads(model, task, names, x, y, state=state))
        return self.project_blocks(blocks, x.shape[0])

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_blocks(self, blocks: Iterable[tuple[str, torch.Tensor]], batch: int) -> torch.Tensor:
        """Project per-parameter gradient blocks given in parameter order (default: concatenate first)."""
        return self.project(torch.cat([b for _, b in blocks], dim=1))


class IdentityProjector(Projector):
    """No projection: exact gradients (small models, and the oracle in tests)."""

    def __init__(self, spec: ProjectorSpec, p: int) -> None:
        self.spec, self.dim = spec, p

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads


class SparseProjector(Projector):
    """CountSketch: coordinate j goes to bucket h(j) with sign s(j); O(p) per example, a few MB of state.

    The sign is folded into the bucket (2k slots: positive ones, then negative
    ones), so projecting is one ``index_add_`` pass over the gradient and one
    (B, k) subtraction, with no signed copy of the gradient.
    """

    def __init__(self, spec: ProjectorSpec, p: int, device: torch.device | str = "cpu") -> None:
        self.spec, self.dim = spec, spec.k
        g = _generator(spec.seed, 0)
        self.bucket = torch.randint(0, spec.k, (p,), generator=g).to(device)
        self.sign = (torch.randint(0, 2, (p,), generator=g) * 2 - 1).float().to(device)
        self._slot = self.bucket + spec.k * (self.sign < 0).long()

    def _finish(self, acc: torch.Tensor) -> torch.Tensor:
        return acc[:, : self.dim] - acc[:, self.dim:]

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(grads.shape[0], 2 * self.dim, dtype=grads.dtype, device=grads.device)
        return self._finish(acc.index_add_(1, self._slot.to(grads.device), grads))

    def project_blocks(self, blocks: Iterable[tuple[str, torch.Tensor]], batch: int) -> torch.Tensor:
        acc, offset = None, 0
        for _, g in blocks:
            if acc is None:
                acc = torch.zeros(batch, 2 * self.dim, dtype=g.dtype, device=g.device)
            acc.index_add_(1, self._slot[offset:offset + g.shape[1]].to(g.device), g)
            offset += g.shape[1]
        if acc is None:
            raise BadSpecError("no parameters to project: the selection is empty; choose some with --params")
        return self._finish(acc)


class DenseProjector(Projector):
    """Gaussian or Rademacher entries scaled by 1/√k, regenerated block-wise from the seed."""

    def __init__(self, spec: ProjectorSpec, p: int) -> None:
        self.spec, self.dim, self.p = spec, spec.k, p
        self.block = max(1, DENSE_BLOCK_BYTES // (4 * spec.k))
        self._cache: dict[int, torch.Tensor] | None = {} if p * spec.k * 4 <= DENSE_CACHE_BYTES else None

    def _matrix(self, b: int) -> torch.Tensor:
        if self._cache is not None and b in self._cache:
            return self._cache[b]
        width = min(self.block, self.p - b * self.block)
        g = _generator(self.spec.seed, b)
        if self.spec.kind == ProjectorKind.GAUSSIAN.value:
            m = torch.randn(width, self.dim, generator=g)
        else:
            m = torch.randint(0, 2, (width, self.dim), generator=g).float() * 2 - 1
        m /= math.sqrt(self.dim)
        if self._cache is not None:
            self._cache[b] = m
        return m

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(grads.shape[0], self.dim, dtype=grads.dtype, device=grads.device)
        for b in range(math.ceil(self.p / self.block)):
            cols = slice(b * self.block, min(self.p, (b + 1) * self.block))
            out += grads[:, cols] @ self._matrix(b).to(grads.device, grads.dtype)
        return out


class FactorizedProjector(Projector):
    """LoGra-style per-layer projection for Linear and Conv2d layers; the full gradient is never formed.

    A layer's per-example weight gradient is Σ_positions δ aᵀ (output gradient
    times input activation, bias folded in as a constant input 1). Projecting
    both sides, P_out δ and P_in a, and summing their outer products gives
    P_out G P_inᵀ, a k_o·k_i feature. When k_o and k_i equal the layer dims the
    projections are the identity and the feature is the exact gradient.
    Parameters outside Linear/Conv2d layers (e.g. BatchNorm) are not covered.
    """

    def __init__(self, spec: ProjectorSpec, model: nn.Module, names: list[str]) -> None:
        self.spec = spec
        chosen = set(names)
        self.layers: list[tuple[str, nn.Linear | nn.Conv2d, bool]] = []
        for mname, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and f"{mname}.weight" in chosen:
                if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or isinstance(mod.padding, str) or mod.padding_mode != "zeros"):
                    raise BadSpecError(f"factorized projector: layer {mname} (groups/padding mode) is not supported; use --projector sparse")
                self.layers.append((mname, mod, mod.bias is not None and f"{mname}.bias" in chosen))
        if not self.layers:
            raise BadSpecError("factorized projector needs Linear or Conv2d layers among --params; use --projector sparse")
        dims = []
        for _, mod, has_bias in self.layers:
            d_out = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            d_in = (mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels * math.prod(mod.kernel_size)) + int(has_bias)
            dims.append((d_out, d_in))
        exact = sum(o * i for o, i in dims) <= spec.k
        per_layer = max(1, spec.k // len(dims))
        self.proj: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        self.dim = 0
        for li, (d_out, d_in) in enumerate(dims):
            if exact:
                k_o, k_i = d_out, d_in
            else:
                k_o = min(d_out, max(1, round(math.sqrt(per_layer))))
                k_i = min(d_in, max(1, per_layer // k_o))
            g = _generator(spec.seed, 1000 + li)
            p_out = None if k_o == d_out else torch.randn(k_o, d_out, generator=g) / math.sqrt(k_o)
            p_in = None if k_i == d_in else torch.randn(k_i, d_in, generator=g) / math.sqrt(k_i)
            self.proj.append((p_out, p_in))
            self.dim += k_o * k_i

    @staticmethod
    def _unfold(mod: nn.Linear | nn.Conv2d, inp: torch.Tensor, has_bias: bool) -> torch.Tensor:
        if isinstance(mod, nn.Conv2d):
            a = unfold_input(mod, inp)
        else:
            a = inp.reshape(inp.shape[0], -1, inp.shape[-1]).transpose(1, 2)
        if has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], dim=1)
        return a  # (B, d_in, L)

    def featurize(
        self, model: nn.Module, task: Task, names: list[str], x: torch.Tensor, y: torch.Tensor,
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        named = dict(model.named_modules())  # by name: the projector may have been made from a copy of this model
        modules = {mname: named[mname] for mname, _, _ in self.layers}
        try:
            inputs, delta_of = capture_layer_grads(model, modules, x, lambda logits: task.output(logits, y).sum(), state)
        except LayerReuseError as e:
            mname, runs = next(iter(e.runs.items()))
            raise BadSpecError(f"factorized projector: layer {mname} ran {runs} times in one forward; use --projector sparse") from None
        deltas = [delta_of[mname] for mname, _, _ in self.layers]
        feats = []
        for (mname, mod, has_bias), delta, (p_out, p_in) in zip(self.layers, deltas, self.proj):
            if isinstance(mod, nn.Conv2d) and p_in is not None:
                a = self._project_patches(mod, inputs[mname], p_in, has_bias)
            else:
                a = self._unfold(mod, inputs[mname], has_bias)
                if p_in is not None:
                    a = torch.einsum("id,bdl->bil", p_in.to(a), a)
            d = delta.reshape(delta.shape[0], delta.shape[1], -1) if isinstance(mod, nn.Conv2d) else \
                delta.reshape(delta.shape[0], -1, delta.shape[-1]).transpose(1, 2)
            if p_out is not None:
                d = torch.einsum("od,bdl->bol", p_out.to(d), d)
            feats.append(torch.bmm(d, a.transpose(1, 2)).reshape(x.shape[0], -1))
        return torch.cat(feats, dim=1)

    @staticmethod
    def _project_patches(mod: nn.Conv2d, inp: torch.Tensor, p_in: torch.Tensor, has_bias: bool) -> torch.Tensor:
        """``P_in`` times the layer's input patches, as a convolution with ``P_in`` as its kernel: (B, k_i, L).

        Equal to projecting the unfolded patches (``unfold`` orders a patch channel-major, as a conv kernel is
        laid out) without forming them, which for a 3×3 conv is 9× the activation memory per example.
        """
        p = p_in.to(inp)
        weight = p[:, : p.shape[1] - int(has_bias)].reshape(p.shape[0], mod.in_channels, *mod.kernel_size)
        bias = p[:, -1] if has_bias else None  # the constant-1 input that folds the bias into the weight gradient
        out = torch.nn.functional.conv2d(inp, weight, bias, mod.stride, mod.padding, mod.dilation)
        return out.reshape(out.shape[0], out.shape[1], -1)


def make_projector(spec: ProjectorSpec, model: nn.Module, names: list[str]) -> Projector:
    """The projector a spec describes, for this model's selected parameters."""
    p = num_parameters(model, names)
    if spec.kind == ProjectorKind.NONE.value:
        return IdentityProjector(spec, p)
    if spec.kind == ProjectorKind.SPARSE.value:
        return SparseProjector(spec, p)
    if spec.kind in (ProjectorKind.GAUSSIAN.value, ProjectorKind.RADEMACHER.value):
        return DenseProjector(spec, p)
    return FactorizedProjector(spec, model, names)
