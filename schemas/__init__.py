"""Event shapes of inferlane (one source of truth), their validation and JSON Schema export."""

from __future__ import annotations

from schemas.events import (
    RECO_DEFAULT_K,
    RECO_MAX_CANDIDATES,
    RECO_MAX_K,
    BatchChunk,
    BatchCounts,
    BatchJob,
    BatchRecord,
    BatchResult,
    Channel,
    DeadLetter,
    Decision,
    DegradedReason,
    FraudLabel,
    FraudScore,
    Label,
    RecoItem,
    RecoRequest,
    RecoResult,
    ShadowScore,
    Transaction,
)
from schemas.jsonschema import SHAPES, export_json_schemas, json_schema
from schemas.validation import Rejection, encode_raw, size_rejection, validate_record

__all__ = [
    "RECO_DEFAULT_K",
    "RECO_MAX_CANDIDATES",
    "RECO_MAX_K",
    "SHAPES",
    "BatchChunk",
    "BatchCounts",
    "BatchJob",
    "BatchRecord",
    "BatchResult",
    "Channel",
    "DeadLetter",
    "Decision",
    "DegradedReason",
    "FraudLabel",
    "FraudScore",
    "Label",
    "RecoItem",
    "RecoRequest",
    "RecoResult",
    "Rejection",
    "ShadowScore",
    "Transaction",
    "encode_raw",
    "export_json_schemas",
    "json_schema",
    "size_rejection",
    "validate_record",
]
