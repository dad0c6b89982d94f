"""The fast path's freshness logic (PartitionClock), the view's changelog replica, and the
slow path's idempotent, offset-guarded updates."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import msgspec

from agents.history import apply_label, apply_transaction, is_retry
from pipeline.features.cardhistory import CardHistory, to_bytes
from pipeline.features.historyview import HistoryView, PartitionClock
from pipeline.settings import load_settings

TXN = {"event_id": "e1", "card_id": "c1", "merchant_id": "m1", "amount": 10.0,
       "country": "DE", "ts": 1_000.0}


def test_clock_lag_is_age_of_oldest_unapplied_earlier_transaction() -> None:
    clock = PartitionClock()
    for offset, ts in ((10, 100.0), (11, 100.5), (12, 101.0), (13, 103.0)):
        clock.add(offset, ts)
    # (The slow path's applied offset only grows; each call forgets what it has applied.)
    assert clock.lag_s(13, 103.0, applied=10) == 2.5  # 11 (at 100.5) is missing
    assert clock.lag_s(11, 100.5, applied=10) == 0.0  # nothing before 11 missing
    assert clock.lag_s(13, 103.0, applied=11) == 2.0  # 12 (at 101.0) is missing
    assert clock.lag_s(13, 103.0, applied=12) == 0.0  # everything before 13 applied
    assert clock.lag_s(13, 103.0, applied=13) == 0.0  # the slow path already has 13 itself


def test_clock_unknown_gap_counts_as_infinitely_stale() -> None:
    clock = PartitionClock()
    clock.add(50, 10.0)  # e.g. the first record after a restart
    assert clock.lag_s(50, 10.0, applied=20) == math.inf  # 21..49 never timed here
    assert clock.lag_s(50, 10.0, applied=49) == 0.0


def test_clock_is_bounded_and_ignores_replays() -> None:
    clock = PartitionClock(maxlen=3)
    for offset in range(10):
        clock.add(offset, float(offset))
    clock.add(5, 5.0)  # redelivered: not appended again
    assert len(clock) == 3
    # Offsets 0..6 dropped out: the lag is a lower bound (the oldest entry still known).
    assert clock.lag_s(9, 9.0, applied=0) == 2.0


def test_transactions_and_labels_are_applied_once_per_offset() -> None:
    h = apply_transaction(None, TXN, offset=7)
    assert h is not None and h.src_offset == 7 and h.cnt_30d == 1.0
    assert apply_transaction(h, TXN, offset=7) is None  # redelivered: skipped
    assert apply_transaction(h, TXN, offset=3) is None
    h2 = apply_transaction(h, {**TXN, "event_id": "e2", "ts": 1_060.0}, offset=9)
    assert h2 is not None and h2.src_offset == 9 and h2.cnt_30d > 1.9
    label = {"event_id": "e1", "card_id": "c1", "label": "chargeback", "ts": 2_000.0}
    h3 = apply_label(h2, label, offset=4)
    assert h3 is not None and h3.chargebacks == 1 and h3.label_offset == 4
    assert apply_label(h3, label, offset=4) is None
    assert h3.src_offset == 9  # labels do not move the transaction offset


def test_a_producer_retry_of_the_newest_transaction_is_not_counted_twice() -> None:
    h = apply_transaction(None, TXN, offset=7)
    assert h is not None and not is_retry(h, {**TXN, "event_id": "e2"}) and is_retry(h, TXN)
    copy = apply_transaction(h, TXN, offset=8)  # the same event_id at a later offset
    assert copy is not None
    assert copy == msgspec.structs.replace(h, src_offset=8)  # only the offset moved
    h2 = apply_transaction(copy, {**TXN, "event_id": "e2", "ts": 1_060.0}, offset=9)
    assert h2 is not None and h2.cnt_30d > 1.9 and h2.last_event_id == "e2"
    # A copy that comes after another transaction of the card is not recognised: counted.
    late_copy = apply_transaction(h2, TXN, offset=10)
    assert late_copy is not None and late_copy.cnt_30d > h2.cnt_30d
    assert not is_retry(CardHistory(), {**TXN, "event_id": ""})  # "" means: no transaction


def _record(offset: int, key: str, value: bytes | None) -> Any:
    return SimpleNamespace(offset=offset, key=key.encode(), value=value)


def test_view_keeps_latest_value_and_highest_applied_offset() -> None:
    view = HistoryView(load_settings())
    view._loading[0] = 4  # assigned while the changelog held 4 records
    view._apply(0, [_record(0, "a", to_bytes(CardHistory(src_offset=5))),
                    _record(1, "b", to_bytes(CardHistory(src_offset=8)))])
    assert view.get(0, "a") is None  # still loading: no snapshot is served
    view._apply(0, [_record(2, "a", to_bytes(CardHistory(src_offset=9, chargebacks=1))),
                    _record(3, "b", b"\x00garbage")])
    assert view.get(0, "a") == CardHistory(src_offset=9, chargebacks=1)
    assert view.get(0, "b") == CardHistory(src_offset=8)  # the bad record was skipped
    assert view.applied(0) == 9 and view.bad_records == 1
    view._apply(0, [_record(4, "a", None)])  # tombstone
    assert view.get(0, "a") is None and view.applied(0) == 9
    assert view.get(1, "a") is None and view.applied(1) == -1
    view.release([0])
    assert view.get(0, "b") is None and view.applied(0) == -1 and view.size() == 0
