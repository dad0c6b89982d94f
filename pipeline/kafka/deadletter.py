"""The one dead-letter path: build the :class:`schemas.DeadLetter` value for a refused record.

Bad input is data, not an exception: every lane turns a record it cannot process into one
dead letter on ``<topic>.dlq`` with the original key, the reason and the raw value. A raw value
longer than :data:`RAW_MAX_BYTES` is cut to its first bytes (the reason says so): the dead
letter must fit one producer batch even for an oversized (``too_large``) record.
"""

from __future__ import annotations

import time

import msgspec
import orjson

from schemas import DeadLetter, encode_raw

__all__ = ["RAW_MAX_BYTES", "dead_letter"]

#: Most bytes of the original value a dead letter carries. JSON escaping can grow text up to
#: six times (``\u0000``): 32 KiB stays under the producer's 256 KiB batch
#: (pipeline/kafka/connection.py).
RAW_MAX_BYTES = 32 * 1024


def dead_letter(
    raw: bytes | None, *, error: str, reason: str, topic: str, partition: int, offset: int,
    lane: str,
) -> bytes:
    """Encode the dead letter for ``raw`` (read from ``topic``/``partition``/``offset``)."""
    if raw is not None and len(raw) > RAW_MAX_BYTES:
        reason = f"{reason} (raw: the first {RAW_MAX_BYTES} of {len(raw)} bytes)"
        raw = raw[:RAW_MAX_BYTES]
    text, encoding = encode_raw(raw)
    letter = DeadLetter(
        error=error, reason=reason, topic=topic, partition=partition, offset=offset, raw=text,
        raw_encoding=encoding, lane=lane, failed_at=time.time(),
    )
    return orjson.dumps(msgspec.to_builtins(letter))
