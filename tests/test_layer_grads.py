"""The layer-hook gradient fast path must equal vmap(grad) exactly, and fall back where it cannot."""

import pytest
import torch
from torch import nn

from influence.features import ClassificationTask, ProjectorSpec, make_projector, per_example_grads, select_parameters
from influence.features.layer_grads import layer_grad_blocks
from influence.models import DigitsCNN, DigitsMLP


def _perturb_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


@pytest.mark.parametrize("factory", [DigitsCNN, DigitsMLP])
@pytest.mark.parametrize("params", ["all", "last:2", "features.1"])
def test_layer_blocks_equal_vmap(factory, params):
    torch.manual_seed(0)
    model = factory().double().eval()
    if params == "features.1" and factory is DigitsMLP:
        params = "net.1"
    _perturb_bn(model)
    names = select_parameters(model, params)
    x, y = torch.rand(7, 1, 16, 16, dtype=torch.float64), torch.randint(0, 10, (7,))
    task = ClassificationTask()
    blocks = layer_grad_blocks(model, task, names, x, y)
    assert blocks is not None
    got = torch.cat([b for _, b in blocks], dim=1)
    want = per_example_grads(model, task, names, x, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class _Tied(nn.Module):
    """A layer called twice per forward: no closed form per call, so the fast path must step aside."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.lin(self.lin(x.flatten(1))))


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x.flatten(1) * self.scale)


@pytest.mark.parametrize("factory", [_Tied, _Custom])
def test_unsupported_models_fall_back_to_vmap(factory):
    torch.manual_seed(0)
    model = factory().eval()
    names = select_parameters(model)
    x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    task = ClassificationTask()
    assert layer_grad_blocks(model, task, names, x, y) is None  # no closed form: the caller must use vmap
    proj = make_projector(ProjectorSpec("sparse", 16), model, names)
    fast = proj.featurize(model, task, names, x, y)
    proj.gradients = "vmap"
    torch.testing.assert_close(fast, proj.featurize(model, task, names, x, y))


def test_sparse_projection_of_blocks_equals_projection_of_full_gradient():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    names = select_parameters(model)
    x, y = torch.rand(9, 1, 16, 16), torch.randint(0, 10, (9,))
    proj = make_projector(ProjectorSpec("sparse", 128, seed=3), model, names)
    task = ClassificationTask()
    fast = proj.featurize(model, task, names, x, y)
    full = per_example_grads(model, task, names, x, y)
    expected = torch.zeros(9, 128).index_add_(1, proj.bucket, full * proj.sign)  # the CountSketch definition
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
