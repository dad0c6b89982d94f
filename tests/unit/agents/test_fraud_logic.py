"""Unit tests for the pure parts of the lanes: fraud decisions, dead letters, archive keys."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import numpy as np
import orjson
import pytest

from agents.archive import archive_key, archive_prefix
from pipeline.inference.fraudscore import Thresholds, decide
from pipeline.inference.model import OnnxScorer
from pipeline.kafka.deadletter import RAW_MAX_BYTES, dead_letter
from pipeline.settings import load_settings
from schemas import DeadLetter

CARD = Path(__file__).resolve().parents[3] / "models" / "fraud" / "card.json"


def _f32(*values: float) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.array(values, dtype=np.float32)


def _ms(*args: int) -> int:
    """Epoch milliseconds of a UTC wall-clock time."""
    return int(dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp() * 1000)


# --- decide / Thresholds -------------------------------------------------------------------------


def test_decide_boundaries() -> None:
    t = Thresholds(review=0.5, decline=0.75)
    scores = _f32(0.0, 0.25, 0.4999, 0.5, 0.5001, 0.7499, 0.75, 0.7501, 1.0)
    assert decide(scores, t) == [
        "approve", "approve", "approve",
        "review", "review", "review",
        "decline", "decline", "decline",
    ]


def test_decide_exactly_at_non_representable_thresholds() -> None:
    # float32(0.7) != 0.7 as a double; a score equal to the threshold "at" float32 still counts.
    t = Thresholds(review=0.7, decline=0.85)
    below = np.nextafter(np.float32(0.7), np.float32(0), dtype=np.float32)
    scores = np.array([below, 0.7, 0.85], dtype=np.float32)
    assert decide(scores, t) == ["approve", "review", "decline"]


def test_decide_with_the_model_card_thresholds() -> None:
    card = json.loads(CARD.read_text())["thresholds"]
    t = Thresholds(review=card["review"], decline=card["decline"])
    review = np.float32(card["review"])
    decline = np.float32(card["decline"])
    scores = np.array([
        np.nextafter(review, np.float32(0)), review,
        np.nextafter(decline, np.float32(0)), decline,
    ], dtype=np.float32)
    assert decide(scores, t) == ["approve", "review", "review", "decline"]


def test_decide_equal_thresholds_skip_review() -> None:
    t = Thresholds(review=0.5, decline=0.5)
    assert decide(_f32(0.49, 0.5, 0.51), t) == ["approve", "decline", "decline"]


def test_decide_extreme_thresholds() -> None:
    assert decide(_f32(0.0, 0.5, 1.0), Thresholds(0.0, 1.0)) == ["review", "review", "decline"]
    assert decide(_f32(0.0, 1.0), Thresholds(0.0, 0.0)) == ["decline", "decline"]
    assert decide(_f32(0.0, 0.999, 1.0), Thresholds(1.0, 1.0)) == [
        "approve", "approve", "decline"]


def test_decide_empty_and_order_preserved() -> None:
    t = Thresholds(review=0.3, decline=0.6)
    assert decide(np.empty(0, dtype=np.float32), t) == []
    scores = _f32(0.9, 0.1, 0.4, 0.6, 0.3, 0.0)
    assert decide(scores, t) == ["decline", "approve", "review", "decline", "review", "approve"]


@pytest.mark.parametrize(
    ("review", "decline"),
    [(0.8, 0.5), (0.5000001, 0.5), (-0.1, 0.5), (0.2, 1.1), (-0.5, -0.1), (1.5, 2.0)],
)
def test_thresholds_reject_inconsistent_values(review: float, decline: float) -> None:
    with pytest.raises(ValueError, match="review <= decline"):
        Thresholds(review=review, decline=decline)


@pytest.mark.parametrize(("review", "decline"), [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.3, 0.3)])
def test_thresholds_accept_bounds(review: float, decline: float) -> None:
    t = Thresholds(review=review, decline=decline)
    assert (t.review, t.decline) == (review, decline)


def test_thresholds_are_frozen() -> None:
    t = Thresholds(review=0.2, decline=0.4)
    with pytest.raises(AttributeError):
        t.review = 0.3  # type: ignore[misc]


class _Card:
    thresholds = {"review": 0.25, "decline": 0.75}


class _Scorer:
    card = _Card()


def test_thresholds_for_model_use_the_card_unless_overridden() -> None:
    scorer = cast(OnnxScorer, _Scorer())
    none = load_settings(fraud_review_threshold=None, fraud_decline_threshold=None)
    assert Thresholds.for_model(none, scorer) == Thresholds(0.25, 0.75)
    review = load_settings(fraud_review_threshold=0.5, fraud_decline_threshold=None)
    assert Thresholds.for_model(review, scorer) == Thresholds(0.5, 0.75)
    both = load_settings(fraud_review_threshold=0.1, fraud_decline_threshold=0.2)
    assert Thresholds.for_model(both, scorer) == Thresholds(0.1, 0.2)
    clash = load_settings(fraud_review_threshold=0.9, fraud_decline_threshold=None)
    with pytest.raises(ValueError, match="review <= decline"):
        Thresholds.for_model(clash, scorer)


# --- dead letters --------------------------------------------------------------------------------


def _letter(raw: bytes | None, **overrides: Any) -> tuple[DeadLetter, dict[str, Any]]:
    args: dict[str, Any] = {
        "error": "schema", "reason": "amount: Expected `float` >= 0.0",
        "topic": "fraud.requests", "partition": 3, "offset": 12345, "lane": "fraud",
    }
    args.update(overrides)
    value = dead_letter(raw, **args)
    assert isinstance(value, bytes)
    return msgspec.json.decode(value, type=DeadLetter), orjson.loads(value)


def test_dead_letter_for_utf8_raw_has_every_field() -> None:
    raw = b'{"event_id": "e-1", "amount": -5}'
    before = time.time()
    letter, data = _letter(raw)
    after = time.time()
    assert set(data) == set(DeadLetter.__struct_fields__)
    assert letter.error == "schema"
    assert letter.reason == "amount: Expected `float` >= 0.0"
    assert letter.topic == "fraud.requests"
    assert letter.partition == 3
    assert letter.offset == 12345
    assert letter.lane == "fraud"
    assert letter.raw == raw.decode()
    assert letter.raw_encoding == "utf-8"
    assert before <= letter.failed_at <= after


def test_dead_letter_for_non_utf8_raw_is_base64() -> None:
    raw = b"\xff\xfe\x00garbage\x80"
    letter, data = _letter(raw, error="invalid_json", reason="value: not valid JSON", offset=0)
    assert letter.raw_encoding == "base64"
    assert data["raw_encoding"] == "base64"
    assert base64.b64decode(letter.raw, validate=True) == raw
    assert letter.error == "invalid_json"
    assert letter.offset == 0


def test_dead_letter_keeps_a_raw_value_up_to_the_cap_whole() -> None:
    raw = b"a" * RAW_MAX_BYTES
    letter, _ = _letter(raw)
    assert letter.raw.encode() == raw
    assert letter.reason == "amount: Expected `float` >= 0.0"


@pytest.mark.parametrize("raw", [b"b" * (2 * 1024 * 1024), b"\x01" * (2 * 1024 * 1024),
                                 b"\xff" * (RAW_MAX_BYTES + 1)])
def test_dead_letter_of_a_long_value_carries_its_first_bytes_and_fits_a_batch(raw: bytes
                                                                               ) -> None:
    value = dead_letter(raw, error="too_large", reason="value: too long", topic="t",
                        partition=0, offset=1, lane="fraud")
    # The results producer's batch is 256 KiB (pipeline/kafka/connection.py): the letter must fit
    # it, even when JSON escapes every byte (\u0001 is six bytes).
    assert len(value) < 256 * 1024
    letter = msgspec.json.decode(value, type=DeadLetter)
    kept = (letter.raw.encode() if letter.raw_encoding == "utf-8"
            else base64.b64decode(letter.raw))
    assert kept == raw[:RAW_MAX_BYTES]
    assert letter.reason == f"value: too long (raw: the first {RAW_MAX_BYTES} of {len(raw)} bytes)"


def test_dead_letter_for_missing_value() -> None:
    letter, _ = _letter(None, error="invalid_json", reason="value: empty record value")
    assert letter.raw == ""
    assert letter.raw_encoding == "utf-8"


def test_dead_letter_keeps_unicode_and_nan_text_verbatim() -> None:
    raw = '{"merchant": "Café €", "amount": NaN}'.encode()
    letter, _ = _letter(raw, error="inference", reason="model failed on this record: boom")
    assert letter.raw == '{"merchant": "Café €", "amount": NaN}'
    assert letter.raw_encoding == "utf-8"
    assert letter.error == "inference"


# --- archive keys --------------------------------------------------------------------------------


@pytest.fixture
def far_timezone() -> Iterator[None]:
    """Run with a local time zone far from UTC: keys must not depend on it."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Kiritimati"  # UTC+14
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.mark.usefixtures("far_timezone")
def test_archive_key_exact_format() -> None:
    ts = _ms(2024, 2, 29, 23, 59, 59) + 999
    assert archive_key("fraud.scores", 3, 0, 41, ts) == (
        "results/fraud.scores/dt=2024-02-29/hour=23/"
        "0003-00000000000000000000-00000000000000000041.jsonl.gz"
    )
    assert archive_key("fraud.scores", 3, 0, 41, ts + 1) == (
        "results/fraud.scores/dt=2024-03-01/hour=00/"
        "0003-00000000000000000000-00000000000000000041.jsonl.gz"
    )


@pytest.mark.usefixtures("far_timezone")
def test_archive_key_pads_and_uses_utc_hour() -> None:
    ts = _ms(2023, 11, 14, 7, 5, 0)
    key = archive_key("staging.fraud.scores", 12, 1_234_567, 9_223_372_036_854_775_807, ts)
    assert key == (
        "results/staging.fraud.scores/dt=2023-11-14/hour=07/"
        "0012-00000000000001234567-09223372036854775807.jsonl.gz"
    )


@pytest.mark.usefixtures("far_timezone")
def test_archive_prefix_is_the_key_up_to_the_last_offset() -> None:
    ts = _ms(2025, 1, 2, 13, 0, 0)
    prefix = archive_prefix("fraud.scores", 0, 500, ts)
    assert prefix == "results/fraud.scores/dt=2025-01-02/hour=13/0000-00000000000000000500-"
    for last in (500, 999, 10**12):
        key = archive_key("fraud.scores", 0, 500, last, ts)
        assert key.startswith(prefix)
        assert key[len(prefix):] == f"{last:020d}.jsonl.gz"
        assert int(key[len(prefix):].split(".", 1)[0]) == last
    # Another first offset never shares the prefix (no "5000" matching "500").
    assert not archive_key("fraud.scores", 0, 5000, 5999, ts).startswith(prefix)


def test_archive_keys_sort_in_offset_order() -> None:
    ts = _ms(2024, 6, 1, 12, 0, 0)
    bounds = [0, 9, 10, 99, 100, 999, 1000, 123_456_789, 10**15, 2**63 - 1]
    windows = list(zip(bounds[:-1], [b - 1 for b in bounds[1:]], strict=True))
    keys = [archive_key("fraud.scores", 1, first, last, ts) for first, last in windows]
    assert sorted(keys) == keys
    # Windows crossing hours and days also sort by offset when time moves forward.
    later = [archive_key("fraud.scores", 1, first, first + 9, ts + i * 3_600_000 * 7)
             for i, first in enumerate(range(0, 100, 10))]
    assert sorted(later) == later
