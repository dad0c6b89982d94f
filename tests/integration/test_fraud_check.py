"""The fraud-check service over real HTTP, with a real broker and a real fraud worker.

With the worker up, 200 concurrent checks all answer with the pipeline's score, and the
decisions view (a separate consumer group on fraud.scores) serves the same decisions. With the
worker stopped, every check answers from the rules once its budget is spent, with
``fallback: true``. Bad requests get a 4xx with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from pipeline.dev.processes import WorkerProcess
from pipeline.services.http import ANSWER_MARGIN_MS
from pipeline.training.synth import TransactionGenerator
from tests.integration.conftest import EnvFactory, ServiceFactory
from tests.openapi_check import assert_matches_openapi

WorkerFactory = Callable[[dict[str, str]], WorkerProcess]
BUDGET_MS = 50.0


async def _check_all(session: aiohttp.ClientSession, url: str,
                     txns: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any], float]]:
    async def one(txn: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
        started = time.monotonic()
        async with session.post(f"{url}/v1/check", json=txn) as response:
            body = await response.json()
            return response.status, body, (time.monotonic() - started) * 1000.0
    return await asyncio.gather(*(one(t) for t in txns))


async def _stored(session: aiohttp.ClientSession, url: str, event_ids: list[str],
                  timeout_s: float = 20.0) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < len(event_ids) and time.monotonic() < deadline:
        for event_id in event_ids:
            if event_id not in found:
                async with session.get(f"{url}/v1/decisions/{event_id}") as response:
                    if response.status == 200:
                        found[event_id] = await response.json()
        await asyncio.sleep(0.2)
    return found


async def test_pipeline_scores_then_rules_fallback_within_budget(
        test_env: EnvFactory, worker_factory: WorkerFactory,
        service_factory: ServiceFactory) -> None:
    env = test_env(lanes="fraud")
    worker = worker_factory(env)
    # A generous budget where the test asserts "the pipeline's score" (not a timing test on a
    # shared 2-core machine), the default one where it asserts the fallback's timing.
    patient = service_factory("fraud-check", env, "--budget-ms", "5000", name="patient")
    # Its own app id, so its own group: the two instances do not split fraud.scores.
    strict = service_factory("fraud-check", {**env, "INFERLANE_APP_ID": env["INFERLANE_APP_ID"]
                                             + "-strict"},
                             "--budget-ms", str(BUDGET_MS), name="strict")
    generator = TransactionGenerator(seed=71)
    # No client-side connection limit (aiohttp's default queues calls beyond 100).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        txns = [generator.next()[0] for _ in range(200)]
        answers = await _check_all(session, patient.url, txns)
        assert [status for status, _, _ in answers] == [200] * 200
        bodies = [body for _, body, _ in answers]
        assert [b["event_id"] for b in bodies] == [t["event_id"] for t in txns]
        assert not any(b["fallback"] for b in bodies), [b for b in bodies if b["fallback"]][:2]
        assert all(b["model_version"].startswith("fraud-") for b in bodies)

        async with session.get(f"{patient.url}/openapi.json") as response:
            doc = await response.json()
        stored = await _stored(session, patient.url, [t["event_id"] for t in txns])
        assert len(stored) == 200
        for body in bodies:
            assert_matches_openapi(doc, "POST", "/v1/check", 200, body)
            view = stored[body["event_id"]]
            assert_matches_openapi(doc, "GET", "/v1/decisions/{event_id}", 200, view)
            assert (view["decision"], view["score"], view["model_version"]) == (
                body["decision"], body["score"], body["model_version"])

        worker.terminate()
        # What 200 concurrent calls cost over HTTP on this machine with nothing to wait for
        # (both ends are Python on 2 cores): the floor under the fallback's round trip.
        floor_ms = await _burst_ms(session, f"{strict.url}/healthz", 200)
        txns = [generator.next()[0] for _ in range(200)]
        answers = await _check_all(session, strict.url, txns)
        statuses = [status for status, _, _ in answers]
        bodies = [body for _, body, _ in answers]
        served_ms = max(b["latency_ms"] for b in bodies)
        round_trip_ms = max(ms for _, _, ms in answers)
        print(f"worker stopped, 200 concurrent checks: slowest answer {served_ms:.1f} ms in the "
              f"service, {round_trip_ms:.1f} ms round trip; 200 concurrent GET /healthz: "
              f"{floor_ms:.1f} ms")
        assert statuses == [200] * 200
        assert all(b["fallback"] and b["fallback_reason"] == "timeout" for b in bodies)
        assert all(b["model_version"] == "rules-v1" for b in bodies)
        for body in bodies:
            assert_matches_openapi(doc, "POST", "/v1/check", 200, body)
        # Every answer waited for the budget (the timeout fired, not an error) ...
        assert min(b["latency_ms"] for b in bodies) >= BUDGET_MS - ANSWER_MARGIN_MS - 1.0
        # ... and none waited for anything after it. How late past the budget the event loop
        # gets to 200 timers is this shared machine's scheduling, not the service's logic (CI
        # once saw 92 ms while 200 GET /healthz took 1,015 ms), so the bound scales with the
        # floor measured just before; `inferlane bench service` measures the tail under a
        # controlled rate.
        assert served_ms <= BUDGET_MS + 20.0 + floor_ms


async def _burst_ms(session: aiohttp.ClientSession, url: str, n: int) -> float:
    """Round trip of the slowest of ``n`` concurrent GETs, ms."""
    async def one() -> float:
        started = time.monotonic()
        async with session.get(url) as response:
            await response.read()
        return (time.monotonic() - started) * 1000.0
    return max(await asyncio.gather(*(one() for _ in range(n))))


async def test_bad_requests_get_4xx_with_the_reason(
        test_env: EnvFactory, service_factory: ServiceFactory) -> None:
    env = test_env(lanes="fraud", service_max_body_bytes="4096")
    service = service_factory("fraud-check", env)
    txn = TransactionGenerator(seed=72).next()[0]
    cases: list[tuple[bytes, int, str, str]] = [
        (b"{oops", 400, "invalid_json", "body"),
        (b'{"event_id": "x"}', 400, "schema", "card_id"),
        (orjson.dumps({**txn, "mcc": "5411"}), 400, "schema", "mcc"),
        (orjson.dumps({**txn, "currency": "euro"}), 400, "schema",
         "currency"),
        (b"{" + b" " * 5000 + b"}", 413, "body_too_large", "body"),
    ]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{service.url}/openapi.json") as response:
            doc = await response.json()
        for body, status, error, field in cases:
            async with session.post(f"{service.url}/v1/check", data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                problem = await response.json()
                assert (response.status, problem["error"]) == (status, error), problem
                assert problem["reason"].startswith(field), problem
                assert_matches_openapi(doc, "POST", "/v1/check", status, problem)
        async with session.get(f"{service.url}/v1/decisions/nope") as response:
            assert response.status == 404
            assert_matches_openapi(doc, "GET", "/v1/decisions/{event_id}", 404,
                                   await response.json())
        async with session.get(f"{service.url}/readyz") as response:
            ready = await response.json()
            assert response.status == 200 and ready["checks"] == {"kafka": True}
            assert_matches_openapi(doc, "GET", "/readyz", 200, ready)
