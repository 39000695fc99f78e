"""The load boundary: model specs, data specs, checkpoints and image files.

Every loader here may raise anything on bad files (torch.load alone raised
eight exception types on corrupted checkpoints), so each one catches at the
boundary and turns the failure into a one-line ``InfluenceError`` naming the
path. Checkpoints are read with ``weights_only=True``, never unpickled beyond that.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import os
import pickle
import sys
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from influence.data import ArrayDataset, Preprocessing, SizedDataset, fingerprint_dataset, preprocess, with_preprocessing
from influence.demo.digits import load_digits_split
from influence.errors import BadCheckpointError, BadDataError, BadSpecError, StoreMismatchError
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


@contextlib.contextmanager
def _on_import_path(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` while user code is imported and its factory runs, then removed again."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _spec_folder(spec: str) -> str:
    """Where a spec's sibling modules live: the file's folder for ``file.py:f``, the current directory otherwise."""
    target = spec.rpartition(":")[0]
    return str(Path(target).resolve().parent) if target.endswith(".py") else os.getcwd()


def _resolve_callable(spec: str, what: str) -> Callable[..., Any]:
    """``package.module:name`` (found from the current directory too) or ``path/to/file.py:name`` → the named attribute.

    Call it inside ``_on_import_path(_spec_folder(spec))`` so a file's sibling modules import as they do when
    the file is run as a script.
    """
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
            if module_spec is None or module_spec.loader is None:
                raise BadSpecError(f"{what} spec {spec!r}: {target} is not an importable Python file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
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


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings → factory keyword arguments; values are Python literals (``3``, ``0.5``, ``True``) or else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise BadSpecError(f"--model-arg must be key=value with a Python name as key, got {item!r}")
        try:
            value: Any = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        out[key] = value
    return out


def load_model(spec: str | nn.Module, model_args: dict[str, Any] | None = None) -> nn.Module:
    """A fresh (untrained) model from a MODEL SPEC called with ``model_args`` as keywords, or the module itself."""
    if isinstance(spec, nn.Module):
        return spec
    kwargs = dict(model_args or {})
    if spec in BUILTIN_MODELS:
        factory: Callable[..., Any] = BUILTIN_MODELS[spec]
        folder = os.getcwd()
    else:
        folder = _spec_folder(spec)
        with _on_import_path(folder):
            factory = _resolve_callable(spec, "model")
    try:
        with _on_import_path(folder):
            model = factory(**kwargs)
    except Exception as e:
        args = f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
        raise BadSpecError(f"model spec {spec!r}: the factory{args} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise BadSpecError(f"model spec {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_fingerprint(model: nn.Module) -> str:
    """Architecture identity: class name plus every state-dict entry's name, shape and dtype."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


# Where training scripts put the weights: torch.save({'model': sd}), Lightning's 'state_dict', the PyTorch
# tutorials' 'model_state_dict', and 'net'; looked for in this order.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes wrappers add to every key: nn.DataParallel / DistributedDataParallel, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _describe_keys(obj: dict[Any, Any]) -> str:
    keys = [str(k) for k in obj]
    return ", ".join(repr(k) for k in keys[:8]) + (f" ... ({len(keys)} keys)" if len(keys) > 8 else "")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip_prefixes(load_file(str(path)))
    _check_zip_crcs(path)
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if _is_state_dict(obj):
        return _strip_prefixes(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return _strip_prefixes(obj[key])
        raise BadCheckpointError(
            f"checkpoint {path} holds a dict with keys {_describe_keys(obj)} but no state dict of tensors; "
            f"save model.state_dict() directly or under one of {', '.join(map(repr, STATE_DICT_KEYS))}"
        )
    raise BadCheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Which keys differ, short enough for one line: counts and the first few names."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if items:
            parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    return "; ".join(parts) or "load_state_dict refused it"


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
    """Load a state dict into ``model`` (in place) and return it in eval mode.

    The file may hold the state dict itself or a dict with it under ``state_dict``, ``model_state_dict``,
    ``model`` or ``net``; a ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix on every key is removed.
    """
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
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise BadCheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__})") from None
        raise BadCheckpointError(
            f"checkpoint {path} holds pickled objects beyond tensors (a whole model?), which are not loaded for safety; "
            "save model.state_dict() instead"
        ) from None
    except Exception as e:  # torch.load / safetensors raise many types on corrupt files
        raise BadCheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise BadCheckpointError(
            f"checkpoint {path} does not match the model's architecture ({type(model).__name__}): {_mismatch(model, state)}"
        ) from None
    return model.eval()


def load_data(
    spec: str | Dataset[Any], preprocessing: Preprocessing | None = None, *, classes: Sequence[str] | None = None,
    shape: Sequence[int] | None = None, reference: str = "the model's images", advice: str | None = None,
) -> SizedDataset:
    """A dataset from a DATA SPEC: built-in name, image folder, ``.npz`` with x and y, or ``module:function``.

    ``preprocessing`` is applied to every image. ``classes`` are the class names in label order (a store's):
    an image folder's sub-folders and an ``.npz``'s ``classes`` array are then mapped to them by name, never
    by position. ``shape`` (C, H, W) is what every preprocessed image must be (default: the first image's);
    ``reference`` and ``advice`` word a folder image's mismatch error (see :func:`load_image`). The result has ``classes`` (names, or None) and, for folders, ``paths`` (relative file paths).
    """
    pre = preprocessing or Preprocessing()
    dataset: SizedDataset
    if isinstance(spec, Dataset):
        if not isinstance(spec, SizedDataset):
            raise BadSpecError(f"data set {type(spec).__name__} has no length; pass a map-style Dataset with __len__")
        dataset = with_preprocessing(spec, pre)
    elif spec in BUILTIN_DATA:
        dataset = with_preprocessing(BUILTIN_DATA[spec](), pre)
    elif os.path.isdir(spec):
        dataset = ImageFolder(spec, preprocessing=pre, classes=classes, shape=shape, reference=reference, advice=advice)
    elif spec.endswith(".npz"):
        dataset = with_preprocessing(_load_npz(Path(spec), classes), pre)
    elif ":" in spec and not os.path.exists(spec):
        with _on_import_path(_spec_folder(spec)):
            fn = _resolve_callable(spec, "data")
            try:
                made = fn()
            except Exception as e:
                raise BadSpecError(f"data spec {spec!r}: the function raised {type(e).__name__}: {e}") from None
        if not isinstance(made, SizedDataset):  # checks for __len__ and __getitem__
            raise BadSpecError(f"data spec {spec!r}: expected a torch Dataset, got {type(made).__name__}")
        dataset = with_preprocessing(made, pre)
    else:
        raise BadSpecError(
            f"unknown data spec {spec!r}: use {', '.join(BUILTIN_DATA)}, a folder of class sub-folders, "
            "an .npz with arrays x and y, or 'module:function'"
        )
    if len(dataset) == 0:
        raise BadDataError(f"data set {spec!r} is empty")
    return dataset


def _load_npz(path: Path, classes: Sequence[str] | None = None) -> ArrayDataset:
    """``x`` and ``y``, and an optional ``classes`` array of names (``y`` indexes it), mapped to ``classes`` by name."""
    if not path.is_file():
        raise BadDataError(f"data file {path} does not exist")
    try:
        # Open the file ourselves: np.load leaks its own handle when the zip directory is corrupt.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise BadDataError(f"{path} must contain arrays named 'x' and 'y', found {sorted(f.files)}")
            x, y = f["x"], f["y"]
            names = f["classes"] if "classes" in f else None
    except BadDataError:
        raise
    except Exception as e:  # np.load raises OverflowError, IndexError, TokenError... on crafted files
        raise BadDataError(f"data file {path} is unreadable ({type(e).__name__}: {e})") from None
    if x.dtype == object or y.dtype == object:
        raise BadDataError(f"{path}: arrays must be numeric, not object")
    if names is None:
        return ArrayDataset(x, y, name=str(path), classes=classes)
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise BadDataError(f"{path}: 'classes' must be a 1-D array of names (strings), got dtype {names.dtype} shape {names.shape}")
    own = [str(n) for n in names.tolist()]
    data = ArrayDataset(x, y, name=str(path), classes=own)
    if len(data.y) and (int(data.y.min()) < 0 or int(data.y.max()) >= len(own)):
        raise BadDataError(f"{path}: labels must index its {len(own)} 'classes', found {int(data.y.min())}..{int(data.y.max())}")
    if classes is None or own == list(classes):
        return data
    lookup = _class_lookup(classes, own, str(path))
    return ArrayDataset(data.x, torch.as_tensor(lookup)[data.y], name=str(path), classes=classes)


def _class_lookup(known: Sequence[str], names: Sequence[str], where: str) -> list[int]:
    """The position in ``known`` of each of ``names``; an unknown name is an error naming it (never a renumbering)."""
    index = {name: i for i, name in enumerate(known)}
    unknown = [n for n in names if n not in index]
    if unknown:
        shown = ", ".join(list(known)[:20]) + (" ..." if len(known) > 20 else "")
        raise BadDataError(f"{where}: class {', '.join(map(repr, unknown[:5]))} is not one of the store's classes ({shown})")
    return [index[n] for n in names]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_crcs(path: Path) -> None:
    """Every chunk of a PNG carries a CRC-32 that Pillow does not check for pixel data (IDAT): an overwritten
    byte there can still inflate, to other pixels. Checked here, so such a file is an error, never other pixels."""
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise BadDataError(f"image {path} is unreadable (a truncated PNG: a chunk header is cut off); restore or re-save it")
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            raise BadDataError(f"image {path} is unreadable (a truncated PNG: a chunk runs past the end); restore or re-save it")
        kind = data[pos + 4:pos + 8]
        if zlib.crc32(data[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            raise BadDataError(f"image {path} is unreadable (PNG chunk {kind.decode('latin-1')!r} at byte {pos} fails its "
                               "CRC-32 check); restore or re-save it")
        if kind == b"IEND":
            return
        pos = end + 4


# PIL modes with one channel; every other mode is read as RGB (an alpha channel is dropped).
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La"}


def read_image(path: str | os.PathLike[str], channels: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file (or ``.npy`` array) as a float (C, H, W) tensor in [0, 1], optionally converted and resized.

    Without ``channels`` the file keeps its own: 1 for grayscale, 3 for colour (alpha dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise BadDataError(f"image {path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise BadDataError(f"image {path} is unreadable ({type(e).__name__})") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "buif":  # strings would parse; complex would drop .imag
            raise BadDataError(f"image {path}: array must hold real numbers, got {getattr(arr, 'dtype', type(arr).__name__)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BadDataError(f"image {path} contains NaN or inf")
        with np.errstate(over="ignore"):
            t = torch.as_tensor(np.asarray(arr, dtype=np.float32))
        if not torch.isfinite(t).all():
            raise BadDataError(f"image {path} has values beyond float32's range (|value| > 3.4e38)")
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or 0 in t.shape:
            raise BadDataError(f"image {path}: array must be (C, H, W) or (H, W) with no empty axis, got {tuple(arr.shape)}")
    else:
        from PIL import Image  # loaded for image files only: a .npy query never needs it

        _check_png_crcs(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    im.load()
                    mode = "L" if im.mode in _GRAY_MODES else "RGB"
                    arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except Exception as e:
            raise BadDataError(f"image {path} is unreadable ({type(e).__name__}: {str(e)[:80]})") from None
        t = torch.as_tensor(arr)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if not torch.isfinite(t).all():
        raise BadDataError(f"image {path} contains NaN or inf")
    if channels is not None and t.shape[0] not in (1, 3):
        raise BadDataError(f"image {path} has {t.shape[0]} channels; the model expects {channels}")
    return preprocess(t, Preprocessing(size=size, channels=channels), f"image {path}").contiguous()


def load_image(
    path: str | os.PathLike[str], preprocessing: Preprocessing, shape: Sequence[int] | None = None, reference: str = "the model's images",
    advice: str | None = None,
) -> torch.Tensor:
    """One image file through ``preprocessing``; a channel count or size other than ``shape`` is an error, not a conversion.

    Conversions happen only when asked for: ``channels`` / ``size`` in ``preprocessing`` (``--channels``, ``--size``).
    ``advice`` replaces the error's "pass --size/--channels" hint where the command has no such flags.
    """
    t = read_image(path)
    if shape is not None and preprocessing.channels is None and t.shape[0] != shape[0]:
        kind = {1: "grayscale (1 channel)", 3: "colour (3 channels)"}.get(int(t.shape[0]), f"{t.shape[0]} channels")
        raise BadDataError(
            f"image {path} is {kind} but {reference} {'have' if reference.endswith('s') else 'has'} {shape[0]}; "
            + (advice or f"pass --channels {shape[0]} to convert it")
        )
    t = preprocess(t, preprocessing, f"image {path}")
    if shape is not None and tuple(t.shape[-2:]) != tuple(shape[-2:]):
        h, w = shape[-2], shape[-1]
        raise BadDataError(
            f"image {path} is {t.shape[-2]}×{t.shape[-1]} but {reference} {'are' if reference.endswith('s') else 'is'} {h}×{w}; "
            + (advice or f"pass --size {h},{w} to resize it")
        )
    return t


class ImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """A folder with one sub-folder of images per class, read lazily through a :class:`Preprocessing`.

    Classes are the sub-folder names, sorted, unless ``classes`` (a store's names, in label order) is given:
    then each sub-folder is labelled by its name's position there, so a folder lacking a class keeps the
    right labels. Every image must match the first one's (or ``shape``'s) channels and size unless the
    preprocessing converts them. ``paths`` holds each example's file path relative to ``root``.
    """

    def __init__(
        self, root: str | os.PathLike[str], channels: int | None = None, size: tuple[int, int] | None = None, *,
        preprocessing: Preprocessing | None = None, classes: Sequence[str] | None = None, shape: Sequence[int] | None = None,
        reference: str = "the model's images", advice: str | None = None,
    ) -> None:
        self.root, self.advice = Path(root), advice
        pre = preprocessing or Preprocessing()
        if channels is not None or size is not None:
            pre = pre.replace(size=size, channels=channels)
        self.preprocessing = pre
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise BadDataError(f"image folder {root} has no class sub-folders")
        self.classes: list[str] = list(folders) if classes is None else [str(c) for c in classes]
        labels = _class_lookup(self.classes, folders, f"image folder {root}")
        self.items = [
            (f, c) for name, c in zip(folders, labels)
            for f in sorted((self.root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
        ]
        self.paths = [f.relative_to(self.root).as_posix() for f, _ in self.items]
        self.shape: tuple[int, ...] | None = tuple(int(v) for v in shape) if shape is not None else None
        self.reference = reference
        if self.shape is None and self.items:
            first = load_image(self.items[0][0], pre)
            self.shape = tuple(first.shape)
            self.reference = f"the first image ({self.paths[0]})"
        self.channels = self.shape[0] if self.shape else (pre.channels or 1)
        self.size = (self.shape[1], self.shape[2]) if self.shape else pre.size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return load_image(path, self.preprocessing, self.shape, self.reference, self.advice), label


def load_recorded_data(
    attrs: dict[str, Any], where: str, *, base: bool = True, code_refusal: str | None = None,
) -> list[SizedDataset]:
    """The data sets a store's rows came from, reloaded from the specs it recorded: the build's (unless ``base`` is
    False) and then each ``influence add``'s, in row order, with the store's preprocessing, class names and shape.

    Each is checked against the content fingerprint recorded with it, so that data changed after it was featurized
    (a re-saved .npz of the same length, a folder whose first, middle or last image was replaced: what
    :func:`influence.data.fingerprint_dataset` hashes) is refused rather than shown beside rows it no longer matches.
    ``code_refusal``, when given, is the error for a spec that imports code (``module:function``); ``where`` names
    the store in messages.
    """
    records = ([{"data_spec": attrs.get("data_spec"), "dataset_fingerprint": attrs.get("dataset_fingerprint")}] if base else [])
    records += list(attrs.get("added") or [])
    pre = Preprocessing.from_attrs(attrs.get("preprocessing"))
    shape = attrs.get("input_shape")
    parts = []
    for rec in records:
        spec = rec.get("data_spec")
        if spec is None:
            raise BadSpecError(f"store {where} holds rows featurized from an in-memory data set; their images cannot be reloaded")
        if code_refusal is not None and data_spec_runs_code(spec):
            raise BadSpecError(code_refusal.replace("{spec}", repr(spec)))
        part = load_data(spec, pre, classes=attrs.get("classes"), shape=shape)
        expected = rec.get("dataset_fingerprint")
        if expected is not None and fingerprint_dataset(part) != expected:
            raise StoreMismatchError(
                f"data {spec} has changed since store {where} featurized it (its content fingerprint differs), so its "
                "rows no longer match these images: restore the data, or build a new store from it")
        parts.append(part)
    return parts


def data_spec_runs_code(spec: object) -> bool:
    """Whether loading a DATA SPEC imports code (``module:function``), rather than reading files or a built-in set."""
    return (isinstance(spec, str) and spec not in BUILTIN_DATA and not spec.endswith(".npz") and ":" in spec
            and not os.path.exists(spec))
