"""A lane: one consume loop on aiokafka, run as a mode/faust Service inside ``faust worker``.

Why not a faust agent: faust's per-event Stream machinery costs more than everything else on the
hot path (a naive agent drains 2.5k-6k events/s where a bare aiokafka loop drains 50k+), and faust
commits offsets it has not finished (see docs/design.md). A lane keeps faust for what it does well
(worker lifecycle, CLI, web, tables) and owns its consumer, its commits and its backpressure:

* fetch with ``getmany``; every fetched partition range becomes a
  :class:`~pipeline.kafka.offsets.Chunk`;
* hand the records to the lane's :class:`Handler` as a task (fetching goes on meanwhile, up to
  ``max_in_flight_records``); the handler reports each chunk done once its results and dead
  letters are acknowledged by the broker;
* commit, every ``commit_interval_ms``, only offsets below the first chunk not yet done, never
  while a rebalance runs; on revoke wait (bounded) for in-flight work, then commit it;
* on stop: stop fetching, finish in-flight work, let the handler flush, commit, leave.

With ``INFERLANE_DELIVERY=exactly_once`` and a handler that says ``transactional = True``, each
partition's records go to the handler in a call of their own inside that partition's Kafka
transaction, and "commit" means committing those transactions with their offsets
(:mod:`pipeline.kafka.transactions`).

A handler failure is not bad input (bad input is a dead letter); it is an infrastructure failure,
so the lane crashes instead of committing past lost work: at-least-once by design. What a crash
does to the worker is the supervisor's call (:mod:`pipeline.kafka.supervisor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeAlias

from aiokafka import (
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError
from mode import Service

from pipeline.kafka.connection import (
    ProducerHandle,
    make_consumer,
    make_producer,
)
from pipeline.kafka.offsets import Chunk, OffsetTracker
from pipeline.kafka.producer import BatchSender
from pipeline.kafka.topics import TopicSpec, ensure_topics, topic_specs
from pipeline.kafka.transactions import FENCED, TransactionalSender, Transactions
from pipeline.metrics import CONSUME_LAG, LANES
from pipeline.settings import Settings

__all__ = ["Handler", "Lane", "LaneContext", "LaneStats", "PartitionRecords", "Record"]

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


@dataclass(frozen=True)
class PartitionRecords:
    """Records fetched together from one partition, and the chunk that tracks them."""

    tp: TopicPartition
    records: Sequence[Record]
    chunk: Chunk


@dataclass
class LaneStats:
    """Counters a lane keeps (logged every ``stats_interval_s``, read by tests and benches)."""

    consumed: int = 0
    produced: int = 0
    dead_lettered: int = 0
    late: int = 0
    degraded: int = 0
    commits: int = 0
    commit_failures: int = 0
    dlq_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class LaneContext:
    """What a handler gets from its lane: settings, the result sender, completion and stats."""

    settings: Settings
    name: str
    sender: BatchSender | TransactionalSender
    done: Callable[[Chunk], None]
    stats: LaneStats
    fail: Callable[[BaseException], None] | None = None
    """For a handler's own background task (a timer) that failed: crash the lane as a failed
    ``handle`` would, instead of letting the task die unseen."""


class Handler(Protocol):
    """The lane-specific part. Called on the lane's event loop; must not block it.

    ``handle`` may run concurrently for successive fetches. It must call ``ctx.done(chunk)`` for
    each chunk once everything it produced for those records is acknowledged (it may do so later,
    e.g. when an archive window is written). Raising means "infrastructure failed": the lane
    crashes rather than commit. Nothing is guaranteed about ordering between two ``handle`` calls.
    A handler may also define ``async def on_assigned(tps)``, called after each assignment.
    """

    @property
    def topics(self) -> Sequence[str]: ...

    async def start(self, ctx: LaneContext) -> None: ...

    async def handle(self, batch: Sequence[PartitionRecords]) -> None: ...

    async def on_revoked(self, tps: set[TopicPartition]) -> None: ...

    async def stop(self) -> None: ...


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, lane: Lane) -> None:
        self._lane = lane

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._lane._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        txns, consumer = self._lane.transactions, self._lane._consumer
        if txns is not None and consumer is not None:
            await txns.assign(set(assigned), consumer)
        else:
            await self._lane._resume_handover(set(assigned))
        on_assigned = getattr(self._lane.handler, "on_assigned", None)
        if on_assigned is not None:  # optional hook, e.g. to start loading partition state
            await on_assigned(set(assigned))
        self._lane._rebalancing = False
        log.info("%s: assigned %s", self._lane.name,
                 sorted((t.topic, t.partition) for t in assigned))


class Lane(Service):  # type: ignore[misc]
    """Consume ``handler.topics`` in the lane's own consumer group and drive the handler."""

    max_records_per_fetch = 4096
    revoke_timeout_s = 10.0
    stats_interval_s = 10.0

    def __init__(self, settings: Settings, name: str, handler: Handler, *,
                 max_in_flight_records: int | None = None,
                 max_records_per_fetch: int | None = None,
                 consumer_overrides: dict[str, Any] | None = None,
                 topics: Sequence[TopicSpec] | None = None) -> None:
        super().__init__()
        self.topic_specs = list(topics) if topics is not None else topic_specs(settings.lanes)
        """The topics ensured at start: by default those of the worker's lanes (a process with
        fewer Kafka rights, e.g. a service, gives the ones it uses, or none when it ensured
        them itself: docs/security.md)."""
        self.consumer_overrides = consumer_overrides or {}
        if max_records_per_fetch is not None:
            self.max_records_per_fetch = max_records_per_fetch
        self.max_in_flight_records = max_in_flight_records or settings.max_in_flight_records
        self.settings = settings
        self.name = name
        self.handler = handler
        self.stats = LaneStats()
        self.tracker = OffsetTracker()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: ProducerHandle | None = None
        self._handling: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._capacity = asyncio.Event()
        self._progress = asyncio.Event()
        self._stopping = False
        self._rebalancing = False
        self._handover: dict[TopicPartition, int] = {}
        """Finished positions of revoked partitions, in case the rebalance gives them back."""
        self.on_crash: Callable[[Lane, BaseException], None] | None = None
        """Called once per failure of a loop or a handler (set by a LaneSupervisor)."""
        self.ready = asyncio.Event()
        """Set once the consumer has joined its group and the loop runs (tests wait on it)."""
        self._next_offset: dict[TopicPartition, int] = {}
        """Per partition, the offset after the last record fetched (for the lag metric)."""
        self.transactions: Transactions | None = None
        """Set in exactly-once mode for a transactional handler."""

    @property
    def label(self) -> str:
        return f"Lane[{self.name}]"

    async def on_start(self) -> None:
        if self.topic_specs:
            await ensure_topics(self.settings, self.topic_specs)
        # Renewed when the broker loses the producer's idempotence state (an expired producer
        # id, a topic deleted and re-created): the handle retires it and starts a new one.
        sender: BatchSender | TransactionalSender
        if self.settings.delivery == "exactly_once" and getattr(self.handler, "transactional",
                                                                  False):
            self.transactions = Transactions(self.settings, self.name)
            sender = TransactionalSender(self.transactions)
        else:
            self._producer = ProducerHandle(lambda: make_producer(self.settings))
            await self._producer.start()
            sender = BatchSender(self._producer, lane=self.name)
        ctx = LaneContext(self.settings, self.name, sender, self._chunk_done, self.stats,
                          fail=self._fail)
        await self.handler.start(ctx)
        self._consumer = make_consumer(self.settings, self.name,
                                       **self.consumer_overrides)
        self._consumer.subscribe(list(self.handler.topics), listener=_Rebalance(self))
        await self._consumer.start()
        for coro in (self._consume_loop(), self._commit_loop(), self._stats_loop()):
            task = asyncio.create_task(coro, name=f"{self.label}")
            task.add_done_callback(self._on_loop_done)
            self._loops.append(task)
        self.ready.set()
        LANES.register(self)
        log.info("%s: started (group %s, member %s, loop %s, %s)", self.label,
                 self.settings.group_id(self.name), f"{self.settings.worker_id}-{self.name}",
                 type(asyncio.get_running_loop()).__module__,
                 (f"exactly-once, transactions of {self.settings.transaction_interval_ms} ms"
                  if self.transactions is not None else "at-least-once"))

    async def on_stop(self) -> None:
        """Graceful stop: finish in-flight work, flush the handler, commit, then leave."""
        self._stopping = True
        LANES.unregister(self)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._handling:
            await asyncio.wait(list(self._handling), timeout=self.revoke_timeout_s)
        # Work still running now (e.g. waiting for S3) is abandoned uncommitted: redone later.
        for task in list(self._handling):
            task.cancel()
        await asyncio.gather(*self._handling, return_exceptions=True)
        try:
            await asyncio.wait_for(self.handler.stop(), self.revoke_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s: handler did not stop within %.0fs; its unfinished work is not "
                        "committed and will be redone", self.label, self.revoke_timeout_s)
        self.handler_stats()
        if self.transactions is None:
            await self._commit()
        else:
            try:
                if self.transactions.failed is None:
                    await self._commit()
            except Exception as exc:  # noqa: BLE001 - aborted: the next owner redoes it
                log.warning("%s: last commit failed (%r); its transactions are aborted and "
                            "redone by the next owner", self.label, exc)
            finally:
                await self.transactions.close()
        if self._consumer is not None:
            if self.settings.static_membership and self.settings.leave_group_on_stop:
                _leave_on_close(self._consumer)
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        log.info("%s: stopped; %s", self.label, self.stats)

    def _on_loop_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self._stopping:
            log.error("%s: loop failed", self.label, exc_info=task.exception())
            self._crash(task.exception())

    def _fail(self, exc: BaseException) -> None:
        if not self._stopping:
            log.error("%s: handler task failed", self.label, exc_info=exc)
            self._crash(exc)

    def _crash(self, exc: BaseException | None) -> None:
        """Stop taking work and tell the lane's supervisor (:mod:`pipeline.kafka.supervisor`
        ends the worker or restarts the lane); without one, crash the mode service."""
        if exc is None:
            return
        if self.on_crash is not None:
            self.on_crash(self, exc)
        else:
            asyncio.ensure_future(self.crash(exc))

    # --- consuming ------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        assert self._consumer is not None  # noqa: S101 - set in on_start
        consumer = self._consumer
        while not self._stopping:
            if self.tracker.total_in_flight >= self.max_in_flight_records:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            fetched = await consumer.getmany(timeout_ms=100,
                                             max_records=self.max_records_per_fetch)
            if fetched:
                self._dispatch(fetched)

    def _dispatch(self, fetched: dict[TopicPartition, list[Record]]) -> None:
        batch: list[PartitionRecords] = []
        now_ms = time.time() * 1000.0
        lag = CONSUME_LAG.labels(self.name)
        for tp, records in fetched.items():
            if records:
                chunk = self.tracker.add(tp, records[0].offset, records[-1].offset)
                batch.append(PartitionRecords(tp, records, chunk))
                self.stats.consumed += len(records)
                self._next_offset[tp] = records[-1].offset + 1
                lag.observe(max(now_ms - records[0].timestamp, 0.0) / 1000.0)
        txns = self.transactions
        if txns is None:
            self._start_handling(self.handler.handle(batch))
            return
        for part in batch:  # each partition's records inside its own transaction
            txn = txns.bind(part.tp)
            if txn is None:  # revoked between the fetch and now: not ours to handle
                self.tracker.forget({part.tp})
                continue
            self._start_handling(self._transactional(txns, txn, part))

    async def _transactional(self, txns: Transactions, txn: Any, part: PartitionRecords) -> None:
        if not await txns.work(txn, partial(self.handler.handle, [part])):
            self._chunk_done(part.chunk)  # revoked while it waited: forgotten, capacity freed

    def _start_handling(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._handling.add(task)
        task.add_done_callback(self._on_handled)

    def _on_handled(self, task: asyncio.Task[None]) -> None:
        self._handling.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s: handler failed; stopping without committing it", self.label,
                      exc_info=exc)
            self._crash(exc)

    def _chunk_done(self, chunk: Chunk) -> None:
        self.tracker.done(chunk)
        self._progress.set()
        if self.tracker.total_in_flight < self.max_in_flight_records:
            self._capacity.set()

    # --- committing -----------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        interval_s = (self.settings.transaction_interval_ms if self.transactions is not None
                      else self.settings.commit_interval_ms) / 1000.0
        while not self._stopping:
            await asyncio.sleep(interval_s)
            if not self._rebalancing:
                await self._commit()

    async def _commit(self, tps: set[TopicPartition] | None = None) -> None:
        if self.transactions is not None:
            # A failure here (fenced: another worker owns the partition now) is not retried:
            # the transaction is lost, the lane crashes, the next owner redoes its records.
            committed = await self.transactions.commit(
                self.transactions.partitions if tps is None else list(tps),
                lambda tp: self.tracker.committable({tp}).get(tp))
            self.tracker.committed(committed)
            self.stats.commits += bool(committed)
            return
        offsets = self.tracker.committable(tps)
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # Not fatal: the offsets stay committable and go out with the next commit.
            self.stats.commit_failures += 1
            log.warning("%s: commit of %s failed: %r", self.label, offsets, exc)
            return
        self.tracker.committed(offsets)
        self.stats.commits += 1

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._rebalancing = True
        if not revoked:
            return
        deadline = time.monotonic() + self.revoke_timeout_s
        await self.handler.on_revoked(revoked)
        while self.tracker.in_flight(revoked) and time.monotonic() < deadline:
            self._progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), deadline - time.monotonic())
        if self.transactions is not None:
            try:
                await self._commit(revoked)
            except FENCED as exc:
                # Another worker owns these partitions' transactional ids now: this one is a
                # zombie (it was paused or cut off past its session). End it.
                self._crash(exc)
            except Exception as exc:  # noqa: BLE001 - aborted: the next owner redoes it
                log.warning("%s: commit of revoked %s failed (%r); their open transactions "
                            "are aborted and redone by the next owner", self.label,
                            sorted(tp.partition for tp in revoked), exc)
            await self.transactions.release(revoked)
        else:
            if self.settings.commit_on_revoke:
                await self._commit(revoked)
            for tp in revoked:
                if (position := self.tracker.position(tp)) is not None:
                    self._handover[tp] = position
        self.tracker.forget(revoked)
        log.info("%s: revoked %s", self.label, sorted((t.topic, t.partition) for t in revoked))

    async def _resume_handover(self, assigned: set[TopicPartition]) -> None:
        """Partitions given back to us resume where *we* finished, not at the last commit.

        The commit on revoke can fail (the local broker refuses any commit once a rebalance has
        started); without this the worker would redo its own finished work. Every offset below
        the remembered position has its results acknowledged, so seeking there loses nothing.
        """
        handover, self._handover = self._handover, {}
        consumer = self._consumer
        if consumer is None:
            return
        for tp in assigned & handover.keys():
            committed = await consumer.committed(tp)
            if committed is None or handover[tp] > committed:
                consumer.seek(tp, handover[tp])
                self.tracker.resume(tp, handover[tp])
                log.info("%s: resuming %s-%d at %d (committed: %s)", self.label, tp.topic,
                         tp.partition, handover[tp], committed)

    def consumer_lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition: high watermark (as of the last fetch) minus the next offset
        this lane will consume; partitions not fetched yet are left out."""
        consumer = self._consumer
        if consumer is None:
            return {}
        lag = {}
        for tp in consumer.assignment():
            highwater, next_offset = consumer.highwater(tp), self._next_offset.get(tp)
            if highwater is not None and next_offset is not None:
                lag[(tp.topic, tp.partition)] = max(highwater - next_offset, 0)
        return lag

    async def _stats_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.stats_interval_s)
            LANES.update_cpu_per_1k()
            log.info("%s: %s in-flight=%d", self.label, self.stats, self.tracker.total_in_flight)
            self.handler_stats()

    def handler_stats(self) -> None:
        """Log what the handler keeps (e.g. the batcher's batch-size histogram, the fraud
        lane's history health), if anything."""
        for name in ("stats", "history_health"):
            value = getattr(self.handler, name, None)
            if value is not None:
                log.info("%s: %s", self.label, value)


def _leave_on_close(consumer: AIOKafkaConsumer) -> None:
    """Make ``consumer.stop()`` send LeaveGroup although it is a static member.

    aiokafka skips LeaveGroup for static members (KIP-345: a restart with the same id then
    needs no rebalance). On a planned stop we want the group to hand the partitions over now.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None and hasattr(coordinator, "_group_instance_id"):
        coordinator._group_instance_id = None
