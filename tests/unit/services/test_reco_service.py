"""The recommendation service without a broker: the store of latest results, candidate
filtering, the popular list from the served model's card, the fallback order over real HTTP
(aiohttp test server; Kafka unreachable, so every POST is a ``kafka_unavailable`` fallback),
input validation, metrics, and the OpenAPI document against the routes and every answer."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from pipeline.errors import ModelLoadError
from pipeline.inference.recomodel import load_reco_card
from pipeline.services.openapi import openapi_document
from pipeline.services.recommendations import RecommendationService
from pipeline.services.recostore import LatestResults, PopularItems, read_popular, top_k
from pipeline.settings import Settings, load_settings
from schemas import RecoItem
from tests.openapi_check import assert_matches_openapi, route_pairs

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "reco"
RECOMMEND, STORED = "/v1/recommend", "/v1/recommendations/{user_id}"


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(**overrides: Any) -> Settings:
    values = {"kafka_bootstrap": f"127.0.0.1:{_closed_port()}", "reco_model_dir": MODEL_DIR,
              **overrides}
    return load_settings(**values)


def _result(user: str, items: list[str], request_id: str = "r1",
            version: str = "reco-v1-int8") -> dict[str, Any]:
    return {"request_id": request_id, "user_id": user, "model_version": version,
            "scored_at": 1_800_000_000.5, "sent_at": None, "dropped_candidates": 0,
            "items": [{"item_id": item, "score": 10.0 - n} for n, item in enumerate(items)]}


def _items(*ids: str) -> list[RecoItem]:
    return [RecoItem(item_id=i, score=float(len(ids) - n)) for n, i in enumerate(ids)]


# --- pure pieces ------------------------------------------------------------------------------
def test_top_k_keeps_order_filters_candidates_and_may_be_short() -> None:
    ranked = _items("a", "b", "c", "d", "e")
    assert [i.item_id for i in top_k(ranked, 3)] == ["a", "b", "c"]
    assert [i.item_id for i in top_k(ranked, 10)] == ["a", "b", "c", "d", "e"]
    assert [i.item_id for i in top_k(ranked, 2, ["e", "c", "zz", "a"])] == ["a", "c"]
    assert [i.item_id for i in top_k(ranked, 5, ["d", "d", "zz"])] == ["d"]
    assert top_k(ranked, 5, ["zz"]) == []


def test_latest_results_keeps_the_last_put_per_user_within_the_bound() -> None:
    store = LatestResults(max_users=2)
    assert store.put(_result("u1", ["i1", "i2"], "first"))
    assert store.put(_result("u1", ["i3"], "second"))
    kept = store.get("u1")
    assert kept is not None and kept.request_id == "second"
    assert kept.ranked() == [RecoItem(item_id="i3", score=10.0)]
    assert (kept.model_version, kept.scored_at) == ("reco-v1-int8", 1_800_000_000.5)
    store.put(_result("u2", ["i4"]))
    store.put(_result("u1", ["i5"], "third"))  # u1 is now the most recently updated
    store.put(_result("u3", ["i6"]))  # evicts u2, the least recently updated
    assert (len(store), store.evicted) == (2, 1)
    assert store.get("u2") is None
    assert [u for u in ("u1", "u2", "u3") if store.get(u)] == ["u1", "u3"]
    assert store.get("u1").request_id == "third"  # type: ignore[union-attr]


def test_latest_results_skips_what_is_not_a_reco_result() -> None:
    store = LatestResults(max_users=10)
    assert not store.put({"request_id": "x", "user_id": "u1"})
    bad = _result("u1", ["i1"])
    bad["items"] = [{"item_id": "i1", "score": "high"}]
    assert not store.put(bad)
    assert (len(store), store.invalid) == (0, 2)


def test_popular_items_come_from_the_card() -> None:
    card = load_reco_card(MODEL_DIR)
    popular = read_popular(MODEL_DIR, "int8")
    assert popular.model_version == "reco-v1-int8"
    assert [i.item_id for i in popular.items] == [p.item_id for p in card.popular_items]
    assert [i.score for i in popular.items] == [float(p.interactions) for p in card.popular_items]
    assert len(popular.items) == 100
    assert read_popular(MODEL_DIR, "fp32").model_version == "reco-v1-fp32"


def _publish(folder: Path, version: str, popular: list[str] | None) -> Path:
    """A copy of the committed reco folder as ``version`` with these popular items (None: the
    card has no popular_items)."""
    shutil.copytree(MODEL_DIR, folder)
    raw = json.loads((folder / "card.json").read_text())
    raw["version"] = version
    del raw["popular_items"]
    if popular is not None:
        raw["popular_items"] = [{"item_id": i, "interactions": 100 - n}
                                for n, i in enumerate(popular)]
    (folder / "card.json").write_text(json.dumps(raw))
    return folder


def test_a_card_without_popular_items_still_serves(tmp_path: Path) -> None:
    folder = _publish(tmp_path / "reco", "v1", None)
    assert read_popular(folder, "int8") == PopularItems("reco-v1-int8", ())
    with pytest.raises(ModelLoadError, match="cannot read model card"):
        read_popular(tmp_path, "int8")
    (folder / "reco.int8.onnx").write_bytes(b"not the model")
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        read_popular(folder, "int8")


async def test_the_service_serves_and_follows_the_registrys_version(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Like the workers: the registry's latest version at start, a newer one once published;
    one whose file fails its sha256 is refused and the served one stays."""
    registry = tmp_path / "registry"
    _publish(registry / "reco-v1", "v1", ["item-00001", "item-00002"])
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{_closed_port()}",
                             model_registry=str(registry), reco_model_version="latest",
                             model_poll_interval_s=0.05)
    service = RecommendationService(settings)
    async with TestClient(TestServer(service.make_app())) as client:
        assert service.popular == PopularItems("reco-v1-int8", (
            RecoItem(item_id="item-00001", score=100.0),
            RecoItem(item_id="item-00002", score=99.0)))
        _publish(registry / "reco-v2", "v2", ["item-00003"])
        await _until(lambda: service.popular.model_version == "reco-v2-int8")
        bad = _publish(registry / "reco-v3", "v3", ["item-00004"])
        (bad / "reco.int8.onnx").write_bytes(b"corrupt")
        await _until(lambda: "refusing model reco-v3" in caplog.text)
        answer = await _call(client, openapi_document(service), "POST", RECOMMEND, RECOMMEND,
                             200, json={"user_id": "user-000001", "k": 3})
    assert (answer["source"], answer["model_version"]) == ("popular", "reco-v2-int8")
    assert answer["items"] == [{"item_id": "item-00003", "score": 100.0}]


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- over HTTP --------------------------------------------------------------------------------
@pytest.fixture
def service() -> RecommendationService:
    """Popular items from the pinned committed folder, read when the app starts."""
    return RecommendationService(_settings(service_max_body_bytes=2048), deadline_ms=100.0)


@pytest.fixture
async def client(service: RecommendationService) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(service.make_app())) as client:
        yield client


async def _call(client: TestClient[Any, Any], doc: dict[str, Any], method: str, template: str,
                path: str, status: int, **kwargs: Any) -> dict[str, Any]:
    async with client.request(method, path, **kwargs) as response:
        body = await response.json()
        assert response.status == status, body
    assert_matches_openapi(doc, method, template, status, body)
    return dict(body)


async def test_fallback_order_stored_then_popular(service: RecommendationService,
                                                  client: TestClient[Any, Any]) -> None:
    doc = openapi_document(service)
    popular = [i.item_id for i in service.popular.items]
    answer = await _call(client, doc, "POST", RECOMMEND, RECOMMEND, 200,
                         json={"user_id": "user-000001", "k": 3})
    assert answer["source"] == "popular" and answer["fallback_reason"] == "kafka_unavailable"
    assert [i["item_id"] for i in answer["items"]] == popular[:3]
    assert answer["model_version"] == "reco-v1-int8" and answer["request_id"] is None
    assert 0.0 <= answer["latency_ms"] < 100.0

    stored = ["item-00007", "item-00003", popular[5], "item-00009"]
    service.on_result(_result("user-000001", stored, "req-7", version="reco-v9-int8"))
    answer = await _call(client, doc, "POST", RECOMMEND, RECOMMEND, 200,
                         json={"user_id": "user-000001", "k": 2})
    assert (answer["source"], answer["fallback_reason"]) == ("stored", "kafka_unavailable")
    assert [i["item_id"] for i in answer["items"]] == stored[:2]
    assert (answer["model_version"], answer["request_id"]) == ("reco-v9-int8", "req-7")
    assert answer["scored_at"] == 1_800_000_000.5
    # Candidates: only stored items among them, in stored order, fewer than k if need be.
    answer = await _call(client, doc, "POST", RECOMMEND, RECOMMEND, 200, json={
        "user_id": "user-000001", "k": 5, "candidate_ids": ["item-00009", "item-00003", "x"]})
    assert answer["source"] == "stored"
    assert [i["item_id"] for i in answer["items"]] == ["item-00003", "item-00009"]
    # No stored item among the candidates: popular ones among them.
    answer = await _call(client, doc, "POST", RECOMMEND, RECOMMEND, 200, json={
        "user_id": "user-000001", "k": 5, "candidate_ids": [popular[40], "x", popular[2]]})
    assert answer["source"] == "popular" and answer["model_version"] == "reco-v1-int8"
    assert [i["item_id"] for i in answer["items"]] == [popular[2], popular[40]]
    answer = await _call(client, doc, "POST", RECOMMEND, RECOMMEND, 200, json={
        "user_id": "user-000001", "candidate_ids": ["item-99999"]})
    assert (answer["source"], answer["items"]) == ("popular", [])
    # Default k is 10.
    answer = await _call(client, doc, "POST", RECOMMEND, RECOMMEND, 200,
                         json={"user_id": "user-000002"})
    assert [i["item_id"] for i in answer["items"]] == popular[:10]


async def test_an_empty_popular_list_answers_no_items() -> None:
    service = RecommendationService(_settings(), PopularItems("reco-v1-int8", ()))
    async with TestClient(TestServer(service.make_app())) as client:
        answer = await _call(client, openapi_document(service), "POST", RECOMMEND, RECOMMEND,
                             200, json={"user_id": "user-000001", "k": 3})
    assert (answer["source"], answer["items"]) == ("popular", [])


async def test_get_stored_recommendations(service: RecommendationService,
                                          client: TestClient[Any, Any]) -> None:
    doc = openapi_document(service)
    missing = await _call(client, doc, "GET", STORED, "/v1/recommendations/user-000042", 404)
    assert missing["error"] == "not_found"
    assert missing["reason"].startswith("user_id: no recommendations stored for 'user-000042'")
    service.on_result(_result("user-000042", ["item-00001", "item-00002"], "a"))
    service.on_result(_result("user-000042", ["item-00005"], "b"))
    answer = await _call(client, doc, "GET", STORED, "/v1/recommendations/user-000042", 200)
    assert answer["source"] == "stored" and answer["request_id"] == "b"
    assert answer["items"] == [{"item_id": "item-00005", "score": 10.0}]
    assert answer["fallback_reason"] is None


@pytest.mark.parametrize(("body", "status", "error", "field"), [
    (b'{"user_id": "user-000001",', 400, "invalid_json", "body: not valid JSON"),
    (b'{"k": 3}', 400, "schema", "user_id:"),
    (b'{"user_id": "user-000001", "k": "3"}', 400, "schema", "k:"),
    (b'{"user_id": "user-000001", "k": 0}', 400, "schema", "k:"),
    (b'{"user_id": "user-000001", "k": 101}', 400, "schema", "k:"),
    (b'{"user_id": "", "k": 1}', 400, "schema", "user_id:"),
    (b'{"user_id": "user-000001", "candidate_ids": []}', 400, "schema", "candidate_ids:"),
    (b'{"user_id": "user-000001", "candidate_ids": [7]}', 400, "schema", "candidate_ids[0]:"),
    (b'["user-000001"]', 400, "schema", "body:"),
    (b"", 400, "invalid_json", "body:"),
    (b'{"user_id": "' + b"u" * 3000 + b'"}', 413, "body_too_large", "body:"),
])
async def test_bad_requests_are_4xx_naming_the_field(
        service: RecommendationService, client: TestClient[Any, Any], body: bytes, status: int,
        error: str, field: str) -> None:
    answer = await _call(client, openapi_document(service), "POST", RECOMMEND, RECOMMEND,
                         status, data=body, headers={"Content-Type": "application/json"})
    assert answer["error"] == error
    assert answer["reason"].startswith(field), answer["reason"]


async def test_metrics_count_answers_fallbacks_results_and_evictions() -> None:
    service = RecommendationService(_settings(reco_service_users_max=2))
    for n in range(3):
        service.on_result(_result(f"user-00000{n}", ["item-00001"]))
    service.on_result({"not": "a result"})
    async with TestClient(TestServer(service.make_app())) as client:
        for user in ("user-000002", "user-000009"):
            async with client.post(RECOMMEND, json={"user_id": user}) as response:
                assert response.status == 200
        async with client.get("/metrics") as response:
            text = await response.text()
    for line in (
            'inferlane_reco_service_answers_total{route="recommend",source="stored"} 1.0',
            'inferlane_reco_service_answers_total{route="recommend",source="popular"} 1.0',
            'inferlane_reco_service_fallbacks_total{reason="kafka_unavailable"} 2.0',
            'inferlane_reco_service_results_consumed_total{outcome="stored"} 3.0',
            'inferlane_reco_service_results_consumed_total{outcome="invalid"} 1.0',
            "inferlane_reco_service_evictions_total 1.0",
            "inferlane_reco_service_users_stored 2.0",
            "inferlane_reco_service_popular_items 100.0"):
        assert line in text, line


# --- OpenAPI ----------------------------------------------------------------------------------
def test_openapi_document_is_valid_and_matches_the_app(service: RecommendationService) -> None:
    doc = openapi_document(service)
    validate(doc)
    app = service.make_app()
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    assert served == route_pairs(doc)
    assert {("POST", RECOMMEND), ("GET", STORED)} <= served
    statuses = doc["paths"][RECOMMEND]["post"]["responses"]
    assert set(statuses) == {"200", "400", "413"}
    assert set(doc["paths"][STORED]["get"]["responses"]) == {"200", "404"}


def test_openapi_check_rejects_what_the_document_does_not_allow(
        service: RecommendationService) -> None:
    doc = openapi_document(service)
    good = {"user_id": "u", "items": [{"item_id": "i", "score": 1.0}], "source": "popular",
            "model_version": "reco-v1-int8"}
    assert_matches_openapi(doc, "POST", RECOMMEND, 200, good)
    for bad in ({**good, "source": "cache"}, {**good, "items": [{"item_id": "i"}]},
                {k: v for k, v in good.items() if k != "model_version"}):
        with pytest.raises(AssertionError, match="does not match the document"):
            assert_matches_openapi(doc, "POST", RECOMMEND, 200, bad)
    with pytest.raises(AssertionError, match="does not document status 404"):
        assert_matches_openapi(doc, "POST", RECOMMEND, 404, {"error": "x", "reason": "y"})
