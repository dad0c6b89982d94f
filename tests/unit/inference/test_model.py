"""Unit tests for pipeline.inference.model against the committed models/fraud artifacts."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score

from pipeline.errors import ModelLoadError
from pipeline.features.fastfeatures import FAST_FEATURE_NAMES, fast_features
from pipeline.inference.model import OnnxScorer, load_card
from pipeline.training.synth import TransactionGenerator

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "fraud"


@pytest.fixture(scope="module")
def int8() -> OnnxScorer:
    return OnnxScorer.load(MODEL_DIR, "int8")


@pytest.fixture(scope="module")
def fp32() -> OnnxScorer:
    return OnnxScorer.load(MODEL_DIR, "fp32")


@pytest.fixture(scope="module")
def fresh() -> tuple[NDArray[np.float32], NDArray[np.int8]]:
    # A seed and period the build never saw.
    txns, labels = TransactionGenerator(seed=2024, start_ts=1_750_000_000.0, mean_gap_s=2.0).batch(
        30_000
    )
    return fast_features(txns), labels


def test_card_matches_runtime() -> None:
    card = load_card(MODEL_DIR)
    assert card.name == "fraud" and card.version == "v1"
    assert card.feature_names == FAST_FEATURE_NAMES
    assert set(card.files) == {"fp32", "int8"}
    assert 0.0 < card.thresholds["review"] < card.thresholds["decline"] < 1.0
    for entry in card.files.values():
        assert entry.bytes == (MODEL_DIR / entry.path).stat().st_size < 1_000_000


def test_versions(int8: OnnxScorer, fp32: OnnxScorer) -> None:
    assert int8.version == "fraud-v1-int8"
    assert fp32.version == "fraud-v1-fp32"
    assert int8.card.name == "fraud"


def test_predict_shape_and_range(
    int8: OnnxScorer, fresh: tuple[NDArray[np.float32], NDArray[np.int8]]
) -> None:
    x, _ = fresh
    p = int8.predict(x[:1000])
    assert p.shape == (1000,)
    assert p.dtype == np.float32
    assert ((p >= 0.0) & (p <= 1.0)).all()


def test_int8_close_to_fp32(
    int8: OnnxScorer, fp32: OnnxScorer, fresh: tuple[NDArray[np.float32], NDArray[np.int8]]
) -> None:
    x, _ = fresh
    assert float(np.mean(np.abs(int8.predict(x) - fp32.predict(x)))) < 0.005


def test_held_out_auc(
    int8: OnnxScorer, fp32: OnnxScorer, fresh: tuple[NDArray[np.float32], NDArray[np.int8]]
) -> None:
    x, y = fresh
    assert roc_auc_score(y, int8.predict(x)) >= 0.85
    assert roc_auc_score(y, fp32.predict(x)) >= 0.85


def test_empty_batch(int8: OnnxScorer) -> None:
    p = int8.predict(np.zeros((0, len(FAST_FEATURE_NAMES)), dtype=np.float32))
    assert p.shape == (0,) and p.dtype == np.float32


def test_wrong_width_rejected(int8: OnnxScorer) -> None:
    with pytest.raises(ValueError):
        int8.predict(np.zeros((2, len(FAST_FEATURE_NAMES) + 1), dtype=np.float32))


def test_thread_pool_matches_sequential(
    int8: OnnxScorer, fresh: tuple[NDArray[np.float32], NDArray[np.int8]]
) -> None:
    x, _ = fresh
    chunks = [x[i : i + 256] for i in range(0, 256 * 40, 256)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(int8.predict, chunks))
    assert all(np.array_equal(a, int8.predict(c)) for a, c in zip(parallel, chunks, strict=True))


def test_warm_up(int8: OnnxScorer) -> None:
    assert int8.warm_up((1, 8)) > 0.0


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "fraud"
    shutil.copytree(MODEL_DIR, dst)
    return dst


def test_sha_mismatch(tmp_path: Path) -> None:
    model_dir = _copy(tmp_path)
    path = model_dir / "fraud.int8.onnx"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match=r"sha256 mismatch.*fraud\.int8\.onnx"):
        OnnxScorer.load(model_dir, "int8")
    OnnxScorer.load(model_dir, "fp32")  # the untouched file still loads


def test_feature_name_mismatch(tmp_path: Path) -> None:
    model_dir = _copy(tmp_path)
    card_path = model_dir / "card.json"
    card = json.loads(card_path.read_text())
    card["feature_names"] = list(reversed(card["feature_names"]))
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="features"):
        OnnxScorer.load(model_dir)


def test_missing_card(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="card"):
        OnnxScorer.load(tmp_path)
