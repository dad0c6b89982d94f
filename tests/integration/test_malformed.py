"""Malformed records mixed into valid traffic, through a real worker on the real local stack.

About 1,000 bad ``fraud.requests`` values of 39 kinds (bad JSON, wrong types, NaN/Infinity,
numbers beyond a double, bad amounts, missing or null fields, unknown channel, 1 MB strings,
empty values and tombstones, other encodings, deep nesting, ...) are interleaved with 3,000
valid transactions and 100 producer-retry duplicates. One worker serves the fraud lane and the
history slow path, so both parsers see every bad record. Then: the worker is alive and logged
no traceback; every valid event has a score (a duplicated one two); every bad record has
exactly one dead letter (matched by its key ``bad-<kind>-<i>``) with the kind's ``error``, a
``reason`` that starts with the field it names and the original value; no bad record is
scored; the history counted each duplicate once.

The generator is hypothesis: one strategy per kind, each returning the raw value, the error
class and the field. :func:`_draw` runs a plain synchronous ``@given`` function with
``@seed(SEED)``, generation only and no example database, that collects what it is given:
``strategy.example()`` is for interactive use and is not reproducible, and the test itself
cannot be ``@given`` (its async session-loop fixtures start a worker; the corpus must go
through Kafka once, not once per example). The corpus is the same on every run for a given
hypothesis version, so a CI failure is reproducible; each record's key names its kind and
index. A kind whose strategy has fewer distinct values than its share (an empty value, a
tombstone) repeats them.

Duplicate ``event_id`` policy (at-least-once: producers retry): not malformed. The lane scores
every copy (``fraud.scores`` is keyed by ``event_id``, readers keep one); the history agent
counts a copy of the card's newest transaction once (``agents.history.is_retry``); its final
state of every card equals the per-event replay of what was sent, whatever its batches.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from agents.history import apply_transaction
from pipeline.dev.loadgen import HistoryTransactionSource
from pipeline.dev.processes import WorkerProcess
from pipeline.features.cardhistory import CardHistory, from_bytes
from pipeline.features.historyview import CHANGELOG
from pipeline.kafka.connection import client_kwargs, make_producer, topic_partitions
from pipeline.kafka.deadletter import RAW_MAX_BYTES
from pipeline.settings import Settings
from schemas import DeadLetter, FraudScore, Transaction, validate_record
from tests.integration.conftest import EnvFactory, ready_settings
from tests.integration.test_fraud_lane import _read_all, _readers

WorkerFactory = Callable[..., WorkerProcess]
T = TypeVar("T")

SEED = 20_240_611
N_BAD = 1000
N_VALID = 3000
N_DUPLICATES = 100
#: INFERLANE_MAX_MESSAGE_BYTES of the worker: the 1 MB strings are over it (``too_large``).
MAX_MESSAGE_BYTES = 512 * 1024

REQUIRED = tuple(f for f in Transaction.__struct_fields__ if f != "sent_at")
ID_FIELDS = ("event_id", "card_id", "merchant_id")
CODE_FIELDS = ("currency", "country", "card_country")
STRING_FIELDS = (*ID_FIELDS, *CODE_FIELDS, "channel")
NUMBER_FIELDS = ("amount", "ts", "sent_at", "mcc")
CHANNELS = ("pos", "ecom", "atm")


@dataclass(frozen=True)
class Bad:
    """One malformed value and what its dead letter must say."""

    value: bytes | None
    error: str
    field: str
    """The reason must start with ``<field>: `` (``value`` for the record as a whole)."""


# --- the generator ---------------------------------------------------------------------------

_CHARS = st.characters(codec="utf-8")  # any code point but surrogates
_UPPER = st.characters(min_codepoint=ord("A"), max_codepoint=ord("Z"))
_FINITE = st.floats(allow_nan=False, allow_infinity=False)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_BAD_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc3\x28", b"\xe2\x28\xa1", b"\xed\xa0\x80",
             b"\xf0\x28\x8c\xbc", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80")
_ENCODINGS = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")


def _code(n: int) -> st.SearchStrategy[str]:
    return st.text(_UPPER, min_size=n, max_size=n)


@st.composite
def transactions(draw: st.DrawFn) -> dict[str, Any]:
    """A valid transaction (the base a kind breaks); ``event_id`` starts with ``bad-``."""
    txn: dict[str, Any] = {
        "event_id": "bad-" + draw(st.text(_CHARS, max_size=40)),
        "card_id": draw(st.text(_CHARS, min_size=1, max_size=40)),
        "merchant_id": draw(st.text(_CHARS, min_size=1, max_size=40)),
        "amount": draw(st.one_of(st.floats(0.0, 1e9), st.integers(0, 10**9))),
        "currency": draw(_code(3)),
        "mcc": draw(st.integers(0, 9999)),
        "country": draw(_code(2)),
        "card_country": draw(_code(2)),
        "channel": draw(st.sampled_from(CHANNELS)),
        "ts": draw(st.floats(0.0, 1e10)),
    }
    if draw(st.booleans()):
        txn["sent_at"] = draw(st.floats(0.0, 1e10))
    return txn


def _splice(txn: dict[str, Any], field: str, token: bytes) -> bytes:
    """``txn`` as JSON with ``field``'s value replaced by the raw ``token`` (added if absent)."""
    return orjson.dumps({**txn, field: "__splice__"}).replace(b'"__splice__"', token, 1)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _set(field_strategy: st.SearchStrategy[str], value_strategy: st.SearchStrategy[Any],
         error: str = "schema") -> st.SearchStrategy[Bad]:
    """A transaction with one field set to a drawn value; the reason names that field."""
    @st.composite
    def build(draw: st.DrawFn) -> Bad:
        field = draw(field_strategy)
        return Bad(_dumps({**draw(transactions()), field: draw(value_strategy)}), error, field)
    return build()


def _token(fields: tuple[str, ...], tokens: st.SearchStrategy[bytes],
           error: str = "schema") -> st.SearchStrategy[Bad]:
    """A transaction with one field's value replaced by a raw JSON token (NaN, 1e400...)."""
    @st.composite
    def build(draw: st.DrawFn) -> Bad:
        field = draw(st.sampled_from(fields))
        return Bad(_splice(draw(transactions()), field, draw(tokens)), error, field)
    return build()


def _whole(values: st.SearchStrategy[bytes | None], error: str) -> st.SearchStrategy[Bad]:
    """Values whose problem is the record as a whole (the reason starts with ``value: ``)."""
    return values.map(lambda raw: Bad(raw, error, "value"))


@st.composite
def _truncated(draw: st.DrawFn) -> bytes:
    raw = _dumps(draw(transactions()))
    return raw[:draw(st.integers(1, len(raw) - 1))]


@st.composite
def _invalid_utf8(draw: st.DrawFn) -> bytes:
    junk = draw(st.sampled_from(_BAD_UTF8))
    field = draw(st.sampled_from(STRING_FIELDS))
    return _splice(draw(transactions()), field, b'"x' + junk + b'y"')


@st.composite
def _other_encoding(draw: st.DrawFn) -> bytes:
    txn = draw(transactions())
    if draw(st.booleans()):  # a bad field too: the encoding is what the reason must name
        txn["amount"] = -1.0
    return _dumps(txn).decode().encode(draw(st.sampled_from(_ENCODINGS)))


@st.composite
def _latin1(draw: st.DrawFn) -> bytes:
    """An ASCII JSON record whose one id holds a latin-1 byte (a producer not using UTF-8)."""
    field = draw(st.sampled_from(ID_FIELDS))
    char = draw(st.characters(min_codepoint=0xA0, max_codepoint=0xFF))
    text = json.dumps({**draw(transactions()), field: "__latin1__"}, ensure_ascii=True)
    return text.encode("ascii").replace(b'"__latin1__"', b'"caf' + char.encode("latin-1") + b'"')


@st.composite
def _bom_prefixed(draw: st.DrawFn) -> bytes:
    txn = draw(transactions())
    if draw(st.booleans()):
        txn["channel"] = "fax"
    return b"\xef\xbb\xbf" + _dumps(txn)


@st.composite
def _huge_string(draw: st.DrawFn) -> bytes:
    """About 1 MB of one character in a field (or an extra one); JSON-escaping-free chars."""
    char = draw(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"),
                              exclude_characters='"\\'))
    size = draw(st.integers(1_000_000, 1_040_000))
    field = draw(st.sampled_from((*STRING_FIELDS, "note")))
    return _dumps({**draw(transactions()), field: char * (size // len(char.encode()))})


@st.composite
def _deeply_nested(draw: st.DrawFn) -> bytes:
    """Nesting deeper than orjson's 1024 levels, at the top or inside a field."""
    opener, closer = draw(st.sampled_from(((b"[", b"]"), (b'{"a":', b"}"))))
    depth = draw(st.integers(1025, 40_000))
    nested = opener * depth + b"1" + closer * depth
    where = draw(st.sampled_from(("top", "amount", "note")))
    return nested if where == "top" else _splice(draw(transactions()), where, nested)


@st.composite
def _trailing_garbage(draw: st.DrawFn) -> bytes:
    txn = _dumps(draw(transactions()))
    tail = draw(st.one_of(
        st.text(_CHARS, min_size=1, max_size=20).filter(lambda s: s.strip(" \t\r\n") != "")
        .map(str.encode),
        st.just(txn)))
    return txn + tail


@st.composite
def _control_char(draw: st.DrawFn) -> bytes:
    char = draw(st.integers(0, 0x1F))
    field = draw(st.sampled_from(STRING_FIELDS))
    return _splice(draw(transactions()), field, b'"a' + bytes([char]) + b'b"')


@st.composite
def _lone_surrogate(draw: st.DrawFn) -> bytes:
    code = draw(st.integers(0xD800, 0xDFFF))
    field = draw(st.sampled_from(STRING_FIELDS))
    return _splice(draw(transactions()), field, f'"x\\u{code:04x}y"'.encode())


@st.composite
def _duplicate_key(draw: st.DrawFn) -> Bad:
    """A valid record whose required key appears again at the end with a bad value (the last
    one wins, as in orjson and the stdlib)."""
    field, bad = draw(st.sampled_from((("amount", b"-1"), ("channel", b'"fax"'),
                                       ("currency", b'"euro"'), ("mcc", b"-5"))))
    raw = _dumps(draw(transactions()))
    return Bad(raw[:-1] + b',"' + field.encode() + b'":' + bad + b"}", "schema", field)


@st.composite
def _json5_syntax(draw: st.DrawFn) -> bytes:
    """JavaScript/Python habits that JSON does not allow."""
    txn = draw(transactions())
    style = draw(st.sampled_from(("python_repr", "trailing_comma", "comment", "unquoted_keys")))
    if style == "python_repr":
        return repr(txn).encode()
    if style == "trailing_comma":
        return _dumps(txn)[:-1] + b",}"
    if style == "comment":
        return b"// a transaction\n" + _dumps(txn)
    return ("{" + ",".join(f"{k}:{_dumps(v).decode()}" for k, v in txn.items()) + "}").encode()


@st.composite
def _newline_suffixed_code(draw: st.DrawFn) -> Bad:
    """A currency or country code followed by a newline (Python's ``$`` matches before it)."""
    field = draw(st.sampled_from(CODE_FIELDS))
    code = draw(_code(3 if field == "currency" else 2))
    return Bad(_dumps({**draw(transactions()), field: code + "\n"}), "schema", field)


def _overflow_tokens() -> st.SearchStrategy[bytes]:
    """Numbers beyond a double's range: 1e400, -7e5000, a 400-digit integer."""
    exponent = st.builds(lambda sign, m, e: f"{sign}{m}e{e}".encode(),
                         st.sampled_from(("", "-")), st.integers(1, 9), st.integers(309, 100_000))
    digits = st.builds(lambda n: b"9" * n, st.integers(310, 5000))
    return st.one_of(exponent, digits)


def _not_matching(pattern: str, max_size: int) -> st.SearchStrategy[str]:
    return st.text(_CHARS, max_size=max_size).filter(lambda s: not re.fullmatch(pattern, s))


KINDS: dict[str, st.SearchStrategy[Bad]] = {
    # The record as a whole.
    "not_json": _whole(st.one_of(
        st.binary(max_size=64).map(lambda b: b"\xff" + b),
        st.text(_CHARS, max_size=64).map(lambda s: ("<txn>" + s).encode()),
        st.text(_CHARS, max_size=64).map(lambda s: ("x" + s).encode())), "invalid_json"),
    "truncated_json": _whole(_truncated(), "invalid_json"),
    "json_array": _whole(st.one_of(
        transactions().map(lambda t: _dumps([t])),
        transactions().map(lambda t: _dumps(list(t.values()))),
        st.lists(_INT64, max_size=5).map(_dumps)), "schema"),
    "json_scalar": _whole(st.one_of(
        st.text(_CHARS, max_size=50), _INT64, _FINITE, st.booleans(),
        transactions().map(lambda t: _dumps(t).decode()),  # JSON in a JSON string
    ).map(_dumps), "schema"),
    "json_null": _whole(st.sampled_from((b"null", b" null", b"null\n", b"\tnull ")), "schema"),
    "empty_value": _whole(st.just(b""), "invalid_json"),
    "tombstone": _whole(st.just(None), "invalid_json"),
    "whitespace_only": _whole(st.text(" \t\r\n", min_size=1, max_size=20).map(str.encode),
                              "invalid_json"),
    "invalid_utf8": _whole(_invalid_utf8(), "invalid_json"),
    "utf16_or_utf32": _whole(_other_encoding(), "invalid_json"),
    "latin1_bytes": _whole(_latin1(), "invalid_json"),
    "bom_prefixed": _whole(_bom_prefixed(), "invalid_json"),
    "huge_string_1mb": _whole(_huge_string(), "too_large"),
    "deeply_nested": _whole(_deeply_nested(), "invalid_json"),
    "trailing_garbage": _whole(_trailing_garbage(), "invalid_json"),
    "control_char_in_string": _whole(_control_char(), "invalid_json"),
    "lone_surrogate_escape": _whole(_lone_surrogate(), "invalid_json"),
    "nan_in_extra_field": _whole(st.builds(
        lambda t, tok: _splice(t, "note", tok), transactions(),
        st.sampled_from((b"NaN", b"Infinity", b"-Infinity"))), "invalid_json"),
    "json5_syntax": _whole(_json5_syntax(), "invalid_json"),
    # One field.
    "missing_field": st.builds(
        lambda t, f: Bad(_dumps({k: v for k, v in t.items() if k != f}), "schema", f),
        transactions(), st.sampled_from(REQUIRED)),
    "null_field": _set(st.sampled_from(REQUIRED), st.none()),
    "wrong_type_for_string": _set(st.sampled_from(STRING_FIELDS), st.one_of(
        _INT64, _FINITE, st.booleans(), st.lists(st.text(max_size=5), max_size=3),
        st.dictionaries(st.text(max_size=5), _INT64, max_size=3))),
    "wrong_type_for_number": _set(st.sampled_from(NUMBER_FIELDS), st.one_of(
        st.text(_CHARS, max_size=12), st.lists(_INT64, max_size=3),
        st.dictionaries(st.text(max_size=5), _INT64, max_size=3))),
    "bool_amount": _set(st.just("amount"), st.booleans()),
    "float_mcc": _set(st.just("mcc"), _FINITE),
    "nan_token": _token(NUMBER_FIELDS, st.just(b"NaN")),
    "infinity_token": _token(NUMBER_FIELDS, st.sampled_from((b"Infinity", b"-Infinity"))),
    "overflow_number": _token(NUMBER_FIELDS, _overflow_tokens()),
    "negative_amount": _set(st.just("amount"), st.one_of(
        st.floats(max_value=0.0, exclude_max=True, allow_infinity=False),
        st.integers(-(2**63), -1))),
    "huge_amount": st.one_of(
        _set(st.just("amount"), st.one_of(
            st.floats(min_value=1e9, exclude_min=True, allow_infinity=False),
            st.integers(10**9 + 1, 2**63 - 1))),
        _token(("amount",), st.integers(20, 300).map(lambda n: b"9" * n))),
    "unknown_channel": _set(st.just("channel"), st.text(_CHARS, max_size=20).filter(
        lambda s: s not in CHANNELS)),
    "bad_currency": _set(st.just("currency"), _not_matching("[A-Z]{3}", 8)),
    "bad_country": _set(st.sampled_from(("country", "card_country")),
                        _not_matching("[A-Z]{2}", 6)),
    "newline_suffixed_code": _newline_suffixed_code(),
    "mcc_out_of_range": _set(st.just("mcc"), st.one_of(
        st.integers(-(2**63), -1), st.integers(10_000, 2**63 - 1))),
    "empty_id": _set(st.sampled_from(ID_FIELDS), st.just("")),
    "id_over_128_chars": _set(st.sampled_from(ID_FIELDS), st.one_of(
        st.text(_CHARS, min_size=129, max_size=300),
        st.builds(lambda c, n: c * n, _CHARS, st.integers(129, 4000)))),
    "ts_out_of_range": _set(st.sampled_from(("ts", "sent_at")), st.one_of(
        st.floats(min_value=1e10, exclude_min=True, allow_infinity=False),
        st.floats(max_value=0.0, exclude_max=True, allow_infinity=False),
        st.integers(10**10 + 1, 2**63 - 1))),
    "duplicate_key_last_bad": _duplicate_key(),
}


def _draw(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    """``n`` values of ``strategy``, the same on every run (see the module docstring)."""
    drawn: list[T] = []

    @seed(SEED)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: T) -> None:
        drawn.append(value)

    collect()
    return [drawn[i % len(drawn)] for i in range(n)]


@functools.cache
def corpus() -> dict[bytes, tuple[str, Bad]]:
    """Key ``bad-<kind>-<i>`` -> (kind, bad record): at least N_BAD, every kind equally."""
    per_kind = math.ceil(N_BAD / len(KINDS))
    return {f"bad-{kind}-{i}".encode(): (kind, bad)
            for kind, strategy in KINDS.items()
            for i, bad in enumerate(_draw(strategy, per_kind))}


# --- the tests -------------------------------------------------------------------------------


def test_every_kind_is_refused_by_the_validator() -> None:
    """The corpus without Kafka: each record is refused as its kind says (a fast first check
    that tells a validation bug from a pipeline one)."""
    assert len(KINDS) >= 20 and len(corpus()) >= N_BAD
    for key, (_, bad) in corpus().items():
        data, rejection = validate_record(bad.value, Transaction, max_bytes=MAX_MESSAGE_BYTES)
        assert data is None and rejection is not None, (key, bad.value[:300] if bad.value else 0)
        assert rejection.error == bad.error, (key, rejection, (bad.value or b"")[:300])
        assert rejection.reason.startswith(f"{bad.field}: "), (key, rejection.reason)


async def test_malformed_records_are_dead_lettered_and_valid_ones_scored(
    test_env: EnvFactory, worker_factory: WorkerFactory
) -> None:
    started = time.monotonic()
    bad_records = corpus()
    env = test_env(lanes="fraud,history", max_message_bytes=str(MAX_MESSAGE_BYTES))
    settings = await ready_settings(env)
    worker = worker_factory(env)
    traffic, valid_ids, duplicated = _traffic(bad_records)
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        sent = await _send(settings, traffic)
        n_scores = len(valid_ids) + len(duplicated)
        assert await dlq.wait_for_count(len(bad_records), timeout_s=60) >= len(bad_records)
        assert await scores.wait_for_count(n_scores, timeout_s=60) >= n_scores
        letters = await _read_all(settings, settings.topic("fraud.requests.dlq"))
        scored = await _read_all(settings, settings.topic("fraud.scores"))
        final = await _changelog_final(settings, sent)
    assert worker.alive, worker.log_tail()
    assert await asyncio.to_thread(worker.terminate) == 0, worker.log_tail()  # a clean stop
    assert "Traceback" not in worker.log_text(), worker.log_text()[-5000:]

    # Every valid event one score, a duplicated one two, and nothing else got a score.
    per_event = Counter(orjson.loads(value)["event_id"] for _, value in scored)
    assert per_event == Counter({**dict.fromkeys(valid_ids, 1),
                                 **dict.fromkeys(duplicated, 2)})
    for _, value in scored:
        msgspec.convert(orjson.loads(value), FraudScore)

    # Every bad record exactly one dead letter, with its error, field and original value.
    by_key = Counter(key for key, _ in letters)
    assert set(by_key) == set(bad_records), set(by_key) ^ set(bad_records)
    assert max(by_key.values()) == 1, [k for k, n in by_key.items() if n > 1]
    samples: dict[str, DeadLetter] = {}
    for key, value in letters:
        kind, bad = bad_records[key]
        letter = msgspec.convert(orjson.loads(value), DeadLetter)
        assert letter.error == bad.error, (key, letter.error, letter.reason)
        assert letter.reason.startswith(f"{bad.field}: "), (key, letter.reason)
        assert _original(letter) == (bad.value or b"")[:RAW_MAX_BYTES], key
        assert (letter.topic, letter.lane) == (settings.topic("fraud.requests"), "fraud")
        samples.setdefault(kind, letter)

    # The slow path applies a fetch at a time and writes each card once per batch: its final
    # state of every card is exactly the per-event replay of what was sent, in offset order...
    replayed, after = _replay(traffic, sent)
    assert final == replayed, sorted(k for k in replayed if final.get(k) != replayed[k])[:5]
    # ... in which each producer retry counted once: only its offset moved.
    for event_id in duplicated:
        (p, first), (_, second) = sent[event_id]
        original, copy = after[(p, first)], after[(p, second)]
        assert copy == msgspec.structs.replace(original, src_offset=copy.src_offset), event_id

    _print_table(bad_records, samples, len(valid_ids), len(duplicated),
                 time.monotonic() - started)


# --- helpers ---------------------------------------------------------------------------------

Traffic = list[tuple[bytes, bytes | None, str | None]]
"""(key, value, event_id of a valid transaction or None) in send order."""


def _traffic(bad_records: dict[bytes, tuple[str, Bad]]) -> tuple[Traffic, set[str], set[str]]:
    """Valid transactions with the bad records shuffled in; N_DUPLICATES valid ones sent twice
    in a row (a producer retry: same key, same bytes). Returns the traffic, the valid event ids
    and the duplicated ones."""
    rng = random.Random(SEED)
    source = HistoryTransactionSource(SEED, start_ts=time.time() - 30 * 86_400.0)
    now = time.time()
    valid: Traffic = []
    for txn in source.take(N_VALID):
        txn["sent_at"] = now
        valid.append((txn["card_id"].encode(), _dumps(txn), txn["event_id"]))
    duplicated = {event_id for _, _, event_id in rng.sample(valid, N_DUPLICATES)
                  if event_id is not None}
    bad: Traffic = [(key, record.value, None) for key, (_, record) in bad_records.items()]
    rng.shuffle(bad)
    # Bad records at random places; the valid ones keep their order (each card's history
    # moves forward in event time, as the slow path expects).
    slots = sorted(rng.sample(range(len(valid) + len(bad)), len(bad)))
    mixed: Traffic = list(valid)
    for slot, record in zip(slots, bad, strict=True):
        mixed.insert(slot, record)
    traffic: Traffic = []
    for record in mixed:
        traffic.append(record)
        if record[2] in duplicated:
            traffic.append(record)
    valid_ids = {event_id for _, _, event_id in valid if event_id is not None}
    assert len(valid_ids) == N_VALID
    return traffic, valid_ids, duplicated


async def _send(settings: Settings, traffic: Traffic) -> dict[str, list[tuple[int, int]]]:
    """Send everything (acknowledged); return the (partition, offset) of each valid event's
    copies."""
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    topic = settings.topic("fraud.requests")
    try:
        pending = [(event_id, await producer.send(topic, value, key=key))
                   for key, value, event_id in traffic]
        acks = await asyncio.gather(*(ack for _, ack in pending))
    finally:
        await producer.stop()
    where: dict[str, list[tuple[int, int]]] = {}
    for (event_id, _), ack in zip(pending, acks, strict=True):
        if event_id is not None:
            where.setdefault(event_id, []).append((ack.partition, ack.offset))
    return where


async def _changelog_final(settings: Settings, sent: dict[str, list[tuple[int, int]]]
                           ) -> dict[bytes, CardHistory]:
    """The latest history of every card in the changelog, once the slow path has applied the
    newest valid transaction of every partition."""
    newest: dict[int, int] = {}
    for copies in sent.values():
        for partition, offset in copies:
            newest[partition] = max(newest.get(partition, -1), offset)
    topic = settings.topic(CHANGELOG)
    consumer = AIOKafkaConsumer(**client_kwargs(settings, client_id="it-changelog"),
                                enable_auto_commit=False)
    await consumer.start()
    final: dict[bytes, CardHistory] = {}
    applied: dict[int, int] = {}
    try:
        partitions = await topic_partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + 60
        while (any(applied.get(p, -1) < o for p, o in newest.items())
               and time.monotonic() < deadline):
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for record in records:
                    if record.key is not None and record.value is not None:
                        h = from_bytes(record.value)
                        final[record.key] = h
                        applied[tp.partition] = max(applied.get(tp.partition, -1), h.src_offset)
        assert all(applied.get(p, -1) >= o for p, o in newest.items()), (applied, newest)
    finally:
        await consumer.stop()
    return final


def _replay(traffic: Traffic, sent: dict[str, list[tuple[int, int]]]
            ) -> tuple[dict[bytes, CardHistory], dict[tuple[int, int], CardHistory]]:
    """Every valid transaction sent, applied one by one in (partition, offset) order with the
    slow path's own transition: each card's final state, and the state after each record."""
    values = {event_id: value for _, value, event_id in traffic if event_id is not None}
    ordered = sorted((partition, offset, event_id) for event_id, copies in sent.items()
                     for partition, offset in copies)
    cards: dict[bytes, CardHistory] = {}
    after: dict[tuple[int, int], CardHistory] = {}
    for partition, offset, event_id in ordered:
        txn = orjson.loads(values[event_id])
        key = txn["card_id"].encode()
        state = apply_transaction(cards.get(key), txn, offset)
        if state is not None:
            cards[key] = state
        after[(partition, offset)] = cards[key]
    return cards, after


def _original(letter: DeadLetter) -> bytes:
    if letter.raw_encoding == "base64":
        return base64.b64decode(letter.raw)
    return letter.raw.encode()


def _print_table(bad_records: dict[bytes, tuple[str, Bad]], samples: dict[str, DeadLetter],
                 n_valid: int, n_duplicated: int, wall_s: float) -> None:
    counts = Counter(kind for kind, _ in bad_records.values())
    print(f"\n{len(bad_records)} malformed records of {len(counts)} kinds among {n_valid} valid "
          f"transactions ({n_duplicated} sent twice), {wall_s:.1f} s")
    print(f"{'kind':<24} {'n':>3}  {'error':<12} sample reason")
    for kind, n in counts.items():
        letter = samples[kind]
        reason = letter.reason if len(letter.reason) <= 90 else letter.reason[:87] + "..."
        print(f"{kind:<24} {n:>3}  {letter.error:<12} {reason!r}")
