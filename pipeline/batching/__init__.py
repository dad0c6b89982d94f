"""Micro-batching: :mod:`~pipeline.batching.batcher` groups rows from many callers into one
model call (size or deadline), and :mod:`~pipeline.batching.priority` lets the real-time lanes
go first when batch work shares the cores.
"""

from pipeline import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "batcher": ["BatchStats", "CombineFn", "MicroBatcher", "ModelFn", "submit_isolating"],
    "priority": ["REALTIME_GATE", "RealtimeGate", "SharedGateState"],
})
