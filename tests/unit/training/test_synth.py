"""Unit tests for pipeline.training.synth: determinism, wire format, fraud rate, invalid events."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline.training.synth import (
    INVALID_KINDS,
    TransactionGenerator,
    invalid_reason_field,
    make_invalid,
)

WIRE_KEYS = {
    "event_id",
    "card_id",
    "merchant_id",
    "amount",
    "currency",
    "mcc",
    "country",
    "card_country",
    "channel",
    "ts",
}
START = 1_700_000_000.0


def _gen(seed: int = 11, **kwargs: Any) -> TransactionGenerator:
    return TransactionGenerator(seed=seed, start_ts=START, **kwargs)


def test_same_seed_same_stream() -> None:
    a_txns, a_labels = _gen().batch(500)
    b_txns, b_labels = _gen().batch(500)
    assert a_txns == b_txns
    assert np.array_equal(a_labels, b_labels)


def test_different_seed_different_stream() -> None:
    a_txns, _ = _gen(seed=1).batch(50)
    b_txns, _ = _gen(seed=2).batch(50)
    assert a_txns != b_txns


def test_batch_equals_repeated_next() -> None:
    txns, labels = _gen().batch(3000)  # crosses a random-block refill boundary
    gen = _gen()
    pairs = [gen.next() for _ in range(3000)]
    assert txns == [t for t, _ in pairs]
    assert labels.tolist() == [y for _, y in pairs]
    assert labels.dtype == np.int8


def test_wire_fields_and_types() -> None:
    txns, labels = _gen().batch(5000)
    for txn in txns:
        assert set(txn) == WIRE_KEYS  # sent_at is the producer's job
        assert isinstance(txn["event_id"], str) and txn["event_id"]
        assert re.fullmatch(r"card-\d{6}", txn["card_id"])
        assert isinstance(txn["merchant_id"], str) and txn["merchant_id"]
        assert isinstance(txn["amount"], float) and txn["amount"] >= 0
        assert round(txn["amount"], 2) == txn["amount"]
        assert re.fullmatch(r"[A-Z]{3}", txn["currency"])
        assert isinstance(txn["mcc"], int) and 1000 <= txn["mcc"] <= 9999
        assert re.fullmatch(r"[A-Z]{2}", txn["country"])
        assert re.fullmatch(r"[A-Z]{2}", txn["card_country"])
        assert txn["channel"] in {"pos", "ecom", "atm"}
        assert isinstance(txn["ts"], float)
    assert len({t["event_id"] for t in txns}) == len(txns)
    ts = [t["ts"] for t in txns]
    assert ts == sorted(ts) and ts[0] >= START
    assert set(np.unique(labels).tolist()) <= {0, 1}
    # Round-trips through JSON unchanged, i.e. really JSON-ready.
    assert orjson.loads(orjson.dumps(txns)) == txns


def test_fraud_rate_is_day_average() -> None:
    # A 2 s mean gap spans ~1.5 simulated days, so night-time fraud peaks average out.
    _, labels = _gen(mean_gap_s=2.0).batch(60_000)
    assert labels.mean() == pytest.approx(0.02, abs=0.004)
    _, none = _gen(fraud_rate=0.0).batch(2000)
    assert none.sum() == 0


def test_fraud_is_visible_but_not_trivial() -> None:
    txns, labels = _gen(mean_gap_s=2.0).batch(40_000)
    fraud = labels == 1
    foreign = np.array([t["country"] != t["card_country"] for t in txns])
    amount = np.log1p([t["amount"] for t in txns])
    assert foreign[fraud].mean() > 3 * foreign[~fraud].mean()
    assert amount[fraud].mean() > amount[~fraud].mean() + 0.5
    assert foreign[~fraud].any() and (~foreign[fraud]).any()  # overlap both ways


def test_default_start_is_now() -> None:
    before = time.time()
    txn, _ = TransactionGenerator(seed=3).next()
    assert before <= txn["ts"] <= time.time() + 60


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TransactionGenerator(fraud_rate=1.5)
    with pytest.raises(ValueError):
        TransactionGenerator(n_cards=0)
    with pytest.raises(ValueError):
        _gen().batch(-1)


def _base() -> dict[str, Any]:
    txn, _ = _gen().next()
    return txn


def _parse(raw: bytes) -> Any:
    return json.loads(raw)  # stdlib accepts NaN, so the nan case can be inspected


@pytest.mark.parametrize("kind", INVALID_KINDS)
def test_invalid_kind_is_invalid_as_stated(kind: str) -> None:
    base = _base()
    snapshot = dict(base)
    raw = make_invalid(kind, np.random.default_rng(5), base)
    assert isinstance(raw, bytes)
    assert base == snapshot  # the caller's event is untouched
    field = invalid_reason_field(kind)
    if kind == "not_json":
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(raw)
        with pytest.raises((UnicodeDecodeError, json.JSONDecodeError)):
            _parse(raw)
        return
    event = _parse(raw)
    if kind == "not_object":
        assert isinstance(event, list)
        return
    assert isinstance(event, dict)
    others = {k: v for k, v in event.items() if k != field}
    assert others == {k: v for k, v in base.items() if k != field}
    _assert_field_invalid(kind, raw, event)


def _assert_field_invalid(kind: str, raw: bytes, event: dict[str, Any]) -> None:
    if kind == "missing_field":
        assert "amount" not in event
    elif kind == "negative_amount":
        assert event["amount"] < 0
    elif kind == "nan_amount":
        assert b"NaN" in raw and math.isnan(event["amount"])
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(raw)
    elif kind == "bad_currency":
        assert not re.fullmatch(r"[A-Z]{3}", event["currency"])
    elif kind == "bad_channel":
        assert event["channel"] not in {"pos", "ecom", "atm"}
    elif kind == "wrong_type":
        assert not isinstance(event["mcc"], int)
    elif kind == "empty_event_id":
        assert event["event_id"] == ""
    else:
        pytest.fail(f"no check for kind {kind}")


def test_reason_fields() -> None:
    expected = {
        "not_json": "value",
        "not_object": "value",
        "missing_field": "amount",
        "negative_amount": "amount",
        "nan_amount": "amount",
        "bad_currency": "currency",
        "bad_channel": "channel",
        "wrong_type": "mcc",
        "empty_event_id": "event_id",
    }
    assert {k: invalid_reason_field(k) for k in INVALID_KINDS} == expected
    with pytest.raises(ValueError):
        invalid_reason_field("nope")
    with pytest.raises(ValueError):
        make_invalid("nope", np.random.default_rng(0), _base())
