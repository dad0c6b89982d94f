"""S3 unreachable for a minute in the middle of a run (a cut TCP proxy in front of the S3
server): the real-time lane keeps scoring through it, nothing is lost, and the archive and a
batch job both finish once S3 is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import orjson

from pipeline.clients.batchclient import read_job_output, submit_job, wait_for_job
from pipeline.dev.loadgen import (
    produce_transactions,
    snapshot_end_offsets,
    write_transactions_jsonl,
)
from pipeline.dev.processes import WorkerProcess
from schemas import BatchJob
from tests.integration.conftest import EnvFactory, ready_settings, settings_from
from tests.integration.faultproxy import FaultProxy
from tests.integration.test_fraud_lane import _read_all, _readers, archived

WorkerFactory = Callable[..., WorkerProcess]
OUTAGE_S = 60.0


async def test_s3_outage_blocks_neither_realtime_nor_loses_anything(
    test_env: EnvFactory, worker_factory: WorkerFactory
) -> None:
    direct = settings_from(test_env())
    host, port = direct.s3_endpoint_url.rsplit("//", 1)[1].split(":")  # type: ignore[union-attr]
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    env = test_env(s3_endpoint_url=f"http://127.0.0.1:{proxy.port}",
                   archive_max_age_ms="500", batch_chunk_bytes="200000")
    settings = await ready_settings(env)
    # In a thread: the proxy runs on this event loop, and the worker's start check reaches
    # S3 through it while start-up is awaited.
    worker = await asyncio.to_thread(worker_factory, env)
    ids, _ = await write_transactions_jsonl(direct, "in/outage.jsonl", 20_000)
    results_from = await snapshot_end_offsets(settings, settings.topic("batch.results"))
    scores, dlq = await _readers(settings)
    try:
        async with scores, dlq:
            traffic = asyncio.create_task(produce_transactions(
                settings, rate_per_s=300, duration_s=OUTAGE_S + 12, seed=17))
            await submit_job(settings, msgspec.convert({
                "job_id": "outage", "model": "fraud",
                "input_uri": f"s3://{settings.s3_bucket}/in/outage.jsonl"}, BatchJob))
            await asyncio.sleep(4.0)
            await proxy.cut()
            cut_at = time.time()
            await asyncio.sleep(OUTAGE_S)
            await proxy.restore()
            restored_at = time.time()
            report = await traffic
            assert not await scores.wait_for(set(report.valid_ids), timeout_s=30)
            # Every event sent while S3 was down (but a 5 s margin) was scored before S3 came
            # back: the real-time lane did not wait for S3.
            during = [v for v in scores.results.values()
                      if cut_at + 1 <= v["sent_at"] <= restored_at - 5]
            assert len(during) > 1000, f"only {len(during)} events sent during the outage"
            late = [v for v in during if v["scored_at"] >= restored_at]
            assert not late, f"{len(late)} real-time results waited for S3"
            final = await wait_for_job(settings, "outage", results_from, timeout_s=120)
        assert final["status"] == "completed", final
        output = [orjson.loads(line)["event_id"]
                  for line in await read_job_output(direct, "batch/outage/")]
        assert len(output) == len(ids) and set(output) == ids
        assert "retrying in" in worker.log_text(), "S3 calls failed and were retried"
        topic = settings.topic("fraud.scores")
        on_topic = sorted(v for _, v in await _read_all(settings, topic))
        # Windows still waiting for S3 when the worker stops are not committed: a later run
        # writes them. Whatever the stop left, the archive converges to exactly the topic.
        deadline = time.monotonic() + 60
        while (in_s3 := sorted(line for lines in (await archived(direct, topic)).values()
                               for line in lines)) != on_topic:
            assert time.monotonic() < deadline, (
                f"archive holds {len(in_s3)} records, topic {len(on_topic)}")
            await asyncio.sleep(1.0)
        assert worker.terminate() == 0
    finally:
        await proxy.stop()
