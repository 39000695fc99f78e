"""The load boundary: model specs, data specs, checkpoints and image files.

Every loader here may raise anything on bad files (torch.load alone raised
eight exception types on corrupted checkpoints), so each one catches at the
boundary and turns the failure into a one-line ``InfluenceError`` naming the
path. Checkpoints are read with ``weights_only=True``, never unpickled beyond that.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from influence.data import ArrayDataset, SizedDataset
from influence.demo.digits import load_digits_split
from influence.errors import BadCheckpointError, BadDataError, BadSpecError
from influence.models import BUILTIN_MODELS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

BUILTIN_DATA: dict[str, Callable[[], ArrayDataset]] = {
    "digits": lambda: load_digits_split()[0],
    "digits-train": lambda: load_digits_split()[0],
    "digits-test": lambda: load_digits_split()[1],
}


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_callable(spec: str, what: str) -> Callable[..., Any]:
    """``package.module:name`` or ``path/to/file.py:name`` → the named attribute."""
    if ":" not in spec:
        raise BadSpecError(
            f"unknown {what} spec {spec!r}: use a built-in name, 'package.module:function' or 'path/to/file.py:function'"
        )
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise BadSpecError(f"{what} spec {spec!r}: file {target} does not exist")
            mod_name = f"_influence_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
    except BadSpecError:
        raise
    except Exception as e:  # user code may raise anything on import
        raise BadSpecError(f"{what} spec {spec!r}: cannot import {target}: {type(e).__name__}: {e}") from None
    fn: object = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise BadSpecError(f"{what} spec {spec!r}: {target} has no callable named {attr!r}")
    return fn


def load_model(spec: str | nn.Module) -> nn.Module:
    """A fresh (untrained) model from a MODEL SPEC, or the module itself."""
    if isinstance(spec, nn.Module):
        return spec
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    factory = _resolve_callable(spec, "model")
    try:
        model = factory()
    except Exception as e:
        raise BadSpecError(f"model spec {spec!r}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise BadSpecError(f"model spec {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_fingerprint(model: nn.Module) -> str:
    """Architecture identity: class name plus every state-dict entry's name, shape and dtype."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    _check_zip_crcs(path)
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadCheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def _check_zip_crcs(path: Path) -> None:
    """A ``torch.save`` file is a zip whose entries carry CRC-32s that ``torch.load`` does not check:
    a flipped bit inside a tensor would load as a silently different weight. Legacy (non-zip) files pass."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise BadCheckpointError(f"checkpoint {path} is a damaged zip archive ({type(e).__name__}); restore or re-save it") from None
    if bad is not None:
        raise BadCheckpointError(f"checkpoint {path} is corrupt: entry {bad} fails its CRC-32 check; restore or re-save it")


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], expected_sha256: str | None = None) -> nn.Module:
    """Load a state dict into ``model`` (in place) and return it in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise BadCheckpointError(f"checkpoint {path} does not exist")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise BadCheckpointError(
            f"checkpoint {path} has changed since the store was built (sha256 differs); rebuild the store with --out NEW"
        )
    try:
        state = _read_state_dict(path)
    except BadCheckpointError:
        raise
    except Exception as e:  # torch.load / safetensors raise many types on corrupt files
        raise BadCheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise BadCheckpointError(
            f"checkpoint {path} does not match the model's architecture ({type(model).__name__}): {detail[:200]}"
        ) from None
    return model.eval()


def load_data(spec: str | Dataset[Any]) -> SizedDataset:
    """A dataset from a DATA SPEC: built-in name, image folder, ``.npz`` with x and y, or ``module:function``."""
    dataset: SizedDataset
    if isinstance(spec, Dataset):
        if not isinstance(spec, SizedDataset):
            raise BadSpecError(f"data set {type(spec).__name__} has no length; pass a map-style Dataset with __len__")
        dataset = spec
    elif spec in BUILTIN_DATA:
        dataset = BUILTIN_DATA[spec]()
    elif os.path.isdir(spec):
        dataset = ImageFolder(spec)
    elif spec.endswith(".npz"):
        dataset = _load_npz(Path(spec))
    elif ":" in spec and not os.path.exists(spec):
        fn = _resolve_callable(spec, "data")
        try:
            made = fn()
        except Exception as e:
            raise BadSpecError(f"data spec {spec!r}: the function raised {type(e).__name__}: {e}") from None
        if not isinstance(made, SizedDataset):  # checks for __len__ and __getitem__
            raise BadSpecError(f"data spec {spec!r}: expected a torch Dataset, got {type(made).__name__}")
        dataset = made
    else:
        raise BadSpecError(
            f"unknown data spec {spec!r}: use {', '.join(BUILTIN_DATA)}, a folder of class sub-folders, "
            "an .npz with arrays x and y, or 'module:function'"
        )
    if len(dataset) == 0:
        raise BadDataError(f"data set {spec!r} is empty")
    return dataset


def _load_npz(path: Path) -> ArrayDataset:
    if not path.is_file():
        raise BadDataError(f"data file {path} does not exist")
    try:
        # Open the file ourselves: np.load leaks its own handle when the zip directory is corrupt.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise BadDataError(f"{path} must contain arrays named 'x' and 'y', found {sorted(f.files)}")
            x, y = f["x"], f["y"]
    except BadDataError:
        raise
    except Exception as e:  # np.load raises OverflowError, IndexError, TokenError... on crafted files
        raise BadDataError(f"data file {path} is unreadable ({type(e).__name__}: {e})") from None
    if x.dtype == object or y.dtype == object:
        raise BadDataError(f"{path}: arrays must be numeric, not object")
    return ArrayDataset(x, y, name=str(path))


def read_image(path: str | os.PathLike[str], channels: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file (or ``.npy`` array) as a float (C, H, W) tensor in [0, 1]."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise BadDataError(f"image {path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise BadDataError(f"image {path} is unreadable ({type(e).__name__})") from None
        t = torch.as_tensor(np.asarray(arr, dtype=np.float32))
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise BadDataError(f"image {path}: array must be (C, H, W) or (H, W), got {tuple(t.shape)}")
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    im.load()
                    mode = "L" if channels == 1 else "RGB"
                    arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except Exception as e:
            raise BadDataError(f"image {path} is unreadable ({type(e).__name__}: {str(e)[:80]})") from None
        t = torch.as_tensor(arr)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if channels is not None and t.shape[0] != channels:
        if t.shape[0] == 3 and channels == 1:
            t = t.mean(0, keepdim=True)
        elif t.shape[0] == 1:
            t = t.expand(channels, -1, -1).clone()
        else:
            raise BadDataError(f"image {path} has {t.shape[0]} channels; the model expects {channels}")
    if size is not None and tuple(t.shape[-2:]) != tuple(size):
        t = torch.nn.functional.interpolate(t[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    if not torch.isfinite(t).all():
        raise BadDataError(f"image {path} contains NaN or inf")
    return t.contiguous()


class ImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """A folder with one sub-folder of images per class; classes sorted by name, images read lazily."""

    def __init__(self, root: str | os.PathLike[str], channels: int | None = None, size: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise BadDataError(f"image folder {root} has no class sub-folders")
        self.items = [
            (f, c) for c, name in enumerate(self.classes)
            for f in sorted((self.root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        first = read_image(self.items[0][0], channels) if self.items else None
        self.channels = channels or (first.shape[0] if first is not None else 1)
        self.size = size or ((first.shape[-2], first.shape[-1]) if first is not None else None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return read_image(path, self.channels, self.size), label
