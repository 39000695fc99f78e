"""Pixel attribution: Captum oracles at float64, one case table for the contract, and the method-specific claims."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pywt
import torch
from torch import nn

from influence.attribution import (
    METHODS,
    SAMPLERS,
    VAR,
    WAM,
    AttributionMethod,
    GradCAM,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    SuppressionSampler,
    WaveletTransform,
    get_method,
    get_sampler,
    integrate,
    run_attribute,
    save_overlay,
    summarize,
)
from influence.errors import BadDataError, BadSpecError
from influence.models import DigitsCNN, DigitsMLP

ATOL = 1e-10  # float64 oracle agreement for single-gradient methods
RTOL = 1e-8
IG_ATOL = 1e-9  # same quadrature, same model: only summation order differs
COMPLETENESS_RTOL = 0.01  # of Σ|IG|, default 50 Gauss-Legendre steps (ReLU/max-pool kinks limit the quadrature)


def small_cnn(seed: int = 0) -> nn.Module:
    """DigitsCNN at float64 with non-trivial BatchNorm statistics, in train mode (methods must not care)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module init draws from the global generator; keep the caller's state
        model = DigitsCNN(width=4).double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=gen, dtype=torch.float64))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model.train()


def images(b: int = 3, seed: int = 1, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def captum_call(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Captum warns when it sets requires_grad on inputs; the project turns warnings into errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn().detach()


# --- Captum oracles ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model64() -> nn.Module:
    return small_cnn().eval()


TARGETS = torch.tensor([0, 3, 7])


def test_saliency_matches_captum(model64: nn.Module) -> None:
    from captum.attr import Saliency as CSaliency

    x = images()
    ours = Saliency(model64).attribute(x, target=TARGETS)
    ref = captum_call(lambda: CSaliency(model64).attribute(x.clone(), target=TARGETS, abs=True))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_input_x_gradient_matches_captum(model64: nn.Module) -> None:
    from captum.attr import InputXGradient as CInputXGradient

    x = images()
    ours = InputXGradient(model64).attribute(x, target=TARGETS)
    ref = captum_call(lambda: CInputXGradient(model64).attribute(x.clone(), target=TARGETS))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_integrated_gradients_matches_captum_gausslegendre(model64: nn.Module) -> None:
    from captum.attr import IntegratedGradients as CIG

    x = images()
    ours = IntegratedGradients(model64).attribute(x, target=TARGETS)  # defaults: n=50, gausslegendre, baseline 0
    ref = captum_call(lambda: CIG(model64).attribute(x.clone(), baselines=0.0, target=TARGETS, n_steps=50, method="gausslegendre"))
    torch.testing.assert_close(ours, ref, atol=IG_ATOL, rtol=RTOL)


def test_integrated_gradients_trapezoid_is_captums_rescaled(model64: nn.Module) -> None:
    """Captum's trapezoid weights are 1/n (sum 1 − 1/n); ours are 1/(n − 1) (sum 1), so ours = captum · n/(n − 1)."""
    from captum.attr import IntegratedGradients as CIG

    x, n = images(), 20
    ours = IntegratedGradients(model64).attribute(x, target=TARGETS, n=n, rule="riemann_trapezoid")
    ref = captum_call(lambda: CIG(model64).attribute(x.clone(), baselines=0.0, target=TARGETS, n_steps=n, method="riemann_trapezoid"))
    torch.testing.assert_close(ours, ref * n / (n - 1), atol=IG_ATOL, rtol=RTOL)


def test_integrated_gradients_completeness(model64: nn.Module) -> None:
    x = images()
    ig = IntegratedGradients(model64).attribute(x, target=TARGETS)  # n=50
    with torch.no_grad():
        gap = (model64(x) - model64(torch.zeros_like(x))).gather(1, TARGETS[:, None]).squeeze(1)
    # relative to the map's total |mass|: the logit gap itself can be near zero for a random model
    error = (ig.flatten(1).sum(1) - gap).abs()
    assert (error <= COMPLETENESS_RTOL * ig.flatten(1).abs().sum(1)).all(), (error, gap)


def test_gradcam_matches_captum(model64: nn.Module) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    x = images()
    layer = model64.features[4]
    ours = GradCAM(model64).attribute(x, target=TARGETS)
    cam = captum_call(lambda: LayerGradCam(model64, layer).attribute(x.clone(), target=TARGETS, relu_attributions=True))
    ref = LayerAttribution.interpolate(cam, (16, 16), interpolate_mode="bilinear")
    torch.testing.assert_close(ours, ref.expand_as(ours), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(GradCAM(model64, layer="features.4").attribute(x, target=TARGETS), ours)


def test_smoothgrad_with_zero_noise_is_the_gradient(model64: nn.Module) -> None:
    x = images()
    smooth = SmoothGrad(model64).attribute(x, target=TARGETS, n=3, sigma_fraction=0.0)
    grad = InputXGradient(model64).attribute(x, target=TARGETS) / x
    torch.testing.assert_close(smooth, grad, atol=1e-8, rtol=1e-6)


# --- one case table drives the cross-method contract ------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[nn.Module], AttributionMethod]
    options: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("saliency", Saliency),
    Case("input_x_gradient", InputXGradient),
    Case("integrated_gradients", IntegratedGradients, {"n": 12}),
    Case("ig_blur_path", IntegratedGradients, {"n": 8, "sampler": "blur_path"}),
    Case("ig_suppression", IntegratedGradients, {"n": 6, "sampler": "suppression", "cell": 2, "seed": 3}),
    Case("smoothgrad", SmoothGrad, {"n": 6, "seed": 1}),
    Case("gradcam", GradCAM),
    Case("var_saliency", lambda m: VAR(Saliency(m))),
    Case("var_smoothgrad", lambda m: VAR(SmoothGrad(m)), {"n": 4}),
    Case("wam_smooth", WAM, {"n": 5}),
    Case("wam_integrated", lambda m: WAM(m, mode="integrated"), {"n": 8}),
    Case("wam_gradient", lambda m: WAM(m, mode="gradient", levels=2)),
]


def test_every_registered_method_has_a_case() -> None:
    covered = {type(case.build(small_cnn())).name for case in CASES}
    assert covered == set(METHODS)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {
        "training": [m.training for m in model.modules()],
        "hooks": [len(getattr(m, h)) for m in model.modules() for h in hooks],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.state_dict().values()],
        "grads": [p.grad for p in model.parameters()],
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_contract(case: Case) -> None:
    """Shape, batch = per example, model left as found (flags, hooks, requires_grad, parameters)."""
    model = small_cnn()
    model.features[0].weight.requires_grad_(False)
    model.head[1].eval()  # a mixed training state must come back as it was
    before = _snapshot(model)
    method = case.build(model)
    x = images(3)
    target = torch.tensor([1, 4, 9])
    batch = method.attribute(x, target=target, **case.options)
    assert batch.shape == x.shape and batch.dtype == x.dtype and torch.isfinite(batch).all()
    assert not batch.requires_grad
    for i in range(3):
        single = method.attribute(x[i : i + 1], target=int(target[i]), **case.options)
        torch.testing.assert_close(single, batch[i : i + 1], atol=1e-10, rtol=1e-7)
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"])
    for p, q in zip(before["params"], after["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_default_target_is_predicted_class(case: Case) -> None:
    model = small_cnn().eval()
    x = images(2)
    predicted = model(x).argmax(1)
    method = case.build(model)
    torch.testing.assert_close(method.attribute(x, **case.options), method.attribute(x, target=predicted, **case.options))


# --- VAR ----------------------------------------------------------------------------------------

def test_var_zeroes_where_share_is_not_above_uniform(model64: nn.Module) -> None:
    var = VAR(Saliency(model64), tau=0.05)
    x = images()
    shares = var.class_shares(x, target=TARGETS)
    out = var.attribute(x, target=TARGETS)
    p_t = shares.shares[:, 0]
    size = shares.valid.sum(1).double().reshape(-1, 1, 1, 1)
    low = p_t - 1 / size <= 0.05
    assert low.any() and (~low).any()
    assert (out[low] == 0).all()
    torch.testing.assert_close(out[~low], (shares.maps[:, 0] * p_t)[~low])
    assert (shares.classes[:, 0] == TARGETS).all()
    torch.testing.assert_close(shares.shares.sum(1), torch.ones_like(p_t))


class TwinLogits(nn.Module):
    """Logits 0 and 1 come from identical weight rows, so every base map is the same for both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16 * 16, 4)
        with torch.no_grad():
            self.fc.weight[1] = self.fc.weight[0]
            self.fc.bias[1] = self.fc.bias[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_var_identical_classes_share_evidence_equally() -> None:
    model = TwinLogits().double()
    x = images(2)
    var = VAR(IntegratedGradients(model), classes=[0, 1])
    shares = var.class_shares(x, target=0, n=8)
    torch.testing.assert_close(shares.shares, torch.full_like(shares.shares, 0.5))
    assert (var.attribute(x, target=0, n=8) == 0).all()


@pytest.mark.parametrize("base", sorted(set(METHODS) - {"var"}))
def test_var_wraps_every_base_method(base: str) -> None:
    model = small_cnn().eval()
    var = VAR(get_method(base).from_model(model), temperature=(1, 5, 100))
    x = images(2)
    out = var.attribute(x, target=torch.tensor([2, 5]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_var_rejects_bad_arguments(model64: nn.Module) -> None:
    with pytest.raises(BadSpecError, match="wraps a base attribution method"):
        VAR(model64)  # type: ignore[arg-type]
    with pytest.raises(BadSpecError, match="temperature must be positive"):
        VAR(Saliency(model64), temperature=0)
    with pytest.raises(BadSpecError, match=r"\(B=3, K\)"):
        VAR(Saliency(model64)).attribute(images(), classes=torch.zeros(2, 2, dtype=torch.long))


# --- WAM ----------------------------------------------------------------------------------------

def test_wavelet_layout_matches_pywt_and_inverts() -> None:
    x = images(2, size=32).repeat(1, 2, 1, 1)
    transform = WaveletTransform("haar", 3)
    z = transform.forward(x)
    ref, _ = pywt.coeffs_to_array(pywt.wavedec2(x[1, 1].numpy(), "haar", level=3, mode="reflect"))
    torch.testing.assert_close(z[1, 1], torch.from_numpy(ref))
    torch.testing.assert_close(transform.inverse(z), x, atol=1e-12, rtol=0)


class LowPass(nn.Module):
    """Sees only 8×8 block means of the image: a function of the level-3 Haar approximation alone."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.up = nn.Upsample(scale_factor=8, mode="nearest")
        self.fc = nn.Linear(256, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.up(self.pool(x)).flatten(1))


@pytest.mark.parametrize("mode", ["gradient", "smooth", "integrated"])
def test_wam_low_pass_model_puts_mass_on_coarsest_scale(mode: str) -> None:
    result = WAM(LowPass().double(), levels=3, mode=mode).attribute_scales(images(2), target=1)
    assert result.scales.shape == (2, 4, 1, 16, 16)
    assert (result.mass[:, -1] > 0.999).all()
    assert result.coefficients[..., 2:, :].abs().max() < 1e-10


def test_wam_rejects_sizes_without_a_dyadic_layout(model64: nn.Module) -> None:
    with pytest.raises(BadDataError, match="divisible by 2\\*\\*levels = 8"):
        WAM(model64).attribute(torch.rand(1, 1, 12, 12, dtype=torch.float64))
    with pytest.raises(BadSpecError, match="unknown WAM mode"):
        WAM(model64, mode="fancy")


# --- samplers -----------------------------------------------------------------------------------

def test_suppression_samples_stay_between_zero_and_x() -> None:
    x = images(2)
    gen = torch.Generator().manual_seed(0)
    sampler = SuppressionSampler(cell=2)
    samples = [s for s, _ in sampler.points(x, 10, gen)]
    for s in samples:
        assert ((s >= 0) & (s <= x)).all()
        ratio = s / x
        torch.testing.assert_close(ratio[..., ::2, ::2], ratio[..., 1::2, 1::2])  # one draw per 2×2 cell
    assert not torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("sampler", ["noise", "suppression"])
def test_stochastic_samplers_are_seeded(model64: nn.Module, sampler: str) -> None:
    x = images(2)
    run = lambda seed: integrate(model64, x, TARGETS[:2], sampler=sampler, n=4, seed=seed)  # noqa: E731
    torch.testing.assert_close(run(7), run(7), atol=0, rtol=0)
    assert not torch.allclose(run(7), run(8))


def test_any_path_method_accepts_any_sampler(model64: nn.Module) -> None:
    x = images(1)
    for name in SAMPLERS:
        for method in (IntegratedGradients(model64), SmoothGrad(model64), WAM(model64, mode="integrated")):
            out = method.attribute(x, target=2, sampler=name, n=3)
            assert out.shape == x.shape and torch.isfinite(out).all()


def test_integrate_linear_path_is_ig(model64: nn.Module) -> None:
    x = images()
    torch.testing.assert_close(integrate(model64, x, TARGETS, n=50), IntegratedGradients(model64).attribute(x, TARGETS))


def test_integrate_differentiates_a_given_score(model64: nn.Module) -> None:
    """Any per-example score: f(x) = Σ x², so IG from 0 is exactly x² and SmoothGrad with σ = 0 is 2x."""
    x = images()
    squares = lambda v, t: (v**2).flatten(1).sum(1)  # noqa: E731
    ig = integrate(model64, x, TARGETS, "linear_path", n=3, score=squares)
    torch.testing.assert_close(ig, x**2, atol=1e-12, rtol=1e-12)
    noise = integrate(model64, x, TARGETS, get_sampler("noise", sigma_fraction=0.0), n=2, score=squares)
    torch.testing.assert_close(noise, 2 * x, atol=1e-12, rtol=1e-12)
    with pytest.raises(BadSpecError, match=r"one value per example, shape \(6,\); got \(\)"):
        integrate(model64, x, TARGETS, n=2, score=lambda v, t: v.sum())


def test_integrate_passes_hold_at_most_batch_size_inputs(model64: nn.Module) -> None:
    x = images(5)
    seen: list[int] = []

    def counted(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.shape[0])
        return model64(v)

    target = torch.tensor([0, 1, 2, 3, 4])
    small = integrate(counted, x, target, "noise", n=3, seed=2, batch_size=2)
    assert seen and max(seen) <= 2
    torch.testing.assert_close(small, integrate(model64, x, target, "noise", n=3, seed=2), atol=1e-12, rtol=1e-10)


def test_registries_list_their_names() -> None:
    names = METHODS.names()
    assert sorted(names) == ["gradcam", "input_x_gradient", "integrated_gradients", "saliency", "smoothgrad", "var", "wam"]
    assert SAMPLERS.names() == ["noise", "linear_path", "blur_path", "suppression"]
    assert get_sampler("blur_path", sigma=1.0).sigma == 1.0
    with pytest.raises(ValueError, match="registered twice"):
        class Again(AttributionMethod, name="saliency"):  # noqa: F841
            pass


# --- errors, CLI entry point, rendering --------------------------------------------------------

def test_bad_inputs_raise_project_errors(model64: nn.Module) -> None:
    sal = Saliency(model64)
    with pytest.raises(BadDataError, match=r"\(B, C, H, W\); got shape \(1, 16, 16\)"):
        sal.attribute(torch.rand(1, 16, 16, dtype=torch.float64))
    with pytest.raises(BadDataError, match="floating point"):
        sal.attribute(torch.ones(1, 1, 16, 16, dtype=torch.long))
    with pytest.raises(BadDataError, match="NaN or inf"):
        sal.attribute(torch.full((1, 1, 16, 16), float("nan"), dtype=torch.float64))
    with pytest.raises(BadSpecError, match="out of range for a model with 10 classes"):
        sal.attribute(images(1), target=10)
    with pytest.raises(BadDataError, match="2 targets for 3 inputs; give an int or one class per example"):
        sal.attribute(images(3), target=[1, 2])
    with pytest.raises(BadSpecError, match="unknown sampler 'uniform'; choose one of: noise, linear_path, blur_path, suppression"):
        IntegratedGradients(model64).attribute(images(1), sampler="uniform")
    with pytest.raises(BadSpecError, match=r"does not take \['cell'\]"):
        get_sampler("noise", cell=2)
    with pytest.raises(BadSpecError, match="unknown integration rule"):
        IntegratedGradients(model64).attribute(images(1), rule="simpson")
    with pytest.raises(BadSpecError, match="no nn.Conv2d"):
        GradCAM(DigitsMLP())
    with pytest.raises(BadSpecError, match="no layer named 'head.9'"):
        GradCAM(model64, layer="head.9")


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(BadSpecError) as err:
        get_method("lime")
    assert "unknown attribution method 'lime'" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)


def test_run_attribute_explains_one_image(model64: nn.Module) -> None:
    x = images(1)[0]
    attribution, info = run_attribute(model64, x, "var:saliency")
    assert attribution.shape == x.shape
    assert set(info) == {"method", "predicted", "predicted_probability", "target", "probability"}
    assert info["target"] == info["predicted"] and info["probability"] == info["predicted_probability"]
    _, info = run_attribute(model64, x, "saliency", target=3)
    assert info["target"] == 3 and 0 < info["probability"] < 1
    with pytest.raises(BadDataError, match=r"\(C, H, W\)"):
        run_attribute(model64, x[None])
    with pytest.raises(BadSpecError, match="only VAR takes a base method"):
        run_attribute(model64, x, "saliency:gradcam")


def test_save_overlay_and_summary(model64: nn.Module, tmp_path: Any) -> None:
    x = images(1)[0]
    attribution, _ = run_attribute(model64, x, "integrated_gradients")
    path = save_overlay(x, attribution, tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = summarize(attribution, top=3)
    assert len(summary["top_pixels"]) == 3 and summary["positive_mass"] >= 0 >= summary["negative_mass"]


def test_registered_method_names() -> None:
    """The CLI names of the pixel-attribution methods (the package's exports are checked in test_exported_members)."""
    assert set(METHODS) == {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam", "var", "wam"}
