"""A session keeps no hidden state, every scoring method keeps one contract, and a store's specs are checked on reuse."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import zarr

import influence
from conftest import BATCH, CHUNK, CNN_SPEC, PROJ_DIM
from influence.cli import main
from influence.errors import BadSpecError, StoreMismatchError
from influence.explain import explain
from influence.features import ClassificationTask, TrakSpec
from influence.flag import HarmfulFlag, MislabelFlag, flag_harmful, flag_mislabels, flag_shortcuts, run_flags
from influence.scoring import METHOD_NAMES, METHODS, get_method
from influence.tfa import get_tfa

# ----------------------------------------------------------------------------- no hidden state


def _run_ops(session: influence.Influence, digits, order: list[str], seen: list) -> dict[str, object]:
    """Run the session's entry points in ``order``; each returns plain values to compare.

    ``seen`` collects what flag_shortcuts hands its detector (the TFA maps, images and ids).
    """
    x, y = digits.x_test[:4], digits.y_test[:4]
    held = session.model_at(-1)  # taken first, used last by "tfa": must not change whatever runs in between
    tx, ty = session.training_examples([0, 1])

    def query():
        return [{k: v for k, v in r.to_json().items() if k != "search_ms"} for r in session.query(x, k=3, labels=y.tolist())]

    def explain_one():
        [e] = explain(session, x[:1], labels=y[:1].tolist(), k=2)
        doc = {k: v for k, v in e.to_json().items() if k != "search_ms"}
        return doc, e.pixel_map, {i: m for i, m in e.tfa_maps.items()}

    def other_checkpoint():
        model = session.model_at(0)
        with torch.no_grad():  # a caller modifying the model it was handed
            for p in model.parameters():
                p.add_(1.0)
        return None

    def shortcuts():
        seen.clear()
        found = [s.to_json() for s in flag_shortcuts(session, digits.x_test, k=3, max_queries_per_class=2, min_queries=1)]
        assert seen and seen[0][0].abs().sum() > 0  # TFA maps reached the detector (on these images it finds none)
        return found, list(seen)

    ops = {
        "query": query,
        "explain": explain_one,
        "shortcuts": shortcuts,
        "scores": lambda: session.scores(x, y, method="trak"),
        "self": lambda: session.self_influence("tracin"),
        "tfa": lambda: get_tfa("gradcos")(held).attribute(tx, target=ty, query=(x[0], int(y[0]))),
        "predict": lambda: session.predict(x),
        "other_checkpoint": other_checkpoint,
    }
    return {name: ops[name]() for name in order}


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def test_any_order_of_calls_gives_the_same_answers(store, digits, monkeypatch):
    import influence.shortcut

    seen: list = []
    real = influence.shortcut.detect_shortcuts

    def recording(maps, images, ids, labels, **kw):
        seen.append((maps.clone(), images.clone(), list(ids)))
        return real(maps, images, ids, labels, **kw)

    monkeypatch.setattr(influence.shortcut, "detect_shortcuts", recording)
    names = ["query", "explain", "shortcuts", "scores", "self", "tfa", "predict", "other_checkpoint"]
    orders = [names, names[::-1]] + [random.Random(seed).sample(names, len(names)) for seed in range(2)]
    runs = [_run_ops(influence.Influence.open(store, trust_store=True), digits, order, seen) for order in orders]
    for order, run in zip(orders[1:], runs[1:]):
        for name in names:
            _assert_same(runs[0][name], run[name], f"{name} (order {order})")
    # a same-session repeat after everything else agrees too
    session = influence.Influence.open(store, trust_store=True)
    _run_ops(session, digits, names, seen)
    _assert_same(runs[0], _run_ops(session, digits, names[::-1], seen), "repeat")


def test_checkpoints_are_read_only_parameter_dicts(session):
    assert [c.id for c in session.checkpoints] == session.store.checkpoint_ids
    with pytest.raises(TypeError):
        session.checkpoints[0].state["features.0.weight"] = torch.zeros(1)  # type: ignore[index]
    a, b = session.model_at(-1), session.model_at(-1)
    assert a is not b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(session.model_at(0).parameters(), a.parameters()))


def test_session_methods_replace_store_layout_reaches(session, digits):
    assert np.array_equal(session.training_labels(), digits.y.numpy())
    with torch.no_grad():
        p_final = torch.softmax(session.model_at(-1)(digits.x), -1).gather(1, digits.y[:, None])[:, 0].numpy()
    np.testing.assert_allclose(session.label_probability(), p_final, rtol=1e-5, atol=1e-6)
    assert session.n_train == len(digits.y) and set(session.methods) == set(METHOD_NAMES)


# ----------------------------------------------------------------------------- one contract for every method


def test_registry_is_the_one_list_of_methods():
    assert METHOD_NAMES == tuple(METHODS.names()) == ("tracin", "gradcos", "trak")
    with pytest.raises(BadSpecError, match="choose one of: tracin, gradcos, trak"):
        get_method("nope")


def _files(root) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_keeps_the_scoring_contract(name, copy_store, digits):
    """prepare → train vectors → query vectors → self-influence (or its documented refusal).

    The check between the two sides: scoring a training image as a query, with its own label, gives its
    self-influence (up to the float16 storage of the training rows).
    """
    path = copy_store()
    session = influence.Influence.open(path, trust_store=True)
    method = get_method(name)
    before = _files(path)
    method.prepare(session.store, TrakSpec())  # already prepared by the build: nothing to redo
    assert _files(path) == before
    scorer = session.scorer(name)
    v = scorer.train_vectors(0, CHUNK)
    assert v.shape == (CHUNK, scorer.dim) and v.dtype == np.float32 and np.isfinite(v).all()
    assert np.array_equal(scorer.train_rows(np.arange(3, 7)), scorer.train_vectors(0, CHUNK)[3:7])
    ids = [0, 5, 77, 150]
    q = session.query_vectors(digits.x[ids], digits.y[ids], name)
    assert q.shape == (len(ids), scorer.dim) and q.dtype == np.float32
    if name == "gradcos":
        with pytest.raises(BadSpecError, match="self-influence under gradcos is 1"):
            session.self_influence(name)
        return
    s = session.self_influence(name)
    assert s.shape == (session.n_train,) and (s > 0).all()
    own = (scorer.train_rows(np.asarray(ids)) * q).sum(1)
    np.testing.assert_allclose(own, s[ids], rtol=2e-2)


# ----------------------------------------------------------------------------- specs on reuse


def _build(out, ckpts, **kw):
    args = dict(proj_dim=PROJ_DIM, lr_weights=ckpts.lrs, batch_size=BATCH, rows_per_chunk=CHUNK, progress=False)
    return influence.build(CNN_SPEC, str(kw.pop("data")), ckpts.paths, out, **(args | kw))


@pytest.mark.parametrize("flag, value, needle", [("--lr-weights", "0.05,0.03,0.02", "lr_weights=[0.05, 0.03, 0.01]"),
                                                 ("--batch-size", "16", "batch_size=32"),
                                                 ("--dtype", "float32", 'dtype="float16"')])
def test_a_rerun_with_other_build_arguments_is_refused(flag, value, needle, copy_store, digits, cnn_ckpts, capsys):
    store = copy_store()
    before = (store / "zarr.json").read_bytes()
    args = ["build", "--model", CNN_SPEC, "--data", str(digits.train_npz), "--out", str(store), "--proj-dim", str(PROJ_DIM),
            "--chunk-rows", str(CHUNK)]
    for c in cnn_ckpts.paths:
        args += ["--checkpoint", str(c)]
    base = {"--lr-weights": ",".join(map(str, cnn_ckpts.lrs)), "--batch-size": str(BATCH)} | {flag: value}
    for k, v in base.items():
        args += [k, v]
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert "was built with" in lines[0] and needle in lines[0] and flag in lines[0] and "new --out" in lines[0], lines[0]
    assert (store / "zarr.json").read_bytes() == before  # refused before anything was written
    assert influence.Influence.open(store, trust_store=True).checkpoint_count == 3


class DoubledTask(ClassificationTask):
    """Cross-entropy of doubled logits... simplified: the loss weight of classification, doubled."""

    name = "doubled"

    def loss_weight(self, logits, y):
        return 2.0 * super().loss_weight(logits, y)


def test_custom_task_is_stored_by_import_path_and_must_be_passed(digits, cnn_ckpts, tmp_path, session):
    out = tmp_path / "custom"
    _build(out, cnn_ckpts, data=digits.train_npz, task=DoubledTask(), methods=["tracin"])
    stored = zarr.open_group(str(out), mode="r").attrs["task"]
    assert stored.endswith(":DoubledTask") and stored != "classification"
    with pytest.raises(BadSpecError, match=f"custom task {stored}.*task=DoubledTask()"):
        influence.Influence.open(out, trust_store=True)
    with pytest.raises(StoreMismatchError, match="does not match the store's task"):
        influence.Influence.open(out, task=ClassificationTask(), trust_store=True)
    custom = influence.Influence.open(out, task=DoubledTask(), trust_store=True)
    assert isinstance(custom.task, DoubledTask)
    # dℓ/dm doubles on both sides, so TracIn scores are 4× the built-in task's: the query side used the task passed
    x, y = digits.x_test[:3], digits.y_test[:3]
    np.testing.assert_allclose(custom.scores(x, y), 4 * session.scores(x, y), rtol=1e-4, atol=1e-6)


def test_a_store_naming_unknown_code_is_never_imported(copy_store):
    from index import integrity

    store = copy_store()
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["task"] = "no_such_module_abc:Evil"
    group.attrs["integrity"] = integrity.write_manifest(store, dict(group.attrs))  # sealed: as if built that way
    with pytest.raises(BadSpecError, match="no_such_module_abc:Evil"):
        influence.Influence.open(store, trust_store=True)


# ----------------------------------------------------------------------------- typed flags


def test_flags_are_typed_and_serialise_to_the_documented_json(session, digits):
    [m] = flag_mislabels(session, top=1)
    assert isinstance(m, MislabelFlag) and list(m.to_json()) == ["train_id", "score", "label", "model_prob_of_label",
                                                                  "suggested_label", "suggested_prob"]
    assert m.label == int(digits.y[m.train_id])
    harmful = flag_harmful(session, digits.x_test, digits.y_test, top=3)
    assert all(isinstance(h, HarmfulFlag) for h in harmful)
    assert all(list(h.to_json()) == ["train_id", "score", "label", "harms", "of_failures"] for h in harmful)
    doc = run_flags(session, (digits.x_test, digits.y_test), kinds=["mislabel", "harmful"], top=3)
    assert doc["mislabel"][0] == m.to_json() and doc["harmful"] == [h.to_json() for h in harmful]
    json.dumps(doc)


def test_trak_prepare_writes_its_inverse_and_lambda_in_one_place(copy_store):
    from influence.scoring import TRAK

    from index.store import FeatureStore

    path = copy_store()
    store = FeatureStore(path, zarr.open_group(str(path), mode="r+"))
    kept = {c: store.read_matrix(f"trak/{c}") for c in store.checkpoint_ids}
    lam = {c: TRAK.stored_lambda(store, c) for c in store.checkpoint_ids}
    group = store.group
    del group[store.matrix_key("trak/c1")]  # as after a build killed before its inverse was written
    group[store.matrix_key("trak/c2")].attrs.clear()  # as after a build killed between the inverse and its λ
    assert TRAK.stored_lambda(store, "c1") is None and TRAK.stored_lambda(store, "c2") is None
    TRAK.prepare(store, TrakSpec(1.0))
    for c in store.checkpoint_ids:
        assert np.array_equal(store.read_matrix(f"trak/{c}"), kept[c]), c
        assert TRAK.stored_lambda(store, c) == lam[c] and lam[c] is not None and lam[c].rel == 1.0
