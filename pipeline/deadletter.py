"""The one dead-letter path: build the :class:`schemas.DeadLetter` value for a refused record.

Bad input is data, not an exception: every lane turns a record it cannot process into one
dead letter on ``<topic>.dlq`` with the original key, the reason and the raw value.
"""

from __future__ import annotations

import time

import msgspec
import orjson

from schemas import DeadLetter, encode_raw

__all__ = ["dead_letter"]


def dead_letter(
    raw: bytes | None, *, error: str, reason: str, topic: str, partition: int, offset: int,
    lane: str,
) -> bytes:
    """Encode the dead letter for ``raw`` (read from ``topic``/``partition``/``offset``)."""
    text, encoding = encode_raw(raw)
    letter = DeadLetter(
        error=error, reason=reason, topic=topic, partition=partition, offset=offset, raw=text,
        raw_encoding=encoding, lane=lane, failed_at=time.time(),
    )
    return orjson.dumps(msgspec.to_builtins(letter))
