"""Lines of an S3 object by byte range: how a batch job is split without reading whole files.

A chunk ``[start, end)`` owns every line whose first byte lies in it (the rule Hadoop input
splits use): reading starts at ``start - 1``, drops everything up to the first newline (the tail
of a line owned by the previous chunk, or nothing when byte ``start - 1`` is itself a newline),
and goes on past ``end`` only to finish the last owned line. Every line of the object is thus
read by exactly one chunk, whatever the chunk size. A gzip object cannot be split: it is one
chunk, decompressed as it streams.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from pipeline.s3.s3store import S3Store

__all__ = ["iter_line_batches", "split_ranges"]


def split_ranges(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of about ``chunk_bytes`` covering ``size`` bytes."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if size <= 0:
        return [(0, 0)]
    return [(start, min(start + chunk_bytes, size)) for start in range(0, size, chunk_bytes)]


async def iter_line_batches(
    store: S3Store, bucket: str, key: str, *, start: int, end: int, size: int, gzip: bool,
    batch_lines: int,
) -> AsyncIterator[list[bytes]]:
    """Non-empty lines owned by ``[start, end)`` of the ``size``-byte object, in lists of
    ``batch_lines``."""
    pending: list[bytes] = []
    # aclosing: stopping at the end of the range releases the S3 connection at once.
    async with aclosing(_pieces(store, bucket, key, start=start, end=end, size=size,
                                gzip=gzip)) as pieces:
        async for line in _owned_lines(pieces, start=start, end=end, gzip=gzip):
            if line.strip():
                pending.append(line)
                if len(pending) >= batch_lines:
                    yield pending
                    pending = []
    if pending:
        yield pending


_OVERSHOOT = 64 * 1024


async def _pieces(store: S3Store, bucket: str, key: str, *, start: int, end: int, size: int,
                  gzip: bool) -> AsyncGenerator[bytes, None]:
    if gzip:
        inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        async for piece in store.stream(key, bucket=bucket):
            yield inflate.decompress(piece)
        yield inflate.flush()
        return
    # Bounded range requests: the owned range plus a little for the last line, then more
    # windows only while the reader still wants bytes (a long last line).
    window_start, window_end = max(start - 1, 0), min(end + _OVERSHOOT, size)
    while window_start < window_end:
        async for piece in store.stream(key, bucket=bucket, start=window_start, end=window_end):
            yield piece
        window_start, window_end = window_end, min(window_end + 16 * _OVERSHOOT, size)


async def _owned_lines(pieces: AsyncIterator[bytes], *, start: int, end: int,
                       gzip: bool) -> AsyncIterator[bytes]:
    # Offsets are of the (decompressed) stream; a gzip chunk owns all of it.
    position = 0 if gzip else max(start - 1, 0)
    skip_first = not gzip and start > 0
    limit = None if gzip else end
    buffer = b""
    async for piece in pieces:
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line_start, position = position, position + len(line) + 1
            if skip_first:
                skip_first = False
                continue
            if limit is not None and line_start >= limit:
                return
            yield line
    if buffer and not skip_first and (limit is None or position < limit):
        yield buffer
