"""The mechanisms every lane shares, one subpackage per job (the map: docs/design.md).

* :mod:`pipeline.kafka` - the Kafka runtime: clients, the faust app, the lane loop, producer,
  offsets, topics, dead letters.
* :mod:`pipeline.batching` - the micro-batcher and the real-time-first priority gate.
* :mod:`pipeline.features` - what the fraud model sees: fast features and per-card history.
* :mod:`pipeline.inference` - the model runtime: model files and cards, registry, hot swap,
  fraud scoring, the reco graph.
* :mod:`pipeline.s3` - the S3 store and line-oriented reads.
* :mod:`pipeline.clients` - request/reply and batch clients of the lanes.
* :mod:`pipeline.services` - the consumer services (HTTP).
* :mod:`pipeline.settings`, :mod:`pipeline.errors`, :mod:`pipeline.metrics` - one of each per
  process.
* :mod:`pipeline.serverless` - the fraud lane as a serverless function.
* :mod:`pipeline.dev`, :mod:`pipeline.training`, :mod:`pipeline.bench`, :mod:`pipeline.cli` -
  local stack and demo, model builds, benchmarks, the ``inferlane`` command.

Each subpackage exports its public names lazily (:func:`lazy_exports`): ``from pipeline.kafka
import Lane`` works, and importing one module of a package never imports its siblings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and a module ``__getattr__`` for ``package`` that exports ``modules``'
    names (``{module: [name, ...]}``), importing a module on the first use of one of them."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return sorted(where), __getattr__
