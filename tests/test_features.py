"""Stage 1: per-example gradients against a float64 loop oracle, and every projector against the JL bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from influence.features import ClassificationTask, ProjectorSpec, make_projector, per_example_grads, select_parameters
from influence.models import DigitsCNN, DigitsMLP

ATOL = 1e-12  # float64: vmap(grad) and a backward loop differ only in summation order
RTOL = 1e-9
TASK = ClassificationTask()


def _eval_model(factory, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A model with non-trivial BatchNorm running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = factory().to(dtype)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _batch(n: int = 6, seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _loop_grads(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, of: str) -> torch.Tensor:
    """The oracle: one ``backward()`` per example."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        logits = model(x[i : i + 1])
        value = TASK.output(logits, y[i : i + 1]) if of == "output" else TASK.loss(logits, y[i : i + 1])
        value.sum().backward()
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


MODELS = {"cnn-batchnorm": lambda: DigitsCNN(width=4), "mlp": lambda: DigitsMLP(hidden=16)}


@pytest.mark.parametrize("of", ["output", "loss"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("selection", ["all", "last:2"])
def test_per_example_grads_match_backward_loop(model_name, of, selection):
    model = _eval_model(MODELS[model_name])
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    names = select_parameters(model, selection)
    x, y = _batch()
    got = per_example_grads(model, TASK, names, x, y, of=of)
    want = _loop_grads(model, names, x, y, of)
    assert got.dtype == torch.float64
    assert got.shape == (len(x), sum(p.numel() for n, p in model.named_parameters() if n in names))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # eval mode: running statistics are read, never updated
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # rows really are per example (not a batch sum, not all equal)
    assert not torch.allclose(got[0], got[1])


@pytest.mark.parametrize("model_name", list(MODELS))
def test_loss_gradient_is_loss_weight_times_output_gradient(model_name):
    """The identity the store relies on: ∇ℓ = (dℓ/dm)·∇m, so one output-gradient array serves every method."""
    model = _eval_model(MODELS[model_name], seed=3)
    names = select_parameters(model, "all")
    x, y = _batch(8, seed=4)
    g_out = per_example_grads(model, TASK, names, x, y, of="output")
    g_loss = per_example_grads(model, TASK, names, x, y, of="loss")
    with torch.no_grad():
        w = TASK.loss_weight(model(x), y)
    assert (w < 0).all() and (w > -1).all()
    torch.testing.assert_close(g_loss, w[:, None] * g_out, atol=ATOL, rtol=RTOL)


def test_loss_weight_does_not_round_to_zero_for_a_well_fit_example():
    """dℓ/dm = −σ(−m) stays non-zero where float32 softmax gives p = 1 (a memorised shortcut image)."""
    task = ClassificationTask()
    logits = torch.tensor([[40.0, 0.0, -3.0], [2.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    assert task.probability(logits, y)[0].item() == 1.0  # the float32 rounding the weight must not inherit
    weights = task.loss_weight(logits, y).double()
    margin = task.output(logits, y).double()
    assert torch.allclose(weights, -torch.sigmoid(-margin), rtol=1e-5)
    assert weights[0].item() < 0.0 and math.isclose(weights[0].item(), -math.exp(-margin[0].item()), rel_tol=1e-4)
    # where it does not round, it is the textbook −(1 − p)
    assert math.isclose(weights[1].item(), -(1 - torch.softmax(logits[1].double(), 0)[0].item()), rel_tol=1e-5)


def test_batchnorm_case_is_not_trivial():
    """Guard for the oracle test: the running statistics differ from batch statistics, so mixing modes would show."""
    model = _eval_model(MODELS["cnn-batchnorm"])
    x, _ = _batch()
    with torch.no_grad():
        eval_logits = model(x)
        model.train()
        batch_logits = model(x)
    model.eval()
    assert not torch.allclose(batch_logits, eval_logits)


# ----------------------------------------------------------------------------- projectors

N_EX = 16
SEEDS = 12


@pytest.fixture(scope="module")
def jl_setup(digits):
    """tiny CNN (float32), 16 real digits, exact output gradients of all and of the factorizable parameters."""
    model = _eval_model(MODELS["cnn-batchnorm"], seed=5, dtype=torch.float32)
    names = select_parameters(model, "all")
    covered = [n for n, _ in model.named_parameters()
               if isinstance(model.get_submodule(n.rpartition(".")[0]), (nn.Linear, nn.Conv2d))]
    x, y = digits.x[:N_EX], digits.y[:N_EX]
    exact = per_example_grads(model.double(), TASK, names, x.double(), y)
    exact_cov = per_example_grads(model, TASK, covered, x.double(), y)
    model.float()
    return model, names, covered, x, y, exact, exact_cov


def _errors(feats: torch.Tensor, exact: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(⟨Pa,Pb⟩ − ⟨a,b⟩)/(‖a‖‖b‖) for all pairs a ≤ b, and the same on the diagonal (relative error of ‖Pa‖²)."""
    f = feats.double().numpy()
    e = exact.double().numpy()
    got, want = f @ f.T, e @ e.T
    norms = np.sqrt(np.diag(want))
    rel = (got - want) / np.outer(norms, norms)
    return rel[np.triu_indices(len(f))], np.diag(rel)


def _rms_errors(kind: str, k: int, setup) -> tuple[float, float, int]:
    model, names, _, x, y, exact, exact_cov = setup
    pairs, diags = [], []
    for seed in range(SEEDS):
        proj = make_projector(ProjectorSpec(kind, k, seed), model, names)
        if kind == "factorized":
            feats, ref = proj.featurize(model, TASK, names, x, y), exact_cov
        else:
            feats, ref = proj.project(exact.float()), exact
        assert feats.shape == (len(x), proj.dim)
        p, d = _errors(feats, ref)
        pairs.append(p)
        diags.append(d)
    return float(np.sqrt(np.mean(np.square(pairs)))), float(np.sqrt(np.mean(np.square(diags)))), proj.dim


@pytest.mark.parametrize("kind", ["sparse", "gaussian", "rademacher"])
def test_projected_inner_products_within_jl_error(kind, jl_setup):
    """RMS error of ⟨Pa,Pb⟩ is about √(2/k) for norms and halves when k quadruples (1/√k)."""
    rms_256, norm_256, _ = _rms_errors(kind, 256, jl_setup)
    rms_1024, norm_1024, _ = _rms_errors(kind, 1024, jl_setup)
    for k, norm_err in ((256, norm_256), (1024, norm_1024)):
        assert 0.5 * math.sqrt(2 / k) < norm_err < 1.6 * math.sqrt(2 / k), (kind, k, norm_err)
    ratio = rms_256 / rms_1024
    assert 1.5 < ratio < 2.7, (kind, rms_256, rms_1024)


def test_factorized_inner_products_converge_to_covered_gradients(jl_setup):
    """Factorized features estimate inner products of the Linear/Conv2d gradients; the error shrinks with k.

    A layer's sketch is P_out ⊗ P_in with k_o·k_i ≈ k/L dims, so its error goes
    like √(2/k_o + 2/k_i) ∝ k^(-1/4), slower than a dense sketch's k^(-1/2)
    (measured noisier too: correlation 0.86-0.94 with exact inner products at about
    2,000 dims): expect at least 16^(1/4) = 2 over a
    16× range of k, a decrease at every 4× step, and a loose absolute bound.
    """
    results = {k: _rms_errors("factorized", k, jl_setup) for k in (256, 1024, 4096)}
    assert results[256][0] > results[1024][0] > results[4096][0], results
    assert results[256][0] / results[4096][0] > 1.7, results
    assert results[4096][0] < 0.2, results


def test_factorized_is_exact_at_full_layer_dims(jl_setup):
    """With k ≥ Σ d_out·d_in the projections are the identity: features are the exact per-layer gradients."""
    model, names, covered, x, y, _, exact_cov = jl_setup
    layers = [(m, mod) for m, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    full = sum(mod.weight.shape[0] * (mod.weight[0].numel() + 1) for _, mod in layers)
    proj = make_projector(ProjectorSpec("factorized", full, 0), model, names)
    assert proj.dim == full
    feats = proj.featurize(model, TASK, names, x, y).double()
    # expected layout per layer: [weight reshaped (d_out, d_in) | bias column], row-major
    exact = exact_cov.double()
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    offset, blocks = 0, []
    for mname, mod in layers:
        w = exact[:, offset : offset + sizes[f"{mname}.weight"]].reshape(len(x), mod.weight.shape[0], -1)
        offset += sizes[f"{mname}.weight"]
        b = exact[:, offset : offset + sizes[f"{mname}.bias"]]
        offset += sizes[f"{mname}.bias"]
        blocks.append(torch.cat([w, b[:, :, None]], dim=2).reshape(len(x), -1))
    assert offset == exact.shape[1]
    want = torch.cat(blocks, dim=1)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats @ feats.T, exact @ exact.T, atol=1e-5, rtol=1e-4)
    # one dimension fewer and it is a projection again
    assert make_projector(ProjectorSpec("factorized", full - 1, 0), model, names).dim < full


def test_factorized_projection_is_p_out_g_p_in_transposed():
    """A projected layer feature is P_out G P_inᵀ of the exact per-example gradient G (bias as G's last column).

    Exercises the convolution that projects input patches without unfolding them: strides, padding, dilation, a
    conv without bias, and a Linear head, against gradients from vmap (no hooks, no closed form).
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.ReLU(), nn.Conv2d(6, 5, (2, 3), stride=(1, 2)), nn.Flatten(), nn.LazyLinear(4),
    )
    x = torch.rand(5, 3, 12, 12, dtype=torch.float64)
    model(x.float())
    model = model.double().eval()
    y = torch.randint(0, 4, (5,))
    names = select_parameters(model, "all")
    proj = make_projector(ProjectorSpec("factorized", 40, 3), model, names)
    assert all(p_in is not None for _, p_in in proj.proj[:3])  # every conv takes the projected-patch path
    feats = proj.featurize(model, TASK, names, x, y)
    exact = per_example_grads(model, TASK, names, x, y)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offset, blocks = 0, []
    for (mname, mod, has_bias), (p_out, p_in) in zip(proj.layers, proj.proj):
        g = exact[:, offset: offset + sizes[f"{mname}.weight"]].reshape(len(x), mod.weight.shape[0], -1)
        offset += sizes[f"{mname}.weight"]
        if has_bias:
            g = torch.cat([g, exact[:, offset: offset + sizes[f"{mname}.bias"], None]], dim=2)
            offset += sizes[f"{mname}.bias"]
        if p_out is not None:
            g = p_out.double() @ g
        if p_in is not None:
            g = g @ p_in.double().T
        blocks.append(g.reshape(len(x), -1))
    torch.testing.assert_close(feats, torch.cat(blocks, dim=1), atol=1e-10, rtol=1e-8)


def test_none_projector_is_the_exact_gradient(jl_setup):
    model, names, _, x, y, exact, _ = jl_setup
    proj = make_projector(ProjectorSpec("none", 0, 0), model, names)
    torch.testing.assert_close(proj.featurize(model, TASK, names, x, y).double(), exact, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sparse", "gaussian", "rademacher", "factorized"])
def test_same_seed_same_projection_different_seed_differs(kind, jl_setup):
    model, names, _, x, y, _, _ = jl_setup
    first = make_projector(ProjectorSpec(kind, 128, 7), model, names).featurize(model, TASK, names, x[:4], y[:4])
    again = make_projector(ProjectorSpec(kind, 128, 7), model, names).featurize(model, TASK, names, x[:4], y[:4])
    other = make_projector(ProjectorSpec(kind, 128, 8), model, names).featurize(model, TASK, names, x[:4], y[:4])
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3, rtol=1e-2)


def test_projector_spec_rejects_unknown_kind_and_bad_k():
    from influence.errors import BadSpecError

    with pytest.raises(BadSpecError, match="unknown projector 'dense'.*sparse"):
        ProjectorSpec("dense", 16, 0)
    with pytest.raises(BadSpecError, match="--proj-dim must be a positive integer, got 0"):
        ProjectorSpec("sparse", 0, 0)


# ----------------------------------------------------------------------------- checkpoints as parameter dicts

@pytest.mark.parametrize("kind, gradients", [("sparse", "auto"), ("sparse", "vmap"), ("factorized", "auto"), ("none", "auto")])
def test_featurize_with_a_state_dict_equals_a_loaded_model(kind, gradients, digits):
    """Features from ``state=`` (functional_call on another model's module) equal those of a model holding the weights.

    The template has other weights and other BatchNorm running statistics, so any tensor read from the module
    instead of the state (a BatchNorm statistic in the closed form, a parameter in vmap) shows up as a difference.
    """
    trained = _eval_model(MODELS["cnn-batchnorm"], seed=3, dtype=torch.float32)
    template = _eval_model(MODELS["cnn-batchnorm"], seed=4, dtype=torch.float32)
    names = select_parameters(trained, "all")
    proj = make_projector(ProjectorSpec(kind, 128, 0), template, names)
    proj.gradients = gradients
    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    x, y = digits.x[:8], digits.y[:8]
    want = proj.featurize(trained, TASK, names, x, y)
    got = proj.featurize(template, TASK, names, x, y, state=state)
    assert torch.equal(got, want)
    assert not torch.equal(proj.featurize(template, TASK, names, x, y), want)  # the template alone differs
    assert all(torch.equal(v, template.state_dict()[k]) for k, v in _eval_model(MODELS["cnn-batchnorm"], seed=4,
                                                                               dtype=torch.float32).state_dict().items())
