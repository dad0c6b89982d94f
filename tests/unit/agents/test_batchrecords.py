"""Unit tests for agents.batch.batchrecords' record parser (the batch.requests lane)."""

from __future__ import annotations

import orjson

from agents.batch.batchrecords import _parse
from pipeline.training.synth import TransactionGenerator


def _record(note: str = "") -> bytes:
    payload, _ = TransactionGenerator(seed=1).next()
    return orjson.dumps({"job_id": "job-1", "model": "fraud",
                         "payload": {**payload, "note": note}})


def test_a_record_within_the_limit_is_parsed() -> None:
    raw = _record()
    job_id, payload, reason = _parse(raw, len(raw))
    assert (job_id, reason) == ("job-1", "")
    assert payload is not None and payload["note"] == ""


def test_a_record_over_the_limit_is_rejected_unparsed() -> None:
    raw = _record("x" * 5000)
    job_id, payload, reason = _parse(raw, 4096)
    assert payload is None
    assert job_id == "_invalid", "an oversized record is not parsed to find its job"
    assert reason == (f"value: {len(raw)} bytes, more than the limit of 4096 bytes "
                      "(INFERLANE_MAX_MESSAGE_BYTES)")
