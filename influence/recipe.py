"""A training run written down exactly, so that it can be rerun byte for byte and replayed in reverse.

Exact mode (metagradients, Ilyas & Engstrom 2025, "MAGIC") differentiates the final
model through every optimizer step, so the run must be a pure function of the
recipe, the data and the per-example loss weights. ``Recipe.train`` runs the same
functional optimizer step (:func:`optimizer_step`) that the replay differentiates,
so the two cannot drift apart.

What a recipe supports:

* SGD with momentum (PyTorch's convention: ``v ← μv + g``, ``θ ← θ − ηv``, no
  dampening, no Nesterov), Adam (L2 weight decay added to the gradient, as
  ``torch.optim.Adam``) and AdamW (decoupled decay), with weight decay;
* a per-epoch learning rate: ``constant``, ``linear`` (``lr·(1 − e/E)`` for epoch
  ``e = 0..E−1``, as :func:`influence.demo.training.train_classifier`) or ``cosine``;
* a data order drawn from the seed, one permutation per epoch (again as
  ``train_classifier``), the last batch of an epoch possibly short; no augmentation;
* the batch loss ``Σ_i w_i ℓ_i / |batch|`` with per-example weights ``w`` (default ones).

BatchNorm in train mode is replayed: each step normalises with the batch's own
statistics (a deterministic function of the batch and the parameters) and moves the
running statistics towards them; the running statistics are threaded through the
step as part of the state (``state["b"]``), feed only the final eval-mode model, and
are differentiated like the parameters.

What it refuses (``BadSpecError``, with the reason): Dropout with p > 0 (random
masks), InstanceNorm with running statistics, and any model whose train-mode forward
or gradient is not bitwise repeatable or that writes to buffers other than
BatchNorm's running statistics (found by a probe on the first batch). Data-dependent
control flow is fine: the replay recomputes every forward exactly, so it follows the
same branches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from influence.data import ArrayDataset, SizedDataset, batch_of, index_subset
from influence.errors import BadDataError, BadSpecError
from influence.loading import load_model

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# {"p": params, "v": momentum or second moment, "m": first moment (Adam), "b": BatchNorm running statistics}
State = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Recipe:
    """A deterministic training run: model factory, optimizer, schedule, epochs, batch size and seed.

    ``model`` is a MODEL SPEC (``digits-mlp``, ``package.module:factory``,
    ``path/file.py:factory``) or a zero-argument factory returning a fresh ``nn.Module``.
    Defaults are those of :func:`influence.demo.training.train_classifier`.
    """

    model: str | Callable[[], nn.Module]
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 12
    batch_size: int = 64
    seed: int = 0
    schedule: str = "linear"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.model, nn.Module):
            raise BadSpecError(
                f"Recipe(model=...) got a built {type(self.model).__name__}; give a MODEL SPEC string or a factory "
                "(a fresh model per run is what makes the run repeatable)"
            )
        if not (isinstance(self.model, str) or callable(self.model)):
            raise BadSpecError(f"Recipe(model=...) must be a MODEL SPEC string or a factory, got {type(self.model).__name__}")
        if self.optimizer not in OPTIMIZERS:
            raise BadSpecError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise BadSpecError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            raise BadSpecError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise BadSpecError(f"Recipe {name} must be a positive finite number, got {v!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise BadSpecError(f"Recipe weight_decay must be ≥ 0, got {self.weight_decay!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise BadSpecError(f"Recipe momentum must be in [0, 1), got {self.momentum!r}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise BadSpecError(f"Recipe betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BadSpecError(f"Recipe {name} must be a positive int, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise BadSpecError(f"Recipe seed must be an int, got {self.seed!r}")

    # ------------------------------------------------------------------ the run's schedule

    def lr_at(self, epoch: int) -> float:
        """Learning rate in force during ``epoch`` (0-based)."""
        frac = epoch / self.epochs
        if self.schedule == "constant":
            return float(self.lr)
        if self.schedule == "linear":
            return float(self.lr * (1 - frac))
        return float(self.lr * 0.5 * (1 + math.cos(math.pi * frac)))

    def batches(self, n: int) -> list[tuple[int, torch.Tensor]]:
        """Every step's ``(epoch, example ids)``, in order: one seeded permutation per epoch."""
        gen = torch.Generator().manual_seed(self.seed)
        out: list[tuple[int, torch.Tensor]] = []
        for epoch in range(self.epochs):
            order = torch.randperm(n, generator=gen)
            out.extend((epoch, order[b:b + self.batch_size]) for b in range(0, n, self.batch_size))
        return out

    def build_model(self) -> nn.Module:
        """A fresh model initialised from the seed (the caller's global RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if isinstance(self.model, str):
                model = load_model(self.model)
            else:
                try:
                    model = self.model()
                except Exception as e:  # user code may raise anything
                    raise BadSpecError(f"the recipe's model factory raised {type(e).__name__}: {e}") from None
                if not isinstance(model, nn.Module):
                    raise BadSpecError(f"the recipe's model factory returned {type(model).__name__}, not a torch.nn.Module")
        refuse_unreplayable_layers(model)
        return model.to(DTYPES[self.dtype])

    # ------------------------------------------------------------------ training

    def train(
        self,
        data: SizedDataset,
        weights: Any = None,
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoints: int = 0,
        device: str | torch.device = "cpu",
    ) -> nn.Module:
        """Train deterministically with per-example loss weights; returns the final model in eval mode.

        With ``checkpoint_dir``, saves ``checkpoints`` evenly spaced state dicts
        (``epoch_NNN.pt``, the last one the final model) and this recipe as ``recipe.json`` beside them.
        """
        if checkpoint_dir is not None and (isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1):
            raise BadSpecError(f"checkpoints must be a positive int when checkpoint_dir is given, got {checkpoints!r}")
        model, run = prepare(self, data, weights, device)
        save_at: set[int] = set()
        if checkpoint_dir is not None:
            save_at = set(np.linspace(self.epochs / checkpoints, self.epochs, checkpoints).round().astype(int).tolist())
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            self.save(Path(checkpoint_dir) / "recipe.json")
        state = run.initial_state()
        for t in range(len(run.steps)):
            state = run.step(state, t)
            epoch = run.steps[t][0]
            if save_at and (t + 1 == len(run.steps) or run.steps[t + 1][0] != epoch) and epoch + 1 in save_at:
                run.load_into(model, state, t + 1)
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                           Path(checkpoint_dir) / f"epoch_{epoch + 1:03d}.pt")  # type: ignore[arg-type]
        run.load_into(model, state, len(run.steps))
        return model.eval()

    # ------------------------------------------------------------------ JSON beside the checkpoints

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["model"] = _model_spec_string(self.model)
        return d

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the recipe as JSON (a factory callable is saved as ``module:name`` when importable)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Recipe":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BadSpecError(f"recipe {path} is unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise BadSpecError(f"recipe {path} must hold a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadSpecError(f"recipe {path} has unknown fields {unknown}; known: {sorted(known)}")
        if "model" not in d:
            raise BadSpecError(f"recipe {path} has no 'model' field")
        if "betas" in d and isinstance(d["betas"], list):
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def _model_spec_string(model: str | Callable[[], nn.Module]) -> str:
    if isinstance(model, str):
        return model
    mod, qual = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not mod or "<" in qual or mod == "__main__":
        raise BadSpecError(
            f"cannot save a recipe whose model factory {model!r} is not importable by name; "
            "give Recipe(model='package.module:factory') or 'path/file.py:factory' instead"
        )
    return f"{mod}:{qual}"


# ----------------------------------------------------------------------------- refusals

def refuse_unreplayable_layers(model: nn.Module) -> None:
    """Dropout masks and InstanceNorm running statistics are state the replay does not reproduce: refuse them by name."""
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise BadSpecError(
                f"exact replay refuses layer {name!r} ({kind}, track_running_stats=True): its running statistics are "
                "not replayed; set track_running_stats=False, or use BatchNorm, GroupNorm or LayerNorm"
            )
        if type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise BadSpecError(
                f"exact replay refuses layer {name!r} ({kind}): only BatchNorm1d/2d/3d running statistics are replayed"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise BadSpecError(
                f"exact replay refuses layer {name!r} ({kind}, p={m.p}): random masks are not replayed; set p=0 or remove it"
            )


def _probe(run: "_Run", x: torch.Tensor, y: torch.Tensor) -> None:
    """Two train-mode forwards and gradients on one batch must agree bitwise and leave the buffers alone."""
    p = run.initial_state()["p"]
    before = {k: v.clone() for k, v in run.buffers.items()}
    w = torch.ones(len(y), dtype=x.dtype, device=x.device)
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.no_grad():
                outs = [run.logits(p, x) for _ in range(2)]
        except RuntimeError as e:  # shape mismatches surface here as RuntimeError from some layer
            raise BadDataError(
                f"the model cannot run on this data's images of shape {tuple(x.shape[1:])}: "
                f"{str(e).strip().splitlines()[0][:160]}"
            ) from None
        changed = [k for k, v in run.buffers.items() if not torch.equal(v, before[k])]
        if changed:
            raise BadSpecError(
                f"exact replay refuses a model that writes to its buffers during a forward ({changed[:3]}): that hidden "
                "state is not replayed"
            )
        if not torch.equal(outs[0], outs[1]):
            diff = float((outs[0] - outs[1]).abs().max())
            raise BadSpecError(
                f"exact replay refuses a non-deterministic model: two train-mode forwards on the same batch differ by up "
                f"to {diff:.3g} (random layers, or a non-deterministic op); make the forward deterministic"
            )
        try:
            grads = [torch.func.grad(run.loss)(p, w, x, y) for _ in range(2)]
        except (BadSpecError, BadDataError):
            raise
        except Exception as e:  # user modules may raise anything under torch.func
            raise BadSpecError(
                f"exact replay cannot differentiate this model functionally (torch.func.functional_call + grad): "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            ) from None
    bad = [k for k in grads[0] if not torch.equal(grads[0][k], grads[1][k])]
    if bad:
        raise BadSpecError(f"exact replay refuses a non-deterministic backward: gradients of {bad[:3]} differ between two runs")


# ----------------------------------------------------------------------------- the functional run

def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with a zero (not NaN) derivative at v = 0: a coordinate whose gradient was always 0 has dv = 0 too."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def optimizer_step(recipe: Recipe, state: State, grad: dict[str, torch.Tensor], lr: float, t: int) -> State:
    """One optimizer update as a pure function (``t`` is the 1-based step count, for Adam's bias correction)."""
    p, wd = state["p"], recipe.weight_decay
    if recipe.optimizer == "sgd":
        g = {k: grad[k] + wd * p[k] for k in p} if wd else grad
        v = {k: recipe.momentum * state["v"][k] + g[k] for k in p}
        return {"p": {k: p[k] - lr * v[k] for k in p}, "v": v}
    b1, b2 = recipe.betas
    g = {k: grad[k] + wd * p[k] for k in p} if (wd and recipe.optimizer == "adam") else grad
    m = {k: b1 * state["m"][k] + (1 - b1) * g[k] for k in p}
    v = {k: b2 * state["v"][k] + (1 - b2) * g[k] * g[k] for k in p}
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    base = {k: p[k] * (1 - lr * wd) for k in p} if recipe.optimizer == "adamw" else p
    new_p = {k: base[k] - lr * (m[k] / c1) / (_safe_sqrt(v[k] / c2) + recipe.eps) for k in p}
    return {"p": new_p, "m": m, "v": v}


class _Run:
    """One recipe bound to one model and one data set: the pure step ``state_t → state_{t+1}``."""

    def __init__(self, recipe: Recipe, model: nn.Module, data: SizedDataset, weights: torch.Tensor, device: torch.device) -> None:
        self.recipe, self.model, self.data, self.device = recipe, model, data, device
        self.dtype = DTYPES[recipe.dtype]
        self.weights = weights
        self.names = [k for k, v in model.named_parameters() if v.requires_grad]
        trainable = set(self.names)
        self.frozen = {k: v.detach() for k, v in model.named_parameters() if k not in trainable}
        # BatchNorm layers whose running statistics the replay threads through the state.
        self.norms = {name: m for name, m in model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
        self.norm_counts = {name: int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0
                            for name, m in self.norms.items()}
        threaded = {_prefix(name) + b for name in self.norms for b in ("running_mean", "running_var", "num_batches_tracked")}
        self.buffers = {k: v.detach() for k, v in model.named_buffers() if k not in threaded}
        self.steps = recipe.batches(len(data))

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``t``'s images, labels and example ids (fetched as ``train_classifier`` does)."""
        idx = self.steps[t][1]
        if isinstance(self.data, ArrayDataset):
            x, y = self.data.x[idx], self.data.y[idx]
        else:
            sub = index_subset(self.data, idx.tolist())
            x, y = batch_of(sub, 0, len(sub))
        return x.to(self.device, self.dtype), y.to(self.device), idx

    def logits(self, p: dict[str, torch.Tensor], x: torch.Tensor, running: dict[str, torch.Tensor] | None = None,
               stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The model's logits; in eval mode BatchNorm uses ``running`` (the state's ``"b"``), in train mode the batch.

        In train mode BatchNorm gets no running-statistics buffers (so it writes nothing) and, when ``stats`` is
        given, each layer's batch mean and unbiased variance are recorded there for :meth:`update_running`.
        """
        norm: dict[str, torch.Tensor | None] = {}
        hooks = []
        for name, m in self.norms.items():
            pre = _prefix(name)
            if self.model.training:
                norm.update({pre + "running_mean": None, pre + "running_var": None, pre + "num_batches_tracked": None})
                if stats is not None:
                    hooks.append(m.register_forward_pre_hook(functools.partial(_record_batch_stats, stats, name)))
            else:
                # native batch_norm has no derivative for its running statistics: it gets detached copies, and a
                # hook recomputes its output differentiably from the state's statistics.
                src = running if running is not None else self.initial_running()
                mean, var = src[pre + "running_mean"], src[pre + "running_var"]
                norm.update({pre + "running_mean": mean.detach(), pre + "running_var": var.detach(),
                             pre + "num_batches_tracked": m.num_batches_tracked})
                hooks.append(m.register_forward_hook(functools.partial(_eval_norm, mean, var)))
        try:
            tensors: dict[str, Any] = {**p, **self.frozen, **self.buffers, **norm}  # None: BatchNorm gets no stats
            out: torch.Tensor = functional_call(self.model, tensors, (x,))
        finally:
            for h in hooks:
                h.remove()
        return out

    def loss(self, p: dict[str, torch.Tensor], w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``Σ_i w_i ℓ_i / |batch|``: with w = 1, the ordinary mean cross-entropy."""
        return self.loss_and_stats(p, w, x, y)[0]

    def loss_and_stats(self, p: dict[str, torch.Tensor], w: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ell = nn.functional.cross_entropy(self.logits(p, x, stats=stats), y, reduction="none")
        return (w * ell).sum() / len(y), stats

    def initial_running(self) -> dict[str, torch.Tensor]:
        """The BatchNorm running statistics the model was built with (empty without BatchNorm)."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.norms.items():
            assert m.running_mean is not None and m.running_var is not None  # track_running_stats
            out[_prefix(name) + "running_mean"] = m.running_mean.detach().clone()
            out[_prefix(name) + "running_var"] = m.running_var.detach().clone()
        return out

    def update_running(self, running: dict[str, torch.Tensor], stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       t: int) -> dict[str, torch.Tensor]:
        """BatchNorm's running-statistics update at step ``t`` (0-based), as a differentiable function."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.norms.items():
            pre = _prefix(name)
            f = m.momentum if m.momentum is not None else 1.0 / (self.norm_counts[name] + t + 1)
            mean, var = stats[name]
            out[pre + "running_mean"] = (1 - f) * running[pre + "running_mean"] + f * mean
            out[pre + "running_var"] = (1 - f) * running[pre + "running_var"] + f * var
        return out

    def initial_state(self) -> State:
        p = {k: v.detach().clone() for k, v in self.model.named_parameters() if k in set(self.names)}
        zeros = {k: torch.zeros_like(v) for k, v in p.items()}
        if self.recipe.optimizer == "sgd":
            state: State = {"p": p, "v": zeros}
        else:
            state = {"p": p, "m": zeros, "v": {k: v.clone() for k, v in zeros.items()}}
        if self.norms:
            state["b"] = self.initial_running()
        return state

    def step_with(self, state: State, w: torch.Tensor, t: int) -> State:
        """Step ``t`` (0-based) with this batch's weights ``w`` as an explicit (differentiable) input."""
        x, y, _ = self.batch(t)
        grad, stats = torch.func.grad(self.loss_and_stats, has_aux=True)(state["p"], w, x, y)
        new = optimizer_step(self.recipe, state, grad, self.recipe.lr_at(self.steps[t][0]), t + 1)
        if self.norms:
            new["b"] = self.update_running(state["b"], stats, t)
        return new

    def step(self, state: State, t: int) -> State:
        with torch.no_grad():
            return self.step_with(state, self.weights[self.steps[t][1]], t)

    def load_into(self, model: nn.Module, state: State, steps: int) -> None:
        """Write a state reached after ``steps`` steps into ``model`` (parameters and BatchNorm statistics)."""
        with torch.no_grad():
            params = dict(model.named_parameters())
            for k, v in state["p"].items():
                params[k].copy_(v)
            buffers = dict(model.named_buffers())
            for k, v in state.get("b", {}).items():
                buffers[k].copy_(v)
            for name in self.norms:
                buffers[_prefix(name) + "num_batches_tracked"].fill_(self.norm_counts[name] + steps)


def _prefix(module_name: str) -> str:
    return f"{module_name}." if module_name else ""


def _eval_norm(mean: torch.Tensor, var: torch.Tensor, module: nn.modules.batchnorm._BatchNorm, args: tuple[Any, ...],
               output: Any) -> torch.Tensor:
    """Forward hook: eval-mode BatchNorm from ``mean`` and ``var``, differentiable in both (replaces the output)."""
    x: torch.Tensor = args[0]
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + module.eps)
    if module.affine:
        out = out * module.weight.reshape(shape) + module.bias.reshape(shape)
    return out


def _record_batch_stats(stats: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str, module: nn.Module,
                        args: tuple[Any, ...]) -> None:
    """Forward pre-hook: the batch mean and unbiased variance per channel, as BatchNorm folds into its running stats."""
    if name in stats:
        raise BadSpecError(f"exact replay refuses BatchNorm layer {name!r} called twice in one forward: its running "
                           "statistics would be updated twice per step; use one BatchNorm per call site")
    x = args[0]
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    if n < 2:
        raise BadDataError(f"BatchNorm layer {name!r} got {n} value per channel in a training batch; it needs at least 2")
    stats[name] = (x.mean(dims), x.var(dims, correction=1))


def prepare(recipe: Recipe, data: SizedDataset, weights: Any, device: str | torch.device = "cpu") -> tuple[nn.Module, _Run]:
    """Build the seeded model, check the data and weights, and probe that the run replays exactly."""
    n = len(data)
    if n == 0:
        raise BadDataError("the training data set is empty")
    device = torch.device(device)
    model = recipe.build_model().to(device).train()
    dtype = DTYPES[recipe.dtype]
    if weights is None:
        w = torch.ones(n, dtype=dtype, device=device)
    else:
        try:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).to(device, dtype)
        except (TypeError, ValueError) as e:
            raise BadDataError(f"weights must be a numeric array of {n} values: {e}") from None
        if w.shape != (n,):
            raise BadDataError(f"weights must have shape ({n},) (one per training example), got {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise BadDataError("weights contain NaN or inf")
    run = _Run(recipe, model, data, w, device)
    if not run.names:
        raise BadSpecError(f"the recipe's model {type(model).__name__} has no trainable parameters")
    x, y, _ = run.batch(0)
    _probe(run, x, y)
    return model, run
