"""Event shapes of inferlane (one source of truth), their validation and JSON Schema export."""

from __future__ import annotations

from schemas.events import (
    BatchChunk,
    BatchCounts,
    BatchJob,
    BatchRecord,
    BatchResult,
    Channel,
    DeadLetter,
    Decision,
    FraudLabel,
    FraudScore,
    Label,
    ShadowScore,
    Transaction,
)
from schemas.jsonschema import SHAPES, export_json_schemas, json_schema
from schemas.validation import Rejection, encode_raw, validate_record

__all__ = [
    "SHAPES",
    "BatchChunk",
    "BatchCounts",
    "BatchJob",
    "BatchRecord",
    "BatchResult",
    "Channel",
    "DeadLetter",
    "Decision",
    "FraudLabel",
    "FraudScore",
    "Label",
    "Rejection",
    "ShadowScore",
    "Transaction",
    "encode_raw",
    "export_json_schemas",
    "json_schema",
    "validate_record",
]
