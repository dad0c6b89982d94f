"""The result reader, run as its own process: ``python -m pipeline.bench.reader --topic T --out F``.

Reading results in a separate process keeps the reader's CPU and event loop apart from the load
generator's, so neither delays the other's timestamps. Protocol over stdin/stdout:

1. the reader assigns every partition of ``--topic`` (no consumer group), seeks to the end and
   prints ``READY``;
2. it then reads everything that arrives, stamping the wall-clock receive time per fetch;
3. on the stdin line ``WAIT <ids file> <timeout s>`` it waits until a result for every id in the
   file has arrived or the timeout passes, writes ``--out`` (JSON rows ``[id, sent_at,
   received_at, scored_at]``, the id being the ``--id-field`` of each result, default
   ``event_id``) and prints ``DONE <rows>``; EOF on stdin writes and exits too.

:class:`ReaderProcess` is the parent's handle on such a process. Settings (bootstrap, broker
flavour) come from the ``INFERLANE_*`` environment like every other process of the pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.bench.stats import ResultRow
from pipeline.kafka.connection import start_reader, topic_partitions
from pipeline.settings import load_settings

__all__ = ["ReaderOutput", "ReaderProcess", "main"]


@dataclass
class ReaderOutput:
    """What a reader process wrote: one row per result record, and records it could not parse."""

    rows: list[ResultRow]
    unparsed: int


class _Collector:
    def __init__(self, id_field: str = "event_id") -> None:
        self.id_field = id_field
        self.rows: list[ResultRow] = []
        self.ids: set[str] = set()
        self.unparsed = 0
        self.pending: set[str] | None = None
        self.complete = asyncio.Event()

    def expect(self, wanted: set[str]) -> None:
        self.pending = wanted - self.ids
        if not self.pending:
            self.complete.set()

    def add(self, raw: bytes | None, received_at: float) -> None:
        try:
            value: Any = orjson.loads(raw or b"")
            event_id = str(value[self.id_field])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.unparsed += 1
            return
        self.rows.append((event_id, value.get("sent_at"), received_at, value.get("scored_at")))
        self.ids.add(event_id)
        if self.pending is not None:
            self.pending.discard(event_id)
            if not self.pending:
                self.complete.set()


async def _consume(consumer: AIOKafkaConsumer, collector: _Collector) -> None:
    while True:
        batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
        now = time.time()
        for records in batches.values():
            for record in records:
                collector.add(record.value, now)


async def _wait_command(collector: _Collector) -> None:
    line = await asyncio.to_thread(sys.stdin.readline)
    parts = line.split()
    if len(parts) != 3 or parts[0] != "WAIT":
        return  # EOF or unknown: write what arrived
    wanted = await asyncio.to_thread(Path(parts[1]).read_text)
    collector.expect(set(wanted.split()))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(collector.complete.wait(), float(parts[2]))


async def _run(topic: str, id_field: str) -> _Collector:
    settings = load_settings()
    consumer = await start_reader(settings, "inferlane-bench-reader")
    collector = _Collector(id_field)
    try:
        partitions = await topic_partitions(consumer, topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            raise SystemExit(f"reader: topic {topic} has no partitions")
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        print("READY", flush=True)
        reading = asyncio.create_task(_consume(consumer, collector))
        await _wait_command(collector)
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    finally:
        await consumer.stop()
    return collector


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--id-field", default="event_id")
    args = parser.parse_args(argv)
    collector = asyncio.run(_run(args.topic, args.id_field))
    args.out.write_bytes(orjson.dumps({"rows": collector.rows, "unparsed": collector.unparsed}))
    print(f"DONE {len(collector.rows)}", flush=True)


def _read_line(stream: IO[bytes], timeout_s: float) -> str:
    """One line from a child's stdout, or "" on EOF or timeout."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline().decode(errors="replace").strip() if ready else ""


class ReaderProcess:
    """Parent-side handle: start a reader, hand it the ids to wait for, collect its rows."""

    def __init__(self, env: dict[str, str], topic: str, work_dir: Path, log_path: Path, *,
                 id_field: str = "event_id") -> None:
        self.env = {**os.environ, **env}
        self.topic = topic
        self.id_field = id_field
        self.out_path = work_dir / f"{log_path.stem}.rows.json"
        self.ids_path = work_dir / f"{log_path.stem}.ids"
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the reader and wait until it is positioned at the end of the topic."""
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "pipeline.bench.reader", "--topic", self.topic,
                "--out", str(self.out_path), "--id-field", self.id_field]
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(  # noqa: S603 - argv built here
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env,
                start_new_session=True)
        assert self._popen.stdout is not None  # noqa: S101 - PIPE above
        line = _read_line(self._popen.stdout, timeout_s)
        if line != "READY":
            self.close()
            raise RuntimeError(f"result reader did not start ({line!r}); log {self.log_path}")

    def request(self, ids: list[str], timeout_s: float) -> None:
        """Tell the reader which ids to wait for (returns at once)."""
        assert self._popen is not None and self._popen.stdin is not None  # noqa: S101
        self.ids_path.write_text("\n".join(ids))
        self._popen.stdin.write(f"WAIT {self.ids_path} {timeout_s:.1f}\n".encode())
        self._popen.stdin.flush()

    def collect(self, timeout_s: float) -> ReaderOutput:
        """Wait until the reader has written its rows (``request`` first) and load them."""
        assert self._popen is not None and self._popen.stdout is not None  # noqa: S101
        line = _read_line(self._popen.stdout, timeout_s)
        if not line.startswith("DONE"):
            self.close()
            raise RuntimeError(f"result reader did not finish ({line!r}); log {self.log_path}")
        self._popen.wait(timeout=10)
        data = orjson.loads(self.out_path.read_bytes())
        for path in (self.out_path, self.ids_path):
            path.unlink(missing_ok=True)  # raw rows are summarised by the caller
        return ReaderOutput(rows=[tuple(row) for row in data["rows"]], unparsed=data["unparsed"])

    def close(self) -> None:
        """Stop the reader if it still runs (idempotent)."""
        if self._popen is None or self._popen.poll() is not None:
            return
        with contextlib.suppress(OSError):
            if self._popen.stdin is not None:
                self._popen.stdin.close()
        try:
            self._popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(timeout=5)


if __name__ == "__main__":
    main()
