"""The fraud-check service without a broker: validation, JSON errors, the rules fallback when
Kafka is unavailable, health/readiness, and its OpenAPI document against its routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from pipeline.services.fraudcheck import FraudCheckService
from pipeline.services.openapi import openapi_document
from pipeline.services.rules import RULES_VERSION, evaluate
from pipeline.settings import load_settings
from schemas.http import CheckDecision, ErrorBody

TXN: dict[str, Any] = {
    "event_id": "e-1", "card_id": "card-1", "merchant_id": "m-1", "amount": 6000.0,
    "currency": "EUR", "mcc": 4829, "country": "NG", "card_country": "DE", "channel": "ecom",
    "ts": 1_790_000_000.0,
}


def _service(**overrides: Any) -> FraudCheckService:
    # Port 9 on loopback: nothing listens, so Kafka stays unavailable (no network needed).
    settings = load_settings(kafka_bootstrap="127.0.0.1:9", **overrides)
    return FraudCheckService(settings)


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    service = _service(service_max_body_bytes=2048)
    async with TestClient(TestServer(service.make_app())) as test_client:
        yield test_client


async def test_without_kafka_every_check_is_a_rules_fallback(
        client: TestClient[Any, Any]) -> None:
    response = await client.post("/v1/check", json=TXN)
    assert response.status == 200
    answer = msgspec.convert(await response.json(), CheckDecision)
    verdict = evaluate(TXN)
    assert answer.fallback and answer.fallback_reason == "kafka_unavailable"
    assert (answer.decision, answer.score, answer.model_version) == (
        verdict.decision, verdict.score, RULES_VERSION)
    assert answer.degraded and answer.rules == list(verdict.fired)


async def test_health_is_up_but_not_ready_without_kafka(client: TestClient[Any, Any]) -> None:
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert await ready.json() == {"status": "not_ready", "checks": {"kafka": False}}


@pytest.mark.parametrize(("body", "status", "error", "field"), [
    (b"{not json", 400, "invalid_json", "body: not valid JSON"),
    (b"", 400, "invalid_json", "body"),
    (b"[1, 2]", 400, "schema", "body: expected a JSON object"),
    (msgspec.json.encode({**TXN, "amount": "12"}), 400, "schema", "amount"),
    (msgspec.json.encode({k: v for k, v in TXN.items() if k != "card_id"}), 400, "schema",
     "card_id"),
    (msgspec.json.encode({**TXN, "amount": -1}), 400, "schema", "amount"),
    (msgspec.json.encode({**TXN, "channel": "fax"}), 400, "schema", "channel"),
    (b'{"amount": NaN}', 400, "schema", "amount"),
    (b"x" * 4096, 413, "body_too_large", "body"),
])
async def test_bad_requests_get_4xx_with_a_reason(client: TestClient[Any, Any], body: bytes,
                                                  status: int, error: str, field: str) -> None:
    response = await client.post("/v1/check", data=body,
                                 headers={"Content-Type": "application/json"})
    assert response.status == status
    problem = msgspec.convert(await response.json(), ErrorBody)
    assert problem.error == error
    assert problem.reason.startswith(field), problem.reason


async def test_unknown_routes_and_methods_answer_json(client: TestClient[Any, Any]) -> None:
    missing = await client.get("/v1/nope")
    assert missing.status == 404 and (await missing.json())["error"] == "not_found"
    wrong = await client.get("/v1/check")
    assert wrong.status == 405 and (await wrong.json())["error"] == "method_not_allowed"
    unknown = await client.get("/v1/decisions/never-seen")
    assert unknown.status == 404
    assert "never-seen" in (await unknown.json())["reason"]


async def test_metrics_count_answers_by_source(client: TestClient[Any, Any]) -> None:
    await client.post("/v1/check", json=TXN)
    text = await (await client.get("/metrics")).text()
    decision = evaluate(TXN).decision
    assert (f'inferlane_fraud_check_answers_total{{decision="{decision}",source="rules"}} 1.0'
            in text)
    assert 'inferlane_fraud_check_fallbacks_total{reason="kafka_unavailable"} 1.0' in text


async def test_openapi_document_is_valid_and_lists_exactly_the_routes(
        client: TestClient[Any, Any]) -> None:
    served = await (await client.get("/openapi.json")).json()
    service = _service()
    assert served == openapi_document(service)
    validate(served)
    documented = {(method.upper(), path) for path, item in served["paths"].items()
                  for method in item}
    registered = {(route.method, route.resource.canonical)
                  for route in service.make_app().router.routes()
                  if route.method != "HEAD"}
    assert documented == registered


def test_rules_weights_and_cut_offs() -> None:
    calm = {**TXN, "amount": 12.5, "mcc": 5411, "country": "DE", "channel": "pos"}
    assert evaluate(calm).fired == () and evaluate(calm).decision == "approve"
    abroad = {**calm, "country": "FR", "amount": 1200.0}
    assert evaluate(abroad).fired == ("amount_over_1000", "cross_border", "round_amount")
    assert evaluate(abroad).decision == "review"
    assert evaluate(TXN).score == 1.0 and evaluate(TXN).decision == "decline"
    atm = {**calm, "channel": "atm", "country": "TH", "amount": 200.0}
    assert evaluate(atm).fired == ("cross_border", "foreign_atm")  # round ATM amounts are normal


def test_rules_rank_fraud_above_chance() -> None:
    from sklearn.metrics import roc_auc_score

    from pipeline.training.synth import TransactionGenerator

    generator = TransactionGenerator(seed=3)
    labels, scores = [], []
    for _ in range(50_000):
        txn, is_fraud = generator.next()
        labels.append(is_fraud)
        scores.append(evaluate(txn).score)
    assert roc_auc_score(labels, scores) > 0.8  # 0.822 on 200,000 (docs/services.md)
