"""``inferlane serve fraud-check``: decide on a card transaction within a latency budget.

``POST /v1/check`` produces the transaction to ``fraud.requests`` through a :class:`FraudClient`
and waits for the fraud lane's score until the budget (``INFERLANE_FRAUD_CHECK_BUDGET_MS``,
counted from the request's arrival) runs out; then the rules (:mod:`pipeline.services.rules`)
answer with ``fallback: true``. The service never answers late and never fails because the
model was slow or Kafka is down: those are fallbacks with a ``fallback_reason``.

Separately it follows ``fraud.scores`` in its own consumer group (``<app_id>-fraud-check``):
decision counters for ``/metrics`` and the latest ``INFERLANE_FRAUD_CHECK_DECISIONS_MAX``
decisions for ``GET /v1/decisions/{event_id}``, so a caller that got a fallback (or did not
wait) can read the model's decision once it is made. Each service instance follows only the
partitions its group member is assigned; with several instances, ask the one that owns the
card's partition, or run one instance per group (distinct ``INFERLANE_APP_ID``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram

from pipeline.clients.laneclients import FraudClient, Rejected, TimedOut
from pipeline.services.http import (
    ANSWER_MARGIN_MS,
    ApiError,
    HttpService,
    Reply,
    Route,
    json_response,
    read_json,
)
from pipeline.services.rules import RULES_VERSION, evaluate
from pipeline.services.stream import BoundedStore
from pipeline.settings import Settings
from schemas import FraudScore, Transaction
from schemas.http import CheckDecision, ErrorBody, StoredDecision

__all__ = ["FraudCheckService"]

log = logging.getLogger(__name__)


class FraudCheckService(HttpService):
    """The fraud-check HTTP service (see the module docstring)."""

    name = "fraud-check"
    client: FraudClient
    result_topic = "fraud.scores"
    title = "inferlane fraud-check service"
    description = ("Approve, review or decline a card transaction within a latency budget: the "
                   "fraud model's decision when the pipeline answers in time, a rules fallback "
                   "otherwise (`fallback: true`).")

    def __init__(self, settings: Settings, *, budget_ms: float | None = None) -> None:
        super().__init__(settings)
        self.budget_ms = settings.fraud_check_budget_ms if budget_ms is None else budget_ms
        self.client = FraudClient(settings, default_timeout_ms=self.budget_ms,
                                  client_id=f"{settings.app_id}-fraud-check-{settings.worker_id}")
        self.decisions: BoundedStore[dict[str, Any]] = BoundedStore(
            settings.fraud_check_decisions_max)
        self._answers = Counter(
            "inferlane_fraud_check_answers", "POST /v1/check answers, by decision and source "
            "(pipeline or rules)", ["decision", "source"], registry=self.registry)
        self._fallbacks = Counter(
            "inferlane_fraud_check_fallbacks", "Rules fallbacks, by reason", ["reason"],
            registry=self.registry)
        self._check_seconds = Histogram(
            "inferlane_fraud_check_seconds", "Time to answer POST /v1/check, by source",
            ["source"], registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.25))
        self._scores_seen = Counter(
            "inferlane_fraud_scores_seen", "Scores read from fraud.scores, by decision and "
            "degraded", ["decision", "degraded"], registry=self.registry)
        self._pending = Gauge("inferlane_fraud_check_pending_calls",
                              "Calls awaiting the pipeline's score now", registry=self.registry)
        self._pending.set_function(lambda: self.client.pending)
        self._stored = Gauge("inferlane_fraud_check_decisions_stored",
                             "Decisions kept for GET /v1/decisions", registry=self.registry)
        self._stored.set_function(lambda: len(self.decisions))

    # --- Kafka --------------------------------------------------------------------------------
    def on_result(self, value: dict[str, Any]) -> None:
        event_id = value.get("event_id")
        if not isinstance(event_id, str):
            return
        self.decisions.put(event_id, value)
        self._scores_seen.labels(str(value.get("decision")), str(bool(value.get("degraded"))
                                                                  ).lower()).inc()

    # --- routes -------------------------------------------------------------------------------
    def service_routes(self) -> list[Route]:
        error = ErrorBody
        return [
            Route("POST", "/v1/check", self._check, "Decide on a transaction within the budget",
                  {200: Reply("The decision: the model's, or the rules' (`fallback: true`).",
                              CheckDecision),
                   409: Reply("A check of the same `event_id` is still running.", error)},
                  body=Transaction, tags=("fraud",)),
            Route("GET", "/v1/decisions/{event_id}", self._decision,
                  "The pipeline's decision on a transaction, read from fraud.scores",
                  {200: Reply("The model's decision.", StoredDecision),
                   404: Reply("No decision for this event among the recent ones.", error)},
                  tags=("fraud",)),
        ]

    async def _check(self, request: web.Request) -> web.Response:
        """Score the transaction with the fraud pipeline; if the score is not back within the
        budget (or Kafka is unavailable), decide with the rules and say so."""
        started = time.monotonic()
        txn = await read_json(request, Transaction)
        if not self.kafka.started:
            return self._fallback(txn, "kafka_unavailable", started)
        remaining_ms = self.budget_ms - (time.monotonic() - started) * 1000.0 - ANSWER_MARGIN_MS
        try:
            outcome = await self.client.score(txn, timeout_ms=max(remaining_ms, 0.0))
        except ValueError as exc:  # the same event_id is awaiting its score already
            raise ApiError(409, "duplicate_event_id", f"event_id: {exc}") from None
        except KafkaError as exc:
            log.warning("fraud-check: produce of %s failed: %r", txn["event_id"], exc)
            return self._fallback(txn, "kafka_error", started)
        if isinstance(outcome, TimedOut):
            return self._fallback(txn, "timeout", started)
        if isinstance(outcome, Rejected):
            if outcome.by == "client":  # read_json checked the same schema: cannot happen
                raise ApiError(400, outcome.error, outcome.reason)
            return self._fallback(txn, "rejected", started)
        return self._answer(_from_score(outcome), "pipeline", started)

    def _fallback(self, txn: dict[str, Any], reason: str, started: float) -> web.Response:
        verdict = evaluate(txn)
        self._fallbacks.labels(reason).inc()
        fields = {"event_id": txn["event_id"], "decision": verdict.decision,
                  "score": verdict.score, "model_version": RULES_VERSION, "degraded": True,
                  "fallback": True, "fallback_reason": reason, "rules": list(verdict.fired)}
        return self._answer(fields, "rules", started)

    def _answer(self, fields: dict[str, Any], source: str, started: float) -> web.Response:
        elapsed_s = time.monotonic() - started
        self._answers.labels(fields["decision"], source).inc()
        self._check_seconds.labels(source).observe(elapsed_s)
        return json_response(CheckDecision(**fields, latency_ms=round(elapsed_s * 1000.0, 3)))

    async def _decision(self, request: web.Request) -> web.Response:
        """The fraud lane's decision on ``event_id``, if it is among the recent ones this
        instance has read from fraud.scores."""
        event_id = request.match_info["event_id"]
        value = self.decisions.get(event_id)
        if value is None:
            raise ApiError(404, "not_found",
                           f"event_id: no decision for {event_id!r} among the "
                           f"{len(self.decisions):,} recent ones this instance has read")
        return json_response(msgspec.convert(value, StoredDecision))


def _from_score(score: FraudScore) -> dict[str, Any]:
    return {"event_id": score.event_id, "decision": score.decision, "score": score.score,
            "model_version": score.model_version, "degraded": score.degraded,
            "fallback": False}
