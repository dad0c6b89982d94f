"""Unit tests for pipeline.features.fastfeatures.fast_features."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from pipeline.features.fastfeatures import FAST_FEATURE_NAMES, fast_features
from pipeline.training.synth import TransactionGenerator

MIDNIGHT_UTC = 1_699_920_000.0  # 2023-11-14T00:00:00Z
F = len(FAST_FEATURE_NAMES)


def _txn(**overrides: Any) -> dict[str, Any]:
    txn: dict[str, Any] = {
        "event_id": "e-1",
        "card_id": "card-000001",
        "merchant_id": "m-de-5411-001",
        "amount": 12.34,
        "currency": "EUR",
        "mcc": 5411,
        "country": "DE",
        "card_country": "DE",
        "channel": "pos",
        "ts": MIDNIGHT_UTC + 12 * 3600,
    }
    txn.update(overrides)
    return txn


def _row(txn: dict[str, Any]) -> dict[str, float]:
    return dict(zip(FAST_FEATURE_NAMES, fast_features([txn])[0].tolist(), strict=True))


def test_names_are_unique() -> None:
    assert len(set(FAST_FEATURE_NAMES)) == F


def test_shape_dtype_layout() -> None:
    txns, _ = TransactionGenerator(seed=4, start_ts=MIDNIGHT_UTC).batch(300)
    x = fast_features(txns)
    assert x.shape == (300, F)
    assert x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]
    assert np.isfinite(x).all()


def test_empty_input() -> None:
    x = fast_features([])
    assert x.shape == (0, F)
    assert x.dtype == np.float32


def test_known_values_foreign_night_atm() -> None:
    row = _row(
        _txn(amount=100.0, country="FR", channel="atm", mcc=6011, ts=MIDNIGHT_UTC + 3 * 3600)
    )
    expected = dict.fromkeys(FAST_FEATURE_NAMES, 0.0)
    expected.update(
        log_amount=math.log1p(100.0),
        round_amount=1.0,
        foreign=1.0,
        ch_atm=1.0,
        mcc_financial=1.0,
        hour_sin=math.sin(math.pi / 4),
        hour_cos=math.cos(math.pi / 4),
        is_night=1.0,
    )
    assert row == pytest.approx(expected, abs=1e-6)


def test_known_values_domestic_noon_risky_ecom() -> None:
    row = _row(_txn(channel="ecom", mcc=7995))
    expected = dict.fromkeys(FAST_FEATURE_NAMES, 0.0)
    expected.update(
        log_amount=math.log1p(12.34),
        ch_ecom=1.0,
        risky_mcc=1.0,
        mcc_services=1.0,
        hour_sin=0.0,
        hour_cos=-1.0,
    )
    assert row == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("mcc", "group"),
    [
        (4111, "mcc_travel"),
        (4829, "mcc_telecom_wire"),
        (5732, "mcc_retail"),
        (6051, "mcc_financial"),
        (7011, "mcc_services"),
    ],
)
def test_mcc_groups_are_one_hot(mcc: int, group: str) -> None:
    row = _row(_txn(mcc=mcc))
    groups = [n for n in FAST_FEATURE_NAMES if n.startswith("mcc_")]
    assert [row[n] for n in groups] == [1.0 if n == group else 0.0 for n in groups]


def test_round_amount_edges() -> None:
    assert _row(_txn(amount=50.0))["round_amount"] == 1.0
    assert _row(_txn(amount=55.0))["round_amount"] == 0.0
    assert _row(_txn(amount=0.0))["round_amount"] == 0.0


def test_unknown_channel_sets_no_channel_column() -> None:
    row = _row(_txn(channel="fax"))
    assert row["ch_pos"] == row["ch_ecom"] == row["ch_atm"] == 0.0


def test_rows_are_independent_of_batch() -> None:
    txns, _ = TransactionGenerator(seed=9, start_ts=MIDNIGHT_UTC).batch(64)
    batch = fast_features(txns)
    single = np.vstack([fast_features([t]) for t in txns])
    assert np.array_equal(batch, single)
