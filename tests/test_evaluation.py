"""influence.evaluation on tiny fixtures whose answers are worked out by hand in each test."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from influence.errors import BadDataError
from influence.evaluation.docs import write_section
from influence.evaluation.lds import lds, margins, subset_masks, trak_scores_dual
from influence.evaluation.mislabel import mislabel_auc, mislabel_metrics, recall_at_fraction
from influence.evaluation.pixel import (
    insertion_deletion, mass_in_box, mu_fidelity, peak_in_box, pointing_share, spearman,
)
from influence.evaluation.removal import removal_trials, summarize
from influence.evaluation.shortcut import match_shortcuts, sample_auprc, top_k_share

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- mislabel

def test_mislabel_auc_perfect_reversed_and_mixed():
    flipped = np.array([True, True, False, False])
    assert mislabel_auc(np.array([4.0, 3.0, 2.0, 1.0]), flipped) == 1.0
    assert mislabel_auc(np.array([1.0, 2.0, 3.0, 4.0]), flipped) == 0.0
    # flipped at scores 4 and 2, clean at 3 and 1: pairs (4>3, 4>1, 2<3, 2>1) → 3 of 4 ordered right
    assert mislabel_auc(np.array([4.0, 3.0, 2.0, 1.0]), np.array([True, False, True, False])) == 0.75


def test_recall_at_fraction_counts_flips_in_the_top():
    scores = np.arange(10, 0, -1).astype(float)  # example 0 first, example 9 last
    flipped = np.zeros(10, dtype=bool)
    flipped[[0, 5]] = True
    assert recall_at_fraction(scores, flipped, 0.1) == 0.5  # top 1: {0}
    assert recall_at_fraction(scores, flipped, 0.2) == 0.5  # top 2: {0, 1}
    assert recall_at_fraction(scores, flipped, 0.6) == 1.0  # top 6: {0..5}
    m = mislabel_metrics(scores, flipped)
    assert set(m) == {"auc", "recall@10%", "recall@20%"} and m["recall@20%"] == 0.5


def test_mislabel_refuses_degenerate_inputs():
    with pytest.raises(BadDataError, match="both flipped and clean"):
        mislabel_auc(np.ones(3), np.zeros(3, dtype=bool))
    with pytest.raises(BadDataError, match="one score per example"):
        mislabel_auc(np.ones(3), np.array([True, False]))
    with pytest.raises(BadDataError, match="fraction"):
        recall_at_fraction(np.ones(2), np.array([True, False]), 1.5)


# --------------------------------------------------------------------------- shortcut

def test_sample_auprc_is_the_mean_average_precision_over_queries():
    positive = np.array([True, False, True, False])
    # query 0 ranks the positives 1st and 3rd: AP = (1/1 + 2/3) / 2 = 5/6; query 1 ranks them 1st and 2nd: AP = 1
    scores = np.array([[0.9, 0.9], [0.8, 0.1], [0.7, 0.8], [0.1, 0.2]])
    assert sample_auprc(scores, positive) == pytest.approx((5 / 6 + 1) / 2)
    assert sample_auprc(scores[:, 1], positive) == 1.0


def test_top_k_share_per_query():
    positive = np.array([True, False, True, False])
    scores = np.array([[0.9, 0.9], [0.8, 0.1], [0.7, 0.8], [0.1, 0.2]])
    # top 2 of query 0: {0, 1} → 1/2; of query 1: {0, 2} → 2/2
    assert top_k_share(scores, positive, 2) == 0.75
    with pytest.raises(BadDataError, match="k must lie"):
        top_k_share(scores, positive, 5)


def test_match_shortcuts_found_false_alarm_and_iou_threshold():
    truth = [12, 12, 15, 15]
    exact = {"class": 7, "box": [12, 12, 15, 15], "train_ids": [1, 2], "score": 0.8}
    other = {"class": 3, "box": [0, 0, 3, 3], "train_ids": [4], "score": 0.5}
    m = match_shortcuts([exact, other], 7, truth)
    assert m["found"] and m["false_alarms"] == 1 and m["best_iou"] == 1.0 and m["hit"]["box"] == truth
    # shifted by one column: intersection 2×3 = 6, union 9 + 9 − 6 = 12 → IoU 0.5, still found
    half = match_shortcuts([{"class": 7, "box": [13, 12, 16, 15], "train_ids": [], "score": 0.1}], 7, truth)
    assert half["found"] and half["best_iou"] == 0.5 and half["false_alarms"] == 0
    # shifted by two: intersection 3, union 15 → IoU 0.2: a false alarm, not a find
    off = match_shortcuts([{"class": 7, "box": [14, 12, 17, 15], "train_ids": [], "score": 0.1}], 7, truth)
    assert not off["found"] and off["best_iou"] == pytest.approx(0.2) and off["false_alarms"] == 1 and off["hit"] is None
    # the right box under the wrong class is not a find
    assert not match_shortcuts([dict(exact, **{"class": 1})], 7, truth)["found"]
    assert match_shortcuts([], 7, truth) == {"found": False, "false_alarms": 0, "best_iou": 0.0, "hit": None}


def test_the_study_scores_flag_shortcut_reports_as_their_json(monkeypatch):
    """The study's detector hands match_shortcuts the JSON of ``flag``, not the typed Shortcut objects."""
    from influence.evaluation import shortcut_study
    from influence.shortcut import Shortcut

    found = [Shortcut(7, [12, 12, 15, 15], [1, 2], 0.8, support=0.9), Shortcut(3, [0, 0, 3, 3], [4], 0.5)]
    monkeypatch.setattr(shortcut_study, "flag_shortcuts", lambda sess, x, y: found)
    reports = shortcut_study.detector(None, torch.zeros(1), torch.zeros(1))
    assert reports == [{"class": 7, "box": [12, 12, 15, 15], "train_ids": [1, 2], "score": 0.8},
                       {"class": 3, "box": [0, 0, 3, 3], "train_ids": [4], "score": 0.5}]
    m = match_shortcuts(reports, 7, [12, 12, 15, 15])
    assert m["found"] and m["false_alarms"] == 1 and m["hit"] | {"train_ids": 2} == dict(reports[0], train_ids=2)


# --------------------------------------------------------------------------- pixel

def _map() -> torch.Tensor:
    m = torch.zeros(4, 4)
    m[1, 1] = 3.0   # row 1, column 1
    m[3, 3] = 1.0
    m[0, 0] = -5.0  # negative: not mass
    return m


def test_mass_and_peak_in_box():
    m = _map()
    assert mass_in_box(m, [0, 0, 2, 2]) == 0.75   # 3 of the positive 4
    assert peak_in_box(m, [0, 0, 2, 2])
    assert mass_in_box(m, [2, 2, 4, 4]) == 0.25
    assert not peak_in_box(m, [2, 2, 4, 4])
    # channels are summed: two channels of half the map give the same answers
    assert mass_in_box(torch.stack([m / 2, m / 2]), [0, 0, 2, 2]) == 0.75
    assert mass_in_box(torch.zeros(4, 4), [0, 0, 2, 2]) == 0.0
    with pytest.raises(BadDataError, match="does not fit"):
        mass_in_box(m, [0, 0, 5, 2])


def test_pointing_share_skips_and_counts_empty_maps():
    maps = torch.zeros(3, 2, 2)
    maps[0, 0, 0], maps[0, 1, 1] = 3.0, 1.0  # share in region (top row) = 3/4
    maps[1, 1, 0] = 2.0                      # share 0
    regions = torch.zeros(3, 2, 2, dtype=torch.bool)
    regions[:, 0, :] = True
    share, empty = pointing_share(maps, regions)
    assert share == pytest.approx(0.375) and empty == 1
    assert math.isnan(pointing_share(torch.zeros(1, 2, 2), regions[:1])[0])


def test_spearman_of_maps():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert spearman(a, a * 10 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones(2, 2)) == 0.0


def test_insertion_deletion_on_a_linear_score():
    # "probability" = mean of the features; x = [4, 3, 2, 1]; 4 steps reveal/remove one feature each.
    prob = lambda f: f.mean(1)  # noqa: E731
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    best_first = torch.tensor([[0, 1, 2, 3]])
    ins, dele = insertion_deletion(prob, x, best_first, steps=4)
    # insertion: revealed sums 0, 4, 7, 9, 10 → means /4 → average 1.5; deletion: 10, 6, 3, 1, 0 → average 1.0
    assert float(ins) == pytest.approx(1.5) and float(dele) == pytest.approx(1.0)
    ins_r, dele_r = insertion_deletion(prob, x, best_first.flip(1), steps=4)
    assert float(ins_r) == pytest.approx(1.0) and float(dele_r) == pytest.approx(1.5)


def test_mu_fidelity_is_one_for_the_exact_attribution_of_a_linear_model():
    torch.manual_seed(0)
    w, x = torch.randn(3, 6), torch.rand(3, 6) + 0.1
    prob = lambda f: (f * w).sum(1)  # noqa: E731
    # zeroing subset S drops the score by exactly Σ_S w·x, so attribution w·x correlates perfectly
    assert mu_fidelity(prob, x, w * x, seed=0) == pytest.approx(1.0)
    assert mu_fidelity(prob, x, -w * x, seed=0) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- LDS

def test_subset_masks_are_seeded_halves():
    m = subset_masks(10, 5, seed=1)
    assert m.shape == (5, 10) and (m.sum(1) == 5).all()
    assert np.array_equal(m, subset_masks(10, 5, seed=1))
    assert not np.array_equal(m, subset_masks(10, 5, seed=2))


def test_lds_of_exactly_linear_margins_is_one():
    rng = np.random.default_rng(0)
    masks = subset_masks(6, 8, seed=0)
    scores = rng.normal(size=(6, 3))
    actual = masks @ scores
    out = lds(scores, masks, actual)
    assert out["lds"] == pytest.approx(1.0) and out["ci"] == pytest.approx([1.0, 1.0]) and out["n_test"] == 3
    assert lds(scores, masks, np.exp(actual))["lds"] == pytest.approx(1.0)  # rank-based: any increasing map
    assert lds(scores, masks, -actual)["lds"] == pytest.approx(-1.0)


def test_lds_hand_spearman():
    # three one-example subsets: predicted margins 1, 2, 3; actual 1, 3, 2 → 1 − 6·(0+1+1)/(3·8) = 0.5
    masks = np.eye(3, dtype=bool)
    out = lds(np.array([[1.0], [2.0], [3.0]]), masks, np.array([[1.0], [3.0], [2.0]]))
    assert out["lds"] == pytest.approx(0.5)
    with pytest.raises(BadDataError, match="need scores"):
        lds(np.ones((3, 1)), masks, np.ones((2, 1)))


def test_trak_dual_form_hand_case():
    phi = [np.eye(2)]          # N = k = 2, ΦΦᵀ = I, trace/k = 1
    test = [np.array([[1.0, 0.0]])]
    q = [np.array([2.0, 1.0])]
    # λ = 0: Φ(ΦᵀΦ)⁻¹φ_t = φ_t = (1, 0), weighted by q → (2, 0); λ = 1·trace/k = 1: halved → (1, 0)
    assert trak_scores_dual(phi, q, test, 0.0) == pytest.approx(np.array([[2.0], [0.0]]))
    assert trak_scores_dual(phi, q, test, 1.0) == pytest.approx(np.array([[1.0], [0.0]]))


@pytest.mark.parametrize("n, k", [(5, 12), (12, 5)])
def test_trak_dual_form_equals_the_library_inverse_at_the_same_relative_lambda(n, k):
    """The dual form of a λ sweep and the store's k×k inverse turn a relative λ into the same absolute one
    (trace/min(N, k)), with fewer rows than k and with more."""
    from influence.scoring import trak_inverse

    rng = np.random.default_rng(0)
    phi, test, q = rng.standard_normal((n, k)), rng.standard_normal((3, k)), rng.random(n)
    inv, _ = trak_inverse(phi.T @ phi, 0.5, n=n)
    want = (phi @ inv @ test.T) * q[:, None]
    np.testing.assert_allclose(trak_scores_dual([phi], [q], [test], 0.5), want, rtol=1e-9, atol=1e-12)


def test_margins_of_known_logits():
    net = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    # logits (2, 0, 0) for x = (1, 0): margin of class 0 = 2 − log(e⁰ + e⁰) = 2 − log 2; of class 1 = 0 − log(e² + 1)
    out = margins(net, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))
    assert out == pytest.approx([2 - math.log(2), -math.log(math.exp(2) + 1)], abs=1e-6)


# --------------------------------------------------------------------------- removal

def test_removal_trials_remove_the_top_scored_examples():
    scores = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]])
    removed_seen = []

    def retrain(keep: np.ndarray, t: int) -> tuple[float, bool]:
        removed = sorted(set(range(5)) - set(keep.tolist()))
        removed_seen.append(removed)
        return float(len({0, 1} & set(keep.tolist()))), 0 in keep  # margin: how many of {0, 1} stayed

    rows = removal_trials(scores, [7], [2.0], [2], retrain, np.random.default_rng(0))
    top = next(r for r in rows if r["how"] == "top")
    assert removed_seen[0] == [0, 1]
    assert top == {"test_id": 7, "k": 2, "how": "top", "flipped": True, "margin_before": 2.0, "margin_after": 0.0}
    rand = next(r for r in rows if r["how"] == "random")
    assert len(removed_seen[1]) == 2 and rand["flipped"] == (0 in removed_seen[1])
    with pytest.raises(BadDataError, match="every k"):
        removal_trials(scores, [7], [2.0], [5], retrain, np.random.default_rng(0))


def test_summarize_removal_rows():
    rows = [
        {"how": "top", "k": 10, "flipped": True, "margin_before": 3.0, "margin_after": 1.0},
        {"how": "top", "k": 10, "flipped": False, "margin_before": 5.0, "margin_after": 1.0},
        {"how": "random", "k": 10, "flipped": False, "margin_before": 1.0, "margin_after": 2.0},
    ]
    s = summarize(rows)
    assert list(s) == ["top10", "random10"]
    assert s["top10"] == {"flip_rate": 0.5, "flips": 1, "n": 2, "mean_margin_drop": 3.0}
    assert s["random10"]["mean_margin_drop"] == -1.0 and s["random10"]["flips"] == 0


# --------------------------------------------------------------------------- docs

def test_write_section_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# B\n\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n\n<!-- BEGIN b -->\nold b\n<!-- END b -->\n")
    write_section("a", "new a\n", doc)
    text = doc.read_text()
    assert "new a" in text and "old a" not in text and "old b" in text
    write_section("c", "c body", doc)
    assert doc.read_text().rstrip().endswith("<!-- BEGIN c -->\nc body\n<!-- END c -->")
    doc.write_text("<!-- BEGIN a -->\nno end\n")
    with pytest.raises(BadDataError, match="only one of the markers"):
        write_section("a", "x", doc)


def test_differing_files_names_changed_digests_and_files_only_one_store_has():
    from influence.evaluation.store_bytes import differing_files

    a = {"zarr.json": "1", "features/c0/c/0/0": "2"}
    assert differing_files(a, dict(a)) == []
    assert differing_files(a, {"zarr.json": "1", "features/c0/c/0/0": "3", "done/c0/c/0": "4"}) == [
        "done/c0/c/0", "features/c0/c/0/0"]


# --------------------------------------------------------------------------- layout

def test_scripts_are_shells_that_neither_edit_sys_path_nor_import_each_other():
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    names = {p.stem for p in scripts}
    for path in scripts:
        tree = ast.parse(path.read_text())
        assert "sys.path" not in path.read_text(), path.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & names, path.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in names, path.name


def test_demo_pieces_are_imported_in_one_module():
    """Only influence/evaluation/digits.py imports the digits demo pieces, so a move changes one file."""
    pieces = {"inject", "load_digits_split", "train_classifier", "DEMO_EPOCHS", "DEMO_CHECKPOINTS"}
    for path in sorted((ROOT / "influence" / "evaluation").glob("*.py")):
        if path.name == "digits.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module != "influence.evaluation.digits":
                assert not {a.name for a in node.names} & pieces, (path.name, node.module)


def test_grid_canvas_places_each_digit_in_its_quadrant():
    from influence.evaluation.attribution_study import place

    digits = torch.stack([torch.full((1, 16, 16), 1.0), torch.full((1, 16, 16), 2.0)])
    canvas = place(digits, torch.tensor([3, 0]))  # first bottom-right, second top-left
    assert canvas.shape == (2, 1, 32, 32)
    assert canvas[0, 0, 16:, 16:].eq(1).all() and canvas[0].sum() == 256
    assert canvas[1, 0, :16, :16].eq(2).all() and canvas[1].sum() == 512



def test_peer_dattri_lambda_follows_each_checkpoints_own_features():
    """The dattri adapter's projection wrapper: after a checkpoint's rows, ``regularization`` is rel · trace/min(N, k)
    of exactly those rows (dattri damps ΦᵀΦ then), per checkpoint; the real projection is put back afterwards."""
    from types import SimpleNamespace

    from influence.evaluation.peers import _measuring_projection

    rng = np.random.default_rng(0)
    rows = {0: rng.standard_normal((7, 4)), 1: 3 * rng.standard_normal((7, 4))}  # N = 7 > k = 4 and two batches each

    def random_project(feature, batch_size, **kw):
        return lambda f, ensemble_id=0: torch.as_tensor(f)

    module, att = SimpleNamespace(random_project=random_project), SimpleNamespace(regularization=0.0)
    applied = []
    with _measuring_projection(module, att, 2.0) as lams:
        for c, x in rows.items():
            for batch in (x[:4], x[4:]):
                module.random_project(batch, len(batch))(batch, ensemble_id=c)
            applied.append(att.regularization)  # what dattri would add to this checkpoint's ΦᵀΦ
    want = [2.0 * (x ** 2).sum() / 4 for x in rows.values()]
    assert applied == pytest.approx(want) and lams() == pytest.approx(want)
    assert module.random_project is random_project and att.regularization == 0.0


def test_peer_traker_lambda_is_set_from_the_gram_traker_damps(tmp_path, monkeypatch):
    """The traker adapter's wrap of ``get_x_xtx_inv``: for each rel and each checkpoint, ``lambda_reg`` is
    rel · trace(xtx)/min(N, k) of the very ΦᵀΦ traker is about to damp, one λ per checkpoint (so a traker that
    stopped calling the method would show up here, not as silently undamped scores)."""
    trak_scores = pytest.importorskip("trak.score_computers")
    from influence.data import ArrayDataset
    from influence.evaluation.peers import run_traker

    seen: list[tuple[float, float]] = []  # (trace of the xtx traker passes, lambda_reg in force) per call
    solve = trak_scores.BasicScoreComputer.get_x_xtx_inv

    def spy(self, grads, xtx):
        seen.append((float(torch.trace(xtx.double())) / min(grads.shape), float(self.lambda_reg)))
        return solve(self, grads, xtx)

    monkeypatch.setattr(trak_scores.BasicScoreComputer, "get_x_xtx_inv", spy)
    make = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))  # noqa: E731
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(str(tmp_path / f"c{seed}.pt"))
        torch.save(make().state_dict(), ckpts[-1])
    gen = torch.Generator().manual_seed(0)
    train = ArrayDataset(torch.randn(20, 1, 3, 4, generator=gen), torch.arange(20) % 3)
    test = ArrayDataset(torch.randn(4, 1, 3, 4, generator=gen), torch.arange(4) % 3)
    rows = dict(run_traker(make, ckpts, [1.0, 1.0], train, test, k=16, rels=(0.0, 1.0, 2.5)))
    assert all(rows[name] is not None for name in rows) and len(rows) == 3
    lams = {name: r[2]["lambdas"] for name, r in rows.items()}
    assert len(seen) == 6 and all(len(v) == 2 for v in lams.values())  # each rel, each checkpoint, once
    mean_eig = [m for m, _ in seen[:2]]
    assert all(m > 0 for m in mean_eig) and mean_eig[0] != pytest.approx(mean_eig[1])  # two checkpoints' own Φ
    assert [lam for _, lam in seen] == pytest.approx([r * m for r in (0.0, 1.0, 2.5) for m in mean_eig])
    assert lams["trak(λ=0)"] == [0.0, 0.0] and lams["trak(λ=2.5·mean eig)"] == pytest.approx([2.5 * m for m in mean_eig])
    assert not np.allclose(rows["trak(λ=0)"][0], rows["trak(λ=1·mean eig)"][0])  # the λ reached the scores
