"""The least-privilege Kafka ACLs of each inferlane process, declared once.

On a cluster with an authorizer every principal needs exactly the rights its clients use:
``Read`` on the topics it consumes and on its consumer groups, ``Write`` on the topics it
produces to and, under ``INFERLANE_DELIVERY=exactly_once``, on its transactional ids. Kafka
implies ``Describe`` from ``Read`` and ``Write`` (so a process can list and describe its own
topics, which ``ensure_topics`` does at start when they exist), and since Kafka 3.0 an idempotent
producer needs ``Write`` on a topic instead of ``IdempotentWrite`` on the cluster (KIP-679).
Creating topics is not in any set here: ``inferlane topics create`` runs once, as an operator
with ``Create`` rights, before the processes start.

``inferlane acls ROLE --principal User:NAME`` prints a role's set as ``kafka-acls.sh`` commands;
docs/security.md holds them for the default settings and the security tests apply the same
commands to a broker with the standard authorizer.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.kafka.topics import archived_topics, spec
from pipeline.settings import Settings

__all__ = ["ROLES", "Grant", "LaneRights", "acl_arguments", "kafka_acls_commands", "lane_rights",
           "role_grants"]


@dataclass(frozen=True)
class LaneRights:
    """What one lane (or one client process) of the pipeline does on Kafka; topic names are
    logical (before ``INFERLANE_TOPIC_PREFIX``), groups are lane names (``<app_id>-<name>``)."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    transactional: bool = False
    """Its results are written in transactions under ``exactly_once`` (ids ``<app_id>-<lane>-``)."""


#: Every lane a worker can serve (``INFERLANE_LANES``), and the faust app each worker runs.
_LANES: dict[str, LaneRights] = {
    "fraud": LaneRights(reads=("fraud.requests", "fraud.history.changelog"),
                        writes=("fraud.scores", "fraud.requests.dlq", "fraud.shadow"),
                        groups=("fraud",), transactional=True),
    "reco": LaneRights(reads=("reco.requests",), writes=("reco.results", "reco.requests.dlq"),
                       groups=("reco",), transactional=True),
    "history": LaneRights(reads=("fraud.requests", "fraud.labels", "fraud.history.changelog"),
                          writes=("fraud.history.changelog", "fraud.labels.dlq"),
                          groups=("history",)),
    "archive": LaneRights(reads=tuple(archived_topics()), groups=("archive",)),
    "batch": LaneRights(reads=("batch.jobs", "batch.chunks", "batch.requests"),
                        writes=("batch.chunks", "batch.results", "batch.jobs.dlq"),
                        groups=("batch-plan", "batch", "batch-records")),
}

#: The other processes: the HTTP services (a producer of requests, readers of results and
#: dead letters, a result follower in group ``<app_id>-<service>``), the event producers of the
#: fraud and recommendation teams, and the batch client.
_CLIENTS: dict[str, tuple[LaneRights, ...]] = {
    "services": (
        LaneRights(reads=("fraud.scores", "fraud.requests.dlq"), writes=("fraud.requests",),
                   groups=("fraud-check",)),
        LaneRights(reads=("reco.results", "reco.requests.dlq"), writes=("reco.requests",),
                   groups=("recommendations",)),
    ),
    "producer": (LaneRights(writes=("fraud.requests", "fraud.labels", "reco.requests")),),
    "batch-client": (LaneRights(reads=("batch.results",), writes=("batch.jobs",)),),
}

ROLES: tuple[str, ...] = ("worker", *_CLIENTS)
"""``worker`` (the lanes of ``INFERLANE_LANES``), ``services``, ``producer``, ``batch-client``."""


def lane_rights(lane: str) -> LaneRights:
    """The rights of worker lane ``lane``."""
    return _LANES[lane]


@dataclass(frozen=True, order=True)
class Grant:
    """One allowed operation on one resource, as ``kafka-acls.sh`` names them."""

    operation: str
    """``Read``, ``Write`` or ``Create``."""
    resource: str
    """``topic``, ``group`` or ``transactional-id`` (the tool's option names)."""
    name: str
    prefixed: bool = False


def role_grants(role: str, settings: Settings, lanes: Sequence[str] | None = None) -> list[Grant]:
    """The grants of ``role`` for ``settings`` (names with their prefix and app id); a worker's
    for ``lanes`` (default: ``INFERLANE_LANES``). Sorted, without repeats."""
    if role == "worker":
        rights = [(lane, lane_rights(lane)) for lane in (lanes or settings.lanes)]
        # faust's own consumer group (the app id) and its leader topic, which every worker
        # creates (if missing), reads and writes at start although no lane uses a faust stream.
        faust_rights = [Grant("Read", "group", settings.app_id),
                        *(Grant(op, "topic", f"{settings.app_id}-__assignor-__leader")
                          for op in ("Create", "Read", "Write"))]
    elif role in _CLIENTS:
        rights, faust_rights = [(role, right) for right in _CLIENTS[role]], []
    else:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    grants = set(faust_rights)
    for lane, right in rights:
        grants.update(Grant("Read", "topic", settings.topic(t)) for t in right.reads)
        grants.update(Grant("Write", "topic", settings.topic(t)) for t in right.writes)
        grants.update(Grant("Read", "group", settings.group_id(g)) for g in right.groups)
        if right.transactional and settings.delivery == "exactly_once":
            # Transactional ids <app_id>-<lane>-<topic>-<partition> (transactions.transactional_id)
            grants.add(Grant("Write", "transactional-id", f"{settings.app_id}-{lane}-",
                             prefixed=True))
    return sorted(grants)


def acl_arguments(principal: str, grants: Iterable[Grant]) -> list[list[str]]:
    """``kafka-acls.sh`` arguments adding ``grants`` for ``principal``: one command per
    operation and pattern type, naming every resource it applies to."""
    commands: dict[tuple[str, bool], list[str]] = {}
    for grant in sorted(grants):
        args = commands.setdefault((grant.operation, grant.prefixed), [
            "--add", "--allow-principal", principal, "--operation", grant.operation,
            *(["--resource-pattern-type", "prefixed"] if grant.prefixed else [])])
        args += [f"--{grant.resource}", grant.name]
    return [commands[key] for key in sorted(commands)]


def kafka_acls_commands(principal: str, grants: Iterable[Grant], *,
                        bootstrap: str = "$BOOTSTRAP",
                        command_config: str = "admin.properties") -> str:
    """The shell commands adding ``grants`` for ``principal`` (:func:`acl_arguments`), each
    resource type on a continuation line of its own."""
    def quote(word: str) -> str:
        return word if word.startswith("$") else shlex.quote(word)

    commands = []
    for args in acl_arguments(principal, grants):
        head = ["kafka-acls.sh", "--bootstrap-server", bootstrap, "--command-config",
                command_config, *args[:5]]
        lines, rest = [" ".join(map(quote, head))], args[5:]
        if rest[:2] == ["--resource-pattern-type", "prefixed"]:
            lines[0] += " --resource-pattern-type prefixed"
            rest = rest[2:]
        for kind in ("--group", "--topic", "--transactional-id"):  # one line per resource type
            names = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == kind]
            if names:
                lines.append("  " + " ".join(f"{kind} {quote(n)}" for n in names))
        commands.append(" \\\n".join(lines))
    return "\n".join(commands)


def _check_declared() -> None:
    """Every topic named here is declared in :data:`pipeline.kafka.topics.TOPICS`."""
    for right in (*_LANES.values(), *(r for rs in _CLIENTS.values() for r in rs)):
        for name in (*right.reads, *right.writes):
            spec(name)


_check_declared()
