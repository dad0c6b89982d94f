"""The fraud history slow path on the real local stack: a worker with the fraud lane and the
history agent (faust Table + changelog). After a known sequence of transactions and a label the
table holds the hand-computed values; they reach the fast path (a later score uses them); they
survive a SIGKILL and restart (recovered from the changelog); a card without history is scored
on defaults with ``degraded: true``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.dev.loadgen import ResultReader, snapshot_end_offsets
from pipeline.dev.processes import WorkerProcess
from pipeline.features.cardhistory import (
    DEFAULT_HISTORY_FEATURES,
    CardHistory,
    from_bytes,
    history_features,
)
from pipeline.features.fastfeatures import fast_features
from pipeline.features.historyview import CHANGELOG
from pipeline.inference.model import OnnxScorer
from pipeline.inference.serving import fraud_model_path
from pipeline.kafka.connection import client_kwargs, make_producer, topic_partitions
from pipeline.settings import Settings
from pipeline.training.synth import TransactionGenerator
from tests.integration.conftest import EnvFactory

WorkerFactory = Callable[..., WorkerProcess]
CARD = "card-history-it"
T0 = 1_790_000_000.0  # event time of the first transaction
# (seconds after T0, amount, merchant, merchant country)
SEQUENCE = [
    (0.0, 20.0, "m-1", "DE"),
    (600.0, 35.5, "m-2", "DE"),
    (1800.0, 12.25, "m-1", "FR"),
    (5400.0, 410.0, "m-3", "DE"),
]


class Changelog:
    """Latest value per key of the history changelog (read directly, no group)."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topic(CHANGELOG)
        self.settings = settings
        self.latest: dict[str, CardHistory] = {}
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Changelog:
        self._consumer = AIOKafkaConsumer(**client_kwargs(self.settings, client_id="it-cl"),
                                          enable_auto_commit=False)
        await self._consumer.start()
        partitions = await topic_partitions(self._consumer, self.topic)
        self._consumer.assign([TopicPartition(self.topic, p) for p in partitions])
        await self._consumer.seek_to_beginning()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def wait_for(self, card: str, check: Callable[[CardHistory], bool],
                       timeout_s: float = 30.0) -> CardHistory:
        assert self._consumer is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await self._consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    if r.value is not None:
                        self.latest[r.key.decode()] = from_bytes(r.value)
            h = self.latest.get(card)
            if h is not None and check(h):
                return h
        raise AssertionError(f"changelog of {card} never satisfied the check: "
                             f"{self.latest.get(card)}")


def _txn(base: dict[str, Any], i: int, dt: float, amount: float, merchant: str,
         country: str) -> dict[str, Any]:
    return {**base, "event_id": f"hist-it-{i}", "card_id": CARD, "amount": amount,
            "merchant_id": merchant, "country": country, "card_country": "DE",
            "ts": T0 + dt, "sent_at": time.time()}


async def _send(settings: Settings, topic: str, value: dict[str, Any]) -> int:
    producer = make_producer(settings)
    await producer.start()
    try:
        meta = await producer.send_and_wait(settings.topic(topic), orjson.dumps(value),
                                            key=value["card_id"].encode())
        return int(meta.offset)
    finally:
        await producer.stop()


def _hand_computed(at: float) -> dict[str, float]:
    """Decayed counts / sums of SEQUENCE as of event time ``at`` (formulas, not library code)."""
    out = {}
    for name, tau in (("1h", 3600.0), ("24h", 86_400.0), ("30d", 30 * 86_400.0)):
        w = [math.exp(-(at - (T0 + dt)) / tau) for dt, *_ in SEQUENCE]
        out[f"cnt_{name}"] = sum(w)
        out[f"amt_{name}"] = sum(wi * a for wi, (_, a, *_) in zip(w, SEQUENCE, strict=True))
    return out


async def _scores_reader(settings: Settings) -> ResultReader:
    topic = settings.topic("fraud.scores")
    return ResultReader(settings, topic, await snapshot_end_offsets(settings, topic))


@pytest.mark.timeout(240)
async def test_history_values_reach_the_fast_path_and_survive_a_restart(
    test_env: EnvFactory, settings: Settings, worker_factory: WorkerFactory
) -> None:
    env = test_env(lanes="fraud,history")
    worker = worker_factory(env)
    base, _ = TransactionGenerator(seed=3).next()
    scorer = OnnxScorer.load(await fraud_model_path(settings))
    assert scorer.uses_history
    async with await _scores_reader(settings) as scores, Changelog(settings) as changelog:
        offsets = []
        for i, (dt, amount, merchant, country) in enumerate(SEQUENCE):
            offsets.append(await _send(settings, "fraud.requests",
                                       _txn(base, i, dt, amount, merchant, country)))
            # One at a time: each transaction is in the table before the next is sent, and the
            # lane's view (it polls an idle broker every 50 ms) has had time to read it; the
            # fast path never waits, so a snapshot not read yet would score degraded.
            await changelog.wait_for(CARD, lambda h, o=offsets[-1]: h.src_offset == o)
            await asyncio.sleep(0.5)
        await _send(settings, "fraud.labels", {"event_id": "hist-it-1", "card_id": CARD,
                                                "label": "chargeback", "ts": T0 + 7000})
        h = await changelog.wait_for(CARD, lambda h: h.chargebacks == 1)

        # The table's values equal the hand-computed ones.
        expected = _hand_computed(T0 + SEQUENCE[-1][0])
        for name, value in expected.items():
            assert getattr(h, name) == pytest.approx(value, rel=1e-9), name
        assert h.last_ts == T0 + 5400 and h.updated_at == T0 + 7000
        assert h.last_country == "DE" and h.prev_country == "FR"
        assert set(h.merchants) == {"m-1", "m-2", "m-3"}
        assert dict(zip(h.countries, h.countries_seen, strict=True)) == {
            "DE": T0 + 5400, "FR": T0 + 1800}
        assert h.chargebacks == 1 and h.confirmed_frauds == 0
        assert h.src_offset == offsets[-1] and h.last_event_id == "hist-it-3"

        # The first transaction had no history: scored on defaults and degraded; the later
        # ones were not degraded.
        await scores.wait_for({f"hist-it-{i}" for i in range(len(SEQUENCE))}, timeout_s=30)
        assert scores.results["hist-it-0"]["degraded"] is True
        assert all(not scores.results[f"hist-it-{i}"]["degraded"]
                   for i in range(1, len(SEQUENCE)))

        # A later event's score uses the history: it equals the model on the snapshot's
        # features and differs from the score on default history.
        later = _txn(base, 10, 9000.0, 980.0, "m-9", "BR")
        await asyncio.sleep(0.5)  # the view's poll interval, see above
        await _send(settings, "fraud.requests", later)
        await scores.wait_for({"hist-it-10"}, timeout_s=30)
        result = scores.results["hist-it-10"]
        hist, degraded = history_features([h], [later], now=math.inf, max_staleness_s=math.inf)
        assert not degraded[0] and result["degraded"] is False
        want = float(scorer.predict(np.hstack([fast_features([later]), hist]))[0])
        blind = float(scorer.predict_fast(fast_features([later]))[0])
        assert result["score"] == pytest.approx(want, abs=1e-6)
        assert abs(want - blind) > 1e-3
        assert hist[0].tolist() != list(DEFAULT_HISTORY_FEATURES)
        h10 = await changelog.wait_for(CARD, lambda h: h.last_event_id == "hist-it-10")

        # Crash and restart: the table comes back from the changelog, so the next update
        # continues from the full state (5 transactions) instead of starting afresh.
        await asyncio.sleep(1.5)  # past the commit interval: the changelog is flushed
        worker.kill()
        worker_factory(env, name="worker-restarted")
        after = _txn(base, 11, 9060.0, 15.0, "m-1", "DE")
        await _send(settings, "fraud.requests", after)
        h11 = await changelog.wait_for(CARD, lambda h: h.last_event_id == "hist-it-11")
        decay = math.exp(-60.0 / (30 * 86_400.0))
        assert h11.cnt_30d == pytest.approx(h10.cnt_30d * decay + 1.0, rel=1e-9)
        assert h11.chargebacks == 1
        # The restarted fast path reloads its view of the changelog and never waits for it
        # (an event meanwhile is scored degraded); once loaded, history reaches scores again.
        await scores.wait_for({"hist-it-11"}, timeout_s=60)
        again = _txn(base, 12, 9120.0, 22.0, "m-1", "DE")
        await asyncio.sleep(0.5)
        await _send(settings, "fraud.requests", again)
        await scores.wait_for({"hist-it-12"}, timeout_s=30)
        assert scores.results["hist-it-12"]["degraded"] is False


async def test_card_without_history_is_degraded(
    test_env: EnvFactory, settings: Settings, worker_factory: WorkerFactory
) -> None:
    """Without the slow path (fraud lane alone) every event is scored on default history."""
    worker_factory(test_env(lanes="fraud"))
    generator = TransactionGenerator(seed=4)
    scorer = OnnxScorer.load(await fraud_model_path(settings))
    async with await _scores_reader(settings) as scores:
        sent = []
        for i in range(20):
            txn, _ = generator.next()
            txn = {**txn, "event_id": f"nohist-{i}", "sent_at": time.time()}
            await _send(settings, "fraud.requests", txn)
            sent.append(txn)
        assert not await scores.wait_for({t["event_id"] for t in sent}, timeout_s=30)
    for txn in sent:
        result = scores.results[txn["event_id"]]
        assert result["degraded"] is True
        assert result["score"] == pytest.approx(
            float(scorer.predict_fast(fast_features([txn]))[0]), abs=1e-6)


@pytest.mark.timeout(240)
async def test_history_survives_a_rebalance(
    test_env: EnvFactory, settings: Settings, worker_factory: WorkerFactory
) -> None:
    """A second history worker joins: the table's partitions are split between the two, the
    new owner recovers its share from the changelog, and every card's history continues."""
    first = worker_factory(test_env(lanes="fraud,history"))
    base, _ = TransactionGenerator(seed=8).next()
    cards = [f"card-rebalance-{i}" for i in range(12)]  # spread over all 4 partitions
    async with Changelog(settings) as changelog:
        for step in range(2):
            for card in cards:
                txn = {**_txn(base, 0, 600.0 * step, 10.0 + step, "m-1", "DE"),
                       "event_id": f"{card}-{step}", "card_id": card}
                await _send(settings, "fraud.requests", txn)
        for card in cards:
            await changelog.wait_for(card, lambda h: h.last_event_id.endswith("-1"))
        # Ready = the group rebalanced with both members; the first recovers what it keeps.
        second = worker_factory(test_env(worker_id="w2", lanes="history"), name="second")
        for card in cards:
            txn = {**_txn(base, 0, 1200.0, 30.0, "m-2", "FR"),
                   "event_id": f"{card}-2", "card_id": card}
            await _send(settings, "fraud.requests", txn)
        for card in cards:
            h = await changelog.wait_for(card, lambda h: h.last_event_id.endswith("-2"))
            # Three transactions counted, whichever worker applied the third.
            want = sum(math.exp(-(1200.0 - t) / (30 * 86_400.0)) for t in (0.0, 600.0, 1200.0))
            assert h.cnt_30d == pytest.approx(want, rel=1e-9), card
            assert set(h.merchants) == {"m-1", "m-2"}
    # Both workers applied some of the third transactions: the table really was split.
    for worker in (first, second):
        await asyncio.to_thread(worker.terminate)
        stats = worker.log_text().rsplit("history agent: HistoryStats(", 1)[1]
        assert int(stats.split("transactions=", 1)[1].split(",", 1)[0]) > 0, worker.label
