"""The public surface: ``__all__`` of each package equals the documented list, and every name imports."""

from __future__ import annotations

import importlib

import pytest

DOCUMENTED = {
    "influence": [
        "BadCheckpointError", "BadDataError", "BadSpecError", "ClassificationTask", "Influence", "InfluenceError",
        "Influencer", "NonFiniteError", "ProjectorSpec", "QueryResult", "StoreIncompleteError", "StoreLockedError",
        "StoreMismatchError", "Task", "build", "describe_store", "Recipe", "exact_scores",
    ],
    "index": [
        "FeatureStore", "IndexSpec", "SearchIndex", "StoreStatus", "build_index", "load_index", "recall_at_k",
        "save_index",
    ],
}


@pytest.mark.parametrize("package", list(DOCUMENTED))
def test_all_matches_documented_list(package):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(DOCUMENTED[package])
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("package, name", [(p, n) for p, names in DOCUMENTED.items() for n in names])
def test_every_exported_name_imports(package, name):
    namespace: dict = {}
    exec(f"from {package} import {name}", namespace)  # the form users write
    assert namespace[name] is getattr(importlib.import_module(package), name)


def test_public_members_are_not_underscored():
    for package, names in DOCUMENTED.items():
        assert not [n for n in names if n.startswith("_")], package


def test_errors_share_one_hierarchy():
    import influence

    for name in DOCUMENTED["influence"]:
        obj = getattr(influence, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, influence.InfluenceError), name


def test_index_imports_on_its_own_in_a_fresh_interpreter():
    """`index` raises influence's errors; importing it first must not hit a cycle through influence/__init__."""
    import subprocess
    import sys

    for stmt in ("import index", "import index.search", "from index import FeatureStore; import influence; influence.build"):
        subprocess.run([sys.executable, "-c", stmt], check=True, capture_output=True)


def test_build_stays_the_function_after_its_module_is_imported():
    import influence
    from influence.pipeline import build

    assert influence.build is build and callable(influence.build)
