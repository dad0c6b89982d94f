"""Prometheus metrics of a worker process (prometheus-client), served at ``/metrics`` by the
worker's web server (``agents/__init__.py``).

One registry per process. Lanes record into the module-level metrics below; label values are
the lane's model name and version, never free text.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest

__all__ = [
    "CONTENT_TYPE_LATEST",
    "DRIFT_ABS_DELTA",
    "DRIFT_FLIPS",
    "DRIFT_ROWS",
    "MODEL_COLD_START",
    "MODEL_INFO",
    "MODEL_LOAD_FAILURES",
    "MODEL_SWAPS",
    "REGISTRY",
    "SHADOW_ROWS",
    "render",
]

REGISTRY = CollectorRegistry(auto_describe=True)

MODEL_INFO = Gauge(
    "inferlane_model_info", "1 for the model version a lane serves (0 once replaced)",
    ["lane", "model", "version", "precision"], registry=REGISTRY)
MODEL_COLD_START = Gauge(
    "inferlane_model_cold_start_seconds",
    "Load + sha256 check + warm-up time of the served model version",
    ["lane", "model", "version"], registry=REGISTRY)
MODEL_SWAPS = Counter(
    "inferlane_model_swaps_total", "Model versions swapped in without a restart",
    ["lane", "model"], registry=REGISTRY)
MODEL_LOAD_FAILURES = Counter(
    "inferlane_model_load_failures_total",
    "Model versions refused (sha256 mismatch, unreadable card or file, rejected graph)",
    ["lane", "model"], registry=REGISTRY)
SHADOW_ROWS = Counter(
    "inferlane_shadow_rows_total", "Rows scored by the shadow model",
    ["lane", "model", "version"], registry=REGISTRY)
DRIFT_ROWS = Counter(
    "inferlane_drift_rows_total", "Rows scored by both the INT8 and the FP32 file",
    ["lane", "model", "version"], registry=REGISTRY)
DRIFT_FLIPS = Counter(
    "inferlane_drift_decision_flips_total",
    "Sampled rows whose decision differs between INT8 and FP32",
    ["lane", "model", "version"], registry=REGISTRY)
DRIFT_ABS_DELTA = Histogram(
    "inferlane_drift_abs_score_delta", "|INT8 score - FP32 score| of sampled rows",
    ["lane", "model", "version"], registry=REGISTRY,
    buckets=(1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0))


def render() -> bytes:
    """The registry in the Prometheus text exposition format."""
    return _generate_latest(REGISTRY)
