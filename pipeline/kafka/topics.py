"""Every topic of the pipeline, declared once with its partitions and configs, and the admin
step that creates them (``inferlane topics create``; workers also ensure them at start).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.errors import StartCheckError, TopicError
from pipeline.kafka.connection import KafkaAccessError, make_admin
from pipeline.settings import Settings

__all__ = ["TOPICS", "Replication", "TopicSpec", "archived_topics", "check_partitions",
           "ensure_topics", "replication_for", "spec", "topic_configs", "topic_specs",
           "without_leaders"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    """A logical topic: ``name`` before the prefix, ``lane`` it belongs to, how it is laid out."""

    name: str
    lane: str
    realtime: bool = True
    partitions: int | None = None
    """Fixed partition count; ``None`` = ``Settings.realtime_partitions``."""
    configs: dict[str, str] = field(default_factory=dict)
    compact: bool = False
    """A table changelog: compacted on Apache Kafka (the local broker cannot compact; there it
    keeps the bounded retention of every local topic, so history older than that is lost
    when a table or view reloads)."""
    results: bool = False
    """A real-time lane's result topic: the archive lane copies it to S3."""


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("fraud.requests", lane="fraud"),
    TopicSpec("fraud.scores", lane="fraud", results=True),
    TopicSpec("fraud.requests.dlq", lane="fraud", partitions=1),
    TopicSpec("fraud.shadow", lane="fraud"),
    # Keyed by card_id like fraud.requests and with as many partitions: the history agent
    # reads both into one co-partitioned table.
    TopicSpec("fraud.labels", lane="history"),
    TopicSpec("fraud.labels.dlq", lane="history", partitions=1),
    # The history table's changelog (faust Table, see agents/history.py); the fraud lane's
    # history view tails it, so the fraud lane ensures it too.
    TopicSpec("fraud.history.changelog", lane="fraud", compact=True),
    TopicSpec("reco.requests", lane="reco"),
    TopicSpec("reco.results", lane="reco", results=True),
    TopicSpec("reco.requests.dlq", lane="reco", partitions=1),
    TopicSpec("batch.requests", lane="batch"),
    TopicSpec("batch.jobs", lane="batch", partitions=1),
    TopicSpec("batch.jobs.dlq", lane="batch", partitions=1),
    # Many partitions so that every worker of the batch group takes a share of each job.
    TopicSpec("batch.chunks", lane="batch", partitions=8),
    TopicSpec("batch.results", lane="batch", partitions=4),
)


def topic_specs(lanes: Iterable[str] | None = None) -> list[TopicSpec]:
    """Specs of the topics the given lanes use (all when ``None``); the archive reads every
    real-time result topic, the history lane reads ``fraud.requests`` and writes the history
    changelog (of the fraud lane, which tails it)."""
    if lanes is None:
        return list(TOPICS)
    wanted = set(lanes)
    archive = "archive" in wanted
    history = {"fraud.requests", "fraud.history.changelog"} if "history" in wanted else set()
    return [spec for spec in TOPICS
            if spec.lane in wanted or (archive and spec.results) or spec.name in history]


def archived_topics() -> list[str]:
    """Logical names of every real-time result topic: what the archive lane copies to S3.

    All of them, whichever lanes the archiving worker itself serves: the results are usually
    produced by other workers (``INFERLANE_LANES=archive`` is a complete archive worker).
    """
    return [spec.name for spec in TOPICS if spec.results]


def spec(name: str) -> TopicSpec:
    """The declared spec of logical topic ``name``."""
    for candidate in TOPICS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no topic {name!r} declared in pipeline.kafka.topics.TOPICS")


def topic_configs(spec: TopicSpec, settings: Settings) -> dict[str, str]:
    """Broker configs of a topic as created here (faust's own declarations reuse them)."""
    configs = dict(spec.configs)
    if spec.compact:
        configs.setdefault("cleanup.policy", "compact")
    return configs


@dataclass(frozen=True)
class Replication:
    """How the created topics are replicated: ``factor`` replicas, of which ``min_insync`` must
    have a write before an ``acks=all`` producer gets its acknowledgement."""

    factor: int
    min_insync: int


def replication_for(settings: Settings, brokers: int) -> Replication:
    """The replication of new topics on a cluster of ``brokers``: the settings where given,
    else ``min(brokers, 3)`` replicas and ``min.insync.replicas`` 2 from three replicas on (one
    broker may fail without stopping writes or losing an acknowledged one), else 1."""
    factor = settings.replication_factor or max(1, min(brokers, 3))
    if factor > brokers:
        raise TopicError(f"INFERLANE_REPLICATION_FACTOR={factor} but the cluster at "
                         f"{settings.kafka_bootstrap} has {brokers} broker(s)")
    min_insync = settings.min_insync_replicas or (2 if factor >= 3 else 1)
    if min_insync > factor:
        raise TopicError(f"INFERLANE_MIN_INSYNC_REPLICAS={min_insync} is more than the "
                         f"{factor} replicas of each topic: no acks=all write could succeed")
    return Replication(factor, min_insync)


def _new_topic(spec: TopicSpec, settings: Settings, replication: Replication) -> NewTopic:
    configs = topic_configs(spec, settings)
    configs.setdefault("min.insync.replicas", str(replication.min_insync))
    return NewTopic(
        name=settings.topic(spec.name),
        num_partitions=spec.partitions or settings.realtime_partitions,
        replication_factor=replication.factor,
        topic_configs=configs,
    )


async def ensure_topics(
    settings: Settings, specs: Iterable[TopicSpec] | None = None, *, timeout_s: float = 30.0
) -> list[str]:
    """Create the missing topics; return the names created. Existing topics are left as they are.

    Then checks the partition counts of the existing ones (:func:`check_partitions`). Raises
    :class:`TopicError` when the broker cannot be reached or refuses a creation, and
    :class:`~pipeline.errors.StartCheckError` when a keyed topic has the wrong partition count.
    """
    specs = list(specs if specs is not None else TOPICS)
    admin = make_admin(settings, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        existing = set(await admin.list_topics())
        missing_specs = [spec for spec in specs if settings.topic(spec.name) not in existing]
        if not missing_specs:
            missing: list[NewTopic] = []
        else:
            cluster = await admin.describe_cluster()
            replication = replication_for(settings, len(cluster.get("brokers", [])) or 1)
            missing = [_new_topic(spec, settings, replication) for spec in missing_specs]
        if missing:
            await _create(admin, missing)
            await _wait_for_leaders(admin, [t.name for t in missing], timeout_s)
        created = {topic.name for topic in missing}
        await check_partitions(admin, [s for s in specs if settings.topic(s.name) not in created],
                               settings)
        return sorted(created)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        detail = str(exc) if isinstance(exc, KafkaAccessError) else repr(exc)
        raise TopicError(f"cannot ensure topics on {settings.kafka_bootstrap}: {detail}") from exc
    finally:
        await admin.close()


def _expected_partitions(spec: TopicSpec, settings: Settings) -> int:
    return spec.partitions or settings.realtime_partitions


async def check_partitions(admin: AIOKafkaAdminClient, specs: Iterable[TopicSpec],
                           settings: Settings) -> None:
    """Compare existing topics' partition counts with their declarations.

    A keyed real-time topic (``partitions=None``: requests, results, labels, the history
    changelog) must have ``INFERLANE_REALTIME_PARTITIONS`` partitions: the history slow path
    and the fraud lane are co-partitioned by card, and a producer maps a key to
    ``hash % count``. A mismatch raises :class:`StartCheckError` with one line per topic, the
    two counts and the fix. A fixed-count topic (DLQs, batch jobs/chunks) with another count
    only limits parallelism: a warning.
    """
    by_name = {settings.topic(spec.name): spec for spec in specs}
    if not by_name:
        return
    problems = []
    for topic in await admin.describe_topics(sorted(by_name)):
        spec = by_name.get(topic.get("topic", ""))
        parts = topic.get("partitions") or []
        if spec is None or topic.get("error_code") or not parts:
            continue  # unknown here: created meanwhile, or reported by whoever uses it
        expected, actual = _expected_partitions(spec, settings), len(parts)
        if actual == expected:
            continue
        name = settings.topic(spec.name)
        if spec.partitions is not None:
            log.warning("topic %s has %d partitions, declared with %d (pipeline/kafka/topics.py);"
                        " it works, with other parallelism", name, actual, expected)
            continue
        problems.append(
            f"topic {name} has {actual} partitions, the pipeline expects {expected} "
            f"(INFERLANE_REALTIME_PARTITIONS={settings.realtime_partitions}; keyed topics are "
            f"co-partitioned by key). Was it auto-created by a producer that started before "
            f"`inferlane topics create`? Fix: on a new cluster delete it and run `inferlane "
            f"topics create` before any producer (and set auto.create.topics.enable=false on "
            f"the brokers); if {actual} partitions is meant, set "
            f"INFERLANE_REALTIME_PARTITIONS={actual} and give every keyed topic {actual}")
    if problems:
        raise StartCheckError("; ".join(problems))


async def _create(admin: AIOKafkaAdminClient, topics: list[NewTopic]) -> None:
    response = await admin.create_topics(topics)
    for name, code, *rest in getattr(response, "topic_errors", ()):
        if code and code != TopicAlreadyExistsError.errno:
            raise TopicError(f"creating topic {name!r} failed: error {code} {rest}")
    log.info("created topics %s", [t.name for t in topics])


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    """Wait until every partition of the new topics has a leader.

    Kafka answers CreateTopics once the controller has recorded the topics; the brokers elect
    the partition leaders a moment later. A producer or consumer started in between gets
    UNKNOWN_TOPIC_OR_PARTITION / LEADER_NOT_AVAILABLE and retries, but a reader that snapshots
    the partitions then would see none: callers may use the topics as soon as this returns.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    waiting = set(names)
    while waiting:
        waiting = await without_leaders(admin, waiting)
        if not waiting:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TopicError(f"topics without partition leaders after {timeout_s:.0f}s: "
                             f"{sorted(waiting)}")
        await asyncio.sleep(0.1)


async def without_leaders(admin: AIOKafkaAdminClient, names: Iterable[str]) -> set[str]:
    """The topics of ``names`` that are unknown or have a partition without a leader."""
    waiting = set(names)
    for topic in await admin.describe_topics(sorted(waiting)):
        parts = topic.get("partitions") or []
        if not topic.get("error_code") and parts and all(p.get("leader", -1) >= 0 for p in parts):
            waiting.discard(topic["topic"])
    return waiting
