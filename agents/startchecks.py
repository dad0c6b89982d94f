"""The worker's start checks: before any lane consumes, the deployment must match what the
lanes need, or the worker exits with one line that names the cause and the fix.

* every topic of the served lanes exists (created if missing) with its declared partition count
  (:func:`pipeline.kafka.topics.check_partitions`: a keyed topic auto-created by an early
  producer with the broker's default count is refused);
* the S3 bucket is reachable when a served lane writes to S3 (archive, batch).

A failed check exits with :data:`~pipeline.errors.EXIT_CONFIG` (78, ``EX_CONFIG``): a
supervisor that restarts the worker will see it fail the same way until the deployment is fixed,
which is what an operator should see. After start, an S3 outage is retried, not fatal.
"""

from __future__ import annotations

import logging

from mode import Service

from pipeline.errors import EXIT_CONFIG, StartCheckError
from pipeline.kafka.topics import ensure_topics, topic_specs
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings

__all__ = ["S3_LANES", "StartChecks", "run_start_checks"]

log = logging.getLogger(__name__)

S3_LANES = frozenset({"archive", "batch"})
"""Lanes that read or write the S3 bucket."""


async def run_start_checks(settings: Settings) -> None:
    """Raise :class:`StartCheckError` when the topics or the bucket do not fit the lanes."""
    await ensure_topics(settings, topic_specs(settings.lanes))
    if S3_LANES & set(settings.lanes):
        async with S3Store(settings) as store:
            await store.check_bucket()
    log.info("start checks passed: topics of lanes %s, %s", ",".join(settings.lanes),
             f"bucket {settings.s3_bucket}" if S3_LANES & set(settings.lanes) else "no bucket")


class StartChecks(Service):  # type: ignore[misc]
    """Registered before the lanes: faust starts services in order, so no lane starts (and
    nothing is consumed) when a check fails."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    async def on_start(self) -> None:
        try:
            await run_start_checks(self.settings)
        except StartCheckError as exc:
            log.critical("worker exits (code %d): start check failed: %s", EXIT_CONFIG, exc)
            raise SystemExit(EXIT_CONFIG) from exc
