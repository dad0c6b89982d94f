"""Validation of raw Kafka values against the event shapes; never raises into the agent loop.

``validate_record(raw, Shape, max_bytes=...)`` returns ``(value, None)`` for a good record and
``(None, Rejection)`` for a bad one, where the rejection names the field and the problem. A value
longer than ``max_bytes`` is refused (``too_large``) before it is parsed. The hot path keeps the
parsed ``dict`` (features read it directly); the Struct conversion is the check.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import orjson

__all__ = ["Rejection", "encode_raw", "size_rejection", "validate_record"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was refused: ``error`` is the class, ``reason`` the human sentence."""

    error: str
    reason: str


def _schema_reason(exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `float` >= 0.0 - at `$.amount`"; lead with the field name.
    message = str(exc)
    if " - at `$." in message:
        text, _, path = message.rpartition(" - at `$.")
        return f"{path.rstrip('`')}: {text}"
    if message.startswith("Object missing required field `"):
        field = message.split("`")[1]
        return f"{field}: missing required field"
    return message


def validate_record(
    raw: bytes | None, shape: type[msgspec.Struct], *, max_bytes: int | None = None
) -> tuple[dict[str, Any] | None, Rejection | None]:
    """Parse ``raw`` as JSON and check it against ``shape``; return the dict or the rejection.

    ``max_bytes`` (the lanes pass ``INFERLANE_MAX_MESSAGE_BYTES``): a longer value is refused
    with error ``too_large`` without being parsed, so its size costs no parsing time or memory.
    """
    if not raw:
        return None, Rejection("invalid_json", "value: empty record value")
    if max_bytes is not None and (too_large := size_rejection(raw, max_bytes)) is not None:
        return None, too_large
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, _lenient_rejection(raw, shape, exc)
    if not isinstance(data, dict):
        kind = type(data).__name__
        return None, Rejection("schema", f"value: expected a JSON object, got {kind}")
    try:
        msgspec.convert(data, shape)
    except msgspec.ValidationError as exc:
        return None, Rejection("schema", _schema_reason(exc))
    return data, None


def size_rejection(raw: bytes | None, max_bytes: int) -> Rejection | None:
    """The ``too_large`` rejection of a value longer than ``max_bytes``, else None. Used by
    :func:`validate_record` and by the batch lanes, whose records have their own parsers."""
    if raw is None or len(raw) <= max_bytes:
        return None
    return Rejection("too_large", f"value: {len(raw)} bytes, more than the limit of "
                                  f"{max_bytes} bytes (INFERLANE_MAX_MESSAGE_BYTES)")


def _lenient_rejection(raw: bytes, shape: type[msgspec.Struct], exc: Exception) -> Rejection:
    """Explain a JSON parse failure; name the field when the culprit is NaN or Infinity.

    Only UTF-8 text is JSON here: the stdlib guesses UTF-16/32 and skips a byte order mark when
    given bytes, so it gets the decoded text. It accepts the NaN and Infinity tokens (and reads
    a number beyond a double's range, such as ``1e400``, as Infinity), which lets us name the
    field that holds one; any other failure, or a NaN elsewhere, is ``invalid_json``.
    """
    invalid = Rejection("invalid_json", f"value: not valid JSON ({exc})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return Rejection("invalid_json", f"value: not valid JSON (not UTF-8: {bad.reason} "
                                         f"{raw[bad.start]:#04x} at byte {bad.start})")
    try:
        data = json.loads(text, parse_int=_int_or_infinity)
    except (ValueError, RecursionError):
        return invalid
    if not isinstance(data, dict):
        return invalid
    try:
        msgspec.convert(data, shape)
    except msgspec.ValidationError as lenient:
        reason = _schema_reason(lenient)
        value = _value_at(data, reason.partition(":")[0])
        if isinstance(value, float) and not math.isfinite(value):
            return Rejection("schema", f"{reason} (NaN or Infinity: not allowed in JSON)")
    except ValueError:  # e.g. a lone surrogate escape ("\ud800") checked against a Literal
        pass
    return invalid


def _int_or_infinity(digits: str) -> int | float:
    """An integer literal as the strict parser sees it: Infinity beyond a double's range."""
    as_float = float(digits)
    return int(digits) if math.isfinite(as_float) else as_float


def _value_at(data: Any, path: str) -> Any:
    """The value at a msgspec error path such as ``amount`` or ``payload.amount`` (else None)."""
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def encode_raw(raw: bytes | None) -> tuple[str, Literal["utf-8", "base64"]]:
    """Represent an arbitrary record value as text for a dead letter: (text, encoding)."""
    if raw is None:
        return "", "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"
