"""Tests of the committed models/fraud-v2 artifacts against pipeline.features.cardhistory
features."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score

from pipeline.features.cardhistory import FRAUD_V2_FEATURE_NAMES
from pipeline.inference.model import ModelCard, load_card, session_options
from pipeline.training.history_data import HistoryStreamGenerator, feature_matrices, replay

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "fraud-v2"
WARMUP = 15_000


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_card(MODEL_DIR)


@pytest.fixture(scope="module")
def sessions(card: ModelCard) -> dict[str, ort.InferenceSession]:
    return {
        precision: ort.InferenceSession(
            (MODEL_DIR / entry.path).read_bytes(), session_options(1), ["CPUExecutionProvider"]
        )
        for precision, entry in card.files.items()
    }


@pytest.fixture(scope="module")
def fresh() -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int8]]:
    # A seed and period the build never saw; the first rows only warm up the history.
    gen = HistoryStreamGenerator(seed=2024, n_cards=1500, start_ts=1_750_000_000.0)
    stream = gen.stream(WARMUP + 30_000)
    x_hist, x_defaults = feature_matrices(stream.txns, replay(stream))
    return x_hist[WARMUP:], x_defaults[WARMUP:], stream.is_fraud[WARMUP:]


def _predict(session: ort.InferenceSession, x: NDArray[np.float32]) -> NDArray[np.float32]:
    (out,) = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x)})
    return np.asarray(out, dtype=np.float32).reshape(-1)


def test_card_identity(card: ModelCard) -> None:
    assert (card.name, card.version) == ("fraud", "v2")
    assert card.raw["feature_set"] == "fast+history"
    assert card.feature_names == FRAUD_V2_FEATURE_NAMES
    assert set(card.files) == {"fp32", "int8"}
    assert 0.0 < card.thresholds["review"] < card.thresholds["decline"] < 1.0
    assert set(card.metrics["defaults_only"]) >= {"fp32", "int8"}
    assert set(card.raw["benchmark"]["rows_per_s"]["int8"]) == {"1", "8", "32", "128", "256", "512"}


def test_files_match_card(card: ModelCard) -> None:
    for entry in card.files.values():
        blob = (MODEL_DIR / entry.path).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry.sha256
        assert len(blob) == entry.bytes < 1_000_000


def test_input_width(card: ModelCard, sessions: dict[str, ort.InferenceSession]) -> None:
    for session in sessions.values():
        (inp,) = session.get_inputs()
        assert inp.name == card.input_name
        assert inp.shape[-1] == len(FRAUD_V2_FEATURE_NAMES)
        assert [o.name for o in session.get_outputs()] == [card.output_name]


def test_predictions_are_probabilities(
    sessions: dict[str, ort.InferenceSession],
    fresh: tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int8]],
) -> None:
    x_hist, x_defaults, _ = fresh
    for session in sessions.values():
        for x in (x_hist[:2000], x_defaults[:2000]):
            p = _predict(session, x)
            assert p.shape == (2000,) and p.dtype == np.float32
            assert ((p >= 0.0) & (p <= 1.0)).all()


def test_history_beats_defaults_on_fresh_data(
    sessions: dict[str, ort.InferenceSession],
    fresh: tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int8]],
) -> None:
    x_hist, x_defaults, y = fresh
    aucs = {}
    for precision, session in sessions.items():
        with_history = roc_auc_score(y, _predict(session, x_hist))
        defaults_only = roc_auc_score(y, _predict(session, x_defaults))
        assert with_history > defaults_only + 0.05, (precision, with_history, defaults_only)
        assert with_history >= 0.93
        aucs[precision] = with_history
    assert abs(aucs["int8"] - aucs["fp32"]) <= 0.005
