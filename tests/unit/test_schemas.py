"""Unit tests for the event shapes in schemas/: validation, raw encoding, JSON Schema export."""

from __future__ import annotations

import base64
import importlib
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import numpy as np
import orjson
import pytest

import schemas
from agents.fraud import FraudHandler, FraudModel
from pipeline.batching.batcher import MicroBatcher
from pipeline.inference.fraudscore import Thresholds
from pipeline.inference.model import OnnxScorer
from pipeline.kafka.lane import LaneContext, LaneStats, Record
from pipeline.settings import load_settings
from schemas import (
    SHAPES,
    BatchJob,
    BatchRecord,
    BatchResult,
    DeadLetter,
    FraudLabel,
    FraudScore,
    RecoRequest,
    RecoResult,
    Rejection,
    ShadowScore,
    Transaction,
    encode_raw,
    export_json_schemas,
    json_schema,
    size_rejection,
    validate_record,
)

COMMITTED_JSON = Path(__file__).resolve().parents[2] / "schemas" / "json"
TS = 1_700_000_000.0  # 2023-11-14T22:13:20Z, epoch seconds
MISSING = object()


def _txn(**overrides: Any) -> dict[str, Any]:
    txn: dict[str, Any] = {
        "event_id": "evt-0001",
        "card_id": "card-000042",
        "merchant_id": "m-de-5411-007",
        "amount": 12.5,
        "currency": "EUR",
        "mcc": 5411,
        "country": "DE",
        "card_country": "FR",
        "channel": "pos",
        "ts": TS,
    }
    for key, value in overrides.items():
        if value is MISSING:
            del txn[key]
        else:
            txn[key] = value
    return txn


def _raw(**overrides: Any) -> bytes:
    return orjson.dumps(_txn(**overrides))


# --- valid transactions --------------------------------------------------------------------------


def test_valid_transaction_returns_the_parsed_dict() -> None:
    data, rejection = validate_record(_raw(), Transaction)
    assert rejection is None
    assert data == _txn()
    assert isinstance(data, dict)


@pytest.mark.parametrize(
    "overrides",
    [
        {"sent_at": TS + 0.25},
        {"sent_at": None},
        {"amount": 0},
        {"amount": 1e9},
        {"amount": 7},
        {"mcc": 0},
        {"mcc": 9999},
        {"channel": "atm"},
        {"channel": "ecom"},
        {"ts": 0.0},
        {"ts": 1e10},
        {"event_id": "x" * 128},
        {"event_id": "é"},
    ],
)
def test_valid_edge_values_pass(overrides: dict[str, Any]) -> None:
    data, rejection = validate_record(_raw(**overrides), Transaction)
    assert rejection is None
    assert data == _txn(**overrides)


def test_unknown_extra_fields_are_accepted_and_kept() -> None:
    raw = _raw(producer="loadgen-7", nested={"a": [1, 2]}, score=None)
    data, rejection = validate_record(raw, Transaction)
    assert rejection is None
    assert data is not None
    assert data["producer"] == "loadgen-7"
    assert data["nested"] == {"a": [1, 2]}


# --- schema rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", MISSING),
        ("event_id", MISSING),
        ("channel", MISSING),
        ("ts", MISSING),
        ("amount", -0.01),
        ("amount", -1),
        ("amount", 1e12),
        ("amount", 1e9 + 1),
        ("amount", True),
        ("amount", "12.50"),
        ("amount", None),
        ("currency", "EURO"),
        ("currency", "eur"),
        ("currency", "EU"),
        ("currency", 978),
        ("country", "DEU"),
        ("country", "de"),
        ("card_country", "D"),
        ("channel", "fax"),
        ("channel", "POS"),
        ("mcc", "abc"),
        ("mcc", "5411"),
        ("mcc", 10000),
        ("mcc", -1),
        ("mcc", 54.11),
        ("event_id", ""),
        ("event_id", "e" * 129),
        ("event_id", "e" * 200),
        ("event_id", 17),
        ("card_id", ""),
        ("merchant_id", "m" * 200),
        ("ts", 1.7e12),
        ("ts", -1.0),
        ("ts", "2023-11-14T22:13:20Z"),
        ("sent_at", 1.7e12),
        # Python's ``$`` also matches before a final newline: the patterns must not.
        ("currency", "EUR\n"),
        ("country", "DE\n"),
        ("card_country", "FR\n"),
    ],
)
def test_bad_field_is_rejected_with_reason_naming_it(field: str, value: Any) -> None:
    data, rejection = validate_record(_raw(**{field: value}), Transaction)
    assert data is None
    assert rejection is not None
    assert rejection.error == "schema"
    assert rejection.reason.startswith(f"{field}: "), rejection.reason


def test_missing_field_reason_is_exact() -> None:
    _, rejection = validate_record(_raw(amount=MISSING), Transaction)
    assert rejection == Rejection("schema", "amount: missing required field")


def test_millisecond_timestamp_reason_names_the_bound() -> None:
    _, rejection = validate_record(_raw(ts=1.7e12), Transaction)
    assert rejection == Rejection("schema", "ts: Expected `float` <= 10000000000.0")


@pytest.mark.parametrize(
    ("literal", "field"),
    [
        (b"NaN", "amount"),
        (b"Infinity", "amount"),
        (b"-Infinity", "amount"),
    ],
)
def test_nan_and_infinity_literals_name_the_field(literal: bytes, field: str) -> None:
    raw = _raw(amount=123456.75).replace(b"123456.75", literal)
    assert literal in raw
    data, rejection = validate_record(raw, Transaction)
    assert data is None
    assert rejection is not None
    assert rejection.error == "schema"
    assert rejection.reason.startswith(f"{field}: "), rejection.reason
    assert "NaN or Infinity" in rejection.reason


def test_nan_literal_in_sent_at_names_sent_at() -> None:
    raw = _raw(sent_at=987654.5).replace(b"987654.5", b"NaN")
    _, rejection = validate_record(raw, Transaction)
    assert rejection is not None
    assert rejection.error == "schema"
    assert rejection.reason.startswith("sent_at: "), rejection.reason


def test_nan_literal_in_an_unknown_field_is_still_invalid_json() -> None:
    raw = _raw(extra=4242.5).replace(b"4242.5", b"NaN")
    data, rejection = validate_record(raw, Transaction)
    assert data is None
    assert rejection is not None
    assert rejection.error == "invalid_json"
    assert rejection.reason.startswith("value: not valid JSON")


def test_nan_in_an_unknown_field_does_not_blame_a_missing_field() -> None:
    # The lenient parse only names a field that holds the NaN; here none does.
    _, rejection = validate_record(b'{"note": NaN}', Transaction)
    assert rejection is not None
    assert rejection.error == "invalid_json"
    assert rejection.reason.startswith("value: not valid JSON"), rejection.reason


@pytest.mark.parametrize("raw", [b"NaN", b"-Infinity", b"1e400", b"[NaN]", b"[1, Infinity]"])
def test_top_level_nan_or_infinity_is_invalid_json_of_the_value(raw: bytes) -> None:
    # Was: schema, "Expected `object`, got `float` (NaN or Infinity...)": no field named.
    _, rejection = validate_record(raw, Transaction)
    assert rejection is not None
    assert rejection.error == "invalid_json"
    assert rejection.reason.startswith("value: not valid JSON"), rejection.reason


@pytest.mark.parametrize(
    ("field", "literal"),
    [("amount", b"1e400"), ("amount", b"-1e400"), ("amount", b"1" + b"0" * 400),
     ("amount", b"1" + b"0" * 5000), ("ts", b"2e308"), ("mcc", b"1" + b"0" * 400),
     ("event_id", b"1" + b"0" * 5000)],
)
def test_numbers_beyond_a_double_name_their_field(field: str, literal: bytes) -> None:
    # orjson refuses them ("number is infinity when parsed as double"): they are Infinity.
    raw = _raw(**{field: "__big__"}).replace(b'"__big__"', literal)
    _, rejection = validate_record(raw, Transaction)
    assert rejection is not None
    assert rejection.error == "schema"
    assert rejection.reason.startswith(f"{field}: "), rejection.reason
    assert rejection.reason.endswith("(NaN or Infinity: not allowed in JSON)")


def test_nan_in_a_nested_field_names_its_path() -> None:
    raw = orjson.dumps({"job_id": "job-1", "model": "fraud", "payload": _txn(amount="__nan__")})
    _, rejection = validate_record(raw.replace(b'"__nan__"', b"NaN"), BatchRecord)
    assert rejection is not None
    assert rejection.error == "schema"
    assert rejection.reason.startswith("payload.amount: "), rejection.reason


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
@pytest.mark.parametrize("amount", [12.5, -5.0])
def test_json_in_another_encoding_is_invalid_json(encoding: str, amount: float) -> None:
    # The stdlib guesses UTF-16/32 and skips a BOM when parsing bytes; the wire is UTF-8 only.
    # Was: a bad field in such a record came out as a schema error blaming NaN or Infinity.
    raw = orjson.dumps(_txn(amount=amount)).decode().encode(encoding)
    _, rejection = validate_record(raw, Transaction)
    assert rejection is not None
    assert rejection.error == "invalid_json"
    assert rejection.reason.startswith("value: not valid JSON"), rejection.reason


@pytest.mark.parametrize("field", ["event_id", "currency", "country", "channel"])
def test_a_lone_surrogate_escape_is_invalid_json_not_raised(field: str) -> None:
    # orjson refuses "\ud800"; the stdlib (the lenient parse) accepts it, and msgspec raised
    # UnicodeEncodeError checking it against the channel Literal: an exception into the lane.
    raw = _raw(**{field: "__s__"}).replace(b'"__s__"', b'"p\\ud800s"')
    _, rejection = validate_record(raw, Transaction)
    assert rejection is not None
    assert rejection.error == "invalid_json"
    assert rejection.reason.startswith("value: not valid JSON"), rejection.reason


def test_invalid_utf8_reason_names_the_byte() -> None:
    raw = b'{"event_id": "\xc3\x28"}'
    assert validate_record(raw, Transaction)[1] == Rejection(
        "invalid_json", "value: not valid JSON (not UTF-8: invalid continuation byte 0xc3 at "
                        "byte 14)")
    latin1 = _raw(merchant_id="caf\u00e9").decode().encode("latin-1")
    _, rejection = validate_record(latin1, Transaction)
    assert rejection is not None
    assert rejection.reason.startswith("value: not valid JSON (not UTF-8: "), rejection.reason


@pytest.mark.parametrize(
    ("raw", "type_name"),
    [
        (b"[1, 2, 3]", "list"),
        (b"[]", "list"),
        (b'"a string"', "str"),
        (b"42", "int"),
        (b"4.5", "float"),
        (b"true", "bool"),
        (b"null", "NoneType"),
    ],
)
def test_non_object_json_is_rejected_as_value(raw: bytes, type_name: str) -> None:
    data, rejection = validate_record(raw, Transaction)
    assert data is None
    assert rejection == Rejection("schema", f"value: expected a JSON object, got {type_name}")


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe\x00\x01",
        b'{"event_id": "\xc3\x28"}',
        b"\x80",
        b"not json at all",
        b"{",
        b'{"amount": 1,}',
        b"\x00",
    ],
)
def test_garbage_bytes_are_invalid_json(raw: bytes) -> None:
    data, rejection = validate_record(raw, Transaction)
    assert data is None
    assert rejection is not None
    assert rejection.error == "invalid_json"
    assert rejection.reason.startswith("value: not valid JSON"), rejection.reason


@pytest.mark.parametrize("raw", [b"", None])
def test_empty_and_null_values_are_invalid_json(raw: bytes | None) -> None:
    assert validate_record(raw, Transaction) == (
        None, Rejection("invalid_json", "value: empty record value"))


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 5_000 + b"]" * 5_000])
def test_deeply_nested_json_is_rejected_not_raised(raw: bytes) -> None:
    """validate_record "never raises into the agent loop": a nesting bomb is just bad input."""
    data, rejection = validate_record(raw, Transaction)
    assert data is None
    assert rejection is not None
    assert rejection.error in {"invalid_json", "schema"}
    assert rejection.reason.startswith("value: ")


@pytest.mark.parametrize(
    ("field", "value"),
    [("job_id", "job-1\n"), ("input_uri", "s3://bucket/in.jsonl\n"),
     ("output_uri", "s3://bucket/out/\n")],
)
def test_batch_job_patterns_refuse_a_trailing_newline(field: str, value: str) -> None:
    job = {"job_id": "job-1", "model": "fraud", "input_uri": "s3://bucket/in.jsonl"}
    assert validate_record(orjson.dumps(job), BatchJob)[1] is None
    _, rejection = validate_record(orjson.dumps({**job, field: value}), BatchJob)
    assert rejection is not None
    assert rejection.error == "schema"
    assert rejection.reason.startswith(f"{field}: "), rejection.reason


def test_other_shapes_validate_too() -> None:
    score = {"event_id": "e", "card_id": "c", "score": 0.25, "decision": "approve",
             "model_version": "fraud-v1-int8", "degraded": False, "scored_at": TS}
    assert validate_record(orjson.dumps(score), FraudScore) == (score, None)
    _, rejection = validate_record(orjson.dumps({**score, "score": 1.5}), FraudScore)
    assert rejection is not None
    assert rejection.reason.startswith("score: ")
    _, rejection = validate_record(orjson.dumps({**score, "decision": "maybe"}), FraudScore)
    assert rejection is not None
    assert rejection.reason.startswith("decision: ")
    letter = {"error": "schema", "reason": "x", "topic": "t", "partition": 0, "offset": 5,
              "raw": "{}"}
    assert validate_record(orjson.dumps(letter), DeadLetter) == (letter, None)
    _, rejection = validate_record(
        orjson.dumps({**letter, "raw_encoding": "latin-1"}), DeadLetter)
    assert rejection is not None
    assert rejection.reason.startswith("raw_encoding: ")


# --- maximum message size ------------------------------------------------------------------------


def _padded(size: int) -> bytes:
    """A valid transaction of exactly ``size`` bytes (padded in an extra field)."""
    base = orjson.dumps({**_txn(), "note": ""})
    assert len(base) <= size
    return orjson.dumps({**_txn(), "note": "x" * (size - len(base))})


def test_a_value_at_the_limit_is_parsed_one_byte_more_is_too_large() -> None:
    at_limit = _padded(4096)
    assert len(at_limit) == 4096
    data, rejection = validate_record(at_limit, Transaction, max_bytes=4096)
    assert rejection is None and data is not None
    over = _padded(4097)
    assert validate_record(over, Transaction, max_bytes=4096) == (None, Rejection(
        "too_large",
        "value: 4097 bytes, more than the limit of 4096 bytes (INFERLANE_MAX_MESSAGE_BYTES)"))


@pytest.mark.parametrize("raw", [b"\xff" * 5000, b"[" * 100_000, b'{"amount": NaN}' * 1000])
def test_too_large_wins_over_any_parse_error(raw: bytes) -> None:
    """An oversized value is refused on its length alone: it is never parsed."""
    _, rejection = validate_record(raw, Transaction, max_bytes=1024)
    assert rejection is not None and rejection.error == "too_large"
    assert rejection.reason.startswith(f"value: {len(raw)} bytes, more than the limit of 1024")


def test_without_max_bytes_there_is_no_limit() -> None:
    data, rejection = validate_record(_padded(2 * 1024 * 1024), Transaction)
    assert rejection is None and data is not None


def test_size_rejection() -> None:
    assert size_rejection(None, 10) is None
    assert size_rejection(b"x" * 10, 10) is None
    too_large = size_rejection(b"x" * 11, 10)
    assert too_large is not None and too_large.error == "too_large"


# --- encode_raw ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b'{"amount": NaN}', "naïve € text".encode(), b"plain", b""])
def test_encode_raw_keeps_utf8_text(raw: bytes) -> None:
    text, encoding = encode_raw(raw)
    assert encoding == "utf-8"
    assert text == raw.decode("utf-8")
    assert text.encode("utf-8") == raw


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00\x01", b'{"a": "\xc3\x28"}', bytes(range(256))])
def test_encode_raw_uses_base64_for_invalid_utf8(raw: bytes) -> None:
    text, encoding = encode_raw(raw)
    assert encoding == "base64"
    assert text == base64.b64encode(raw).decode("ascii")
    assert base64.b64decode(text, validate=True) == raw


def test_encode_raw_of_none_is_empty_text() -> None:
    assert encode_raw(None) == ("", "utf-8")


# --- JSON Schema ---------------------------------------------------------------------------------


def test_committed_json_schemas_are_up_to_date(tmp_path: Path) -> None:
    written = export_json_schemas(tmp_path / "out")
    assert [p.name for p in written] == [f"{name}.schema.json" for name in SHAPES]
    committed = sorted(p.name for p in COMMITTED_JSON.glob("*.schema.json"))
    assert committed == sorted(p.name for p in written)
    for path in written:
        assert path.read_bytes() == (COMMITTED_JSON / path.name).read_bytes(), (
            f"schemas/json/{path.name} is stale: run `inferlane schemas export schemas/json`")


def test_export_is_deterministic(tmp_path: Path) -> None:
    first = [p.read_bytes() for p in export_json_schemas(tmp_path / "a")]
    second = [p.read_bytes() for p in export_json_schemas(tmp_path / "b")]
    assert first == second
    assert all(body.endswith(b"}\n") for body in first)


def test_json_schema_is_standalone() -> None:
    schema = json_schema(Transaction)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "Transaction"
    assert schema["type"] == "object"
    assert "$defs" not in schema
    assert "$ref" not in orjson.dumps(schema).decode()
    assert schema["required"] == [
        "event_id", "card_id", "merchant_id", "amount", "currency", "mcc", "country",
        "card_country", "channel", "ts",
    ]
    props = cast(dict[str, dict[str, Any]], schema["properties"])
    assert set(props) == set(Transaction.__struct_fields__)
    assert props["amount"]["minimum"] == 0.0
    assert props["amount"]["maximum"] == 1e9
    assert props["mcc"] == {"type": "integer", "minimum": 0, "maximum": 9999}
    assert props["currency"]["pattern"] == r"^[A-Z]{3}(?!\n)$"
    assert re.search(props["currency"]["pattern"], "EUR")
    assert not re.search(props["currency"]["pattern"], "EUR\n")
    assert props["ts"]["maximum"] == 1e10


def test_shapes_registry() -> None:
    assert SHAPES == {"Transaction": Transaction, "FraudScore": FraudScore,
                      "RecoRequest": RecoRequest, "RecoResult": RecoResult,
                      "DeadLetter": DeadLetter, "BatchJob": BatchJob, "BatchRecord": BatchRecord,
                      "BatchResult": BatchResult, "FraudLabel": FraudLabel,
                      "ShadowScore": ShadowScore}


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 "isort-style": CONSTANTS, then Classes, then functions, each alphabetical.
    group = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return group, name


def test_package_all_is_sorted_and_importable() -> None:
    assert schemas.__all__ == sorted(schemas.__all__, key=_isort_key)
    assert len(set(schemas.__all__)) == len(schemas.__all__)
    module = importlib.import_module("schemas")
    for name in schemas.__all__:
        assert getattr(module, name) is not None
    namespace: dict[str, Any] = {}
    exec("from schemas import *", namespace)  # noqa: S102 - the star import is what is tested
    assert set(schemas.__all__) <= set(namespace)


# --- FraudScore as the fraud lane builds it ------------------------------------------------------


class _FakeScorer:
    version = "fraud-v1-int8"


def test_fraud_score_dict_built_by_hand_like_the_lane_converts() -> None:
    txn = _txn(sent_at=TS - 0.01)
    score = np.float32(0.8125)
    value = orjson.dumps({
        "event_id": txn["event_id"], "card_id": txn["card_id"], "score": float(score),
        "decision": "review", "model_version": "fraud-v1-int8", "degraded": False,
        "scored_at": time.time(), "sent_at": txn["sent_at"],
    })
    result = msgspec.convert(orjson.loads(value), FraudScore)
    assert result.score == 0.8125
    assert result.sent_at == TS - 0.01


async def test_fraud_score_values_produced_by_the_lane_convert() -> None:
    settings = load_settings(topic_prefix="")
    handler = FraudHandler(settings, scorer=cast(OnnxScorer, _FakeScorer()))
    stats = LaneStats()
    handler._ctx = cast(LaneContext, type("Ctx", (), {"stats": stats})())
    model = FraudModel(scorer=cast(OnnxScorer, _FakeScorer()),
                       thresholds=Thresholds(review=0.5, decline=0.9),
                       batcher=cast(MicroBatcher, None), reference=None, cold_start_s=0.0)
    valid = [_txn(event_id="a", card_id="card-a"),
             _txn(event_id="b", card_id="card-b", sent_at=time.time()),
             _txn(event_id="c", card_id="card-c", sent_at=TS),
             _txn(event_id="d", card_id="card-d")]
    scores = np.array([0.1, 0.5, 0.95, np.nan], dtype=np.float32)
    before = time.time()
    try:
        # Kafka record timestamps (ms) stand in for sent_at where it is absent ("a", "d").
        sources = [cast(Record, SimpleNamespace(timestamp=int(before * 1000)))] * len(valid)
        degraded = np.array([False, True, False, False])
        out = handler._results(valid, sources, scores, degraded, [(3, "model failed")], model)
    finally:
        await handler.stop()
    assert [key for key, _ in out] == [b"card-a", b"card-b", b"card-c"]
    converted = [msgspec.convert(orjson.loads(value), FraudScore) for _, value in out]
    assert [s.event_id for s in converted] == ["a", "b", "c"]
    assert [s.decision for s in converted] == ["approve", "review", "decline"]
    assert [s.score for s in converted] == [float(np.float32(x)) for x in (0.1, 0.5, 0.95)]
    assert all(s.model_version == "fraud-v1-int8" for s in converted)
    assert [s.degraded for s in converted] == [False, True, False]
    assert stats.degraded == 1
    assert all(before <= s.scored_at <= time.time() for s in converted)
    assert [s.sent_at for s in converted] == [None, valid[1]["sent_at"], TS]
    assert stats.late == 1  # only "c" was sent long before the 50 ms budget


# --- RecoRequest / RecoResult --------------------------------------------------------------------


def _reco(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"request_id": "r-1", "user_id": "user-000042"}
    for key, value in overrides.items():
        if value is MISSING:
            request.pop(key, None)
        else:
            request[key] = value
    return request


@pytest.mark.parametrize(
    "overrides",
    [{}, {"k": 1}, {"k": 100}, {"candidate_ids": ["item-00001"]},
     {"candidate_ids": ["item-00001"] * 1000}, {"candidate_ids": None}, {"sent_at": TS},
     {"context": {"page": "home"}}],
)
def test_valid_reco_requests_pass(overrides: dict[str, Any]) -> None:
    data, rejection = validate_record(orjson.dumps(_reco(**overrides)), RecoRequest)
    assert rejection is None
    assert data == _reco(**overrides)


def test_reco_request_defaults() -> None:
    request = msgspec.convert(_reco(), RecoRequest)
    assert request.k == schemas.RECO_DEFAULT_K == 10
    assert request.candidate_ids is None and request.sent_at is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("request_id", MISSING), ("request_id", ""), ("request_id", 7),
        ("user_id", MISSING), ("user_id", "u" * 129), ("user_id", None),
        ("k", 0), ("k", 101), ("k", -1), ("k", "10"), ("k", 2.5), ("k", True),
        ("candidate_ids", []), ("candidate_ids", ["item-00001"] * 1001),
        ("candidate_ids", "item-00001"), ("candidate_ids", [5]), ("candidate_ids", [""]),
        ("sent_at", 1.7e12), ("sent_at", "now"),
    ],
)
def test_bad_reco_field_is_rejected_with_reason_naming_it(field: str, value: Any) -> None:
    data, rejection = validate_record(orjson.dumps(_reco(**{field: value})), RecoRequest)
    assert data is None
    assert rejection is not None and rejection.error == "schema"
    assert rejection.reason.startswith(field), rejection.reason


def test_reco_result_shape() -> None:
    value = {"request_id": "r-1", "user_id": "user-000042", "model_version": "reco-v1-int8",
             "items": [{"item_id": "item-00003", "score": 2.5},
                       {"item_id": "item-00007", "score": 1.25}],
             "scored_at": TS, "sent_at": TS - 0.01, "dropped_candidates": 2}
    result = msgspec.convert(value, RecoResult)
    assert [item.item_id for item in result.items] == ["item-00003", "item-00007"]
    assert result.dropped_candidates == 2
    _, rejection = validate_record(orjson.dumps({**value, "items": [{"score": 1.0}]}), RecoResult)
    assert rejection is not None and rejection.reason.startswith("items[0]: ")
    schema = json_schema(RecoResult)
    assert "RecoItem" in cast(dict[str, Any], schema["$defs"])
