"""What every consumer service shares: routes as data, JSON errors, metrics, health, Kafka link.

A service (:class:`HttpService` subclass) declares its routes as :class:`Route` values; the same
list registers the aiohttp handlers and generates the OpenAPI document
(:mod:`pipeline.services.openapi`), so the document cannot name a route the server lacks.

Every error answer is JSON (:class:`schemas.http.ErrorBody`): bad JSON, schema failures, bodies
over ``INFERLANE_SERVICE_MAX_BODY_BYTES`` (413), unknown routes (404), wrong methods (405).
``/healthz`` says the process is up; ``/readyz`` is 200 only while every Kafka client of the
service is connected (:class:`KafkaLink`). ``/metrics`` is Prometheus text from the service's own
registry.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from pipeline.clients.laneclients import ReplyClient
from pipeline.errors import TopicError
from pipeline.kafka.lane import Lane
from pipeline.kafka.topics import ensure_topics, spec
from pipeline.metrics import render as process_metrics
from pipeline.services.openapi import Handler, Reply, Route, openapi_document
from pipeline.services.stream import follow_results
from pipeline.settings import Settings
from schemas.http import ErrorBody, Health
from schemas.validation import validate_record

__all__ = ["ANSWER_MARGIN_MS", "SERVICE_READY_MARK", "ApiError", "HttpService", "KafkaLink",
           "Reply", "Route", "json_response", "read_json", "serve"]

SERVICE_READY_MARK = "Kafka clients connected"
"""Logged by a consumer service (``inferlane serve ...``) once its Kafka clients are up."""

log = logging.getLogger(__name__)


ANSWER_MARGIN_MS = 1.0
"""Kept from a budget or deadline for building and writing the answer."""


def json_response(value: msgspec.Struct | Mapping[str, Any], status: int = 200) -> web.Response:
    body = msgspec.json.encode(value) if isinstance(value, msgspec.Struct) else orjson.dumps(value)
    return web.Response(body=body, status=status, content_type="application/json")


def _error(status: int, error: str, reason: str) -> web.Response:
    return json_response(ErrorBody(error=error, reason=reason), status)


class ApiError(Exception):
    """Raised by a handler to answer ``status`` with an :class:`ErrorBody`."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(f"{status} {error}: {reason}")
        self.status = status
        self.error = error
        self.reason = reason


async def read_json(request: web.Request, shape: type[msgspec.Struct]) -> dict[str, Any]:
    """The request body, checked against ``shape``; 4xx with the reason otherwise."""
    raw = await request.read()  # over client_max_size: 413 (turned into JSON by the middleware)
    value, rejection = validate_record(raw, shape)
    if rejection is not None or value is None:
        error = rejection.error if rejection else "invalid_json"
        reason = rejection.reason if rejection else "value: empty body"
        reason = reason.replace("value: empty record value", "body: empty")
        if reason.startswith("value: "):  # the record's value is the request's body here
            reason = "body: " + reason[len("value: "):]
        raise ApiError(400, error, reason)
    return value


_SLUGS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
          413: "body_too_large", 415: "unsupported_media_type"}


def _error_middleware(max_body_bytes: int) -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.error, exc.reason)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = exc.text or exc.reason
            if exc.status == 413:
                reason = f"body: larger than the limit of {max_body_bytes} bytes"
            elif exc.status == 404:
                reason = f"no route {request.method} {request.path}"
            elif exc.status == 405:
                reason = f"{request.method} is not allowed on {request.path}"
            return _error(exc.status, _SLUGS.get(exc.status, "http_error"), reason)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - an unexpected bug answers 500 JSON, never a hang
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal", "internal error (logged by the service)")
    return errors


class KafkaLink:
    """Connects a service's Kafka clients in the background and keeps checking them.

    ``connect`` is retried with backoff until it succeeds (the HTTP side runs meanwhile, and
    answers what it can without Kafka); then ``ping`` runs every ``check_interval_s``.
    ``connected`` is what ``/readyz`` reports.
    """

    def __init__(self, name: str, connect: Callable[[], Awaitable[None]],
                 disconnect: Callable[[], Awaitable[None]], ping: Callable[[], Awaitable[bool]],
                 *, check_interval_s: float = 2.0, max_backoff_s: float = 5.0) -> None:
        self.name = name
        self._connect = connect
        self._disconnect = disconnect
        self._ping = ping
        self.check_interval_s = check_interval_s
        self.max_backoff_s = max_backoff_s
        self.started = False
        """Clients started (stays true while the broker is briefly unreachable)."""
        self.connected = False
        """Started and the last ping answered."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kafka-link-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.started:
            self.started = self.connected = False
            await self._disconnect()

    async def _run(self) -> None:
        backoff_s = 0.25
        while not self.started:
            try:
                await self._connect()
            except (KafkaError, OSError, TopicError) as exc:
                log.warning("%s: Kafka not reachable (%r); retrying in %.1fs", self.name, exc,
                            backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.max_backoff_s)
                continue
            self.started = self.connected = True
            log.info("%s: %s", self.name, SERVICE_READY_MARK)
        while True:
            await asyncio.sleep(self.check_interval_s)
            ok = await self._ping()
            if ok != self.connected:
                log.warning("%s: Kafka %s", self.name, "reachable again" if ok else
                            "unreachable")
            self.connected = ok


class HttpService(ABC):
    """Base of a consumer service: the aiohttp app, common routes, metrics and Kafka link."""

    name: str
    title: str
    description: str
    result_topic: str
    """The result topic the service follows in its own group (``<app_id>-<name>``)."""
    client: ReplyClient[Any]
    """The request/reply client the service asks the pipeline with (set by the subclass)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lane: Lane | None = None
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "inferlane_http_requests", "HTTP requests answered, by route and status",
            ["route", "status"], registry=self.registry)
        self.http_seconds = Histogram(
            "inferlane_http_request_seconds", "Time to answer an HTTP request, by route",
            ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0))
        self.kafka = KafkaLink(self.name, self._connect, self.disconnect, self.ping)

    # --- what a service provides ------------------------------------------------------------
    @abstractmethod
    def service_routes(self) -> list[Route]:
        """The service's own routes (health, readiness, metrics and OpenAPI are added)."""

    @abstractmethod
    def on_result(self, value: dict[str, Any]) -> None:
        """Called with each record of :attr:`result_topic`, parsed, in partition order."""

    async def connect(self) -> None:
        """Start the client and the result follower; :class:`KafkaError` / :class:`OSError`
        make :class:`KafkaLink` retry."""
        await self.client.start()
        lane = follow_results(self.settings, self.name, self.result_topic, self.on_result)
        try:
            await lane.start()
        except BaseException:
            await lane.stop()
            raise
        self._lane = lane

    async def disconnect(self) -> None:
        """Stop the follower (graceful: commits what was consumed), then the client."""
        if self._lane is not None:
            await self._lane.stop()
            self._lane = None
        await self.client.stop()

    async def ping(self) -> bool:
        """True while the broker answers the client."""
        return await self.client.ping()

    async def _connect(self) -> None:
        # The topics the service uses, no others (all its Kafka rights: docs/security.md).
        request = self.client.request_topic
        await ensure_topics(self.settings, [spec(request), spec(f"{request}.dlq"),
                                            spec(self.result_topic)])
        await self.connect()

    # --- common routes ------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        health = {200: Reply("The process is up.", Health)}
        ready = {200: Reply("Every Kafka client is connected.", Health),
                 503: Reply("Not (yet, or no longer) connected to Kafka.", Health)}
        return [
            *self.service_routes(),
            Route("GET", "/healthz", self._healthz, "Liveness", health, tags=("operations",)),
            Route("GET", "/readyz", self._readyz, "Readiness", ready, tags=("operations",)),
            Route("GET", "/metrics", self._metrics, "Prometheus metrics",
                  {200: Reply("Prometheus text format.", None, "text/plain")},
                  tags=("operations",)),
            Route("GET", "/openapi.json", self._openapi, "This API's OpenAPI document",
                  {200: Reply("OpenAPI 3.1 document.", None)}, tags=("operations",)),
        ]

    async def _healthz(self, request: web.Request) -> web.Response:
        return json_response(Health(status="ok"))

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.kafka.connected
        return json_response(Health(status="ready" if ready else "not_ready",
                                    checks={"kafka": ready}), 200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        # The service's own metrics, then the process-wide ones (its result-following lanes:
        # events, lag, commits; see pipeline/metrics.py). Names do not overlap.
        body = generate_latest(self.registry) + process_metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document(self))

    # --- the app ----------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        max_body = self.settings.service_max_body_bytes
        app = web.Application(client_max_size=max_body,
                              middlewares=[self._metrics_middleware,
                                           _error_middleware(max_body)])
        for route in self.routes():
            app.router.add_route(route.method, route.path, route.handler)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    @web.middleware
    async def _metrics_middleware(self, request: web.Request,
                                  handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        response = await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self.http_seconds.labels(route).observe(time.perf_counter() - started)
        self.http_requests.labels(route, str(response.status)).inc()
        return response

    async def on_start(self) -> None:
        """Called before the service listens (override to load what it serves; the default
        does nothing). Kafka is connected in the background after it."""
        return None

    async def on_stop(self) -> None:
        """Called after the Kafka clients stopped (override to stop what ``on_start`` began)."""
        return None

    async def _on_startup(self, app: web.Application) -> None:
        await self.on_start()
        self.kafka.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.kafka.stop()
        await self.on_stop()


async def serve(service: HttpService, host: str, port: int) -> None:
    """Run ``service`` on ``host:port`` until SIGTERM/SIGINT, then stop gracefully."""
    runner = web.AppRunner(service.make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s: listening on http://%s:%d (OpenAPI at /openapi.json)", service.name, host,
             port)
    try:
        await stop.wait()
    finally:
        log.info("%s: stopping", service.name)
        await runner.cleanup()
        log.info("%s: stopped", service.name)
