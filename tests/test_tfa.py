"""Training feature attribution (influence.tfa) and the shortcut detector (influence.shortcut).

Oracles at float64 on a tiny smooth model (tanh, average pooling: no kinks, so central finite differences are
accurate): gradcos against finite differences of the Grad-Cos score, its path-integrated variant against the
score's change along the path (completeness), occlusion against explicitly masked copies scored one by one,
two_step against the pixel-attribution integrated gradients (itself checked against Captum).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influence.attribution import IntegratedGradients, LinearPathSampler, NoiseSampler, integrate
from influence.errors import BadDataError, BadSpecError
from influence.features import ClassificationTask, per_example_grads, select_parameters
from influence.shortcut import Shortcut, box_iou, detect_shortcuts
from influence.tfa import DEFAULT_TFA, TFA_METHODS, get_tfa

ATOL = 1e-7
RTOL = 1e-5


def smooth_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 4),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.1, 0.1)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.double().eval()


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return smooth_net()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    query = (torch.rand(1, 8, 8, generator=g, dtype=torch.float64), 1)
    return x, y, query


def _grad_of(net: nn.Module, x: torch.Tensor, y: int) -> torch.Tensor:
    return per_example_grads(net, ClassificationTask(), select_parameters(net), x[None], torch.tensor([y]), of="loss")[0]


def test_gradcos_matches_finite_differences(net, batch):
    x, y, query = batch
    gt = _grad_of(net, *query)
    maps = get_tfa("gradcos")(net).attribute(x, target=y, query=query)
    assert maps.shape == x.shape and maps.dtype == torch.float64

    def score(xi: torch.Tensor, yi: int) -> float:
        return float(torch.nn.functional.cosine_similarity(_grad_of(net, xi, yi), gt, dim=0))

    eps = 1e-5
    for i in range(2):
        fd = torch.zeros_like(x[i])
        for p in range(x[i].numel()):
            d = torch.zeros(x[i].numel(), dtype=x.dtype)
            d[p] = eps
            d = d.view_as(x[i])
            fd.view(-1)[p] = (score(x[i] + d, int(y[i])) - score(x[i] - d, int(y[i]))) / (2 * eps)
        torch.testing.assert_close(maps[i], fd, atol=1e-8, rtol=1e-5)


def test_gradcos_options_compose(net, batch):
    x, y, query = batch
    method = get_tfa("gradcos")(net)
    plain = method.attribute(x, target=y, query=query)
    torch.testing.assert_close(method.attribute(x, target=y, query=query, input_x_gradient=True), plain * x)
    torch.testing.assert_close(method.attribute(x, target=y, query=query, input_x_gradient=True, positive=True),
                               (plain * x).clamp(min=0))
    a = method.attribute(x, target=y, query=query, smooth=3, seed=5)
    b = method.attribute(x, target=y, query=query, smooth=3, seed=5)
    torch.testing.assert_close(a, b)  # seeded
    assert not torch.allclose(a, plain)
    path = method.attribute(x, target=y, query=query, steps=4)
    assert path.shape == x.shape and torch.isfinite(path).all()
    combo = get_tfa("gradcos_two_step")(net).attribute(x, target=y, query=query)
    assert (combo >= 0).all() and float(combo.max()) <= 1 + 1e-12
    with pytest.raises(BadSpecError, match="not both"):
        method.attribute(x, target=y, query=query, smooth=2, steps=2)


@pytest.mark.parametrize("baseline", ["zero", "blur", "mean"])
@pytest.mark.parametrize("score", ["dot", "cos"])
def test_occlusion_equals_explicit_masking(net, batch, baseline, score):
    from influence.attribution._path import gaussian_blur

    x, y, query = batch
    gt = _grad_of(net, *query)
    maps = get_tfa("occlusion")(net).attribute(x, target=y, query=query, baseline=baseline, score=score)

    def s(xi: torch.Tensor, yi: int) -> torch.Tensor:
        g = _grad_of(net, xi, yi)
        return g @ gt if score == "dot" else (g @ gt) / (g.norm() * gt.norm())

    for i in range(x.shape[0]):
        xi, yi = x[i], int(y[i])
        base = {"zero": torch.zeros_like(xi), "mean": xi.mean(dim=(1, 2), keepdim=True).expand_as(xi),
                "blur": gaussian_blur(xi[None], 2.0, truncate=2.0)[0]}[baseline]
        total = torch.zeros(8, 8, dtype=x.dtype)
        count = torch.zeros(8, 8, dtype=x.dtype)
        s0 = s(xi, yi)
        for r in (0, 2, 4):
            for c in (0, 2, 4):
                masked = xi.clone()
                masked[:, r:r + 4, c:c + 4] = base[:, r:r + 4, c:c + 4]
                total[r:r + 4, c:c + 4] += s0 - s(masked, yi)
                count[r:r + 4, c:c + 4] += 1
        torch.testing.assert_close(maps[i, 0], total / count, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name, options", [(n, {}) for n in sorted(TFA_METHODS)] + [
    ("gradcos", {"smooth": 3, "seed": 4}), ("gradcos", {"steps": 3, "batch_size": 2}), ("gradcos_two_step", {"smooth": 2}),
    ("two_step", {"of": "margin", "batch_size": 2}),
], ids=str)
def test_shape_batch_equals_single_and_model_unchanged(name, options, batch):
    """Also for SmoothGrad: one noise draw per sample, shared by the batch, so a map does not depend on its batch."""
    net = smooth_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y, query = batch
    maps = get_tfa(name)(net).attribute(x, target=y, query=query, **options)
    assert maps.shape == x.shape and torch.isfinite(maps).all()
    for i in range(x.shape[0]):
        one = get_tfa(name)(net).attribute(x[i:i + 1], target=int(y[i]), query=query, **options)
        torch.testing.assert_close(one[0], maps[i], atol=1e-10, rtol=1e-7)
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in net.modules())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_query_gradient_equals_query_tuple(net, batch):
    x, y, query = batch
    gt = _grad_of(net, *query)
    for name in ("gradcos", "occlusion"):
        m = get_tfa(name)(net)
        torch.testing.assert_close(m.attribute(x, target=y, query=gt), m.attribute(x, target=y, query=query))


def test_query_specificity(net, batch):
    x, y, query = batch
    other = (query[0].flip(-1), 3)
    for name in ("gradcos", "occlusion", "gradcos_two_step"):
        m = get_tfa(name)(net)
        assert get_tfa(name).test_specific
        assert not torch.allclose(m.attribute(x, target=y, query=query), m.attribute(x, target=y, query=other))
    two = get_tfa("two_step")(net)
    assert not get_tfa("two_step").test_specific
    torch.testing.assert_close(two.attribute(x, target=y, query=query), two.attribute(x, target=y, query=other))


def _gradcos_score(net: nn.Module, gt: torch.Tensor):
    """cos(g(x_n, y_n), g_t) per example, spelled with the public per-example gradient (differentiable in x)."""
    names = select_parameters(net)

    def score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = per_example_grads(net, ClassificationTask(), names, x, y, of="loss")
        return torch.nn.functional.cosine_similarity(g, gt[None], dim=1)

    return score


def test_gradcos_path_options_are_the_integrate_core(net, batch):
    """smooth= is the noise sampler and steps= the midpoint path from black, on the Grad-Cos score."""
    x, y, query = batch
    gt = _grad_of(net, *query)
    score = _gradcos_score(net, gt)
    method = get_tfa("gradcos")(net)
    smooth = integrate(net, x, y, NoiseSampler(sigma_fraction=0.2), n=3, seed=7, score=score)
    torch.testing.assert_close(method.attribute(x, target=y, query=query, smooth=3, sigma=0.2, seed=7), smooth,
                               atol=ATOL, rtol=RTOL)
    path = integrate(net, x, y, LinearPathSampler(0.0, rule="riemann_middle"), n=4, score=score)
    torch.testing.assert_close(method.attribute(x, target=y, query=query, steps=4), path, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(method.attribute(x, target=y, query=query, steps=4, input_x_gradient=True), path)


def test_gradcos_path_completeness(net, batch):
    """Integrated gradients of the Grad-Cos score sum to the score's change from the black image to x."""
    x, y, query = batch
    score = _gradcos_score(net, _grad_of(net, *query))
    maps = get_tfa("gradcos")(net).attribute(x, target=y, query=query, steps=100)
    with torch.no_grad():
        gap = score(x, y) - score(torch.zeros_like(x), y)
    assert gap.abs().min() > 1e-3  # a non-trivial change to recover
    torch.testing.assert_close(maps.flatten(1).sum(1), gap, atol=1e-5, rtol=1e-4)


def test_two_step_equals_pixel_integrated_gradients(net, batch):
    x, y, _ = batch
    ours = get_tfa("two_step")(net).attribute(x, target=y, steps=16)
    ref = IntegratedGradients(net).attribute(x, target=y, n=16, rule="riemann_middle")
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)


def test_two_step_integrated_gradients_completeness(net, batch):
    x, y, _ = batch
    ig = get_tfa("two_step")(net).attribute(x, target=y, method="integrated_gradients", steps=200)
    with torch.no_grad():
        gap = net(x).gather(1, y[:, None])[:, 0] - net(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(ig.flatten(1).sum(1), gap, atol=1e-3, rtol=1e-3)
    margin = get_tfa("two_step")(net).attribute(x, target=y, of="margin", steps=200)
    task = ClassificationTask()
    with torch.no_grad():
        gap = task.output(net(x), y) - task.output(net(torch.zeros_like(x)), y)
    torch.testing.assert_close(margin.flatten(1).sum(1), gap, atol=1e-3, rtol=1e-3)


def test_registry_and_errors(net, batch):
    x, y, query = batch
    assert TFA_METHODS.names() == ["gradcos", "gradcos_two_step", "two_step", "occlusion"]
    assert DEFAULT_TFA in TFA_METHODS
    with pytest.raises(BadSpecError, match=r"unknown TFA method 'nope'; choose one of: gradcos, gradcos_two_step, two_step, occlusion"):
        get_tfa("nope")
    with pytest.raises(BadSpecError, match="needs query"):
        get_tfa("gradcos")(net).attribute(x, target=y)
    with pytest.raises(BadDataError, match="query gradient has 5 values"):
        get_tfa("gradcos")(net).attribute(x, target=y, query=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(BadDataError, match="2 targets for 3"):
        get_tfa("two_step")(net).attribute(x, target=[0, 1])
    with pytest.raises(BadSpecError, match="TFA needs target="):
        get_tfa("two_step")(net).attribute(x)
    with pytest.raises(BadSpecError, match=r"out of range for a model with 4 classes: \[0, 4, 3\]"):
        get_tfa("two_step")(net).attribute(x, target=[0, 4, 3])
    with pytest.raises(BadSpecError, match="baseline='gray'"):
        get_tfa("occlusion")(net).attribute(x, target=y, query=query, baseline="gray")
    with pytest.raises(BadDataError, match=r"\(B, C, H, W\)"):
        get_tfa("two_step")(net).attribute(torch.zeros(8, 8, dtype=torch.float64), target=0)


# ----------------------------------------------------------------------------- shortcut detector

def _planted(n_patched: int = 20, box=(10, 2, 13, 5), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 60
    images = torch.rand(n, 1, 16, 16, generator=g)
    maps = torch.rand(n, 1, 16, 16, generator=g) * 0.3
    labels = [3] * 30 + [5] * 30
    x0, y0, x1, y1 = box
    for j in range(n_patched):
        images[j, :, y0:y1, x0:x1] = 1.0
        maps[j, :, y0:y1, x0:x1] += 1.0 + torch.rand(1, y1 - y0, x1 - x0, generator=g)
    return maps, images, list(range(100, 100 + n)), labels


def test_detector_finds_planted_patch():
    box = [10, 2, 13, 5]
    maps, images, ids, labels = _planted(box=tuple(box))
    found = detect_shortcuts(maps, images, ids, labels)
    assert len(found) == 1
    s = found[0]
    assert isinstance(s, Shortcut) and s.cls == 3 and box_iou(s.box, box) >= 0.5
    assert set(s.train_ids) == set(range(100, 120))
    assert 0 < s.score <= 1
    assert set(s.to_json()) == {"class", "box", "train_ids", "score"}
    # the same maps, channel-reduced, and each image repeated (several queries) give the same answer
    again = detect_shortcuts(torch.cat([maps, maps])[:, 0], torch.cat([images, images]), ids + ids, labels + labels)
    assert [(a.cls, a.box, a.train_ids) for a in again] == [(s.cls, s.box, s.train_ids)]


def test_detector_silent_on_random_maps_and_unlike_content():
    g = torch.Generator().manual_seed(3)
    images, maps = torch.rand(80, 1, 16, 16, generator=g), torch.rand(80, 1, 16, 16, generator=g)
    labels = [i % 4 for i in range(80)]
    assert detect_shortcuts(maps, images, list(range(80)), labels) == []
    # peaks cluster in one place, but the pixels there differ between images: natural evidence, not a patch
    maps[:40, :, 6:9, 6:9] += 2.0
    assert detect_shortcuts(maps, images, list(range(80)), labels) == []


def test_detector_input_errors():
    maps, images, ids, labels = _planted()
    with pytest.raises(BadDataError, match="one train id and label per map"):
        detect_shortcuts(maps, images, ids[:-1], labels)
    with pytest.raises(BadDataError, match="do not match maps"):
        detect_shortcuts(maps, images[:5], ids, labels)
