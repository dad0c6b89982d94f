"""The fraud lane's handler: validate, featurize, score in micro-batches, decide, produce.

Per fetched batch: each record is validated against :class:`schemas.Transaction` (bad ones
become dead letters naming field and problem), fast features are computed for the valid ones
in one vectorised pass, a history model also gets each card's slow-path snapshot from the
:class:`~pipeline.historyview.HistoryView` (never waiting for it: missing or lagging history
means default history and ``degraded: true``), the matrix goes through the shared
:class:`~pipeline.batcher.MicroBatcher` (INT8 ONNX in an executor thread), scores map to
decisions by thresholds, and the :class:`schemas.FraudScore` records are produced in
per-partition batches. The chunks are reported done only after both the scores and the dead
letters are acknowledged.

If the model raises on a batch, the rows are bisected until the failing rows are isolated; those
go to the DLQ (``error: inference``) and the rest are scored (poison isolation).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka import TopicPartition
from numpy.typing import NDArray

from pipeline.batcher import BatchStats, MicroBatcher
from pipeline.deadletter import dead_letter
from pipeline.features import fast_features
from pipeline.history import history_features
from pipeline.historyview import HistoryView, PartitionClock
from pipeline.lane import LaneContext, PartitionRecords, Record
from pipeline.model import OnnxScorer
from pipeline.priority import REALTIME_GATE
from pipeline.settings import Settings
from schemas import Transaction, validate_record

__all__ = ["FraudHandler", "Thresholds", "decide", "encode_score", "score_fields"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    """Score cut-offs: ``score >= decline`` declines, ``score >= review`` reviews, else approve."""

    review: float
    decline: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.review <= self.decline <= 1.0:
            raise ValueError(f"need 0 <= review <= decline <= 1, got {self}")

    @classmethod
    def for_model(cls, settings: Settings, scorer: OnnxScorer) -> Thresholds:
        card = scorer.card.thresholds
        review = settings.fraud_review_threshold
        decline = settings.fraud_decline_threshold
        return cls(review=card["review"] if review is None else review,
                   decline=card["decline"] if decline is None else decline)


def decide(scores: NDArray[np.float32], thresholds: Thresholds) -> list[str]:
    """Map scores to ``approve`` / ``review`` / ``decline``, vectorised."""
    codes = (scores >= thresholds.review).astype(np.int8) + (scores >= thresholds.decline)
    labels = ("approve", "review", "decline")
    return [labels[c] for c in codes.tolist()]


def score_fields(txn: dict[str, Any], score: float, decision: str, version: str,
                 now: float, degraded: bool) -> dict[str, Any]:
    """The :class:`schemas.FraudScore` fields of one scored transaction (real-time and batch)."""
    return {
        "event_id": txn["event_id"], "card_id": txn["card_id"], "score": score,
        "decision": decision, "model_version": version, "degraded": degraded,
        "scored_at": now, "sent_at": txn.get("sent_at"),
    }


def encode_score(txn: dict[str, Any], score: float, decision: str, version: str,
                 now: float, degraded: bool) -> bytes:
    """The :class:`schemas.FraudScore` JSON of one scored transaction."""
    return orjson.dumps(score_fields(txn, score, decision, version, now, degraded))


class FraudHandler:
    """Lane handler for ``fraud.requests`` -> ``fraud.scores`` (+ ``fraud.requests.dlq``)."""

    def __init__(self, settings: Settings, scorer: OnnxScorer | None = None) -> None:
        self.settings = settings
        self.requests_topic = settings.topic("fraud.requests")
        self.scores_topic = settings.topic("fraud.scores")
        self.dlq_topic = settings.topic("fraud.requests.dlq")
        self.topics = (self.requests_topic,)
        self._scorer = scorer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fraud-model")
        self._batcher: MicroBatcher | None = None
        self._ctx: LaneContext | None = None
        self.thresholds: Thresholds | None = None
        self.cold_start_s = 0.0
        self.history: HistoryView | None = None
        """Snapshots of the slow path's card history (only for a model that reads history)."""
        self._clocks: defaultdict[int, PartitionClock] = defaultdict(PartitionClock)

    @property
    def scorer(self) -> OnnxScorer:
        if self._scorer is None:
            raise RuntimeError("FraudHandler not started")
        return self._scorer

    async def start(self, ctx: LaneContext) -> None:
        """Load and warm the model before the lane takes traffic."""
        self._ctx = ctx
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        if self._scorer is None:
            self._scorer = await loop.run_in_executor(
                self._executor, lambda: OnnxScorer.load(
                    self.settings.fraud_model_dir, self.settings.fraud_model_precision,
                    self.settings.inference_threads))
        await loop.run_in_executor(self._executor, self.scorer.warm_up)
        full_batch_s = await loop.run_in_executor(
            self._executor, self.scorer.batch_seconds, self.settings.fraud_batch_max_rows)
        inline = full_batch_s * 1e6 < self.settings.inline_inference_max_us
        self.thresholds = Thresholds.for_model(self.settings, self.scorer)
        if self.scorer.uses_history:
            self.history = HistoryView(self.settings)
            await self.history.start()
        self.cold_start_s = time.monotonic() - started
        self._batcher = MicroBatcher(
            self.scorer.predict, batch_max_rows=self.settings.fraud_batch_max_rows,
            max_wait_ms=self.settings.fraud_max_wait_ms, executor=self._executor, inline=inline)
        await self._batcher.start()
        log.info("fraud: model %s ready in %.3fs (thresholds %s); a full batch of %d takes "
                 "%.0f us: inference %s", self.scorer.version, self.cold_start_s, self.thresholds,
                 self.settings.fraud_batch_max_rows, full_batch_s * 1e6,
                 "inline on the loop" if inline else "in an executor thread")

    @property
    def stats(self) -> BatchStats | None:
        """The batcher's counters (batches, rows, batch-size histogram)."""
        return self._batcher.stats if self._batcher is not None else None

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        if self.history is not None:
            await self.history.stop()
        self._executor.shutdown(wait=True)

    async def on_assigned(self, tps: set[TopicPartition]) -> None:
        """Start loading the history of the co-partitioned changelog partitions."""
        if self.history is not None:
            self.history.assign(tp.partition for tp in tps if tp.topic == self.requests_topic)

    async def on_revoked(self, tps: set[TopicPartition]) -> None:
        """Drop their history snapshots; in-flight work finishes on its own."""
        mine = [tp.partition for tp in tps if tp.topic == self.requests_topic]
        for partition in mine:
            self._clocks.pop(partition, None)
        if self.history is not None:
            self.history.release(mine)

    async def handle(self, batch: Sequence[PartitionRecords]) -> None:
        with REALTIME_GATE.realtime():  # batch work in this process yields meanwhile
            await self._handle(batch)

    async def _handle(self, batch: Sequence[PartitionRecords]) -> None:
        ctx = self._ctx
        assert ctx is not None  # noqa: S101 - set in start()
        valid: list[dict[str, Any]] = []
        sources: list[Record] = []
        dead: list[tuple[bytes | None, bytes]] = []
        for part in batch:
            for record in part.records:
                data, rejection = validate_record(record.value, Transaction)
                if data is not None:
                    valid.append(data)
                    sources.append(record)
                elif rejection is not None:
                    dead.append(self._dead(record, rejection.error, rejection.reason))
        dlq_sent = asyncio.ensure_future(ctx.sender.send(self.dlq_topic, dead))
        try:
            features, degraded = self._features(valid, sources)
            scores, failed = await self._score(features)
            dead_more = [self._dead(sources[i], "inference", reason) for i, reason in failed]
            await ctx.sender.send(self.scores_topic,
                                  self._results(valid, sources, scores, degraded, failed))
            await ctx.sender.send(self.dlq_topic, dead_more)
        finally:
            await dlq_sent
        ctx.stats.produced += len(valid) - len(failed)
        ctx.stats.dead_lettered += len(dead) + len(failed)
        for part in batch:
            ctx.done(part.chunk)

    def _dead(self, record: Record, error: str, reason: str) -> tuple[bytes | None, bytes]:
        assert self._ctx is not None  # noqa: S101
        self._ctx.stats.dlq_reasons[error] = self._ctx.stats.dlq_reasons.get(error, 0) + 1
        letter = dead_letter(record.value, error=error, reason=reason, topic=record.topic,
                             partition=record.partition, offset=record.offset, lane="fraud")
        return record.key, letter

    def _features(self, valid: list[dict[str, Any]], sources: list[Record],
                  ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """The model's input rows and, per row, whether history was unavailable (degraded)."""
        n = len(valid)
        if not n:
            return np.empty((0, 0), dtype=np.float32), np.zeros(0, dtype=np.bool_)
        fast = fast_features(valid)
        view = self.history
        if view is None:
            return fast, np.zeros(n, dtype=np.bool_)
        clocks = self._clocks
        for record in sources:
            clocks[record.partition].add(record.offset, record.timestamp / 1000.0)
        max_lag_s = self.settings.history_max_staleness_ms / 1000.0
        snapshots = []
        for txn, record in zip(valid, sources, strict=True):
            p = record.partition
            lag_s = clocks[p].lag_s(record.offset, record.timestamp / 1000.0, view.applied(p))
            snapshots.append(view.get(p, txn["card_id"]) if lag_s <= max_lag_s else None)
        history, degraded = history_features(snapshots, valid, now=math.inf,
                                             max_staleness_s=math.inf)
        return np.hstack([fast, history]), degraded

    async def _score(self, features: NDArray[np.float32]) -> tuple[NDArray[np.float32], list[
            tuple[int, str]]]:
        """Scores for every row; rows the model fails on are returned as (index, reason)."""
        n = features.shape[0]
        if not n:
            return np.empty(0, dtype=np.float32), []
        assert self._batcher is not None  # noqa: S101 - set in start()
        scores = np.full(n, np.nan, dtype=np.float32)
        failed: list[tuple[int, str]] = []
        await self._bisect(features, 0, n, scores, failed)
        return scores, failed

    async def _bisect(self, features: NDArray[np.float32], lo: int, hi: int,
                      scores: NDArray[np.float32], failed: list[tuple[int, str]]) -> None:
        assert self._batcher is not None  # noqa: S101
        try:
            scores[lo:hi] = await self._batcher.submit(features[lo:hi])
        except Exception as exc:  # noqa: BLE001 - poison isolation: any model error
            if hi - lo == 1:
                failed.append((lo, f"model failed on this record: {exc!r}"))
                return
            mid = (lo + hi) // 2
            await self._bisect(features, lo, mid, scores, failed)
            await self._bisect(features, mid, hi, scores, failed)

    def _results(self, valid: list[dict[str, Any]], sources: list[Record],
                 scores: NDArray[np.float32], degraded: NDArray[np.bool_],
                 failed: list[tuple[int, str]]) -> list[tuple[bytes | None, bytes]]:
        assert self._ctx is not None and self.thresholds is not None  # noqa: S101
        now = time.time()
        budget_s = self.settings.fraud_budget_ms / 1000.0
        skip = {i for i, _ in failed}
        decisions = decide(np.nan_to_num(scores), self.thresholds)
        version = self.scorer.version
        out: list[tuple[bytes | None, bytes]] = []
        late = 0
        flags = degraded.tolist()
        for i, (txn, score, decision) in enumerate(zip(valid, scores.tolist(), decisions,
                                                       strict=True)):
            if i in skip:
                continue
            sent_at = txn.get("sent_at")
            # The budget counts from when the event was produced: consumer lag counts too.
            origin = sent_at if sent_at is not None else sources[i].timestamp / 1000.0
            if now - origin > budget_s:
                late += 1
            out.append((txn["card_id"].encode(),
                        encode_score(txn, score, decision, version, now, flags[i])))
        self._ctx.stats.late += late
        self._ctx.stats.degraded += sum(flags[i] for i in range(len(flags)) if i not in skip)
        return out
