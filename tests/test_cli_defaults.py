"""The CLI's plain copies of choices and defaults (``influence._cli_defaults``) equal the registries and signatures.

The copies let parsing and ``--help`` run without torch; this test keeps the API the single source of each value.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

from influence import _cli_defaults


def _api(path: str):
    module, qualname = path.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _sources() -> dict[str, list[str]]:
    from index.store import FEATURE_DTYPES
    from influence.attribution import METHODS as ATTRIBUTION
    from influence.features.projectors import ProjectorKind
    from influence.flag import KINDS
    from influence.mislabel_rank import RANKINGS
    from influence.repair import ACTIONS, MASK_SCOPES
    from influence.scoring import METHOD_NAMES
    from influence.tfa import TFA_METHODS

    return {"scoring": list(METHOD_NAMES), "attribution": sorted(ATTRIBUTION), "tfa": sorted(TFA_METHODS),
            "flag-kind": list(KINDS), "mislabel-ranking": list(RANKINGS), "projector": [k.value for k in ProjectorKind], "dtype": list(FEATURE_DTYPES),
            "repair-action": list(ACTIONS), "mask-scope": list(MASK_SCOPES)}


def test_choices_are_the_registries():
    sources = _sources()
    assert set(_cli_defaults.CHOICES) == set(sources)
    for family, names in sources.items():
        assert _cli_defaults.choices(family) == names, family


@pytest.mark.parametrize("api", sorted(_cli_defaults.DEFAULTS))
def test_defaults_are_the_signatures(api):
    params = inspect.signature(_api(_cli_defaults.API[api])).parameters
    for name, value in _cli_defaults.DEFAULTS[api].items():
        assert name in params, (api, name)
        assert params[name].default == value and type(params[name].default) is type(value), (api, name, params[name].default, value)


def test_named_constants_are_the_modules():
    from influence.index_check import DEFAULT_KS
    from influence.mislabel_rank import DEFAULT_HELP
    from influence.tfa import DEFAULT_TFA

    assert _cli_defaults.DEFAULT_TFA == DEFAULT_TFA
    assert _cli_defaults.DEFAULT_KS == DEFAULT_KS
    assert _cli_defaults.DEFAULT_MISLABEL_HELP == DEFAULT_HELP
