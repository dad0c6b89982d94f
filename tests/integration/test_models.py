"""Model runtime on the real local stack: a registry (local folder or S3 prefix), a new version
swapped in under load without a restart, a corrupted version refused while the previous one keeps
serving, a shadow version scoring a sample to ``fraud.shadow``, INT8-vs-FP32 drift metrics.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.dev.loadgen import (
    ProduceReport,
    ResultReader,
    produce_transactions,
    snapshot_end_offsets,
)
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.stack import free_port
from pipeline.features.fastfeatures import fast_features
from pipeline.inference.model import OnnxScorer
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings
from tests.integration.conftest import EnvFactory, ready_settings

WorkerFactory = Callable[..., WorkerProcess]
MODELS = Path(__file__).resolve().parents[2] / "models"


def _publish(registry: Path, source: str, folder: str, version: str,
             corrupt: bool = False) -> Path:
    """Copy a committed model folder into the registry as ``version`` (card written last)."""
    target = registry / folder
    staging = registry.parent / f"staging-{folder}"
    shutil.copytree(MODELS / source, staging)
    card = json.loads((staging / "card.json").read_text())
    card["version"] = version
    if corrupt:  # flip bytes in the INT8 file: its sha256 no longer matches the card
        path = staging / card["files"]["int8"]["path"]
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    (staging / "card.json").unlink()
    staging.rename(target)
    (target / "card.json").write_text(json.dumps(card))
    return target


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
        return response.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _wait_log(worker: WorkerProcess, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in worker.log_text():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{text!r} not in the worker log:\n{worker.log_tail(40)}")


async def _readers(settings: Settings, *names: str) -> list[ResultReader]:
    readers = []
    for name in names:
        topic = settings.topic(name)
        readers.append(ResultReader(settings, topic, await snapshot_end_offsets(settings, topic)))
    return readers


@pytest.mark.timeout(240)
async def test_new_version_swapped_under_load_and_corrupt_version_refused(
    test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    _publish(registry, "fraud-v2", "fraud-v2", "v2")
    port = free_port()
    env = test_env(lanes="fraud", model_registry=str(registry), model_poll_interval_s="0.3",
                   drift_sample="0.5", web_port=str(port))
    settings = await ready_settings(env)
    worker = worker_factory(env, web=True)
    assert _metric(_metrics(port), "inferlane_model_info", version="v2") == 1.0
    scores, requests = await _readers(settings, "fraud.scores", "fraud.requests")
    async with scores, requests:
        report = ProduceReport()
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=400, duration_s=9.0, seed=21, report=report))
        await asyncio.sleep(1.5)
        _publish(registry, "fraud-v2", "fraud-v3-broken", "v3", corrupt=True)
        await _wait_log(worker, "refusing model fraud-v3")
        await asyncio.sleep(1.0)
        _publish(registry, "fraud", "fraud-v4", "v4")  # the v1 network, published as v4
        await _wait_log(worker, "swapped model fraud-v2-int8 -> fraud-v4-int8")
        await traffic
        missing = await scores.wait_for(set(report.valid_ids), timeout_s=30)
        await requests.wait_for(set(report.valid_ids), timeout_s=10)
    assert not missing and scores.duplicates == 0  # nothing lost across the swap
    assert "sha256 mismatch" in worker.log_text()
    versions = {v["model_version"] for v in scores.results.values()}
    assert versions == {"fraud-v2-int8", "fraud-v4-int8"}
    # Per card (one partition, in order) the switch happens once: never v2 again after v4.
    seen_v4: set[str] = set()
    for event_id in report.valid_ids:
        result = scores.results[event_id]
        if result["model_version"] == "fraud-v4-int8":
            seen_v4.add(result["card_id"])
        else:
            assert result["card_id"] not in seen_v4, f"{event_id} went back to v2"
    # Every v4 score is exactly the v4 model's score: no row met a half-loaded model.
    v4 = OnnxScorer.load(MODELS / "fraud")
    v4_ids = [e for e in report.valid_ids if scores.results[e]["model_version"].endswith("v4-int8")]
    assert len(v4_ids) > 100
    txns = [requests.results[e] for e in v4_ids]
    want = v4.predict(fast_features(txns))
    got = [scores.results[e]["score"] for e in v4_ids]
    assert got == pytest.approx(want.tolist(), abs=1e-6)
    metrics = _metrics(port)
    assert _metric(metrics, "inferlane_model_swaps_total", model="fraud") == 1.0
    assert _metric(metrics, "inferlane_model_load_failures_total", model="fraud") == 1.0
    assert _metric(metrics, "inferlane_model_info", version="v4") == 1.0
    assert _metric(metrics, "inferlane_model_info", version="v2") == 0.0
    assert _metric(metrics, "inferlane_drift_rows_total", version="v2") > 0
    assert _metric(metrics, "inferlane_drift_rows_total", version="v4") > 0


@pytest.mark.timeout(240)
async def test_s3_registry_shadow_and_drift(
    test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    env = test_env(lanes="fraud,history", drift_sample="1.0", fraud_shadow_version="v1",
                   fraud_shadow_sample="0.5")
    settings = await ready_settings(env)
    prefix = f"registry-{settings.app_id}/"
    async with S3Store(settings) as store:
        for folder in ("fraud", "fraud-v2"):
            for path in sorted((MODELS / folder).iterdir()):
                await store.put(f"{prefix}{folder}/{path.name}", path.read_bytes())
    env["INFERLANE_MODEL_REGISTRY"] = f"s3://{settings.s3_bucket}/{prefix}"
    worker = worker_factory(env)
    assert "registry: fetched fraud-v2" in worker.log_text()
    scores, shadow, requests = await _readers(settings, "fraud.scores", "fraud.shadow",
                                              "fraud.requests")
    async with scores, shadow, requests:
        report = await produce_transactions(settings, rate_per_s=1000, count=1500, seed=5)
        assert not await scores.wait_for(set(report.valid_ids), timeout_s=30)
        await requests.wait_for(set(report.valid_ids), timeout_s=10)
        await asyncio.sleep(1.0)
    assert {v["model_version"] for v in scores.results.values()} == {"fraud-v2-int8"}
    assert 500 < len(shadow.results) < 1000  # about half of the 1,455 valid ones
    v1 = OnnxScorer.load(MODELS / "fraud")
    rows: list[dict[str, Any]] = list(shadow.results.values())
    want = v1.predict(fast_features([requests.results[r["event_id"]] for r in rows]))
    assert [r["score"] for r in rows] == pytest.approx(want.tolist(), abs=1e-6)
    for row in rows:
        primary = scores.results[row["event_id"]]
        assert row["model_version"] == "fraud-v1-int8" and row["degraded"] is False
        assert row["primary_model_version"] == "fraud-v2-int8"
        assert row["primary_score"] == pytest.approx(primary["score"], abs=1e-7)
        assert row["primary_decision"] == primary["decision"]
    log = worker.log_text()
    await asyncio.to_thread(worker.terminate)
    assert "shadow model fraud-v1-int8 scores 50%" in log
    # The drift summary is logged at stop: every scored row was also scored in FP32.
    summary = worker.log_text().rsplit("fraud: DriftStats(", 1)[1].split(")", 1)[0]
    fields = dict(part.split("=") for part in summary.split(", "))
    assert int(fields["rows"]) == len(report.valid_ids)
    assert float(fields["max_abs_delta"]) < 0.1
