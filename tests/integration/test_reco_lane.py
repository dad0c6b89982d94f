"""The reco lane end to end on the real local stack: a worker process, real Kafka protocol, real
S3 endpoint. Every request gets exactly one result or one dead letter; results hold exactly
min(k, available) items, equal to the RecoScorer's own top-k (catalogue or candidates) in
score order; every invalid kind is dead-lettered with its reason; the archive holds the results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import orjson

from pipeline.dev.loadgen import RECO, ResultReader, produce_requests, snapshot_end_offsets
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.recogen import RECO_INVALID_KINDS, RecoRequestSource, reco_reason_field
from pipeline.inference.recomodel import RecoScorer
from pipeline.inference.serving import model_path
from pipeline.kafka.connection import make_producer
from pipeline.settings import Settings
from schemas import DeadLetter, RecoResult
from tests.integration.conftest import EnvFactory, ready_settings
from tests.integration.test_fraud_lane import _read_all, archived

WorkerFactory = Callable[[dict[str, str]], WorkerProcess]


async def _readers(settings: Settings) -> tuple[ResultReader, ResultReader]:
    results = settings.topic(RECO.results_topic)
    dlq = settings.topic(RECO.dlq_topic)
    return (ResultReader(settings, results, await snapshot_end_offsets(settings, results),
                         id_field=RECO.id_field),
            ResultReader(settings, dlq, await snapshot_end_offsets(settings, dlq)))


def _edge_requests() -> list[dict[str, Any]]:
    """Hand-made requests: extreme k, duplicated and unknown candidates, short lists."""
    return [
        {"request_id": "edge-k1", "user_id": "user-000000", "k": 1},
        {"request_id": "edge-k100", "user_id": "user-099999", "k": 100},
        {"request_id": "edge-default-k", "user_id": "user-012345"},
        {"request_id": "edge-dups", "user_id": "user-000777", "k": 10,
         "candidate_ids": ["item-00005", "item-00006", "item-00005", "item-09999", "item-00006"]},
        {"request_id": "edge-unknown", "user_id": "user-000778", "k": 2,
         "candidate_ids": ["item-10000", "item-00042", "nope", "item-00043", "item-00044"]},
        {"request_id": "edge-one", "user_id": "user-000779", "k": 50,
         "candidate_ids": ["item-01234"]},
    ]


def _expected(scorer: RecoScorer, request: dict[str, Any]) -> tuple[list[str], int]:
    """The scorer's own answer: item ids best first, and how many candidate ids it drops."""
    user = scorer.user_index(request["user_id"])
    assert user is not None
    k = request.get("k", 10)
    ids = request.get("candidate_ids")
    if ids is None:
        items, _ = scorer.recommend(np.array([user]), k)
        return [scorer.item_id(i) for i in items[0].tolist()], 0
    distinct = list(dict.fromkeys(ids))
    known = [i for i in map(scorer.item_index, distinct) if i is not None]
    items, _ = scorer.recommend_candidates(np.array([user]), np.array([known]),
                                           k=min(k, len(known)))
    return [scorer.item_id(i) for i in items[0].tolist()], len(distinct) - len(known)


async def test_results_are_the_scorers_top_k_exactly_once_and_archived(
    test_env: EnvFactory, worker_factory: WorkerFactory
) -> None:
    env = test_env(lanes="reco,archive")
    settings = await ready_settings(env)
    worker = worker_factory(env)
    source = RecoRequestSource.for_model(await model_path(settings, "reco"), seed=21,
                                         candidate_fraction=0.3, candidates=(1, 150))
    sent: dict[str, dict[str, Any]] = {}
    results, dlq = await _readers(settings)
    async with results, dlq:
        producer = make_producer(settings)
        await producer.start()
        try:
            for request in _edge_requests():
                sent[request["request_id"]] = request
                await producer.send_and_wait(settings.topic(RECO.requests_topic),
                                             orjson.dumps(request),
                                             key=request["user_id"].encode())
        finally:
            await producer.stop()
        recorder = _Recorder(source, sent)
        report = await produce_requests(settings, recorder, rate_per_s=2000, count=1500, seed=21)
        assert not await results.wait_for(set(sent), timeout_s=30)
        assert report.sent == len(report.valid_ids) == len(sent) - len(_edge_requests())
        assert results.duplicates == 0 and results.records == len(sent)
        assert dlq.records == 0
    scorer = RecoScorer.load(await model_path(settings, "reco"), settings.reco_model_precision)
    candidate_results = 0
    for request_id, request in sent.items():
        result = msgspec.convert(results.results[request_id], RecoResult)
        items, dropped = _expected(scorer, request)
        assert [item.item_id for item in result.items] == items, request_id
        scores = [item.score for item in result.items]
        assert scores == sorted(scores, reverse=True), request_id
        assert result.dropped_candidates == dropped and result.model_version == "reco-v1-int8"
        assert result.user_id == request["user_id"] and result.sent_at == request.get("sent_at")
        if "candidate_ids" in request:
            candidate_results += 1
            assert set(items) <= set(request["candidate_ids"])
            assert len(items) == min(request.get("k", 10), len(set(request["candidate_ids"]))
                                     - dropped)
        else:
            assert len(items) == request.get("k", 10)
    assert candidate_results > 300
    assert worker.terminate() == 0, worker.log_tail()  # graceful: the archive writes its windows
    topic = settings.topic(RECO.results_topic)
    on_topic = sorted(value for _, value in await _read_all(settings, topic))
    in_s3 = sorted(line for lines in (await archived(settings, topic)).values() for line in lines)
    assert len(on_topic) == len(sent) and in_s3 == on_topic


class _Recorder:
    """A request source that remembers every valid request it made, by request id."""

    def __init__(self, source: RecoRequestSource, sent: dict[str, dict[str, Any]]) -> None:
        self.source, self.sent = source, sent
        self.workload, self.invalid_kinds = source.workload, source.invalid_kinds

    def take(self, n: int) -> list[dict[str, Any]]:
        requests = self.source.take(n)
        for request in requests:
            self.sent[request["request_id"]] = request  # sent_at is added to this same dict
        return requests

    def side_records(self) -> list[tuple[str, bytes | None, bytes]]:
        return self.source.side_records()

    def make_invalid(self, kind: str, rng: np.random.Generator, base: dict[str, Any]) -> bytes:
        self.sent.pop(base["request_id"])
        return self.source.make_invalid(kind, rng, base)


async def test_each_invalid_kind_is_dead_lettered_and_nothing_is_lost(
    test_env: EnvFactory, worker_factory: WorkerFactory
) -> None:
    env = test_env(lanes="reco")
    settings = await ready_settings(env)
    worker_factory(env)
    source = RecoRequestSource.for_model(await model_path(settings, "reco"), seed=8,
                                         candidate_fraction=0.3)
    rng = np.random.default_rng(8)
    sent: dict[bytes, str] = {}
    good: set[str] = set()
    results, dlq = await _readers(settings)
    async with results, dlq:
        producer = make_producer(settings)
        await producer.start()
        try:
            for kind in RECO_INVALID_KINDS:
                raw = source.make_invalid(kind, rng, source.next())
                sent[raw] = kind
                await producer.send_and_wait(settings.topic(RECO.requests_topic), raw,
                                             key=kind.encode())
                request = source.next()
                good.add(request["request_id"])
                await producer.send_and_wait(settings.topic(RECO.requests_topic),
                                             orjson.dumps(request), key=b"good")
        finally:
            await producer.stop()
        # Then a mixed stream: every request must end as exactly one result or one dead letter.
        report = await produce_requests(settings, source, rate_per_s=2000, count=1000,
                                        invalid_fraction=0.1, seed=9)
        total_bad = len(RECO_INVALID_KINDS) + sum(report.invalid_by_kind.values())
        assert await dlq.wait_for_count(total_bad, timeout_s=30) == total_bad
        assert not await results.wait_for(good | set(report.valid_ids), timeout_s=30)
        letters = await _read_all(settings, settings.topic(RECO.dlq_topic))
        assert results.records == len(good) + len(report.valid_ids)
        assert results.duplicates == 0 and len(letters) == total_bad
    assert set(report.invalid_by_kind) == set(RECO_INVALID_KINDS)
    seen = set()
    for key, value in letters:
        letter = msgspec.convert(orjson.loads(value), DeadLetter)
        assert letter.lane == "reco" and letter.topic == settings.topic(RECO.requests_topic)
        kind = key.decode()
        if kind not in RECO_INVALID_KINDS:
            continue  # from the mixed stream (keyed by user id)
        seen.add(kind)
        raw = (letter.raw.encode() if letter.raw_encoding == "utf-8"
               else __import__("base64").b64decode(letter.raw))
        assert sent[raw] == kind, "the dead letter carries the original value"
        error, field = reco_reason_field(kind)
        assert letter.error == error and letter.reason.startswith(field), (kind, letter.reason)
    assert seen == set(RECO_INVALID_KINDS)
