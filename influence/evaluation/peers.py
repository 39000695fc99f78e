"""Adapters that run peer attribution libraries on our models and data and return score matrices + wall time.

Every adapter takes the same inputs as our build (a model class, checkpoint paths with their
learning rates, the training and test ArrayDatasets, a projection size ``k``) and yields
``(method, (scores (n_train, n_test) float32, seconds, note))`` rows, with scores in our sign
convention (positive = proponent: training on i raises t's margin / lowers its loss), ready
for the same LDS code. ``None`` instead of the tuple means the peer could not run that config.

Peers (all CPU, 2 threads):
- ``traker`` (TRAK reference, ``pip install traker``; no fast_jl, so its CPU ``BasicProjector``
  with ``ProjectionType.rademacher``): TRAK at its default λ = 0 and at relative λs in our unit.
- ``captum`` (``captum.influence``): ``TracInCP`` (exact full gradients, no projection; equal to our
  TracInCP with projector none) and ``TracInCPFastRandProj`` (last layer only, projected to k).
- ``dattri`` (``pip install dattri``): ``TRAKAttributor`` (normal projection, regularization 0 and
  the same relative λs) and ``TracInAttributor`` (projected to k, lr-weighted).

TRAK's λ (``rels``) is in our unit: per checkpoint, λ_peer = rel · trace(Φ_peerᵀΦ_peer)/min(N, k)
(``influence.scoring.trak_lambda``), with the trace of the peer's own projected training features, measured as
it makes them. The peers scale their features differently, so one absolute λ means different damping in each:
traker (0.3.2) divides the gradients by √p and projects with ±1 entries (``TRAKer.normalize_factor``,
``BasicProjector``), so trace/k ≈ Σ_i‖g_i‖²/p; dattri (0.3.0) divides them by √p and projects with N(0, 1)
entries divided by √k (``TRAKAttributor.norm_scaler``, ``BasicProjector.project``), so trace/k ≈ Σ_i‖g_i‖²/(p·k).
The relative λ is invariant to such scales, so rel = 1 damps every tool, ours included, by its mean nonzero
eigenvalue.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from influence.data import ArrayDataset
from influence.features import ClassificationTask
from influence.scoring import trak_lambda


class _Projection(TypedDict):
    projector: str
    k: int | None


class PeerNote(_Projection, total=False):
    """How a peer projected: its projector's name and size (``None``: no projection); for its TRAK rows, the
    absolute λ it was given per checkpoint (``rel`` · trace/min(N, k) of its own features)."""

    lambdas: list[float]


PeerResult = tuple[np.ndarray, float, PeerNote]
Row = tuple[str, "PeerResult | None"]
TOOLS = ("traker", "captum", "dattri")
_Params = dict[str, torch.Tensor]
_Example = tuple[torch.Tensor, torch.Tensor]


def _peer(module: str) -> Any:
    """The optional, untyped peer module ``module`` (never a runtime dependency), so used through ``Any``."""
    return importlib.import_module(module)


def _load(model_cls: Callable[[], nn.Module], path: str) -> nn.Module:
    net = model_cls()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def _loader(ds: ArrayDataset, batch_size: int = 64) -> DataLoader[tuple[torch.Tensor, ...]]:
    return DataLoader(TensorDataset(ds.x, ds.y), batch_size=batch_size, shuffle=False)


def _final_linear(net: nn.Module) -> nn.Module:
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1]


def _trak_name(rel: float) -> str:
    """A TRAK row's method name: λ = 0, or λ = rel times the mean nonzero eigenvalue of the peer's ΦᵀΦ."""
    return "trak(λ=0)" if not rel else f"trak(λ={rel:g}·mean eig)"


# ----------------------------------------------------------------------------- traker

def run_traker(model_cls: Callable[[], nn.Module], ckpts: list[str], lrs: list[float], train: ArrayDataset, test: ArrayDataset,
               *, k: int, rels: Sequence[float] = (0.0, 1.0)) -> Iterator[Row]:
    """TRAK reference: featurize each checkpoint once with its CPU rademacher projector, then solve and score per λ.

    ``rels`` in our unit: each checkpoint's ``lambda_reg`` = rel · trace(ΦᵀΦ)/min(N, k), taken from the very ΦᵀΦ
    traker is about to damp (its score computer's ``get_x_xtx_inv(grads, xtx)``, wrapped to set ``lambda_reg``
    first), so every checkpoint gets its own λ, as ours does. Seconds for each λ = featurize + that λ's solve and
    scoring.
    """
    TRAKer = _peer("trak").TRAKer
    projectors = _peer("trak.projectors")
    BasicProjector, ProjectionType = projectors.BasicProjector, projectors.ProjectionType

    net = _load(model_cls, ckpts[0])
    grad_dim = sum(p.numel() for p in net.parameters())
    save = tempfile.mkdtemp(prefix="traker_")
    try:
        t0 = time.perf_counter()
        proj = BasicProjector(grad_dim=grad_dim, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                              device=torch.device("cpu"), block_size=128, dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = TRAKer(model=net, task="image_classification", train_set_size=len(train), save_dir=save, device="cpu",
                        projector=proj, proj_dim=k, use_half_precision=False, logging_level=40, load_from_save_dir=True)
            for mid, c in enumerate(ckpts):
                tr.load_checkpoint(torch.load(c, map_location="cpu", weights_only=True), model_id=mid)
                for x, y in _loader(train):
                    tr.featurize(batch=(x, y), num_samples=len(y))
        featurize_s = time.perf_counter() - t0
    except Exception as e:  # a peer failing on a config is a result, not a crash of the benchmark
        print(f"[peers] traker k={k} featurize: {type(e).__name__}: {e}")
        shutil.rmtree(save, ignore_errors=True)
        yield ("trak", None)
        return
    computer = tr.score_computer
    solve = computer.get_x_xtx_inv
    lams: list[float] = []  # this λ's per checkpoint, appended as finalize_features solves each
    rel_now = [0.0]

    def damped(grads: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
        computer.lambda_reg = trak_lambda(rel_now[0], float(torch.trace(xtx.double())), *grads.shape)
        lams.append(computer.lambda_reg)
        features: torch.Tensor = solve(grads, xtx)
        return features

    computer.get_x_xtx_inv = damped  # finalize_features calls it once per checkpoint
    for i, rel in enumerate(rels):
        name = _trak_name(rel)
        try:
            t0 = time.perf_counter()
            rel_now[0] = float(rel)
            lams.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for mid in range(len(ckpts)):
                    tr.saver.model_ids[mid]["is_finalized"] = 0
                tr.finalize_features()
                for mid, c in enumerate(ckpts):
                    tr.start_scoring_checkpoint(exp_name=f"lds{i}", checkpoint=torch.load(c, map_location="cpu", weights_only=True),
                                                model_id=mid, num_targets=len(test))
                    for x, y in _loader(test):
                        tr.score(batch=(x, y), num_samples=len(y))
                scores = np.asarray(tr.finalize_scores(exp_name=f"lds{i}"), dtype=np.float32)
            yield (name, (scores, featurize_s + time.perf_counter() - t0, {"projector": "rademacher", "k": k, "lambdas": list(lams)}))
        except Exception as e:
            print(f"[peers] traker k={k} rel={rel}: {type(e).__name__}: {e}")
            yield (name, None)
    shutil.rmtree(save, ignore_errors=True)


# ----------------------------------------------------------------------------- captum

class _BruteForceNN:
    """captum's NearestNeighbors contract without annoy (only used by its top-k path, never by influence())."""

    def setup(self, data: torch.Tensor) -> None:
        self.data = data

    def get_nearest_neighbors(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = query @ self.data.T
        d, i = torch.topk(s, k, dim=1)
        return i, d


def run_captum(model_cls: Callable[[], nn.Module], ckpts: list[str], lrs: list[float], train: ArrayDataset, test: ArrayDataset,
               *, k: int, exact: bool = True, **_: object) -> Iterator[Row]:
    influence = _peer("captum.influence")
    TracInCP, TracInCPFastRandProj = influence.TracInCP, influence.TracInCPFastRandProj
    NearestNeighbors = _peer("captum.influence._utils.nearest_neighbors").NearestNeighbors

    NN = type("NN", (_BruteForceNN, NearestNeighbors), {})
    lr_of = dict(zip(ckpts, lrs))
    net = _load(model_cls, ckpts[0])

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        return float(lr_of[path])

    ds = TensorDataset(train.x, train.y)
    test_batch = (test.x, test.y)
    if exact:
        t0 = time.perf_counter()
        try:
            tc = TracInCP(net, ds, ckpts, checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                          batch_size=64, sample_wise_grads_per_batch=True)
            s = tc.influence(test_batch).T.numpy().astype(np.float32)
            yield ("tracincp(exact)", (s, time.perf_counter() - t0, {"projector": "none", "k": None}))
        except Exception as e:
            print(f"[peers] captum TracInCP: {type(e).__name__}: {e}")
            yield ("tracincp(exact)", None)
    t0 = time.perf_counter()
    try:
        tf = TracInCPFastRandProj(net, _final_linear(net), ds, ckpts, checkpoints_load_func=load,
                                  loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=64, nearest_neighbors=NN(),
                                  projection_dim=k, seed=0)
        s = tf.influence(test_batch, k=None).T.numpy().astype(np.float32)
        yield ("tracincp-fast-randproj(last layer)", (s, time.perf_counter() - t0, {"projector": "gaussian(last layer)", "k": k}))
    except Exception as e:
        print(f"[peers] captum TracInCPFastRandProj: {type(e).__name__}: {e}")
        yield ("tracincp-fast-randproj(last layer)", None)


# ----------------------------------------------------------------------------- dattri

def run_dattri(model_cls: Callable[[], nn.Module], ckpts: list[str], lrs: list[float], train: ArrayDataset, test: ArrayDataset,
               *, k: int, rels: Sequence[float] = (0.0, 1.0), tracin: bool = True) -> Iterator[Row]:
    """dattri TRAK (margin target, normal projection) at regularization 0 and at ``rels`` in our unit, then
    lr-weighted TracIn (unless ``tracin`` is False: it recomputes the test gradients per training batch, the slowest row).

    ``regularization`` = rel · trace(ΦᵀΦ)/min(N, k) per checkpoint, measured on dattri's own projected training
    features as ``cache`` makes them (:func:`_measuring_projection`): dattri adds ``self.regularization`` to each
    checkpoint's ΦᵀΦ right after projecting that checkpoint's rows, so setting it from the rows seen so far gives
    each checkpoint its own λ, as ours does. Each λ is a full ``cache`` (featurize + solve): dattri does not
    separate the two.
    """
    TracInAttributor = _peer("dattri.algorithm.tracin").TracInAttributor
    trak_module = _peer("dattri.algorithm.trak")
    TRAKAttributor = trak_module.TRAKAttributor
    AttributionTask = _peer("dattri.task").AttributionTask

    net = _load(model_cls, ckpts[0])
    ce = nn.CrossEntropyLoss()

    def margin(params: _Params, data: _Example) -> torch.Tensor:
        """Our margin, logit_y − logsumexp_{j≠y} logit_j (``ClassificationTask.output``, as traker's): log p −
        log(1 − p) from the cross-entropy loses all precision as p → 1."""
        x, y = data
        logits: torch.Tensor = torch.func.functional_call(net, params, x.unsqueeze(0))
        out: torch.Tensor = ClassificationTask().output(logits, y.unsqueeze(0))[0]
        return out

    def loss(params: _Params, data: _Example) -> torch.Tensor:
        x, y = data
        out: torch.Tensor = ce(torch.func.functional_call(net, params, x.unsqueeze(0)), y.unsqueeze(0))
        return out

    def prob(params: _Params, data: _Example) -> torch.Tensor:  # no @flatten_func: dattri 0.3 unflattens the params before calling it
        x, y = data
        return torch.exp(-ce(torch.func.functional_call(net, params, x.unsqueeze(0)), y.unsqueeze(0)))

    states = [torch.load(c, map_location="cpu", weights_only=True) for c in ckpts]
    proj: dict[str, Any] = {"proj_dim": k, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu", "proj_type": "normal"}
    for rel in rels:
        name = _trak_name(rel)
        t0 = time.perf_counter()
        try:
            task = AttributionTask(loss_func=margin, model=net, checkpoints=states)
            att = TRAKAttributor(task=task, correct_probability_func=prob, projector_kwargs=dict(proj), device="cpu",
                                 regularization=0.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with _measuring_projection(trak_module, att, float(rel)) as lams:
                    att.cache(_loader(train))
                s = att.attribute(_loader(test)).numpy().astype(np.float32)
            yield (name, (np.nan_to_num(s), time.perf_counter() - t0, {"projector": "normal", "k": k, "lambdas": lams()}))
        except Exception as e:
            print(f"[peers] dattri TRAK k={k} rel={rel}: {type(e).__name__}: {e}")
            yield (name, None)
    if not tracin:
        return
    t0 = time.perf_counter()
    try:
        task = AttributionTask(loss_func=loss, model=net, checkpoints=states)
        att = TracInAttributor(task=task, weight_list=torch.tensor(lrs, dtype=torch.float32), normalized_grad=False,
                               projector_kwargs=dict(proj), device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = att.attribute(_loader(train), _loader(test)).numpy().astype(np.float32)
        yield ("tracin", (s, time.perf_counter() - t0, {"projector": "normal", "k": k}))
    except Exception as e:
        print(f"[peers] dattri TracIn k={k}: {type(e).__name__}: {e}")
        yield ("tracin", None)


@contextlib.contextmanager
def _measuring_projection(trak_module: Any, att: Any, rel: float) -> Iterator[Callable[[], list[float]]]:
    """While ``att.cache`` runs: wrap dattri's ``random_project`` (as ``dattri.algorithm.trak`` calls it) to add up
    each checkpoint's (``ensemble_id``'s) projected rows, trace(ΦᵀΦ) = Σ‖φ_i‖², and set ``att.regularization`` to
    rel · trace/min(N, k) of the rows seen so far. dattri damps a checkpoint's ΦᵀΦ after projecting all its rows and
    before projecting the next checkpoint's, so each gets its own λ. Yields a function giving the λs applied."""
    real = trak_module.random_project
    seen: dict[int, list[float]] = {}  # ensemble_id → [trace, rows, k]

    def counting(*args: Any, **kwargs: Any) -> Callable[..., torch.Tensor]:
        project = real(*args, **kwargs)

        def measured(feature: Any, ensemble_id: int = 0) -> torch.Tensor:
            out: torch.Tensor = project(feature, ensemble_id=ensemble_id)
            acc = seen.setdefault(ensemble_id, [0.0, 0, out.shape[1]])
            acc[0] += float((out.detach().double() ** 2).sum())
            acc[1] += out.shape[0]
            att.regularization = trak_lambda(rel, acc[0], int(acc[1]), int(acc[2])) if rel else 0.0
            return out

        return measured

    trak_module.random_project = counting
    try:
        yield lambda: [trak_lambda(rel, t, int(n), int(k)) for t, n, k in (seen[c] for c in sorted(seen))]
    finally:
        trak_module.random_project = real
        att.regularization = 0.0  # attribute() without a cached loader would damp again: not with a stale λ


# Each runner takes its own options (rels, exact), so their common type names only the rows they yield.
RUNNERS: dict[str, Callable[..., Iterator[Row]]] = {"traker": run_traker, "captum": run_captum, "dattri": run_dattri}


def run(tool: str, model_cls: Callable[[], nn.Module], ckpts: Sequence[str | os.PathLike[str]], lrs: Sequence[float],
        train: ArrayDataset, test: ArrayDataset, *, k: int, threads: int = 2, **kw: Any) -> Iterator[Row]:
    """``kw``: ``rels`` (TRAK's relative λs, in our unit: see the module's docstring), ``exact``. Rows ``(method, (scores, seconds, note) | None)`` of one peer tool on one model set at projection size k, on ``threads`` torch threads."""
    if tool not in RUNNERS:
        raise ValueError(f"unknown peer {tool!r}; choose one of {', '.join(RUNNERS)}")
    torch.set_num_threads(threads)
    yield from RUNNERS[tool](model_cls, [str(c) for c in ckpts], list(lrs), train, test, k=k, **kw)
