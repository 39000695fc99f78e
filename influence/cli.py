"""The command line: parses, calls the same functions a Python user would, formats. It never computes.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr), 1 internal error.
``--json`` prints one JSON document on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from influence import _cli_defaults
from influence.errors import BadSpecError, InfluenceError

if TYPE_CHECKING:  # the commands import what they use when they run: parsing, --help and usage errors load no torch
    import numpy as np
    from torch import nn

    from influence.data import Preprocessing
    from influence.query import Influence, Influencer, QueryResult, TestData


def _choices(family: str) -> list[str]:
    """CLI choices: copies of the registries' names (``influence._cli_defaults``, tested equal to them)."""
    return _cli_defaults.choices(family)


def _default(api: str, name: str) -> Any:
    """The default of API function ``api``'s parameter ``name``: a copy tested equal to its signature's, so the two
    cannot drift apart (``influence._cli_defaults``)."""
    return _cli_defaults.default(api, name)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` stays in charge of exit codes."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"--ids must be comma-separated indexes >= 0, got {text!r}")
    return ids


def _floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


# argparse ``type=`` functions: a bad number is refused while parsing (exit 2, one line), before any work starts.
_Num = TypeVar("_Num", int, float)


def _number(cast: Callable[[str], _Num], ok: Callable[[_Num], bool], expected: str) -> Callable[[str], _Num]:
    """A ``type=`` that parses with ``cast`` and refuses values outside ``ok`` (NaN fails every comparison)."""

    def parse(text: str) -> _Num:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


# sizes and counts (rows, batch, dimension, k, top): 0 or negative would silently mean nothing or crash later
_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
_non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")  # a seed, or a count where 0 means none
# a ridge λ: NaN, infinity or a negative value build a store whose every TRAK answer is meaningless
_non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")  # a share of the training set


def _methods(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    methods = _choices("scoring")
    bad = [n for n in names if n not in methods]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method {bad or text!r}; choose from {', '.join(methods)} (comma-separated)")
    return names


def _class_arg(text: str) -> str:
    """A class as a name or an index; a negative index is refused here, before any work (names are checked later)."""
    try:
        negative = int(text) < 0
    except ValueError:
        negative = False
    if negative or not text.strip():
        raise argparse.ArgumentTypeError(f"must be a class name or an index >= 0, got {text!r}")
    return text


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"--classes must be comma-separated non-empty names, got {text!r}")
    return names


def _preprocessing_args(p: argparse.ArgumentParser, *, build: bool) -> None:
    """--size/--channels everywhere images are read; --mean/--std only at build (queries use the store's)."""
    if build:
        p.add_argument("--mean", type=_floats, default=None, help="per-channel mean M1,M2,M3 subtracted from [0,1] images (recorded)")
        p.add_argument("--std", type=_floats, default=None, help="per-channel std S1,S2,S3 divided by after --mean (recorded)")
        p.add_argument("--size", type=_size, default=None, help="resize every image to H,W (recorded; default: all must share one size)")
        p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                       help="convert every image to 1 (gray) or 3 (RGB) channels (recorded; default: all must match the first)")
    else:
        p.add_argument("--size", type=_size, default=None, help="resize images of another size to H,W (default: the store's preprocessing only)")
        p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert images to 1 or 3 channels (default: the store's)")


def _store_args(p: argparse.ArgumentParser) -> None:
    """How a command that opens a store gets its model: a store is data, so its recorded spec runs only when asked."""
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="the store's model as a MODEL SPEC (default: the recorded spec, which must be built-in unless "
                        "--trust-store); the recorded --model-arg values are reused")
    p.add_argument("--trust-store", action="store_true",
                   help="import the model spec recorded in the store (runs its code: only for stores you trust)")


def _open(args: argparse.Namespace, device: str | None = None) -> Influence:
    """The store named by ``args.store``, opened with the model the user chose (see ``_store_args``)."""
    from influence.query import Influence

    kw: dict[str, Any] = {} if device is None else {"device": device}
    return Influence.open(args.store, model=args.model, trust_store=args.trust_store, **kw)


def _preprocessing(args: argparse.Namespace) -> Preprocessing:
    from influence.data import Preprocessing

    return Preprocessing(mean=None if args.mean is None else tuple(args.mean), std=None if args.std is None else tuple(args.std),
                         size=args.size, channels=args.channels)


def _parser() -> _Parser:
    methods, tfas, rankings = _choices("scoring"), _choices("tfa"), _choices("mislabel-ranking")
    mislabel_choices = list(dict.fromkeys([*rankings, *methods]))  # gradcos parses, and is refused with the reason
    p = _Parser(prog="influence", description="Which training images, and which regions of them, made my model predict this?")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser("demo", help="train the digits demo (label noise + patch shortcut), build, and explain its errors")
    d.add_argument("--out", default=_default("run_demo", "out"), help="output folder (default: %(default)s)")
    d.add_argument("--seed", type=_non_negative_int, default=_default("run_demo", "seed"))
    d.add_argument("--k", type=_positive_int, default=_default("run_demo", "k"), help="influencers to print per misclassified image")
    d.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")

    b = sub.add_parser("build", help="extract per-example gradient features into a store and build its FAISS indexes")
    b.add_argument("--model", required=True, help="built-in name, package.module:factory or file.py:factory")
    b.add_argument("--data", required=True, help="built-in name, image folder, .npz with x and y, or module:function")
    b.add_argument("--checkpoint", action="append", required=True, help="a state dict (.pt or .safetensors); repeat for TracInCP")
    b.add_argument("--out", required=True, help="store folder (re-run the same command to resume; add checkpoints to extend)")
    b.add_argument("--projector", choices=_choices("projector"), default=_default("build", "projector"))
    b.add_argument("--proj-dim", type=_positive_int, default=_default("build", "proj_dim"), help="projected dimension k per checkpoint (default %(default)s)")
    b.add_argument("--params", default=_default("build", "params"), help="all | last:N | comma-separated parameter or module names")
    b.add_argument("--lr-weights", type=_floats, default=_default("build", "lr_weights"), help="learning rate per checkpoint (default 1 each)")
    b.add_argument("--batch-size", type=_positive_int, default=_default("build", "batch_size"))
    b.add_argument("--method", type=_methods, default=list(_default("build", "methods")),
                   help=f"methods to index (default: all of {','.join(methods)})")
    b.add_argument("--index", default=_default("build", "index_factory"), help="FAISS index factory string (default %(default)s: exact)")
    b.add_argument("--rerank", type=_non_negative_int, default=_default("build", "rerank"),
                   help="approximate --index only: shortlist re-ranked exactly from the store (default %(default)s; 0: none)")
    b.add_argument("--seed", type=_non_negative_int, default=_default("build", "seed"), help="projection seed")
    b.add_argument("--dtype", choices=_choices("dtype"), default=_default("build", "dtype"), help="feature storage type")
    b.add_argument("--trak-lambda", type=_non_negative_float, default=_default("build", "trak_lambda"),
                   help="TRAK ridge λ relative to the mean nonzero eigenvalue of ΦᵀΦ, trace/min(N, k) "
                        "(default %(default)s, measured best)")
    b.add_argument("--chunk-rows", type=_positive_int, default=_default("build", "rows_per_chunk"),
                   help="rows per store chunk (rounded to a multiple of the batch size)")
    b.add_argument("--device", default=_default("build", "device"))
    b.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model factory (repeatable; values are Python literals or strings)")
    b.add_argument("--classes", type=_names, default=None,
                   help="class names in the model's output order, comma-separated (default: the folder names, an .npz's "
                        "'classes' array, else 0..K-1)")
    _preprocessing_args(b, build=True)
    b.add_argument("--json", action="store_true", help="print the store summary, with seconds per build stage, as JSON")

    a = sub.add_parser("add", help="append training examples to a store (new ids after the old ones; indexes and TRAK updated)")
    a.add_argument("store")
    a.add_argument("--data", required=True, help="DATA SPEC of the new examples (classes mapped to the store's by name)")
    _store_args(a)
    a.add_argument("--device", default=_default("add", "device"))
    a.add_argument("--json", action="store_true", help="print the store summary, with seconds per stage, as JSON")

    c = sub.add_parser("index-check", help="recall@10/@50 of a store's approximate indexes against exact search")
    c.add_argument("store")
    _store_args(c)
    c.add_argument("--data", default=None,
                   help="DATA SPEC of query images, held-out test data preferably (default: the store's training data)")
    c.add_argument("--queries", type=_positive_int, default=200, help="examples sampled from --data as queries (default %(default)s)")
    c.add_argument("--method", type=_methods, default=None, help="methods to check (default: all the store has)")
    c.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed")
    c.add_argument("--device", default=_default("Influence.open", "device"))
    c.add_argument("--json", action="store_true")

    for name, helptext, api in (("query", "top proponents and opponents of test images", "Influence.query"),
                                ("score", "the full (n_train, n_test) score matrix", "Influence.scores")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("store")
        _store_args(q)
        src = q.add_mutually_exclusive_group(required=(name == "query"))
        src.add_argument("--image", help="an image file (png, jpg, ...) or .npy array")
        src.add_argument("--data", help="DATA SPEC of test examples")
        q.add_argument("--ids", type=_ids, default=None, help="comma-separated example ids in --data (default: all)")
        q.add_argument("--method", choices=methods, default=_default(api, "method"))
        q.add_argument("--target", default=None, help="class to explain: a class name or index, 'label' (true label) or 'predicted' (default)")
        q.add_argument("--label", default=None, help="true class of --image (name or index): opponents then answer what pulled it away")
        q.add_argument("--device", default=_default("Influence.open", "device"))
        _preprocessing_args(q, build=False)
        if name == "query":
            q.add_argument("--k", type=_positive_int, default=_default(api, "k"))
            q.add_argument("--json", action="store_true")
        else:
            q.add_argument("--out", required=True, help="where to write the .npy matrix")

    s = sub.add_parser("self-influence", help="per-training-example mislabel score (self-influence, loss, ...: what `flag` ranks by)")
    s.add_argument("store")
    _store_args(s)
    s.add_argument("--method", choices=mislabel_choices, default=None,
                   help=f"default: the one `influence flag` ranks mislabels by ({_cli_defaults.DEFAULT_MISLABEL_HELP}); "
                        "trak or tracin for self-influence proper")
    s.add_argument("--out", required=True)

    i = sub.add_parser("info", help="what a store holds: model, checkpoints, projector, N, status")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="check every artifact of a store against its recorded digests (exit 2 if any fails)")
    v.add_argument("store")
    v.add_argument("--json", action="store_true")

    e = sub.add_parser("explain", help="prediction, pixel map, influencers with training-image maps and flags; HTML report with --out")
    e.add_argument("store")
    _store_args(e)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="an image file (png, jpg, ...) or .npy array")
    src.add_argument("--data", help="DATA SPEC of test examples")
    e.add_argument("--ids", type=_ids, default=None, help="comma-separated example ids in --data (default: the misclassified ones)")
    e.add_argument("--k", type=_positive_int, default=_default("explain", "k"))
    e.add_argument("--method", choices=["auto", *methods], default=_default("explain", "method"),
                   help="auto (default): proponents and opponents by TracIn, plus the Grad-Cos proponents (finds shortcuts)")
    e.add_argument("--target", default=None, help="class to explain: a class name or index, 'label' or 'predicted' (default)")
    e.add_argument("--label", default=None, help="true class of --image (name or index)")
    _preprocessing_args(e, build=False)
    e.add_argument("--attribution", default=_default("explain", "attribution"),
                   help="pixel attribution method (see `influence attribute --help`; default %(default)s)")
    e.add_argument("--tfa", default=_default("explain", "tfa"), choices=tfas, help=f"map on training images (default {_cli_defaults.DEFAULT_TFA}, the measured best)")
    e.add_argument("--out", default=None, help="folder for an HTML report with PNG figures")
    e.add_argument("--flags", default=None, help="`influence flag --json` output: the report's summary shows its mislabels and shortcuts")
    e.add_argument("--exact", action="store_true",
                   help="proponents and opponents from exact mode: replay --recipe's training (about 3-4 training runs; slow)")
    e.add_argument("--recipe", default=None, help="RECIPE.json saved beside the checkpoints by Recipe.train (needed by --exact)")
    e.add_argument("--json", action="store_true")

    f = sub.add_parser("flag", help="likely mislabels, net-harmful training examples and patch shortcuts")
    f.add_argument("store")
    _store_args(f)
    f.add_argument("--test", default=None, help="DATA SPEC of test images (their failures drive harmful and shortcut)")
    f.add_argument("--kind", choices=[*_choices("flag-kind"), "all"], default="all")
    f.add_argument("--top", type=_positive_int, default=_default("run_flags", "top"))
    f.add_argument("--method", choices=mislabel_choices, default=_default("run_flags", "method"),
                   help=f"override the measured defaults: {_cli_defaults.DEFAULT_MISLABEL_HELP} for mislabel, tracin for "
                        f"harmful, gradcos for shortcut; {', '.join(r for r in rankings if r not in methods)} rank mislabels only")
    f.add_argument("--tfa", default=_default("run_flags", "tfa"), choices=tfas, help=f"map on training images for shortcut search (default {_cli_defaults.DEFAULT_TFA})")
    _preprocessing_args(f, build=False)
    f.add_argument("--json", action="store_true")

    r = sub.add_parser("repair", help="act on flags: cleaned data for your training (STORE --flags F --out DIR), or the demo's retrain loop")
    r.add_argument("store", nargs="?", default=None, help="a store: write cleaned training data for it (omit for the demo loop)")
    _store_args(r)
    r.add_argument("--flags", default=None, help="with STORE: `influence flag --json` output to act on")
    r.add_argument("--out", default=None, help=f"with STORE: output folder; without: a finished `influence demo` folder (default {_default('run_repair', 'demo_dir')})")
    r.add_argument("--action", choices=_choices("repair-action"), default=_default("run_repair", "action"), help="what to do with flagged mislabels")
    r.add_argument("--fraction", type=_fraction, default=_default("run_repair", "mislabel_fraction"),
                   help="share of training examples flagged as mislabels (default %(default)s)")
    r.add_argument("--mask-scope", choices=_choices("mask-scope"), default=_default("run_repair", "mask_scope"),
                   help="mask the shortcut box on the flagged images only, or on every image of its class (default %(default)s)")
    r.add_argument("--method", choices=mislabel_choices, default=_default("run_repair", "method"),
                   help=f"ranking used to flag mislabels (default: as `influence flag`, {_cli_defaults.DEFAULT_MISLABEL_HELP})")
    r.add_argument("--seed", type=_non_negative_int, default=_default("run_repair", "seed"))
    r.add_argument("--json", action="store_true")

    a = sub.add_parser(
        "attribute", help="pixel attribution map on one image",
        description="A pixel attribution map of one image. With --store, the model, its final checkpoint, the "
                    "preprocessing and the class names come from a store (as `query --image` reads it); without, give "
                    "--model and --checkpoint, and --mean/--std/--size/--channels as your training transforms.")
    a.add_argument("--store", default=None, metavar="STORE",
                   help="take the model, final checkpoint, preprocessing and class names from this store")
    a.add_argument("--model", default=None, metavar="SPEC",
                   help="MODEL SPEC (required without --store; with it, the store's model as a spec you trust)")
    a.add_argument("--trust-store", action="store_true",
                   help="with --store: import the model spec recorded in the store (runs its code)")
    a.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the model factory (repeatable; without --store)")
    a.add_argument("--checkpoint", default=None, help="state dict to load (required without --store; default with it: the store's final checkpoint)")
    a.add_argument("--image", required=True)
    a.add_argument("--method", default=_default("run_attribute", "method"),
                   help=f"{' | '.join(_choices('attribution'))}, or var:BASE (default %(default)s)")
    a.add_argument("--target", type=_class_arg, default=None, help="class to explain: a class name or index (default: the predicted class)")
    a.add_argument("--mean", type=_floats, default=None, help="per-channel mean M1,M2,M3 subtracted from [0,1] images (without --store)")
    a.add_argument("--std", type=_floats, default=None, help="per-channel std S1,S2,S3 divided by after --mean (without --store)")
    a.add_argument("--size", type=_size, default=None, help="resize the image to H,W (default: keep its size, or the store's)")
    a.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="convert the image to 1 or 3 channels (default: the model's first convolution's, or the store's)")
    a.add_argument("--classes", type=_names, default=None,
                   help="class names in the model's output order, for --target and the output (without --store)")
    a.add_argument("--out", required=True, help="PNG overlay to write (a .npy of the raw map is written beside it)")
    a.add_argument("--json", action="store_true")
    return p


# ----------------------------------------------------------------------------- commands

def _emit(doc: Any, as_json: bool, text: str) -> None:
    print(json.dumps(doc, indent=1) if as_json else text)


def _cmd_demo(args: argparse.Namespace) -> int:
    from influence.demo.run import run_demo

    summary = run_demo(args.out, seed=args.seed, k=args.k, log=sys.stderr, listing=sys.stderr if args.json else sys.stdout,
                       progress=not args.json)
    if args.json:
        print(json.dumps(summary))
    return 0


def _process_seconds() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): the start-up before a command runs."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _cmd_build(args: argparse.Namespace) -> int:
    from index.lock import writer_lock  # stdlib only: a second writer is refused before torch or zarr load

    startup = _process_seconds()
    t0 = time.perf_counter()
    sharded = os.environ.get("WORLD_SIZE", "1") not in ("", "1")  # under torchrun: this process is one rank
    # taken before the model and data load, so a second writer is refused at once (a sharded build's rank 0 takes it)
    with writer_lock(args.out) if not sharded else contextlib.nullcontext():
        from influence.distributed import ShardPlan
        from influence.loading import parse_model_args
        from influence.pipeline import StageTimer, build
        from influence.query import describe_store

        plan = ShardPlan.from_env()
        timer = StageTimer()
        timer.seconds["library_import"] = time.perf_counter() - t0  # torch, zarr and the pipeline, loaded after the lock
        path = build(args.model, args.data, args.checkpoint, args.out, projector=args.projector, proj_dim=args.proj_dim,
                     params=args.params, lr_weights=args.lr_weights, batch_size=args.batch_size, methods=args.method,
                     index_factory=args.index, seed=args.seed, dtype=args.dtype, rows_per_chunk=args.chunk_rows,
                     trak_lambda=args.trak_lambda, device=args.device, progress=not args.json,
                     preprocessing=_preprocessing(args), classes=args.classes, model_args=parse_model_args(args.model_arg),
                     rerank=args.rerank, timer=timer, shard=plan)
    if not plan.is_root:
        return 0  # rank 0 finishes the store and reports it
    stages = ({"startup": startup} if startup is not None else {}) | timer.seconds
    info = describe_store(path) | {"seconds": round(time.perf_counter() - t0, 2),
                                   "stages": {k: round(v, 3) for k, v in stages.items()}}
    classes = info["classes"] or []
    _emit(info, args.json, f"store {info['path']}: {info['n']} examples × {len(info['checkpoints'])} checkpoints, "
                           f"k={info['k']}, {len(classes)} classes ({', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}), "
                           f"status {info['status']} ({info['seconds']} s)\n"
                           f"stages (s): {', '.join(f'{k} {v:.2f}' for k, v in info['stages'].items())}")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    from index.lock import writer_lock  # stdlib only: a second writer is refused before torch or zarr load

    t0 = time.perf_counter()
    if not (Path(args.store) / "zarr.json").is_file():
        raise BadSpecError(f"{args.store} is not an influence store; build one with `influence build`")
    with writer_lock(args.store):  # taken before the model and data load: a second writer is refused at once
        from influence.append import add
        from influence.pipeline import StageTimer
        from influence.query import describe_store

        timer = StageTimer()
        path = add(args.store, args.data, model=args.model, trust_store=args.trust_store, device=args.device,
                   progress=not args.json, timer=timer)
    info = describe_store(path) | {"seconds": round(time.perf_counter() - t0, 2),
                                   "stages": {k: round(v, 3) for k, v in timer.seconds.items()}}
    added = (info.get("added") or [{}])[-1].get("n")
    _emit(info, args.json, f"store {info['path']}: {added} examples added, {info['n']} in all × "
                           f"{len(info['checkpoints'])} checkpoints, status {info['status']} ({info['seconds']} s)")
    return 0


def _cmd_index_check(args: argparse.Namespace) -> int:
    from influence.index_check import check_indexes
    from influence.loading import data_spec_runs_code

    session = _open(args, args.device)
    spec = args.data if args.data is not None else session.store.attrs.get("data_spec")
    if spec is None:
        raise BadSpecError(f"store {args.store} records no data spec (built from in-memory data); pass --data")
    if args.data is None and data_spec_runs_code(spec) and not args.trust_store:
        raise BadSpecError(f"store {args.store} records data spec {spec!r}, which is code and is not imported unless you "
                           f"ask: pass --data SPEC, or --trust-store if you trust this store")
    results = check_indexes(session, session.test_data(spec), queries=args.queries, methods=args.method, seed=args.seed)
    doc = {"store": str(args.store), "data": str(spec), "ks": list(_cli_defaults.DEFAULT_KS), "indexes": [r.to_json() for r in results]}
    text = "\n".join(r.line() for r in results) or "every index of this store is exact (Flat): nothing to check"
    _emit(doc, args.json, text)
    return 0


def _queries(args: argparse.Namespace, session: Influence) -> TestData:
    """--image (with an optional --label) or --data/--ids, read with the store's preprocessing and class names."""
    import torch

    from influence.loading import load_image
    from influence.query import TestData

    if args.image:
        pre = session.preprocessing.replace(size=args.size, channels=args.channels)
        x = load_image(args.image, pre, session.input_shape)[None]
        label = getattr(args, "label", None)
        y = torch.tensor([session.class_index(label, "--label")] if label is not None else [], dtype=torch.long)
        return TestData(x, y, [], [args.image])
    if getattr(args, "label", None) is not None:
        raise BadSpecError("--label is for --image; with --data the labels come from the data")
    return session.test_data(args.data, args.ids, size=args.size, channels=args.channels)


def _labels(data: TestData) -> list[int] | None:
    return data.y.tolist() if len(data.y) == len(data.x) else None


def _targets(arg: str | None, labels: list[int] | None, n: int, session: Influence) -> list[int] | None:
    if arg in (None, "predicted"):
        return None
    if arg == "label":
        if labels is None:
            raise BadSpecError("--target label needs labels: --data with labels, or --label for an --image")
        return labels
    return [session.class_index(arg, "--target")] * n


def _who(p: Influencer) -> str:
    """One influencer for the terminal: id, class name, file path where known, score."""
    where = f" {p.path}" if p.path else ""
    return f"#{p.train_id} y={p.label_name}{where} {p.score:+.3g}"


def _head(r: QueryResult, fallback: str) -> str:
    head = f"test {r.test_id}" if r.test_id is not None else fallback
    return head + (f" ({r.test_path})" if r.test_path and r.test_id is not None else "")


def _cmd_query(args: argparse.Namespace) -> int:
    session = _open(args, args.device)
    data = _queries(args, session)
    labels = _labels(data)
    ids = data.ids or None
    results = session.query(data.x, _targets(args.target, labels, len(data.x), session), k=args.k, method=args.method,
                            labels=labels, test_ids=ids, test_paths=data.paths)
    if args.json:
        print(json.dumps({"method": args.method, "results": [r.to_json() for r in results]}))
        return 0
    for r in results:
        head = _head(r, Path(args.image).name if args.image else "image")
        true = f", true {r.label_name}" if r.label_name is not None else ""
        print(f"{head}: predicted {r.predicted_name}{true}; explaining class {r.target_name} (p={r.probability:.3f}) by {r.method}, search {r.search_ms:.2f} ms")
        print("  proponents: " + ", ".join(_who(p) for p in r.proponents))
        print(f"  opponents of {r.opponents_target_name}: " + ", ".join(_who(p) for p in r.opponents))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    session = _open(args, args.device)
    if not args.image and not args.data:
        raise InfluenceError("give --data SPEC (with optional --ids) or --image FILE")
    data = _queries(args, session)
    scores = session.scores(data.x, _targets(args.target, _labels(data), len(data.x), session), method=args.method)
    _save_npy(args.out, scores)
    print(f"wrote {args.out}: scores of shape {scores.shape} ({args.method})", file=sys.stderr)
    return 0


def _cmd_self_influence(args: argparse.Namespace) -> int:
    from influence.flag import mislabel_method
    from influence.mislabel_rank import mislabel_scores

    session = _open(args)
    method = args.method or mislabel_method(session)  # the mislabel ranking's default, as in `flag`
    values = mislabel_scores(session, method, progress=True)
    _save_npy(args.out, values)
    print(f"wrote {args.out}: mislabel score of {len(values)} training examples ({method})", file=sys.stderr)
    return 0


def _save_npy(path: str, value: np.ndarray) -> None:
    """Write atomically so an interrupted run never leaves a truncated array under the final name."""
    import numpy as np

    from index.atomic import atomic_write

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as f:
        np.save(f, value)


def _cmd_info(args: argparse.Namespace) -> int:
    from influence.query import describe_store

    info = describe_store(args.store)
    lines = [f"{k}: {json.dumps(v)}" for k, v in info.items()]
    _emit(info, args.json, "\n".join(lines))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from index.verify import verify_store

    verdicts = verify_store(args.store)
    failed = [v for v in verdicts if not v.ok]
    if args.json:
        print(json.dumps({"store": args.store, "ok": not failed, "verdicts": [v.__dict__ for v in verdicts]}))
    else:
        print("\n".join(v.line() for v in verdicts))
    if failed:
        print(f"error: store {args.store} fails verification ({len(failed)} of {len(verdicts)} artifacts, first: "
              f"{failed[0].artifact}); rebuild it with the same `influence build` command and a new --out", file=sys.stderr)
        return 2
    return 0


def _cmd_attribute(args: argparse.Namespace) -> int:
    import torch

    from influence.attribution import run_attribute
    from influence.attribution._render import save_overlay
    from influence.data import Preprocessing, preprocess
    from influence.loading import load_checkpoint, load_image, load_model, parse_model_args, read_image
    from influence.query import class_index, class_name

    if args.store:
        given = [f for f, v in (("--mean", args.mean), ("--std", args.std), ("--classes", args.classes), ("--model-arg", args.model_arg)) if v]
        if given:
            raise BadSpecError(f"{' and '.join(given)} come from the store with --store ({args.store}); drop them")
        session = _open(args)
        model = session.model_at(-1)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        names: list[str] | None = session.class_names
        pre = session.preprocessing.replace(size=args.size, channels=args.channels)
        x = load_image(args.image, pre, session.input_shape, reference=f"store {args.store}'s images")
    else:
        missing = [f for f, v in (("--model", args.model), ("--checkpoint", args.checkpoint)) if not v]
        if missing:
            raise BadSpecError(f"attribute needs {' and '.join(missing)} (or --store STORE to take them from a store)")
        if args.trust_store:
            raise BadSpecError("--trust-store is for --store; without it the model is the --model you give")
        model = load_checkpoint(load_model(args.model, parse_model_args(args.model_arg)), args.checkpoint)
        names = args.classes
        pre = _preprocessing(args)
        if pre.channels is None:  # as the model's first convolution takes them
            pre = pre.replace(channels=_input_channels(model))
        x = load_image(args.image, pre)
    shown = preprocess(read_image(args.image), Preprocessing(size=pre.size, channels=pre.channels), f"image {args.image}")  # unnormalised
    try:
        with torch.no_grad():
            model(x[None])
    except RuntimeError as e:
        raise InfluenceError(
            f"the model cannot take image {args.image} of shape {tuple(x.shape)} ({str(e).splitlines()[0][:90]}); "
            "pass --size H,W to resize it to the model's input size"
        ) from None
    target = None if args.target is None else class_index(args.target, names)
    attribution, info = run_attribute(model, x, method=args.method, target=target)
    if names is not None:
        info = {**info, "target_name": class_name(info["target"], names), "predicted_name": class_name(info["predicted"], names)}
    said = {k: info.get(f"{k}_name", info.get(k)) for k in ("target", "predicted")}
    save_overlay(shown, attribution, args.out, title=f"{args.method} for {said['target']}")
    raw = str(Path(args.out).with_suffix(".npy"))
    _save_npy(raw, attribution.detach().cpu().numpy())
    doc = {"method": args.method, **info, "png": args.out, "npy": raw}
    _emit(doc, args.json, f"wrote {args.out} and {raw}: {args.method}, target {said['target']} (p={info['probability']:.3f}), "
                          f"predicted {said['predicted']}")
    return 0


def _input_channels(model: nn.Module) -> int | None:
    """Input channels from the first Conv2d (None: keep the image's own)."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be H,W (e.g. 16,16), got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--size must be two whole numbers >= 1, got {text!r}")
    return h, w


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from influence.explain import explain
    from influence.recipe import Recipe

    if args.exact and not args.recipe:
        raise BadSpecError("--exact needs --recipe RECIPE.json (the recipe.json that Recipe.train saved beside the checkpoints)")
    if args.recipe and not args.exact:
        raise BadSpecError(f"--recipe {args.recipe} is used only with --exact; add --exact or drop --recipe")
    recipe = Recipe.load(args.recipe) if args.exact else None
    session = _open(args)
    data = _queries(args, session)
    x, labels, ids, paths = data.x, _labels(data), data.ids or None, data.paths
    if args.data and args.ids is None and labels is not None and ids is not None:  # default: the failures
        wrong = (session.predict(x).argmax(-1).cpu() != torch.as_tensor(labels)).nonzero().flatten().tolist()
        if not wrong:
            raise InfluenceError(f"no misclassified examples in {args.data}; pass --ids to explain correct ones")
        x, labels, ids = x[wrong], [labels[i] for i in wrong], [ids[i] for i in wrong]
        paths = None if paths is None else [paths[i] for i in wrong]
    flags = _read_flags(args.flags, session) if args.flags else None
    found = explain(session, x, targets=_targets(args.target, labels, len(x), session), labels=labels, test_ids=ids, k=args.k,
                    method=args.method, attribution=args.attribution, tfa=args.tfa, progress=not args.json,
                    exact_recipe=recipe)
    if paths is not None:  # explain() queries without paths; the results are ours to annotate
        for e, path in zip(found, paths):
            e.result.test_path = path
    report = None
    if args.out:
        shortcut_images = {j: session.training_examples(sc["train_ids"][:8])[0] for j, sc in enumerate((flags or {}).get("shortcuts", []))}
        mis = [int(f["train_id"]) for f in (flags or {}).get("mislabel", [])][:8]
        mislabel_images = dict(zip(mis, session.training_examples(mis)[0])) if mis else {}
        from influence.report import write_report  # matplotlib: loaded only when a report is asked for

        report = str(write_report(args.out, found, flags=flags, shortcut_images=shortcut_images, mislabel_images=mislabel_images,
                                  preprocessing=session.preprocessing))
    if args.json:
        print(json.dumps({"method": args.method, "report": report, "explanations": [e.to_json() for e in found]}))
        return 0
    for e in found:
        r = e.result
        true = f", true {r.label_name}" if r.label_name is not None else ""
        how = "; influencers exact (replayed training)" if r.exact else ""
        print(f"{_head(r, args.image or 'image')}: predicted {r.predicted_name}{true}; explaining class {r.target_name} (p={r.probability:.3f}){how}")
        sim = ("~", e.similar) if e.similar_method else ("~", [])
        for side, items in (("+", r.proponents), ("-", r.opponents), sim):
            for p in items:
                tag = f"  [{', '.join(e.flags[p.train_id])}]" if p.train_id in e.flags else ""
                print(f"  {side} {_who(p)}{tag}")
    if report:
        print(f"report: {report}", file=sys.stderr)
    return 0


def _cmd_flag(args: argparse.Namespace) -> int:
    from influence.flag import name_flags, run_flags

    session = _open(args)
    test = None
    if args.test:
        data = session.test_data(args.test, size=args.size, channels=args.channels)
        test = (data.x, data.y)
    kinds = _choices("flag-kind") if args.kind == "all" else [args.kind]
    if test is None and args.kind == "all":
        kinds = ["mislabel"]
        print("flag: running the mislabel check only; harmful and shortcut need test images: pass --test SPEC", file=sys.stderr)
    doc = name_flags(session, run_flags(session, test, kinds=kinds, top=args.top, method=args.method, tfa=args.tfa,
                                        progress=not args.json))
    if args.json:
        print(json.dumps(doc))
        return 0
    for kind in ("mislabel", "harmful"):
        if kind in doc:
            print(f"{kind}: " + (", ".join(_flag_text(f) for f in doc[kind][:args.top]) or "none"))
    if "shortcuts" in doc:
        if not doc["shortcuts"]:
            print("shortcuts: none found")
        for s in doc["shortcuts"]:
            print(f"shortcut: class {s['class_name']}, box {s['box']} (x0, y0, x1, y1), {len(s['train_ids'])} training images, score {s['score']:.3g}")
    return 0


def _flag_text(f: dict[str, Any]) -> str:
    """One named flag as `flag` prints it: "#id (y=label path, score; model: suggested p)"."""
    where = f" {f['path']}" if f["path"] else ""
    suggested = f"; model: {f['suggested_label_name']} {f['suggested_prob']:.2f}" if f.get("suggested_label_name") else ""
    return f"#{f['train_id']} (y={f['label_name']}{where}, {f['score']:.3g}{suggested})"


def _read_flags(path: str, session: Influence) -> dict[str, Any]:
    """An `influence flag --json` file, with names and paths added where it lacks them."""
    from influence.flag import name_flags

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadSpecError(f"cannot read flags {path!r} ({e}); write them with `influence flag STORE --json > flags.json`") from None
    if not isinstance(doc, dict):
        raise BadSpecError(f"flags {path!r} hold a {type(doc).__name__}, not the JSON object `influence flag --json` writes")
    return name_flags(session, doc)


def _cmd_repair(args: argparse.Namespace) -> int:
    if args.store is not None:  # the user's own store: write cleaned data and a recipe, retrain nothing
        from influence.repair import repair_store

        if not args.flags or not args.out:
            raise BadSpecError("repair STORE needs --flags FLAGS.json (from `influence flag STORE --json`) and --out DIR")
        session = _open(args)
        done = repair_store(session, _read_flags(args.flags, session), args.out, action=args.action, mask_scope=args.mask_scope)
        if args.json:
            print(json.dumps(done))
        else:
            print(done.pop("recipe"))
        return 0
    if args.flags:
        raise BadSpecError("--flags is for `repair STORE`; the demo loop (no STORE) reads the demo folder's flags.json")
    from influence.demo.retrain import run_repair

    report = run_repair(args.out or _default("run_repair", "demo_dir"), mislabel_fraction=args.fraction, action=args.action, seed=args.seed,
                        mask_scope=args.mask_scope, method=args.method, log=sys.stderr, progress=not args.json)
    if args.json:
        print(json.dumps(report))
    return 0


COMMANDS = {
    "demo": _cmd_demo, "build": _cmd_build, "query": _cmd_query, "score": _cmd_score,
    "self-influence": _cmd_self_influence, "info": _cmd_info, "verify": _cmd_verify, "attribute": _cmd_attribute,
    "explain": _cmd_explain, "flag": _cmd_flag, "repair": _cmd_repair,
    "index-check": _cmd_index_check, "add": _cmd_add,
}


# A full disk or a file-size limit is the user's to fix, not a bug: every writer is atomic or resumable, so the same
# command re-run afterwards finishes the job.
_FULL = {errno.ENOSPC: ("no space left on device", "free some space"),
         errno.EFBIG: ("file too large for the file-size limit", "raise the file-size limit (ulimit -f)")}


def _full_message(e: OSError, args: argparse.Namespace | None) -> str:
    """One line: what was being written (the file when the OS names it, else the command's output), why, what to do."""
    reason, fix = _FULL[e.errno or errno.ENOSPC]
    path = e.filename or (getattr(args, "out", None) or getattr(args, "store", None) if args is not None else None)
    where = f" writing {path}" if path else ""
    return f"{reason}{where} ({e.strerror or e}): {fix}, then re-run the same command"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    args: argparse.Namespace | None = None
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InfluenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _FULL:
            raise
        print(f"error: {_full_message(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
