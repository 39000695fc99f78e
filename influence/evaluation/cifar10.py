"""The CIFAR-10 benchmark plan: classes, the 10,000-image subset, label flips and planted patches.

One place for what the training script (scripts/cifar10_train.py, a plain-torch loop), the data script and the
evaluation script must agree on. numpy and pillow only, so the training script can import it on a machine that
has torch but not this package's other dependencies (run it from the repository root with ``PYTHONPATH=.``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR2 = ("cat", "dog")
SUBSET_PER_CLASS = 1000
FLIP_RATES = (0.1, 0.2)
FOLDS = 4
# name -> (size px, colour RGB in [0, 1] or "checker", top-left (x, y)); the checker patch sits at the image centre,
# over the object's own texture rather than on the plainer border
PATCHES: dict[str, tuple[int, object, tuple[int, int]]] = {
    "red2-topleft": (2, (1.0, 0.0, 0.0), (2, 2)),
    "green4-bottomright": (4, (0.0, 1.0, 0.0), (26, 26)),
    "yellow6-topright": (6, (1.0, 1.0, 0.0), (24, 2)),
    "checker4-centre": (4, "checker", (14, 14)),
}
SHORTCUT_SEEDS = (0, 1, 2)
PATCH_FRACTION = 0.5


def read_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×3×32×32 images and labels of an image folder, in sorted class / sorted file order."""
    from PIL import Image

    xs, ys = [], []
    for c, name in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
                ys.append(c)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def subset_ids(y: np.ndarray, per_class: int = SUBSET_PER_CLASS) -> np.ndarray:
    """The first ``per_class`` images of each class: the 10,000-image subset."""
    return np.concatenate([np.nonzero(y == c)[0][:per_class] for c in range(10)])


def flip_labels(y: np.ndarray, rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``rate`` of the labels to a uniformly random other class; returns (noisy labels, flipped ids)."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(len(y), int(round(rate * len(y))), replace=False))
    noisy = y.copy()
    noisy[ids] = (y[ids] + rng.integers(1, 10, len(ids))) % 10
    return noisy, ids


def patch_box(name: str) -> tuple[int, int, int, int]:
    size, _, (x0, y0) = PATCHES[name]
    return x0, y0, x0 + size, y0 + size


def apply_patch(x: np.ndarray, name: str) -> np.ndarray:
    """A copy of uint8 N×3×32×32 images with the named patch planted."""
    size, colour, _ = PATCHES[name]
    x0, y0, x1, y1 = patch_box(name)
    out: np.ndarray = x.copy()
    if colour == "checker":
        yy, xx = np.mgrid[0:size, 0:size]
        pattern = ((yy + xx) % 2 * 255).astype(np.uint8)
        out[:, :, y0:y1, x0:x1] = pattern[None, None]
    else:
        out[:, :, y0:y1, x0:x1] = (np.asarray(colour) * 255).astype(np.uint8)[None, :, None, None]
    return out


def shortcut_plan(y: np.ndarray, name: str, seed: int) -> tuple[int, np.ndarray]:
    """(shortcut class, ids of the training images to patch) for one patch and seed."""
    cls = (list(PATCHES).index(name) * 3 + seed) % 10
    rng = np.random.default_rng(1000 + seed)
    members = np.nonzero(y == cls)[0]
    return cls, np.sort(rng.choice(members, int(PATCH_FRACTION * len(members)), replace=False))
