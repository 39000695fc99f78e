"""The CLI's choices and defaults as plain values, so that parsing arguments (and ``--help``) imports no torch.

Each value is a copy of the one place it is defined: a registry's names or an API function's signature default
(``API`` names the function for each key). ``tests/test_cli_defaults.py`` asserts every copy equals its source,
so a registry or signature that changes fails the suite until this file follows: the single source stays the API.
"""

from __future__ import annotations

from typing import Any

# the registries and constants, by family (the module attribute each copies is in tests/test_cli_defaults.py)
CHOICES: dict[str, tuple[str, ...]] = {
    "scoring": ("tracin", "gradcos", "trak"),  # influence.scoring.METHOD_NAMES
    "attribution": ("gradcam", "input_x_gradient", "integrated_gradients", "saliency", "smoothgrad", "var", "wam"),
    "tfa": ("gradcos", "gradcos_two_step", "occlusion", "two_step"),
    "flag-kind": ("mislabel", "harmful", "shortcut"),
    "mislabel-ranking": ("loss", "combined", "trak", "tracin", "loss-sum", "margin", "loss-margin"),  # influence.mislabel_rank.RANKINGS
    "projector": ("none", "sparse", "gaussian", "rademacher", "factorized"),
    "dtype": ("float16", "float32"),
    "repair-action": ("drop", "relabel"),
    "mask-scope": ("flagged", "class"),
}

DEFAULT_TFA = "two_step"  # influence.tfa.DEFAULT_TFA: what tfa=None means
DEFAULT_MISLABEL_HELP = "loss, the final checkpoint's training loss, the measured best"  # influence.mislabel_rank.DEFAULT_HELP
DEFAULT_KS = (10, 50)  # influence.index_check.DEFAULT_KS: the recalls index-check reports

# "module:qualname" of each API function whose defaults the CLI shows
API: dict[str, str] = {
    "build": "influence.pipeline:build",
    "add": "influence.append:add",
    "run_demo": "influence.demo.run:run_demo",
    "run_repair": "influence.demo.retrain:run_repair",
    "Influence.open": "influence.query:Influence.open",
    "Influence.query": "influence.query:Influence.query",
    "Influence.scores": "influence.query:Influence.scores",
    "explain": "influence.explain:explain",
    "run_flags": "influence.flag:run_flags",
    "run_attribute": "influence.attribution:run_attribute",
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "build": {
        "projector": "sparse", "proj_dim": 2048, "params": "all", "lr_weights": None, "batch_size": 64,
        "methods": ("tracin", "gradcos", "trak"), "index_factory": "Flat", "rerank": 256, "seed": 0, "dtype": "float16",
        "trak_lambda": 1.0, "rows_per_chunk": 1024, "device": "cpu",
    },
    "add": {"device": "cpu"},
    "run_demo": {"out": "runs/demo", "seed": 0, "k": 5},
    "run_repair": {"demo_dir": "runs/demo", "action": "drop", "mislabel_fraction": 0.1, "mask_scope": "class",
                   "method": None, "seed": 0},
    "Influence.open": {"device": "cpu"},
    "Influence.query": {"method": "tracin", "k": 10},
    "Influence.scores": {"method": "tracin"},
    "explain": {"k": 5, "method": "auto", "attribution": "integrated_gradients", "tfa": None},
    "run_flags": {"top": 20, "method": None, "tfa": None},
    "run_attribute": {"method": "integrated_gradients"},
}


def choices(family: str) -> list[str]:
    """The CLI choices of one family (see ``CHOICES``)."""
    return list(CHOICES[family])


def default(api: str, name: str) -> Any:
    """The default of parameter ``name`` of the API function ``api`` (a key of ``API``)."""
    return DEFAULTS[api][name]
