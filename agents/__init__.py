"""The lanes of inferlane, one module per lane: what it reads, what it does to a batch, what it
writes, and ``register``, which attaches it to the worker's faust app.

* :mod:`agents.fraud` - ``fraud.requests`` -> INT8 fraud model -> ``fraud.scores`` (+ DLQ)
* :mod:`agents.reco` - ``reco.requests`` -> INT8 top-k graph -> ``reco.results`` (+ DLQ)
* :mod:`agents.history` - ``fraud.requests`` + ``fraud.labels`` -> per-card history table
* :mod:`agents.archive` - result topics -> S3 (windowed gzip JSONL)
* :mod:`agents.batch` - batch jobs and ``batch.requests`` scored S3 -> S3
* :mod:`agents.startchecks` - what the worker checks before any lane consumes

The worker is ``faust -A agents worker -l info``: faust reads ``app`` from this package, which
builds it on first access (:mod:`agents.worker`), so importing one lane module never starts a
worker.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["app", "settings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("agents.worker"), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
