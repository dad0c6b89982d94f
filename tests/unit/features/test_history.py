"""Unit tests for pipeline.features.cardhistory: state updates, features, staleness,
serialisation."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import pytest

from pipeline.features.cardhistory import (
    DEFAULT_HISTORY_FEATURES,
    FRAUD_V2_FEATURE_NAMES,
    HISTORY_FEATURE_NAMES,
    HISTORY_VERSION,
    MAX_TRACKED,
    CardHistory,
    from_bytes,
    history_features,
    to_bytes,
    update_with_label,
    update_with_transaction,
)
from pipeline.features.fastfeatures import FAST_FEATURE_NAMES

T0 = 1_700_000_000.0
H = 3600.0
DAY = 86_400.0
TAUS = (H, DAY, 30 * DAY)


def _txn(ts: float, amount: float, merchant: str, country: str, event_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "card_id": "card-000001",
        "merchant_id": merchant,
        "amount": amount,
        "currency": "EUR",
        "mcc": 5411,
        "country": country,
        "card_country": "DE",
        "channel": "pos",
        "ts": ts,
    }


# Three past transactions and a chargeback, then the transaction being scored (4 h after T0).
PAST = [
    _txn(T0, 10.0, "m1", "DE", "e0"),
    _txn(T0 + 0.5 * H, 20.0, "m2", "DE", "e1"),
    _txn(T0 + 2 * H, 30.0, "m1", "FR", "e2"),
]
CHARGEBACK = {"event_id": "e0", "card_id": "card-000001", "label": "chargeback", "ts": T0 + 3 * H}
NOW_TXN = _txn(T0 + 4 * H, 100.0, "m3", "FR", "e3")


def _history(txns: list[dict[str, Any]], label: dict[str, Any] | None = None) -> CardHistory:
    h: CardHistory | None = None
    for t in txns:
        h = update_with_transaction(h, t)
    if label is not None:
        h = update_with_label(h, label)
    assert h is not None
    return h


def _features(h: CardHistory | None, txn: dict[str, Any], **kw: float) -> dict[str, float]:
    opts = {"now": txn["ts"], "max_staleness_s": math.inf} | kw
    x, degraded = history_features([h], [txn], **opts)
    assert x.shape == (1, len(HISTORY_FEATURE_NAMES)) and x.dtype == np.float32
    row = dict(zip(HISTORY_FEATURE_NAMES, x[0].tolist(), strict=True))
    row["degraded"] = float(degraded[0])
    return row


def test_feature_names() -> None:
    assert FRAUD_V2_FEATURE_NAMES == FAST_FEATURE_NAMES + HISTORY_FEATURE_NAMES
    assert len(set(FRAUD_V2_FEATURE_NAMES)) == len(FRAUD_V2_FEATURE_NAMES)
    assert len(DEFAULT_HISTORY_FEATURES) == len(HISTORY_FEATURE_NAMES)


def test_state_after_known_sequence() -> None:
    h = _history(PAST, CHARGEBACK)
    # Decayed to the newest transaction (T0 + 2 h): ages 2 h, 1.5 h and 0.
    ages = (2 * H, 1.5 * H, 0.0)
    for field, tau in zip(("cnt_1h", "cnt_24h", "cnt_30d"), TAUS, strict=True):
        assert getattr(h, field) == pytest.approx(sum(math.exp(-a / tau) for a in ages))
    expected_amt = sum(a * math.exp(-age / H) for a, age in zip((10, 20, 30), ages, strict=True))
    assert h.amt_1h == pytest.approx(expected_amt)
    assert h.last_ts == T0 + 2 * H and h.last_country == "FR"
    assert h.prev_ts == T0 + 0.5 * H and h.prev_country == "DE"
    assert h.merchants == ("m1", "m2") and h.merchants_seen == (T0 + 2 * H, T0 + 0.5 * H)
    assert h.countries == ("FR", "DE")
    assert (h.chargebacks, h.confirmed_frauds) == (1, 0)
    assert h.updated_at == CHARGEBACK["ts"]
    assert h.v == HISTORY_VERSION


def test_features_by_hand() -> None:
    f = _features(_history(PAST, CHARGEBACK), NOW_TXN)
    ages = (4 * H, 3.5 * H, 2 * H)  # as of the scored transaction's ts
    amounts = (10.0, 20.0, 30.0)
    for i, tau in enumerate(TAUS):
        weights = [math.exp(-a / tau) for a in ages]
        name = ("1h", "24h", "30d")[i]
        assert f[f"h_cnt_{name}"] == pytest.approx(math.log1p(sum(weights)), rel=1e-6)
        spent = sum(w * a for w, a in zip(weights, amounts, strict=True))
        assert f[f"h_amt_{name}"] == pytest.approx(math.log1p(spent), rel=1e-6)
    w = [math.exp(-a / TAUS[2]) for a in ages]
    xs = [math.log1p(a) for a in amounts]
    s0 = sum(w) + 2.0  # two prior pseudo-transactions at mean 3.4, sd 1.0
    mean = (sum(wi * x for wi, x in zip(w, xs, strict=True)) + 2 * 3.4) / s0
    var = (sum(wi * x * x for wi, x in zip(w, xs, strict=True)) + 2 * (1 + 3.4**2)) / s0
    assert f["h_amount_z"] == pytest.approx((math.log1p(100) - mean) / math.sqrt(var - mean**2))
    assert f["h_merchants_24h"] == 2.0  # m1 twice, m2
    assert f["h_countries_24h"] == 2.0  # DE, FR
    assert f["h_country_changed"] == 0.0  # previous transaction was in FR too
    assert f["h_country_new_30d"] == 0.0
    assert f["h_log_since_last"] == pytest.approx(math.log1p(2 * H))
    assert f["h_chargebacks"] == pytest.approx(math.log1p(1))
    assert f["h_confirmed_frauds"] == 0.0
    assert f["h_has_history"] == 1.0 and f["degraded"] == 0.0


def test_new_country_and_change() -> None:
    f = _features(_history(PAST), dict(NOW_TXN, country="IT"))
    assert f["h_country_changed"] == 1.0 and f["h_country_new_30d"] == 1.0
    assert f["h_countries_24h"] == 2.0  # the scored transaction's own country is not counted


def test_windows_expire() -> None:
    f = _features(_history(PAST), dict(NOW_TXN, ts=T0 + 3 * DAY))
    assert f["h_merchants_24h"] == 0.0 and f["h_countries_24h"] == 0.0
    assert f["h_country_new_30d"] == 0.0  # FR was used 3 days ago: within 30 d
    assert f["h_cnt_1h"] == pytest.approx(0.0, abs=1e-12)
    f = _features(_history(PAST), dict(NOW_TXN, ts=T0 + 40 * DAY))
    assert f["h_country_new_30d"] == 1.0


def test_history_excludes_the_scored_transaction() -> None:
    before = _history(PAST, CHARGEBACK)
    after = update_with_transaction(before, NOW_TXN)  # the slow path got there first
    f_before, f_after = _features(before, NOW_TXN), _features(after, NOW_TXN)
    assert f_after == pytest.approx(f_before, abs=1e-5)
    # A card's very first transaction: already-applied or not, it has no history (degraded,
    # defaults), so the race between the two paths cannot change features or flag.
    first = update_with_transaction(None, PAST[0])
    f = _features(first, PAST[0])
    assert f["h_has_history"] == 0.0 and f["h_cnt_30d"] == 0.0 and f["degraded"] == 1.0
    assert f == pytest.approx(_features(None, PAST[0]))


def test_degraded_when_missing_or_stale() -> None:
    h = _history(PAST, CHARGEBACK)
    txns = [NOW_TXN, NOW_TXN, NOW_TXN]
    now = h.updated_at + 600.0
    x, degraded = history_features([None, h, h], txns, now=now, max_staleness_s=900.0)
    assert degraded.tolist() == [True, False, False]
    assert x[0].tolist() == list(DEFAULT_HISTORY_FEATURES)
    assert x[1, HISTORY_FEATURE_NAMES.index("h_has_history")] == 1.0
    x, degraded = history_features([h], [NOW_TXN], now=now, max_staleness_s=300.0)
    assert degraded.tolist() == [True] and x[0].tolist() == list(DEFAULT_HISTORY_FEATURES)


def test_batch_matches_single_rows() -> None:
    h = _history(PAST, CHARGEBACK)
    stale = msgspec.structs.replace(h, updated_at=0.0)
    rows: list[tuple[CardHistory | None, dict[str, Any]]] = [
        (h, NOW_TXN), (None, NOW_TXN), (stale, NOW_TXN), (h, dict(NOW_TXN, country="IT")),
    ]  # fmt: skip
    kw = {"now": NOW_TXN["ts"], "max_staleness_s": DAY}
    x, degraded = history_features([r[0] for r in rows], [r[1] for r in rows], **kw)
    for i, (hist, txn) in enumerate(rows):
        xi, di = history_features([hist], [txn], **kw)
        assert np.array_equal(x[i], xi[0]) and degraded[i] == di[0]
    assert degraded.tolist() == [False, True, True, False]
    x, degraded = history_features([], [], **kw)
    assert x.shape == (0, len(HISTORY_FEATURE_NAMES)) and degraded.shape == (0,)
    with pytest.raises(ValueError, match="histories"):
        history_features([h], [], **kw)


def test_out_of_order_transaction() -> None:
    in_order = _history(PAST)
    late = _history([PAST[0], PAST[2], PAST[1]])  # e1 arrives after e2
    for field in ("cnt_1h", "cnt_24h", "cnt_30d", "amt_1h", "amt_30d", "logamt_sq_sum"):
        assert getattr(late, field) == pytest.approx(getattr(in_order, field))
    assert late.last_ts == in_order.last_ts == T0 + 2 * H  # never moves backwards
    assert late.last_country == "FR" and late.last_event_id == "e2"
    assert late.updated_at == T0 + 2 * H
    assert set(late.merchants) == {"m1", "m2"}
    assert _features(late, NOW_TXN) == pytest.approx(_features(in_order, NOW_TXN))


def test_snapshot_newer_than_transaction_is_not_decayed_backwards() -> None:
    h = _history(PAST)
    f = _features(h, dict(NOW_TXN, ts=T0 + H, event_id="old"))
    assert f["h_cnt_1h"] == pytest.approx(math.log1p(h.cnt_1h))
    assert f["h_log_since_last"] == 0.0


def test_labels() -> None:
    h = _history(PAST)
    legit = update_with_label(h, dict(CHARGEBACK, label="legit", ts=T0 + 5 * H))
    assert legit == msgspec.structs.replace(h, updated_at=T0 + 5 * H)
    fraud = update_with_label(None, dict(CHARGEBACK, label="confirmed_fraud"))
    assert (fraud.confirmed_frauds, fraud.chargebacks, fraud.last_ts) == (1, 0, 0.0)
    f = _features(fraud, NOW_TXN)  # labels but no earlier transaction in the state
    assert f["h_has_history"] == 0.0 and f["h_confirmed_frauds"] == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="label"):
        update_with_label(h, dict(CHARGEBACK, label="maybe"))


def test_tracked_sets_are_bounded() -> None:
    txns = [_txn(T0 + i, 5.0, f"m{i}", "DE", f"e{i}") for i in range(MAX_TRACKED + 8)]
    h = _history(txns)
    assert len(h.merchants) == len(h.merchants_seen) == MAX_TRACKED
    assert h.merchants[0] == f"m{MAX_TRACKED + 7}" and "m0" not in h.merchants  # oldest evicted
    h = update_with_transaction(h, _txn(T0 + 2 * DAY, 5.0, "new", "FR", "late"))
    assert h.merchants == ("new",)  # everything else is older than 24 h
    assert h.countries == ("FR", "DE")  # countries are kept for 30 d


def test_bytes_round_trip() -> None:
    h = _history(PAST, CHARGEBACK)
    blob = to_bytes(h)
    assert isinstance(blob, bytes) and len(blob) < 300
    assert from_bytes(blob) == h
    assert from_bytes(to_bytes(CardHistory())) == CardHistory()
    with pytest.raises(ValueError, match="version"):
        from_bytes(to_bytes(msgspec.structs.replace(h, v=HISTORY_VERSION + 1)))
    with pytest.raises(ValueError):
        from_bytes(b"\x00not msgpack")
