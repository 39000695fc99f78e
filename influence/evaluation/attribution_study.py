"""The pixel-attribution study on scikit-learn digits: grid pointing game (with VAR), MPRT, faithfulness, stability.

Each protocol trains or takes a small model, computes maps with the shipped attribution methods
(``influence.attribution``), scores them with ``influence.evaluation.pixel`` and returns its Markdown lines and its
figures; scripts/eval_attribution.py assembles them into the "attribution" section of the benchmarks page.
Protocols follow Adebayo et al. 2018 (MPRT), Petsiuk et al. 2018 (insertion / deletion) and Bhatt et al. 2020
(μ-fidelity).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from influence.attribution import (
    VAR,
    AttributionMethod,
    WAM,
    GradCAM,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    SuppressionSampler,
    WaveletTransform,
)
from influence.evaluation.pixel import insertion_deletion, pointing_share, spearman
from influence.evaluation.pixel import mu_fidelity as mu_fidelity_score
from influence.models import DigitsCNN


STEPS = 32
HEADS = {
    "max": "1×1 class conv + global max over positions (fully convolutional)",
    "linear": "flatten + linear, position-aware like DigitsCNN's",
}
GRID_EPOCHS = 12

# A feature space the faithfulness curves mask in: (features (B, D) → model inputs, the images' features (B, D)).
Space = tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]


# --- data and models -----------------------------------------------------------------------------

def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits 8×8 → 16×16 (bilinear), values in [0, 1], the project's fixed stratified split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def place(digits: torch.Tensor, quadrants: torch.Tensor) -> torch.Tensor:
    """Put each 16×16 digit in quadrant q (0 TL, 1 TR, 2 BL, 3 BR) of a black 32×32 canvas."""
    canvas = torch.zeros(digits.shape[0], 1, 32, 32)
    for q in range(4):
        sel = quadrants == q
        r, c = 16 * (q // 2), 16 * (q % 2)
        canvas[sel, :, r : r + 16, c : c + 16] = digits[sel]
    return canvas


class GridCNN(nn.Module):
    """Digits CNN for 32×32 canvases: DigitsCNN's two feature blocks plus one 3×3 conv block
    (receptive field ≈ 18 px, one digit cell), then a head. ``head="max"``: a 1×1 class conv and a
    global max over positions (fully convolutional: each class is scored where its evidence is
    strongest). ``head="linear"``: flatten + linear, like DigitsCNN's own head (position-aware)."""

    def __init__(self, width: int = 8, head: str = "max") -> None:
        super().__init__()
        self.features = DigitsCNN(width=width).features
        self.block = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU())
        self.head = head
        if head == "max":
            self.classifier: nn.Module = nn.Conv2d(4 * width, 10, 1)
        else:
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.block(self.features(x)))
        return out.amax(dim=(2, 3)) if self.head == "max" else out


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0,
          augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> nn.Module:
    """Adam, lr 3e-3, batch 64; shuffling (and augmentation) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 64):
            idx = order[start : start + 64]
            xb = x[idx] if augment is None else augment(x[idx], gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            opt.step()
    return model.eval()


def random_quadrant(digits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return place(digits, torch.randint(0, 4, (digits.shape[0],), generator=gen))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


# --- shared measures -----------------------------------------------------------------------------

def base_methods(model: nn.Module, n_ig: int = 50, n_smooth: int = 25) -> dict[str, tuple[AttributionMethod, dict[str, Any]]]:
    """name → (method instance, attribute options) for every base method."""
    return {
        "saliency": (Saliency(model), {}),
        "input_x_gradient": (InputXGradient(model), {}),
        "integrated_gradients": (IntegratedGradients(model), {"n": n_ig}),
        "smoothgrad": (SmoothGrad(model), {"n": n_smooth}),
        "gradcam": (GradCAM(model), {}),
        "wam": (WAM(model), {"n": n_smooth}),
    }


def pixel_map(name: str, a: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """(B, H, W) pixel map: channel sum; WAM's coefficient map → Σ of its per-scale |coefficient| maps."""
    if name.startswith("wam"):
        maps, _ = WaveletTransform("haar", levels).scales(a)
        return maps.sum(dim=(1, 2))
    return a.sum(dim=1)


# --- 1. grid pointing game -----------------------------------------------------------------------

def pointing_game(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, n_grids: int,
                  seed: int, head: str) -> tuple[list[str], dict[str, tuple[tuple[float, int], tuple[float, int]]]]:
    """Grid pointing game with and without VAR on a ``GridCNN(head=head)`` trained on random-quadrant canvases.

    Results: method → ((share, empty maps) without VAR, the same with VAR).
    """
    lines: list[str] = []
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module init draws from the global generator
        model = train(GridCNN(head=head), x_train, y_train, epochs=GRID_EPOCHS, seed=seed, augment=random_quadrant)
    quad_acc = np.mean([accuracy(model, place(x_test, torch.full((len(y_test),), q)), y_test) for q in range(4)])
    with torch.no_grad():
        probs = torch.stack([model(place(x_test, torch.full((len(y_test),), q))).softmax(1) for q in range(4)])
    p_true = probs.gather(2, y_test.reshape(1, -1, 1).expand(4, -1, 1)).squeeze(2).amin(0)
    confident = torch.nonzero((probs.argmax(2) == y_test).all(0) & (p_true > 0.9)).flatten()
    gen = torch.Generator().manual_seed(seed)
    grids: list[torch.Tensor] = []
    targets: list[int] = []
    cells: list[int] = []
    present: list[list[int]] = []
    for _ in range(n_grids):
        classes = torch.randperm(10, generator=gen)[:4]
        picks = []
        for c in classes:
            pool = confident[y_test[confident] == c]
            picks.append(int(pool[torch.randint(len(pool), (1,), generator=gen)].item()))
        grid = torch.zeros(1, 32, 32)
        for q, i in enumerate(picks):
            r, c = 16 * (q // 2), 16 * (q % 2)
            grid[:, r : r + 16, c : c + 16] = x_test[i]
        for q in range(4):
            grids.append(grid)
            targets.append(int(classes[q]))
            cells.append(q)
            present.append(classes.tolist())
    x = torch.stack(grids)
    t = torch.tensor(targets)
    cls = torch.tensor(present)
    with torch.no_grad():
        top4 = model(x).topk(4, dim=1).indices
    top4_hit = float(np.mean([len(set(a) & set(b)) / 4 for a, b in zip(top4.tolist(), cls.tolist())]))
    cell_mask = torch.zeros(len(t), 32, 32)
    for i, q in enumerate(cells):
        r, c = 16 * (q // 2), 16 * (q % 2)
        cell_mask[i, r : r + 16, c : c + 16] = 1
    cells_b = cell_mask.bool()

    results: dict[str, tuple[tuple[float, int], tuple[float, int]]] = {}
    for name, (method, opts) in base_methods(model).items():
        plain = pointing_share(pixel_map(name, method.attribute(x, target=t, **opts)), cells_b)
        var = pointing_share(pixel_map(name, VAR(method).attribute(x, target=t, classes=cls, **opts)), cells_b)
        results[name] = (plain, var)
    lines += [
        f"### Grid pointing game (VAR), `GridCNN(head={head!r})`",
        "",
        f"Model: `GridCNN` (DigitsCNN's two conv blocks + a 3×3 conv block, width 8; head {HEADS[head]}), trained {GRID_EPOCHS} epochs on 32×32 canvases with one training digit in a random quadrant; test accuracy "
        f"{quad_acc:.3f} (mean over the four quadrants). {n_grids} grids of 2×2 confidently (p > 0.9 in every quadrant), "
        f"correctly classified test digits of 4 distinct classes ({len(confident)} eligible digits); each cell's class "
        f"is explained in turn ({len(t)} maps per method). Share of the positive map mass inside the target's cell "
        f"(random: 0.25). VAR's class set C = the 4 classes present; T = 10, τ = 0.01. WAM maps are the sum of its "
        f"per-scale |coefficient| maps. Mean overlap of the model's top-4 classes on a grid with the 4 classes "
        f"present: {top4_hit:.3f}.",
        "",
        "| method | share, base | share, VAR | VAR / base | empty VAR maps |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ((b, _), (v, empty)) in results.items():
        lines.append(f"| {name} | {b:.3f} | {v:.3f} | {v / b:.2f}× | {empty} / {len(t)} |")
    lines.append(f"\n({time.time() - t0:.0f} s)\n")
    return lines, results


# --- 2. MPRT --------------------------------------------------------------------------------------

def mprt(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[list[str], dict[str, float]]:
    """Cascading top-down MPRT; results: method → mean Spearman once every layer is randomised."""
    t0 = time.time()
    layers = ["head.3", "head.1", "features.4", "features.0"]  # top-down: output layer first
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def maps(m: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        methods = base_methods(m)
        methods["var_integrated_gradients"] = (VAR(IntegratedGradients(m)), {"n": 50})
        for name, (method, opts) in methods.items():
            out[name] = method.attribute(x, target=y, **opts).abs().sum(1)
        return out

    original = maps(model)
    foreground = (x > 0.1).squeeze(1)
    rows: dict[str, list[float]] = {name: [] for name in original}
    fg_last: dict[str, float] = {}
    randomised = DigitsCNN()
    randomised.load_state_dict(state)
    randomised.eval()
    named = dict(randomised.named_modules())
    for i, layer in enumerate(layers):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 100 + i)
            named[layer].reset_parameters()
        current = maps(randomised)
        for name in rows:
            rows[name].append(float(np.mean([spearman(a, b) for a, b in zip(original[name], current[name])])))
            if i == len(layers) - 1 and not name.startswith("wam"):
                fg_last[name] = float(np.mean([spearman(a[m], b[m]) for a, b, m in zip(original[name], current[name], foreground)]))
    lines = [
        "### Model-parameter randomisation (MPRT, cascading top-down)",
        "",
        f"DigitsCNN (16×16), {len(y)} test images, target = true label. Layers re-initialised (PyTorch default init, "
        f"seeded) cumulatively from the output down; BatchNorm statistics are kept. Cell: mean Spearman "
        f"correlation between |map| (channels summed; WAM: |coefficient map|) before and after. Target: < 0.5 once "
        f"all layers are randomised. Last column: the fully randomised model, foreground pixels only (x > 0.1), "
        f"because maps that end in ⊙x are 0 on the black background whatever the model, and those shared zeros "
        f"agree in rank (not computed for WAM, whose map is not in pixel space).",
        "",
        "| method | " + " | ".join(f"+{layer}" for layer in layers) + " | all, foreground |",
        "|---|" + "---:|" * (len(layers) + 1),
    ]
    for name, values in rows.items():
        fg = f"{fg_last[name]:.3f}" if name in fg_last else "–"
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {fg} |")
    lines.append(f"\n({time.time() - t0:.0f} s)\n")
    return lines, {k: v[-1] for k, v in rows.items()}


# --- 3. faithfulness --------------------------------------------------------------------------------



def _target_prob(model: nn.Module, t: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, D) features → the model's probability of target ``t`` on the decoded inputs."""
    return lambda f: model(decode(f)).softmax(1).gather(1, t[:, None]).squeeze(1)


@torch.no_grad()
def curves(model: nn.Module, x: torch.Tensor, t: torch.Tensor, ranking: torch.Tensor,
           decode: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor) -> tuple[float, float]:
    """Insertion and deletion AUC (``pixel.insertion_deletion``, STEPS steps, features set to / revealed from 0) when
    features (B, D) are ranked by ``ranking`` (B, D); ``decode`` maps features to model inputs."""
    ins, dele = insertion_deletion(_target_prob(model, t, decode), features, ranking.argsort(dim=1, descending=True), STEPS)
    return float(ins.mean()), float(dele.mean())


@torch.no_grad()
def mu_fidelity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, attribution: torch.Tensor,
                decode: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, seed: int) -> float:
    """``pixel.mu_fidelity`` over 32 random 20 % subsets of the features."""
    return mu_fidelity_score(_target_prob(model, t, decode), features, attribution, seed)


def faithfulness(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[list[str], dict[str, float]]:
    """Insertion / deletion AUC and μ-fidelity per map; results: map label → insertion − deletion AUC."""
    t0 = time.time()
    with torch.no_grad():
        t = model(x).argmax(1)
    b = x.shape[0]
    wavelet = WaveletTransform("haar", 3)
    pixels: Space = (lambda f: f.reshape(x.shape), x.flatten(1))
    coeffs: Space = (lambda f: wavelet.inverse(f.reshape(x.shape)), wavelet.forward(x).flatten(1))
    ig, sg = IntegratedGradients(model), SmoothGrad(model)
    n = 25
    rows: list[tuple[str, str, torch.Tensor, Space]] = [
        ("IntegratedGradients (linear_path, n=50)", "pixels", ig.attribute(x, t, n=50), pixels),
        ("SmoothGrad (noise, n=25)", "pixels", sg.attribute(x, t, n=25), pixels),
    ]
    for mode, steps in (("integrated", 50), ("smooth", 25)):
        z = WAM(model, mode=mode).attribute(x, t, n=steps)
        rows.append((f"WAM {mode} (n={steps})", "wavelet coefficients", z, coeffs))
        rows.append((f"WAM {mode} (n={steps}), Σ per-scale maps", "pixels", pixel_map("wam", z).unsqueeze(1), pixels))
    sampler_rows: list[tuple[str, str, torch.Tensor, Space]] = []
    for label, sampler, opts in (
        ("noise (σ = 0.15·range)", "noise", {}),
        ("linear_path (x₀ = 0)", "linear_path", {}),
        ("suppression (per pixel)", "suppression", {}),
        ("suppression (2×2 cells)", SuppressionSampler(cell=2), {}),
        ("blur_path (σ = 4 px)", "blur_path", {}),
    ):
        a = ig.attribute(x, t, sampler=sampler, n=n, seed=seed, **opts)
        sampler_rows.append((f"sampler {label}, n={n}", "pixels", a, pixels))
        if sampler == "noise":
            sampler_rows.append((f"sampler {label} ×x, n={n}", "pixels", a * x, pixels))
    results: dict[str, float] = {}
    lines = [
        "### Faithfulness: insertion / deletion AUC and μ-fidelity",
        "",
        f"DigitsCNN (16×16), first {b} test images, target = predicted class. Features (256 pixels or 256 Haar "
        f"coefficients, 3 levels) are ranked by the signed map (WAM pixel rows: by Σ of per-scale |coefficient| "
        f"maps) and removed (set to 0 = black) or revealed from an all-zero input, {STEPS} steps; AUC = mean target "
        f"probability over the curve. μ-fidelity: Pearson between Σ attribution over 32 random 20 % subsets and the "
        f"probability drop when they are zeroed. Sampler rows use the one integration core at equal n = {n} "
        f"(seed {seed}); `noise` returns the mean gradient (SmoothGrad's definition), so its ×x row is the like-for-like "
        f"comparison with the samplers that finish with ⊙x or ⊙(x − x₀).",
        "",
        "| map | masked | insertion ↑ | deletion ↓ | ins − del ↑ | μ-fidelity ↑ |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, space, a, (decode, features) in rows + sampler_rows:
        ranking = a.flatten(1)
        ins, dele = curves(model, x, t, ranking, decode, features)
        mu = mu_fidelity(model, x, t, ranking, decode, features, seed)
        results[label] = ins - dele
        lines.append(f"| {label} | {space} | {ins:.3f} | {dele:.3f} | {ins - dele:.3f} | {mu:.3f} |")
    lines.append(f"\n({time.time() - t0:.0f} s)\n")
    return lines, results


# --- 4. sampler stability -----------------------------------------------------------------------------

def stability(model: nn.Module, x: torch.Tensor, seeds: tuple[int, int]) -> tuple[list[str], dict[tuple[str, int], tuple[float, float]]]:
    """Seed-to-seed Spearman of the stochastic samplers; results: (sampler, n) → (all pixels, foreground)."""
    t0 = time.time()
    with torch.no_grad():
        t = model(x).argmax(1)
    ig = IntegratedGradients(model)
    foreground = (x > 0.1).squeeze(1)
    results: dict[tuple[str, int], tuple[float, float]] = {}
    lines = [
        "### Sampler stability (seed to seed)",
        "",
        f"Same {x.shape[0]} images and targets. Spearman correlation between the maps from seeds {seeds[0]} and "
        f"{seeds[1]}, over all 256 pixels and over foreground pixels only (x > 0.1, where ⊙x does not force zeros "
        f"that agree trivially). `linear_path` and `blur_path` are deterministic (1.000 by construction).",
        "",
        "| sampler | n | all pixels | foreground |",
        "|---|---:|---:|---:|",
    ]
    for label, sampler, times_x in (
        ("noise", "noise", False),
        ("noise ×x", "noise", True),
        ("suppression (per pixel)", "suppression", False),
        ("suppression (2×2 cells)", SuppressionSampler(cell=2), False),
    ):
        for n in (10, 25):
            a, b = (ig.attribute(x, t, sampler=sampler, n=n, seed=s) for s in seeds)
            if times_x:
                a, b = a * x, b * x
            a, b = a.sum(1), b.sum(1)
            full = float(np.mean([spearman(p, q) for p, q in zip(a, b)]))
            fg = float(np.mean([spearman(p[m], q[m]) for p, q, m in zip(a, b, foreground)]))
            results[(label, n)] = (full, fg)
            lines.append(f"| {label} | {n} | {full:.3f} | {fg:.3f} |")
    lines.append(f"\n({time.time() - t0:.0f} s)\n")
    return lines, results
