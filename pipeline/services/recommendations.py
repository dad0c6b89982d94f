"""``inferlane serve recommendations``: a user's top-k items, fresh within a deadline or not.

``POST /v1/recommend`` produces a reco request to ``reco.requests`` through a
:class:`RecoClient` and waits for the reco lane's result until the deadline
(``INFERLANE_RECO_SERVICE_DEADLINE_MS``, counted from the request's arrival) runs out. Then,
in this order:

1. ``source: pipeline`` - the lane's result (exactly ``min(k, available)`` items);
2. ``source: stored`` - the user's latest result read from ``reco.results``, its first ``k``
   items (only those among ``candidate_ids`` when the request names candidates); used when at
   least one item qualifies, so it may hold fewer than ``k``;
3. ``source: popular`` - the served model's most popular training items (model card
   ``popular_items``), first ``k``, filtered to the candidates likewise; an empty list when the
   card has none or no candidate is among them.

A fallback says why in ``fallback_reason``: ``timeout``, ``rejected`` (the lane dead-lettered
the request, e.g. a user the model does not know), ``kafka_unavailable`` (not connected),
``kafka_error`` (the broker refused the request). Neither a slow pipeline nor Kafka being down
is ever a 5xx.

The popular items are those of the reco version the workers serve, selected the same way
(``INFERLANE_RECO_MODEL_DIR``, else the registry at ``INFERLANE_RECO_MODEL_VERSION``) before the
service listens; while it runs it follows the registry like the workers do (``latest`` and
``INFERLANE_MODEL_POLL_INTERVAL_S`` > 0), so a newly published version's popular items and
``model_version`` replace the old ones (a version whose file fails its sha256 is refused, as
the workers refuse it).

Separately it follows ``reco.results`` in its own consumer group (``<app_id>-recommendations``)
and keeps the latest result of at most ``INFERLANE_RECO_SERVICE_USERS_MAX`` users
(:class:`~pipeline.services.recostore.LatestResults`) for ``GET /v1/recommendations/{user_id}``
and the stored fallback. Each instance keeps only the users of the partitions its group member
is assigned; with several instances, ask the one that owns the user's partition, or run one
instance per group (distinct ``INFERLANE_APP_ID``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram

from pipeline.clients.laneclients import RecoClient, Rejected, TimedOut
from pipeline.inference.serving import follower_for
from pipeline.services.http import (
    ANSWER_MARGIN_MS,
    ApiError,
    HttpService,
    Reply,
    Route,
    json_response,
    read_json,
)
from pipeline.services.recostore import LatestResults, PopularItems, read_popular, top_k
from pipeline.settings import Settings
from schemas import RECO_DEFAULT_K, RecoResult
from schemas.http import (
    ErrorBody,
    FallbackReason,
    Recommendations,
    RecommendRequest,
    RecoSource,
)

__all__ = ["RecommendationService"]

log = logging.getLogger(__name__)


class RecommendationService(HttpService):
    """The recommendation HTTP service (see the module docstring)."""

    name = "recommendations"
    client: RecoClient
    result_topic = "reco.results"
    title = "inferlane recommendation service"
    description = ("A user's top-k items: fresh from the reco pipeline when it answers within "
                   "the deadline, else the latest ones read from `reco.results`, else the "
                   "served model's most popular items; `source` says which.")

    def __init__(self, settings: Settings, popular: PopularItems | None = None, *,
                 deadline_ms: float | None = None) -> None:
        """``popular``: fixed popular items; None = the served model's, read at start and
        followed (see the module docstring)."""
        super().__init__(settings)
        self.deadline_ms = (settings.reco_service_deadline_ms if deadline_ms is None
                            else deadline_ms)
        self.popular = popular if popular is not None else PopularItems("", ())
        self._popular_fixed = popular is not None
        self._follower = follower_for(settings, "reco")
        self._follow_task: asyncio.Task[None] | None = None
        self.client = RecoClient(settings, default_timeout_ms=self.deadline_ms,
                                 client_id=f"{settings.app_id}-recommendations-"
                                           f"{settings.worker_id}")
        self.latest = LatestResults(settings.reco_service_users_max)
        self._define_metrics()

    def _define_metrics(self) -> None:
        self._answers = Counter(
            "inferlane_reco_service_answers", "Recommendations answered, by route and source "
            "(pipeline, stored or popular)", ["route", "source"], registry=self.registry)
        self._fallbacks = Counter(
            "inferlane_reco_service_fallbacks", "POST /v1/recommend answers not from the "
            "pipeline, by reason", ["reason"], registry=self.registry)
        self._recommend_seconds = Histogram(
            "inferlane_reco_service_recommend_seconds", "Time to answer POST /v1/recommend, by "
            "source", ["source"], registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.25, 0.5))
        self._consumed = Counter(
            "inferlane_reco_service_results_consumed", "Records read from reco.results, by "
            "outcome (stored, or invalid: not a RecoResult)", ["outcome"],
            registry=self.registry)
        self._evictions = Counter(
            "inferlane_reco_service_evictions", "Users dropped from the store to stay within "
            "INFERLANE_RECO_SERVICE_USERS_MAX", registry=self.registry)
        Gauge("inferlane_reco_service_users_stored", "Users whose latest result is kept",
              registry=self.registry).set_function(lambda: len(self.latest))
        Gauge("inferlane_reco_service_pending_calls", "Calls awaiting the pipeline's result now",
              registry=self.registry).set_function(lambda: self.client.pending)
        Gauge("inferlane_reco_service_popular_items", "Popular items loaded from the served "
              "model's card (0: the popular fallback answers with no items)",
              registry=self.registry).set_function(lambda: len(self.popular.items))

    # --- the served model's popular items ------------------------------------------------------
    async def on_start(self) -> None:
        if not self._popular_fixed:
            path = await self._follower.initial()
            self.popular = await self._read_popular(path)
            log.info("recommendations: %d popular items of %s from %s", len(self.popular.items),
                     self.popular.model_version, path)
            if self._follower.follows:
                self._follow_task = asyncio.create_task(
                    self._follower.follow(self._read_popular, self._install_popular),
                    name="recommendations-model-follow")
                self._follow_task.add_done_callback(_log_death)

    async def on_stop(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            await asyncio.gather(self._follow_task, return_exceptions=True)
            self._follow_task = None

    async def _read_popular(self, path: Path) -> PopularItems:
        return await asyncio.to_thread(read_popular, path, self.settings.reco_model_precision)

    async def _install_popular(self, popular: PopularItems) -> None:
        log.info("recommendations: popular items now from %s (were %s)", popular.model_version,
                 self.popular.model_version)
        self.popular = popular

    # --- Kafka --------------------------------------------------------------------------------
    def on_result(self, value: dict[str, Any]) -> None:
        evicted = self.latest.evicted
        stored = self.latest.put(value)
        self._consumed.labels("stored" if stored else "invalid").inc()
        if self.latest.evicted > evicted:
            self._evictions.inc(self.latest.evicted - evicted)

    # --- routes -------------------------------------------------------------------------------
    def service_routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/recommend", self._recommend,
                  "A user's top-k: fresh within the deadline, else stored, else popular",
                  {200: Reply("The items and their `source` (`pipeline`, `stored` or "
                              "`popular`, with `fallback_reason`).", Recommendations)},
                  body=RecommendRequest, tags=("recommendations",)),
            Route("GET", "/v1/recommendations/{user_id}", self._recommendations,
                  "The user's latest top-k, read from reco.results",
                  {200: Reply("The latest result seen for the user (`source: stored`).",
                              Recommendations),
                   404: Reply("No result for this user in this instance's store.", ErrorBody)},
                  tags=("recommendations",)),
        ]

    async def _recommend(self, request: web.Request) -> web.Response:
        """Ask the reco pipeline for the user's top-k; if it has not answered by the deadline
        (or refused, or Kafka is unavailable), answer with the stored items, else the popular
        ones, and say why in ``fallback_reason``."""
        started = time.monotonic()
        body = await read_json(request, RecommendRequest)
        if not self.kafka.started:
            return self._fallback(body, "kafka_unavailable", started)
        remaining_ms = (self.deadline_ms - (time.monotonic() - started) * 1000.0
                        - ANSWER_MARGIN_MS)
        try:
            outcome = await self.client.recommend(
                body["user_id"], k=body.get("k"), candidate_ids=body.get("candidate_ids"),
                timeout_ms=max(remaining_ms, 0.0))
        except KafkaError as exc:
            log.warning("recommendations: produce for %s failed: %r", body["user_id"], exc)
            return self._fallback(body, "kafka_error", started)
        if isinstance(outcome, TimedOut):
            return self._fallback(body, "timeout", started)
        if isinstance(outcome, Rejected):
            if outcome.by == "client":  # read_json checked the same constraints
                raise ApiError(400, outcome.error, outcome.reason)
            return self._fallback(body, "rejected", started)
        return self._answer(_from_result(outcome), "pipeline", started)

    def _fallback(self, body: dict[str, Any], reason: FallbackReason,
                  started: float) -> web.Response:
        self._fallbacks.labels(reason).inc()
        k: int = body.get("k", RECO_DEFAULT_K)
        candidates: list[str] | None = body.get("candidate_ids")
        fields: dict[str, Any] = {"user_id": body["user_id"], "fallback_reason": reason}
        stored = self.latest.get(body["user_id"])
        if stored is not None:
            items = top_k(stored.ranked(), k, candidates)
            if items:
                return self._answer({**fields, "items": items, "model_version":
                                     stored.model_version, "request_id": stored.request_id,
                                     "scored_at": stored.scored_at}, "stored", started)
        items = top_k(self.popular.items, k, candidates)
        return self._answer({**fields, "items": items,
                             "model_version": self.popular.model_version}, "popular", started)

    def _answer(self, fields: dict[str, Any], source: RecoSource,
                started: float) -> web.Response:
        elapsed_s = time.monotonic() - started
        self._answers.labels("recommend", source).inc()
        self._recommend_seconds.labels(source).observe(elapsed_s)
        return json_response(Recommendations(**fields, source=source,
                                             latency_ms=round(elapsed_s * 1000.0, 3)))

    async def _recommendations(self, request: web.Request) -> web.Response:
        """The latest result the reco pipeline produced for ``user_id``, if this instance has
        read one from reco.results (and kept it: the store holds the most recently updated
        users)."""
        started = time.monotonic()
        user_id = request.match_info["user_id"]
        stored = self.latest.get(user_id)
        if stored is None:
            raise ApiError(404, "not_found",
                           f"user_id: no recommendations stored for {user_id!r} (this instance "
                           f"holds the latest result of {len(self.latest):,} user(s) read from "
                           "reco.results; POST /v1/recommend asks the pipeline)")
        self._answers.labels("recommendations", "stored").inc()
        return json_response(Recommendations(
            user_id=user_id, items=stored.ranked(), source="stored",
            model_version=stored.model_version, request_id=stored.request_id,
            scored_at=stored.scored_at,
            latency_ms=round((time.monotonic() - started) * 1000.0, 3)))


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("recommendations: %s died; the popular items are no longer updated",
                  task.get_name(), exc_info=task.exception())


def _from_result(result: RecoResult) -> dict[str, Any]:
    return {"user_id": result.user_id, "items": result.items,
            "model_version": result.model_version, "request_id": result.request_id,
            "scored_at": result.scored_at}
