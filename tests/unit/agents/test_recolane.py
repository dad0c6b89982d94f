"""Unit tests for agents.reco: request resolution, result encoding and the handler driven
with in-memory records against the committed models/reco graph (no broker: the sender is a
recording double; the Kafka path is covered by tests/integration/test_reco_lane.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec
import numpy as np
import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from numpy.typing import NDArray

from agents.reco import (
    TOP_DTYPE,
    RecoHandler,
    RecoQuery,
    encode_result,
    resolve,
)
from pipeline.dev.recogen import RECO_INVALID_KINDS, RecoRequestSource, reco_reason_field
from pipeline.inference.recomodel import RecoScorer
from pipeline.kafka.lane import LaneContext, LaneStats, PartitionRecords
from pipeline.kafka.offsets import Chunk
from pipeline.kafka.producer import BatchSender
from pipeline.settings import Settings, load_settings
from schemas import DeadLetter, RecoRequest, RecoResult, Rejection, validate_record

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "reco"
TOPIC = "reco.requests"


@pytest.fixture(scope="module")
def int8() -> RecoScorer:
    return RecoScorer.load(MODEL_DIR, "int8")


@pytest.fixture(scope="module")
def fp32() -> RecoScorer:
    return RecoScorer.load(MODEL_DIR, "fp32")


# --- resolve -------------------------------------------------------------------------------------


def test_resolve_catalogue_request(int8: RecoScorer) -> None:
    query = resolve({"request_id": "r", "user_id": "user-000042"}, int8)
    assert isinstance(query, RecoQuery)
    assert (query.user, query.k, query.candidates, query.available, query.dropped) == (
        42, 10, None, 10_000, 0)


@pytest.mark.parametrize("user_id", ["user-100000", "user-42", "bob", "item-00042"])
def test_resolve_unknown_user(int8: RecoScorer, user_id: str) -> None:
    assert resolve({"request_id": "r", "user_id": user_id}, int8) == Rejection(
        "unknown_user", "user_id: unknown user")


def test_resolve_k_above_the_models_k_max(int8: RecoScorer) -> None:
    assert resolve({"request_id": "r", "user_id": "user-000001", "k": 101}, int8) == Rejection(
        "schema", "k: above the model's k_max (100)")


def test_resolve_candidates_dedupes_and_drops_unknown_ids(int8: RecoScorer) -> None:
    ids = ["item-00007", "item-10000", "item-00003", "item-00007", "nope", "item-00003",
           "item-7", "nope"]
    query = resolve({"request_id": "r", "user_id": "user-000001", "candidate_ids": ids}, int8)
    assert isinstance(query, RecoQuery)
    assert query.candidates is not None and query.candidates.tolist() == [7, 3]
    assert (query.available, query.dropped) == (2, 3)  # item-10000, nope, item-7


def test_resolve_no_known_candidate(int8: RecoScorer) -> None:
    request = {"request_id": "r", "user_id": "user-000001", "candidate_ids": ["x", "item-99999"]}
    assert resolve(request, int8) == Rejection("unknown_items", "candidate_ids: no known item id")


# --- results -------------------------------------------------------------------------------------


def test_encode_result_takes_min_k_available(int8: RecoScorer) -> None:
    top = np.zeros(100, dtype=TOP_DTYPE)
    top["item"][:3], top["score"][:3] = [5, 9, 1], [2.5, 0.1, -1.0]
    top["item"][3:], top["score"][3:] = -1, -np.inf
    request = {"request_id": "r-9", "user_id": "user-000002", "sent_at": 1_700_000_000.0}
    query = RecoQuery(request, 2, 10, np.array([5, 9, 1]), available=3, dropped=1)
    result = msgspec.convert(orjson.loads(encode_result(query, top, int8, 1_700_000_001.0)),
                             RecoResult)
    assert [(i.item_id, i.score) for i in result.items] == [
        ("item-00005", 2.5), ("item-00009", 0.1), ("item-00001", -1.0)]
    assert result.dropped_candidates == 1 and result.model_version == "reco-v1-int8"
    assert (result.sent_at, result.scored_at) == (1_700_000_000.0, 1_700_000_001.0)
    short = RecoQuery(request, 2, 2, None, available=10_000)
    assert len(orjson.loads(encode_result(short, top, int8, 0.0))["items"]) == 2


# --- the handler, driven with in-memory records ---------------------------------------------------


class RecordingSender:
    """Stands in for the lane's BatchSender: keeps what would be produced, per topic."""

    def __init__(self) -> None:
        self.sent: dict[str, list[tuple[bytes | None, bytes]]] = {}

    async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        self.sent.setdefault(topic, []).extend(records)

    def values(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(value) for _, value in self.sent.get(topic, [])]


class Harness:
    def __init__(self, handler: RecoHandler, settings: Settings) -> None:
        self.handler, self.settings = handler, settings
        self.sender = RecordingSender()
        self.stats = LaneStats()
        self.done: list[Chunk] = []
        self.offset = 0

    def context(self) -> LaneContext:
        return LaneContext(self.settings, "reco", cast(BatchSender, self.sender),
                           self.done.append, self.stats)

    def part(self, values: list[bytes | dict[str, Any]]) -> PartitionRecords:
        tp = TopicPartition(TOPIC, 0)
        records = []
        for value in values:
            raw = value if isinstance(value, bytes) else orjson.dumps(value)
            records.append(ConsumerRecord(TOPIC, 0, self.offset, int(time.time() * 1000), 0,
                                          b"key", raw, None, 3, len(raw), ()))
            self.offset += 1
        return PartitionRecords(tp, records, Chunk(tp, records[0].offset, records[-1].offset))

    async def handle(self, *values: bytes | dict[str, Any]) -> None:
        await self.handler.handle([self.part(list(values))])

    def results(self) -> dict[str, dict[str, Any]]:
        return {v["request_id"]: v for v in self.sender.values("reco.results")}

    def letters(self) -> list[DeadLetter]:
        return [msgspec.convert(v, DeadLetter) for v in self.sender.values("reco.requests.dlq")]


@pytest.fixture
async def harness(int8: RecoScorer) -> AsyncIterator[Harness]:
    settings = load_settings(topic_prefix="", reco_batch_max_rows=16)
    h = Harness(RecoHandler(settings, scorer=int8), settings)
    await h.handler.start(h.context())
    yield h
    await h.handler.stop()


def _req(request_id: str, user: int, **fields: Any) -> dict[str, Any]:
    return {"request_id": request_id, "user_id": f"user-{user:06d}", **fields}


def _ids(indices: NDArray[np.int64]) -> list[str]:
    return [f"item-{i:05d}" for i in indices.tolist()]


async def test_catalogue_requests_get_the_scorers_own_top_k(
    harness: Harness, int8: RecoScorer
) -> None:
    users = list(range(0, 100_000, 2_500))
    await harness.handle(*[_req(f"r{u}", u, k=1 + u % 20, sent_at=time.time()) for u in users])
    results = harness.results()
    assert len(results) == len(users) and not harness.letters()
    for user in users:
        k = 1 + user % 20
        items, scores = int8.recommend(np.array([user]), k)
        got = results[f"r{user}"]
        assert [i["item_id"] for i in got["items"]] == _ids(items[0])
        # JSON carries the shortest float32 form: it reads back as exactly the model's float32.
        assert [np.float32(i["score"]) for i in got["items"]] == scores[0].tolist()
        assert got["model_version"] == "reco-v1-int8" and got["dropped_candidates"] == 0
    assert harness.stats.produced == len(users) and harness.stats.late == 0
    assert [c.first for c in harness.done] == [0]


async def test_candidate_requests_rank_only_their_known_candidates(
    harness: Harness, int8: RecoScorer
) -> None:
    rng = np.random.default_rng(4)
    pools = {u: rng.choice(10_000, size=int(rng.integers(1, 60)), replace=False)
             for u in range(100, 130)}
    requests = [_req(f"c{u}", u, k=25, candidate_ids=[*_ids(pool), "item-77777", _ids(pool)[0]])
                for u, pool in pools.items()]
    await harness.handle(*requests, _req("plain", 7, k=3))
    results = harness.results()
    assert set(results) == {f"c{u}" for u in pools} | {"plain"}
    for user, pool in pools.items():
        got = results[f"c{user}"]
        assert len(got["items"]) == min(25, len(pool))
        assert got["dropped_candidates"] == 1
        expected, _ = int8.recommend_candidates(np.array([user]), pool[None, :],
                                                k=min(25, len(pool)))
        assert [i["item_id"] for i in got["items"]] == _ids(expected[0])
        scores = [i["score"] for i in got["items"]]
        assert scores == sorted(scores, reverse=True)
    assert len(results["plain"]["items"]) == 3
    stats = harness.handler.stats
    assert stats is not None and stats["candidates"].rows == 30 and stats["catalogue"].rows == 1


async def test_every_request_gets_one_result_or_one_dead_letter(harness: Harness) -> None:
    bad: list[tuple[bytes | dict[str, Any], str, str]] = [
        (b"{not json", "invalid_json", "value: "),
        ({"user_id": "user-000001"}, "schema", "request_id: "),
        (_req("k0", 1, k=0), "schema", "k: "),
        (_req("kbig", 1, k=500), "schema", "k: "),
        (_req("ghost", 100_000), "unknown_user", "user_id: unknown user"),
        (_req("nocand", 1, candidate_ids=["item-99999"]), "unknown_items", "candidate_ids: "),
        (_req("many", 1, candidate_ids=["item-00001"] * 1001), "schema", "candidate_ids: "),
        (_req("empty", 1, candidate_ids=[]), "schema", "candidate_ids: "),
    ]
    good = [_req(f"g{i}", i) for i in range(5)]
    await harness.handle(good[0], *[value for value, _, _ in bad], *good[1:])
    assert set(harness.results()) == {g["request_id"] for g in good}
    letters = harness.letters()
    assert [(d.error, d.offset) for d in letters] == [(e, 1 + i) for i, (_, e, _) in
                                                      enumerate(bad)]
    for letter, (_, _, prefix) in zip(letters, bad, strict=True):
        assert letter.reason.startswith(prefix), letter.reason
        assert letter.lane == "reco" and letter.topic == TOPIC
    assert harness.stats.dead_lettered == len(bad) and harness.stats.produced == len(good)
    assert len(harness.done) == 1


class _Poisoned(RecoScorer):
    """The real graph, except that it raises for any batch holding user 13."""

    def recommend(self, user_indices: Any, k: int) -> Any:
        if 13 in np.asarray(user_indices):
            raise RuntimeError("poisoned user")
        return super().recommend(user_indices, k)


async def test_a_model_failure_dead_letters_only_the_failing_request(int8: RecoScorer) -> None:
    settings = load_settings(topic_prefix="", reco_batch_max_rows=16)
    poisoned = _Poisoned(int8.card, "int8", int8._session)
    h = Harness(RecoHandler(settings, scorer=poisoned), settings)
    await h.handler.start(h.context())
    try:
        await h.handle(*[_req(f"r{u}", u) for u in range(10, 20)])
    finally:
        await h.handler.stop()
    assert set(h.results()) == {f"r{u}" for u in range(10, 20) if u != 13}
    (letter,) = h.letters()
    assert letter.error == "inference" and "poisoned user" in letter.reason
    assert orjson.loads(letter.raw)["request_id"] == "r13"


async def test_serving_another_scorer_swaps_the_model_at_the_next_batch(
    harness: Harness, fp32: RecoScorer
) -> None:
    await harness.handle(_req("before", 5))
    assert harness.handler._slot is not None
    old_paths = harness.handler._slot.value
    await harness.handler.serve(fp32)
    await harness.handle(_req("after", 5))
    results = harness.results()
    assert results["before"]["model_version"] == "reco-v1-int8"
    assert results["after"]["model_version"] == "reco-v1-fp32"
    items, _ = fp32.recommend(np.array([5]), 10)
    assert [i["item_id"] for i in results["after"]["items"]] == _ids(items[0])
    assert not old_paths.catalogue.running and not old_paths.candidates.running
    assert harness.handler.scorer is fp32


# --- the request generator ---------------------------------------------------------------------


def test_generated_requests_resolve_and_bad_kinds_fail_as_declared(int8: RecoScorer) -> None:
    source = RecoRequestSource.for_model(MODEL_DIR, seed=3, candidate_fraction=0.5,
                                         candidates=(5, 50))
    with_candidates = 0
    for _ in range(300):
        value = source.next()
        data, rejection = validate_record(orjson.dumps(value), RecoRequest)
        assert rejection is None and data is not None
        query = resolve(data, int8)
        assert isinstance(query, RecoQuery) and query.k == 10
        if query.candidates is not None:
            with_candidates += 1
            assert query.available == len(value["candidate_ids"]) and query.dropped == 0
    assert 100 < with_candidates < 200
    rng = np.random.default_rng(1)
    for kind in RECO_INVALID_KINDS:
        raw = source.make_invalid(kind, rng, source.next())
        data, rejection = validate_record(raw, RecoRequest)
        outcome = rejection if data is None else resolve(data, int8)
        error, field = reco_reason_field(kind)
        assert isinstance(outcome, Rejection), kind
        assert outcome.error == error and outcome.reason.startswith(field), (kind, outcome)


class _Gated(RecoScorer):
    """The real graph, held at the gate (in the model thread) until the test opens it."""

    gate: threading.Event

    def recommend(self, user_indices: Any, k: int) -> Any:
        if not self.gate.wait(timeout=10):
            raise TimeoutError("gate never opened")
        return super().recommend(user_indices, k)


async def test_a_batch_in_flight_finishes_with_the_model_it_started_with(
    int8: RecoScorer, fp32: RecoScorer
) -> None:
    settings = load_settings(topic_prefix="", reco_batch_max_rows=16, reco_inline_max_us=0)
    gated = _Gated(int8.card, "int8", int8._session)
    gated.gate = threading.Event()
    gated.gate.set()  # start() warms up and times the model through recommend()
    h = Harness(RecoHandler(settings, scorer=gated), settings)
    await h.handler.start(h.context())
    try:
        gated.gate.clear()
        in_flight = asyncio.create_task(h.handle(_req("during", 9)))
        await asyncio.sleep(0.05)
        swap = asyncio.create_task(h.handler.serve(fp32))
        await asyncio.sleep(0.2)
        assert not swap.done(), "the swap waits for the batch that uses the old model"
        gated.gate.set()
        await in_flight
        await swap
        await h.handle(_req("after", 9))
    finally:
        gated.gate.set()
        await h.handler.stop()
    results = h.results()
    assert results["during"]["model_version"] == "reco-v1-int8"
    assert results["after"]["model_version"] == "reco-v1-fp32"
