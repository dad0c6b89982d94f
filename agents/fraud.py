"""The fraud lane's handler: validate, featurize, score in micro-batches, decide, produce.

Per fetched batch: each record is validated against :class:`schemas.Transaction` (bad ones
become dead letters naming field and problem), fast features are computed for the valid ones
in one vectorised pass, a history model also gets each card's slow-path snapshot from the
:class:`~pipeline.features.historyview.HistoryView` (never waiting for it: missing or lagging
history means default history and ``degraded: true``), the matrix goes through the shared
:class:`~pipeline.batching.batcher.MicroBatcher` (INT8 ONNX in an executor thread), scores map to
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
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import numpy as np
import orjson
from aiokafka import TopicPartition
from numpy.typing import NDArray

from pipeline.batching.batcher import BatchStats, MicroBatcher
from pipeline.batching.priority import REALTIME_GATE
from pipeline.features.cardhistory import CardHistory, history_features
from pipeline.features.fastfeatures import FAST_FEATURE_NAMES, fast_features
from pipeline.features.historyview import HistoryView, PartitionClock
from pipeline.inference.fraudscore import Features, Thresholds, decide, encode_score
from pipeline.inference.model import OnnxScorer
from pipeline.inference.registry import ModelRegistry
from pipeline.inference.serving import Slot, follower_for
from pipeline.kafka.deadletter import dead_letter
from pipeline.kafka.faustapp import attach_lane
from pipeline.kafka.lane import Lane, LaneContext, PartitionRecords, Record
from pipeline.kafka.partitioner import PartitionerCheck
from pipeline.kafka.supervisor import LaneSupervisor
from pipeline.metrics import (
    DEGRADED,
    DRIFT_ABS_DELTA,
    DRIFT_FLIPS,
    DRIFT_ROWS,
    E2E_LATENCY,
    MODEL_COLD_START,
    MODEL_INFO,
    SHADOW_ROWS,
)
from pipeline.settings import Settings
from schemas import Transaction, validate_record

__all__ = ["LANE", "FraudHandler", "FraudModel", "register"]

LANE = "fraud"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FraudModel:
    """What one handler call scores with: a loaded, verified, warmed model and its batcher."""

    scorer: OnnxScorer
    thresholds: Thresholds
    batcher: MicroBatcher
    reference: OnnxScorer | None
    """The FP32 file of the same version, for the drift sample (None when off)."""
    cold_start_s: float

    @property
    def version(self) -> str:
        return self.scorer.version


class FraudHandler:
    """Lane handler for ``fraud.requests`` -> ``fraud.scores`` (+ ``fraud.requests.dlq``).

    The model comes from the registry (or a pinned folder) and is swapped for a newer version
    while the lane runs (see :mod:`pipeline.inference.serving`); a shadow version can score a
    sample to ``fraud.shadow``, and a sample is scored with the FP32 file too (drift metrics).
    """

    transactional = True
    """Under ``INFERLANE_DELIVERY=exactly_once`` the lane runs each partition's calls in its
    Kafka transaction: every send of ``handle`` (results, dead letters, shadow) joins it."""

    def __init__(self, settings: Settings, scorer: OnnxScorer | None = None) -> None:
        self.settings = settings
        self.requests_topic = settings.topic("fraud.requests")
        self.scores_topic = settings.topic("fraud.scores")
        self.dlq_topic = settings.topic("fraud.requests.dlq")
        self.shadow_topic = settings.topic("fraud.shadow")
        self.topics = (self.requests_topic,)
        self._given_scorer = scorer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fraud-model")
        # Shadow and drift scoring run here, after the results are out: never ahead of them.
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fraud-side")
        self._slot: Slot[FraudModel] | None = None
        self._follower = follower_for(settings, "fraud")
        self._watch_task: asyncio.Task[None] | None = None
        self._ctx: LaneContext | None = None
        self.shadow: FraudModel | None = None
        self.history: HistoryView | None = None
        """Snapshots of the slow path's card history (once a served model reads history)."""
        self._assigned: set[int] = set()
        self._clocks: defaultdict[int, PartitionClock] = defaultdict(PartitionClock)
        self._degraded: Counter[str] = Counter()
        self._partitioner = PartitionerCheck(LANE, settings.partitioner)
        self._rng = np.random.default_rng()
        self.drift = DriftStats()

    @property
    def model(self) -> FraudModel:
        if self._slot is None:
            raise RuntimeError("FraudHandler not started")
        return self._slot.value

    @property
    def scorer(self) -> OnnxScorer:
        return self.model.scorer

    @property
    def thresholds(self) -> Thresholds:
        return self.model.thresholds

    async def start(self, ctx: LaneContext) -> None:
        """Load, verify and warm the model (and shadow) before the lane takes traffic."""
        self._ctx = ctx
        if self._given_scorer is not None:
            model = await self._build(scorer=self._given_scorer)
        else:
            model = await self._build(path=await self._follower.initial())
        self._slot = Slot(model)
        await self._ensure_history(model)
        if self.settings.fraud_shadow_version is not None:
            await self._start_shadow(self.settings.fraud_shadow_version)
        if self._follower.follows:
            self._watch_task = asyncio.create_task(
                self._follower.follow(lambda path: self._build(path=path), self._install),
                name="fraud-model-watch")
        _served(model, 1)

    async def _build(self, *, path: Path | None = None,
                     scorer: OnnxScorer | None = None, batcher: bool = True) -> FraudModel:
        """Load (sha256-checked), warm up and measure a model; start its batcher."""
        started = time.monotonic()
        s = self.settings

        def load() -> tuple[OnnxScorer, OnnxScorer | None, float]:
            main = scorer if scorer is not None else OnnxScorer.load(
                path, s.fraud_model_precision, s.inference_threads)  # type: ignore[arg-type]
            main.warm_up()
            reference = None
            if (path is not None and s.drift_sample > 0 and main.precision == "int8"
                    and "fp32" in main.card.files):
                reference = OnnxScorer.load(path, "fp32", s.inference_threads)
                reference.warm_up()
            return main, reference, main.batch_seconds(s.fraud_batch_max_rows)

        # A thread of its own: warming a successor never holds up the serving model's thread.
        main, reference, full_batch_s = await asyncio.to_thread(load)
        inline = full_batch_s * 1e6 < s.inline_inference_max_us
        micro = MicroBatcher(main.predict, batch_max_rows=s.fraud_batch_max_rows,
                             max_wait_ms=s.fraud_max_wait_ms, executor=self._executor,
                             inline=inline, name="fraud")
        if batcher:
            await micro.start()
        model = FraudModel(main, Thresholds.for_model(s, main), micro, reference,
                           time.monotonic() - started)
        log.info("fraud: model %s ready in %.3fs (thresholds %s, drift reference %s); a full "
                 "batch of %d takes %.0f us: inference %s", model.version, model.cold_start_s,
                 model.thresholds, "fp32" if reference else "off", s.fraud_batch_max_rows,
                 full_batch_s * 1e6, "inline on the loop" if inline else "in an executor thread")
        return model

    async def _start_shadow(self, version: str) -> None:
        registry = self._follower.registry or ModelRegistry(self.settings)
        entry = await registry.select("fraud", version)
        self.shadow = await self._build(path=await registry.fetch(entry), batcher=False)
        await self._ensure_history(self.shadow)
        log.info("fraud: shadow model %s scores %.0f%% of the traffic to %s",
                 self.shadow.version, 100 * self.settings.fraud_shadow_sample, self.shadow_topic)

    async def _ensure_history(self, model: FraudModel) -> None:
        if model.scorer.uses_history and self.history is None:
            self.history = HistoryView(self.settings)
            await self.history.start()
            self.history.assign(self._assigned)

    async def _install(self, model: FraudModel) -> None:
        """Swap ``model`` in between handler calls; stop the old one once no call uses it."""
        await self._ensure_history(model)
        assert self._slot is not None  # noqa: S101 - set in start()
        old = await self._slot.replace(model)
        await old.batcher.stop()
        _served(old, 0)
        _served(model, 1)
        log.info("fraud: swapped model %s -> %s without a restart", old.version,
                 model.version)

    @property
    def history_health(self) -> HistoryHealth | None:
        """Degraded scores by reason and the view's recent freshness (logged with the stats)."""
        view = self.history
        if view is None and not self._degraded:
            return None
        ages = np.asarray(view.freshness_s if view is not None else ())
        p50, p99 = (np.percentile(ages, (50, 99)) * 1000.0).round(1).tolist() if ages.size \
            else (None, None)
        return HistoryHealth(no_history=self._degraded["no_history"],
                             stale=self._degraded["stale"], loading=self._degraded["loading"],
                             misrouted=self._degraded["misrouted"],
                             freshness_p50_ms=p50, freshness_p99_ms=p99,
                             freshness_samples=int(ages.size))

    @property
    def stats(self) -> BatchStats | None:
        """The batcher's counters (batches, rows, batch-size histogram)."""
        return self._slot.value.batcher.stats if self._slot is not None else None

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._slot is not None:
            await self._slot.value.batcher.stop()
        if self.history is not None:
            await self.history.stop()
        self._executor.shutdown(wait=True)
        self._side.shutdown(wait=True)
        if self.drift.rows:
            log.info("fraud: %s", self.drift)

    async def on_assigned(self, tps: set[TopicPartition]) -> None:
        """Start loading the history of the co-partitioned changelog partitions."""
        mine = {tp.partition for tp in tps if tp.topic == self.requests_topic}
        self._assigned |= mine
        if self.history is not None:
            self.history.assign(mine)

    async def on_revoked(self, tps: set[TopicPartition]) -> None:
        """Drop their history snapshots; in-flight work finishes on its own."""
        mine = {tp.partition for tp in tps if tp.topic == self.requests_topic}
        self._assigned -= mine
        for partition in mine:
            self._clocks.pop(partition, None)
        if self.history is not None:
            self.history.release(mine)

    async def handle(self, batch: Sequence[PartitionRecords]) -> None:
        assert self._slot is not None  # noqa: S101 - set in start()
        with REALTIME_GATE.realtime(), self._slot.use() as model:
            await self._handle(batch, model)

    async def _handle(self, batch: Sequence[PartitionRecords], model: FraudModel) -> None:
        ctx = self._ctx
        assert ctx is not None  # noqa: S101 - set in start()
        valid: list[dict[str, Any]] = []
        sources: list[Record] = []
        dead: list[tuple[bytes | None, bytes]] = []
        max_bytes = self.settings.max_message_bytes
        for part in batch:
            for record in part.records:
                data, rejection = validate_record(record.value, Transaction, max_bytes=max_bytes)
                if data is not None:
                    valid.append(data)
                    sources.append(record)
                elif rejection is not None:
                    dead.append(self._dead(record, rejection.error, rejection.reason))
        dlq_sent = asyncio.ensure_future(ctx.sender.send(self.dlq_topic, dead))
        try:
            features = self._features(valid, sources)
            x, degraded = features.for_model(model.scorer)
            scores, failed = await self._score(model, x)
            dead_more = [self._dead(sources[i], "inference", reason) for i, reason in failed]
            await ctx.sender.send(self.scores_topic, self._results(
                valid, sources, scores, degraded, failed, model, features.reasons))
            if model.scorer.uses_history:
                self._degraded.update(_count_degraded(features, failed))
            await ctx.sender.send(self.dlq_topic, dead_more)
            await self._side_scoring(valid, features, x, model, scores, failed)
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

    def _features(self, valid: list[dict[str, Any]], sources: list[Record]) -> Features:
        """Fast features of every row, plus history features once a model reads history."""
        fast = fast_features(valid) if valid else np.empty((0, len(FAST_FEATURE_NAMES)),
                                                           dtype=np.float32)
        view = self.history
        if view is None or not valid:
            return Features(fast, None, None, ["loading"] * len(valid))
        clocks = self._clocks
        for record in sources:
            clocks[record.partition].add(record.offset, record.timestamp / 1000.0)
        max_lag_s = self.settings.history_max_staleness_ms / 1000.0
        snapshots: list[CardHistory | None] = []
        reasons = []
        misrouted = self._partitioner.misrouted(sources, self.settings.realtime_partitions)
        for txn, record in zip(valid, sources, strict=True):
            p = record.partition
            if view.loading(p):
                snapshots.append(None)
                reasons.append("loading")
                continue
            lag_s = clocks[p].lag_s(record.offset, record.timestamp / 1000.0, view.applied(p))
            snapshots.append(view.get(p, txn["card_id"]) if lag_s <= max_lag_s else None)
            reasons.append("no_history" if lag_s <= max_lag_s else "stale")
        history, degraded = history_features(snapshots, valid, now=math.inf,
                                             max_staleness_s=math.inf)
        final = [r if d else "" for r, d in zip(reasons, degraded.tolist(), strict=True)]
        if any(misrouted):
            # Scored on the history its partition holds (all of it for a producer that always
            # used the other partitioner), but never as if that were the card's whole story.
            degraded = degraded | np.asarray(misrouted, dtype=np.bool_)
            final = ["misrouted" if m else r for r, m in zip(final, misrouted, strict=True)]
        return Features(fast, history, degraded, final)

    async def _score(self, model: FraudModel, features: NDArray[np.float32],
                     ) -> tuple[NDArray[np.float32], list[tuple[int, str]]]:
        """Scores for every row; rows the model fails on are returned as (index, reason)."""
        n = features.shape[0]
        if not n:
            return np.empty(0, dtype=np.float32), []
        scores = np.full(n, np.nan, dtype=np.float32)
        failed: list[tuple[int, str]] = []
        await self._bisect(model.batcher, features, 0, n, scores, failed)
        return scores, failed

    async def _bisect(self, batcher: MicroBatcher, features: NDArray[np.float32], lo: int,
                      hi: int, scores: NDArray[np.float32], failed: list[tuple[int, str]],
                      ) -> None:
        try:
            scores[lo:hi] = await batcher.submit(features[lo:hi])
        except Exception as exc:  # noqa: BLE001 - poison isolation: any model error
            if hi - lo == 1:
                failed.append((lo, f"model failed on this record: {exc!r}"))
                return
            mid = (lo + hi) // 2
            await self._bisect(batcher, features, lo, mid, scores, failed)
            await self._bisect(batcher, features, mid, hi, scores, failed)

    def _results(self, valid: list[dict[str, Any]], sources: list[Record],
                 scores: NDArray[np.float32], degraded: NDArray[np.bool_],
                 failed: list[tuple[int, str]], model: FraudModel,
                 reasons: Sequence[str] | None = None) -> list[tuple[bytes | None, bytes]]:
        assert self._ctx is not None  # noqa: S101
        now = time.time()
        budget_s = self.settings.fraud_budget_ms / 1000.0
        skip = {i for i, _ in failed}
        decisions = decide(np.nan_to_num(scores), model.thresholds)
        version = model.version
        out: list[tuple[bytes | None, bytes]] = []
        late = 0
        flags = degraded.tolist()
        e2e = E2E_LATENCY.labels("fraud")
        for i, (txn, score, decision) in enumerate(zip(valid, scores.tolist(), decisions,
                                                       strict=True)):
            if i in skip:
                continue
            sent_at = txn.get("sent_at")
            # The budget counts from when the event was produced: consumer lag counts too.
            origin = sent_at if sent_at is not None else sources[i].timestamp / 1000.0
            e2e.observe(max(now - origin, 0.0))
            if now - origin > budget_s:
                late += 1
            out.append((txn["card_id"].encode(),
                        encode_score(txn, score, decision, version, now, flags[i],
                                     reasons[i] if reasons is not None else "loading")))
        self._ctx.stats.late += late
        self._ctx.stats.degraded += sum(flags[i] for i in range(len(flags)) if i not in skip)
        return out

    async def _side_scoring(self, valid: list[dict[str, Any]], features: Features,
                            x: NDArray[np.float32], model: FraudModel,
                            scores: NDArray[np.float32], failed: list[tuple[int, str]]) -> None:
        """Shadow and drift samples, scored after the results are out (off the latency path).

        ``x`` is the served model's input; its FP32 twin (same card) reads the same rows.
        """
        n = len(valid)
        if not n:
            return
        ok = np.ones(n, dtype=np.bool_)
        ok[[i for i, _ in failed]] = False
        loop = asyncio.get_running_loop()
        if model.reference is not None and self.settings.drift_sample > 0:
            rows = np.flatnonzero(ok & (self._rng.random(n) < self.settings.drift_sample))
            if rows.size:
                ref = await loop.run_in_executor(self._side, model.reference.predict, x[rows])
                self.drift.record(model, scores[rows], ref)
        shadow = self.shadow
        if shadow is not None and self.settings.fraud_shadow_sample > 0:
            rows = np.flatnonzero(ok & (self._rng.random(n) < self.settings.fraud_shadow_sample))
            if rows.size:
                shadow_x, degraded = features.for_model(shadow.scorer)
                shadow_scores = await loop.run_in_executor(self._side, shadow.scorer.predict,
                                                           shadow_x[rows])
                await self._send_shadow(valid, rows, shadow, shadow_scores, degraded, model,
                                        scores)

    async def _send_shadow(self, valid: list[dict[str, Any]], rows: NDArray[np.intp],
                           shadow: FraudModel, shadow_scores: NDArray[np.float32],
                           degraded: NDArray[np.bool_], model: FraudModel,
                           scores: NDArray[np.float32]) -> None:
        assert self._ctx is not None  # noqa: S101
        now = time.time()
        decisions = decide(shadow_scores, shadow.thresholds)
        primary = decide(scores[rows], model.thresholds)
        out = []
        for j, i in enumerate(rows.tolist()):
            txn = valid[i]
            out.append((txn["card_id"].encode(), orjson.dumps({
                "event_id": txn["event_id"], "card_id": txn["card_id"],
                "score": float(shadow_scores[j]), "decision": decisions[j],
                "model_version": shadow.version, "degraded": bool(degraded[i]),
                "primary_score": float(scores[i]), "primary_decision": primary[j],
                "primary_model_version": model.version, "scored_at": now,
            })))
        await self._ctx.sender.send(self.shadow_topic, out)
        SHADOW_ROWS.labels("fraud", "fraud", shadow.version).inc(len(out))


@dataclass
class DriftStats:
    """INT8-vs-FP32 differences on the sampled rows (also exported as Prometheus metrics)."""

    rows: int = 0
    abs_delta_sum: float = 0.0
    max_abs_delta: float = 0.0
    decision_flips: int = 0

    @property
    def mean_abs_delta(self) -> float:
        return self.abs_delta_sum / self.rows if self.rows else 0.0

    def record(self, model: FraudModel, served: NDArray[np.float32],
               reference: NDArray[np.float32]) -> None:
        delta = np.abs(served.astype(np.float64) - reference.astype(np.float64))
        flips = sum(a != b for a, b in zip(decide(served, model.thresholds),
                                          decide(reference, model.thresholds), strict=True))
        self.rows += delta.size
        self.abs_delta_sum += float(delta.sum())
        self.max_abs_delta = max(self.max_abs_delta, float(delta.max()))
        self.decision_flips += flips
        labels = ("fraud", model.scorer.card.name, model.scorer.card.version)
        DRIFT_ROWS.labels(*labels).inc(delta.size)
        DRIFT_FLIPS.labels(*labels).inc(flips)
        histogram = DRIFT_ABS_DELTA.labels(*labels)
        for value in delta.tolist():
            histogram.observe(value)


def _count_degraded(features: Features, failed: list[tuple[int, str]]) -> Counter[str]:
    """The scored rows' degraded reasons, also added to :data:`DEGRADED`."""
    if features.reasons is None:
        return Counter()
    skip = {i for i, _ in failed}
    counts = Counter(r for i, r in enumerate(features.reasons) if r and i not in skip)
    for reason, n in counts.items():
        DEGRADED.labels("fraud", reason).inc(n)
    return counts


@dataclass(frozen=True)
class HistoryHealth:
    """How the fraud lane's history fared: degraded scores by reason since start, and the
    freshness of the latest slow-path updates its view received."""

    no_history: int
    stale: int
    loading: int
    misrouted: int
    freshness_p50_ms: float | None
    freshness_p99_ms: float | None
    freshness_samples: int


def _served(model: FraudModel, on: int) -> None:
    card = model.scorer.card
    MODEL_INFO.labels("fraud", card.name, card.version, model.scorer.precision).set(on)
    if on:
        MODEL_COLD_START.labels("fraud", card.name, card.version).set(model.cold_start_s)


def register(app: faust.App, settings: Settings) -> LaneSupervisor | None:
    """Attach the fraud lane to ``app`` when ``INFERLANE_LANES`` includes it (real-time: its
    crash ends the worker)."""
    if LANE not in settings.lanes:
        return None
    return attach_lane(app, settings, LANE, lambda: Lane(settings, LANE, FraudHandler(settings)),
                       realtime=True)
