"""The public surface, checked from both sides so it fails when either the package or its documentation drifts.

``PUBLIC`` is the reviewed list of what users may import from each package: changing it is an API change.
The tests compare it with ``__all__``, check every exported name imports and that nothing else leaks into
the package namespace, and check that the names the README's Python section and the package docstrings
use are exported (and, for methods and fields, exist).
"""

from __future__ import annotations

import __future__
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import types
from dataclasses import fields

import pytest

from conftest import REPO

PUBLIC = {
    "influence": [
        "BadCheckpointError", "BadDataError", "BadSpecError", "ClassificationTask", "Influence", "InfluenceError",
        "Influencer", "NonFiniteError", "ProjectorSpec", "QueryResult", "StoreIncompleteError", "StoreLockedError",
        "StoreMismatchError", "Task", "add", "build", "describe_store", "Recipe", "exact_scores",
    ],
    "index": [
        "FeatureStore", "IndexSpec", "SearchIndex", "StoreStatus", "build_index", "load_index", "recall_at_k",
        "save_index",
    ],
    "influence.attribution": [
        "METHODS", "SAMPLERS", "VAR", "WAM", "AttributionMethod", "BlurPathSampler", "ClassShares", "GradCAM",
        "InputXGradient", "IntegratedGradients", "LinearPathSampler", "NoiseSampler", "Saliency", "Sampler",
        "SmoothGrad", "SuppressionSampler", "WaveletScales", "WaveletTransform", "build_method", "get_method",
        "get_sampler", "integrate", "run_attribute", "save_overlay", "summarize",
    ],
}
# Public-looking names in a package namespace that are neither exported nor submodules (none today:
# the lazy loaders import their helpers as ``_importlib``/``_Any``).
KNOWN_LEAKS: dict[str, set[str]] = {}
PROJECT = ("influence", "index")


def _project_modules() -> list[str]:
    """Every importable module of the two packages (the CLI entry point ``__main__`` excluded)."""
    names = []
    for root in PROJECT:
        pkg = importlib.import_module(root)
        names.append(root)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, root + ".") if not m.name.endswith("__main__")]
    return names


@pytest.mark.parametrize("package", list(PUBLIC))
def test_all_is_the_reviewed_list(package):
    exported = importlib.import_module(package).__all__
    assert len(set(exported)) == len(exported), f"duplicates in {package}.__all__"
    assert sorted(exported) == sorted(PUBLIC[package])


@pytest.mark.parametrize("package", list(PUBLIC))
def test_every_exported_name_imports_and_belongs_to_the_project(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        namespace: dict = {}
        exec(f"from {package} import {name}", namespace)  # the form users write
        obj = namespace[name]
        assert obj is getattr(module, name)
        if isinstance(obj, (type, types.FunctionType)):
            assert obj.__module__.split(".")[0] in PROJECT, f"{package}.{name} re-exports {obj.__module__}.{name}"


def test_no_module_exports_an_underscored_or_missing_name():
    checked = 0
    for modname in _project_modules():
        module = importlib.import_module(modname)
        exported = getattr(module, "__all__", None)
        if exported is None:
            continue
        checked += 1
        assert not [n for n in exported if n.startswith("_")], modname
        assert not [n for n in exported if not hasattr(module, n)], modname
    assert checked >= len(PUBLIC)


@pytest.mark.parametrize("package", list(PUBLIC))
def test_implementation_names_do_not_leak(package):
    """Anything public in the namespace is exported or a submodule: helpers of the implementation stay hidden."""
    module = importlib.import_module(package)
    leaks = set()
    for name in dir(module):
        obj = getattr(module, name)
        if name.startswith("_") or name in module.__all__ or isinstance(obj, __future__._Feature):
            continue
        if isinstance(obj, types.ModuleType) and obj.__name__ == f"{package}.{name}":
            continue
        leaks.add(name)
    assert leaks <= KNOWN_LEAKS.get(package, set()), f"{package} leaks {sorted(leaks - KNOWN_LEAKS.get(package, set()))}"


def test_every_error_class_is_exported_and_shares_one_hierarchy():
    import influence
    import influence.errors as errors

    defined = {n for n, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, Exception)
               and obj.__module__ == errors.__name__}
    assert defined and defined <= set(influence.__all__)
    for name in influence.__all__:
        obj = getattr(influence, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, influence.InfluenceError), name


# ----------------------------------------------------------------------------- documentation → package

def _readme_python_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Python\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has a '## Python' section"
    return match.group(1)


def test_readme_python_section_uses_only_exported_names():
    import influence

    section = _readme_python_section()
    top = set(re.findall(r"\binfluence\.([A-Za-z_]\w*)", section))
    assert {"build", "Influence"} <= top, "the section shows build and Influence"
    assert not top - set(influence.__all__), f"README uses unexported influence.{sorted(top - set(influence.__all__))}"

    methods = set(re.findall(r"\bsession\.(\w+)\(", section)) | set(re.findall(r"\bInfluence\.(\w+)\(", section))
    assert {"open", "query", "scores"} <= methods
    for name in methods:
        assert callable(getattr(influence.Influence, name, None)), f"README calls Influence.{name}"

    result_fields = {f.name for f in fields(influence.QueryResult)}
    used = set(re.findall(r"\bresult\.(\w+)", section)) | set(re.findall(r"`([a-z]\w*)`", section))
    assert used and not used - result_fields, f"README names QueryResult fields {sorted(used - result_fields)}"

    keywords = set(re.findall(r"\b(\w+)=", section))
    accepted = {p for fn in (influence.build, influence.Influence.open, influence.Influence.query, influence.Influence.scores,
                                influence.Recipe, influence.exact_scores)
                for p in inspect.signature(fn).parameters}
    assert keywords and not keywords - accepted, f"README passes unknown keywords {sorted(keywords - accepted)}"


def test_package_docstrings_name_only_exported_members():
    """A double-backquoted name in a package docstring that is an attribute of the package must be exported."""
    found = 0
    for package in PUBLIC:
        module = importlib.import_module(package)
        for name in re.findall(r"``([A-Za-z]\w*)``", module.__doc__ or ""):
            if hasattr(module, name) and not isinstance(getattr(module, name), types.ModuleType):
                found += 1
                assert name in module.__all__, f"{package}'s docstring names {name}, which is not exported"
    assert found, "guard: the docstrings name at least one member (influence.attribution names METHODS)"


def test_influence_docstring_data_flow_names_real_modules():
    import influence

    flow = re.search(r"Data flow:(.*?)(?:\n\n|$)", influence.__doc__ or "", flags=re.S)
    assert flow, "influence's docstring describes the data flow"
    steps = re.sub(r"\([^)]*\)", "", flow.group(1))
    names = [s.strip().rstrip(".") for s in re.split(r"→|/", steps) if s.strip().rstrip(".")]
    assert len(names) >= 5
    for name in names:
        importlib.import_module(name if name.startswith("index") else f"influence.{name}")


def test_every_registered_attribution_method_and_sampler_is_exported():
    import influence.attribution as pkg

    for registry in (pkg.METHODS, pkg.SAMPLERS):
        classes = [registry.get(name) for name in registry]
        assert classes and all(cls.__name__ in pkg.__all__ for cls in classes)
    for name in pkg.METHODS:
        assert "target" in inspect.signature(pkg.METHODS.get(name).attribute).parameters  # the documented call


# ----------------------------------------------------------------------------- import behaviour

def test_index_imports_on_its_own_in_a_fresh_interpreter():
    """`index` raises influence's errors; importing it first must not hit a cycle through influence/__init__."""
    for stmt in ("import index", "import index.search", "from index import FeatureStore; import influence; influence.build"):
        subprocess.run([sys.executable, "-c", stmt], check=True, capture_output=True, cwd=REPO)


def test_build_stays_the_function_after_its_module_is_imported():
    import influence
    from influence.pipeline import build

    assert influence.build is build and callable(influence.build)
