"""Unit tests for pipeline.inference.recomodel against the committed models/reco artifacts."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import numpy_helper

from pipeline.errors import ModelLoadError
from pipeline.inference.recomodel import PAD_ID, RecoScorer, load_reco_card
from pipeline.training import reco_data as rd

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "reco"


@pytest.fixture(scope="module")
def int8() -> RecoScorer:
    return RecoScorer.load(MODEL_DIR, "int8")


@pytest.fixture(scope="module")
def fp32() -> RecoScorer:
    return RecoScorer.load(MODEL_DIR, "fp32")


def _users(n: int, seed: int = 3) -> NDArray[np.int64]:
    return np.random.default_rng(seed).choice(100_000, size=n, replace=False).astype(np.int64)


def test_card_matches_files_and_targets() -> None:
    card = load_reco_card(MODEL_DIR)
    assert (card.name, card.version, card.k_max) == ("reco", "v1", 100)
    assert (card.n_users, card.n_items) == (100_000, 10_000)
    assert set(card.files) == {"fp32", "int8"}
    for entry in card.files.values():
        assert entry.bytes == (MODEL_DIR / entry.path).stat().st_size < 8_000_000
    m = card.metrics
    assert m["int8"]["recall@10"] >= m["fp32"]["recall@10"] - 0.01
    assert m["fp32"]["recall@10"] > 2 * m["popularity"]["recall@10"]
    assert all(v is True for k, v in m["targets"].items() if k.startswith("int8_"))


def test_versions(int8: RecoScorer, fp32: RecoScorer) -> None:
    assert int8.version == "reco-v1-int8"
    assert fp32.version == "reco-v1-fp32"
    assert int8.card.name == "reco" and int8.k_max == 100


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_recommend_distinct_valid_descending(
    precision: str, int8: RecoScorer, fp32: RecoScorer
) -> None:
    scorer = int8 if precision == "int8" else fp32
    items, scores = scorer.recommend(_users(64), k=10)
    assert items.shape == scores.shape == (64, 10)
    assert items.dtype == np.int64 and scores.dtype == np.float32
    assert ((items >= 0) & (items < 10_000)).all()
    assert all(len(set(row.tolist())) == 10 for row in items)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_fp32_graph_is_the_embedding_dot_product(fp32: RecoScorer) -> None:
    model = onnx.load(MODEL_DIR / fp32.card.files["fp32"].path)
    tables = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    users = _users(16, seed=9)
    expected = tables["user_embedding"][users] @ tables["item_embedding_t"]
    items, scores = fp32.recommend(users, k=20)
    np.testing.assert_allclose(scores, -np.sort(-expected, axis=1)[:, :20], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(expected, items, 1), scores, rtol=1e-5)


def test_k_bounds(int8: RecoScorer) -> None:
    items, _ = int8.recommend(_users(3), k=100)
    assert items.shape == (3, 100)
    for bad in (0, 101):
        with pytest.raises(ValueError, match="k must be"):
            int8.recommend(_users(3), k=bad)
    empty_items, empty_scores = int8.recommend(np.empty(0, np.int64), k=5)
    assert empty_items.shape == empty_scores.shape == (0, 5)


def test_bad_user_indices_rejected(int8: RecoScorer) -> None:
    with pytest.raises(ValueError, match="user indices"):
        int8.recommend(np.array([100_000]), k=5)
    with pytest.raises(ValueError, match="integers"):
        int8.recommend(np.array([1.5]), k=5)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_candidates_only_returns_candidates(
    precision: str, int8: RecoScorer, fp32: RecoScorer
) -> None:
    scorer = int8 if precision == "int8" else fp32
    rng = np.random.default_rng(5)
    users = _users(32)
    cands = np.stack([rng.choice(10_000, 30, replace=False) for _ in users]).astype(np.int64)
    items, scores = scorer.recommend_candidates(users, cands)
    assert items.shape == scores.shape == (32, 30)
    for row, pool in zip(items, cands, strict=True):
        assert sorted(row.tolist()) == sorted(pool.tolist())
    assert (np.diff(scores, axis=1) <= 0).all()
    top5, _ = scorer.recommend_candidates(users, cands, k=5)
    np.testing.assert_array_equal(top5, items[:, :5])


def test_candidate_scores_match_full_catalogue(fp32: RecoScorer) -> None:
    users = _users(8)
    full_items, full_scores = fp32.recommend(users, k=20)
    items, scores = fp32.recommend_candidates(users, full_items[:, ::-1].copy())
    np.testing.assert_array_equal(items, full_items)
    np.testing.assert_array_equal(scores, full_scores)


def test_candidate_padding_sorts_last(int8: RecoScorer) -> None:
    cands = np.array([[5, PAD_ID, 7, PAD_ID], [1, 2, 3, 4]], dtype=np.int64)
    items, scores = int8.recommend_candidates(np.array([0, 1]), cands, k=4)
    assert sorted(items[0, :2].tolist()) == [5, 7]
    assert items[0, 2:].tolist() == [PAD_ID, PAD_ID]
    assert np.isneginf(scores[0, 2:]).all() and np.isfinite(scores[1]).all()
    with pytest.raises(ValueError, match="candidate ids"):
        int8.recommend_candidates(np.array([0]), np.array([[10_000]]))
    with pytest.raises(ValueError, match="C >= 1"):
        int8.recommend_candidates(np.array([0]), np.empty((1, 0), np.int64))


def test_id_mapping(int8: RecoScorer) -> None:
    assert int8.user_index("user-000123") == 123
    assert int8.user_index("user-099999") == 99_999
    for unknown in ("user-100000", "user-123", "user-0000123", "item-00001", "bob", "user-00012x"):
        assert int8.user_index(unknown) is None
    assert int8.item_id(42) == "item-00042"
    assert int8.item_index("item-00042") == 42
    assert int8.item_index("item-10000") is None
    with pytest.raises(ValueError):
        int8.item_id(10_000)


def test_sha_mismatch_is_rejected(tmp_path: Path) -> None:
    copy = tmp_path / "reco"
    shutil.copytree(MODEL_DIR, copy)
    path = copy / "reco.int8.onnx"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        RecoScorer.load(copy, "int8")
    assert RecoScorer.load(copy, "fp32").version == "reco-v1-fp32"  # untouched file still loads


def test_missing_card_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read model card"):
        RecoScorer.load(tmp_path)


def test_int8_top10_overlaps_fp32(int8: RecoScorer, fp32: RecoScorer) -> None:
    users = _users(1000, seed=11)
    a, _ = int8.recommend(users, k=10)
    b, _ = fp32.recommend(users, k=10)
    overlap = np.mean([len(np.intersect1d(x, y)) / 10 for x, y in zip(a, b, strict=True)])
    assert overlap >= 0.95


def test_shared_across_threads(int8: RecoScorer) -> None:
    assert int8.warm_up((1, 8)) > 0.0
    batches = [_users(16, seed=s) for s in range(8)]
    serial = [int8.recommend(u, k=10)[0] for u in batches]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda u: int8.recommend(u, k=10)[0], batches))
    for x, y in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(x, y)


def test_card_popular_items_are_distinct_known_items_most_first() -> None:
    card = load_reco_card(MODEL_DIR)
    popular = card.popular_items
    assert len(popular) == card.k_max == 100
    assert len({p.item_id for p in popular}) == 100
    assert all(card.item_ids.parse(p.item_id, card.n_items) is not None for p in popular)
    counts = [p.interactions for p in popular]
    assert counts == sorted(counts, reverse=True) and counts[-1] > 0
    assert sum(counts) < card.raw["training"]["n_train_interactions"]
    assert card.served_version("int8") == "reco-v1-int8"


def test_popular_items_follow_training_counts() -> None:
    data = rd.generate_reco_data(rd.RecoDataConfig(n_users=400, n_items=150, seed=3))
    entries = rd.popular_items(data, 20)
    counts = data.item_counts()
    indices = [int(e["item_id"].removeprefix("item-")) for e in entries]
    assert [e["interactions"] for e in entries] == [int(counts[i]) for i in indices]
    assert indices == rd.popularity_ranking(data, np.arange(3), 20)[2].tolist()
    assert min(e["interactions"] for e in entries) >= np.sort(counts)[::-1][19]


def test_card_popular_items_optional_but_checked(tmp_path: Path) -> None:
    copy = tmp_path / "reco"
    shutil.copytree(MODEL_DIR, copy)
    raw = json.loads((copy / "card.json").read_text())
    del raw["popular_items"]
    (copy / "card.json").write_text(json.dumps(raw))
    assert load_reco_card(copy).popular_items == ()
    raw["popular_items"] = [{"item_id": "item-10000", "interactions": 3}]
    (copy / "card.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"popular_items\[0\]: 'item-10000' is not an item"):
        load_reco_card(copy)
    raw["popular_items"] = [{"item_id": "item-00001", "interactions": "3"}]
    (copy / "card.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="'interactions' must be int"):
        load_reco_card(copy)
