"""Bodies of the consumer services' HTTP APIs (fraud-check, recommendations).

Request bodies reuse the event shapes where they are the same thing (``POST /v1/check`` takes a
:class:`~schemas.events.Transaction`); the rest live here. The OpenAPI documents of the services
are generated from these classes (``pipeline/services/openapi.py``), so code and document agree.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from schemas.events import RECO_MAX_CANDIDATES, RECO_MAX_K, Decision, RecoItem

__all__ = [
    "CheckDecision",
    "ErrorBody",
    "FallbackReason",
    "Health",
    "RecoSource",
    "RecommendRequest",
    "Recommendations",
    "StoredDecision",
]

_Id = Annotated[str, Meta(min_length=1, max_length=128)]
_Ms = Annotated[float, Meta(ge=0.0)]

FallbackReason = Literal["timeout", "rejected", "kafka_unavailable", "kafka_error"]
RecoSource = Literal["pipeline", "stored", "popular"]


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """Every 4xx/5xx answer: a machine-readable class and a sentence naming the problem."""

    error: str
    """E.g. ``invalid_json``, ``schema``, ``body_too_large``, ``not_found``."""
    reason: str


class CheckDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Answer of ``POST /v1/check``: always within the budget, from the model or the rules."""

    event_id: _Id
    decision: Decision
    score: Annotated[float, Meta(ge=0.0, le=1.0)]
    """The model's fraud probability; for a rules fallback, the rules' risk score."""
    model_version: str
    """E.g. ``fraud-v2-int8``; ``rules-v1`` for a rules fallback."""
    degraded: bool
    """The model scored without fresh card history (always true for the rules)."""
    fallback: bool
    """True when the pipeline's score was not back within the budget (rules answered)."""
    fallback_reason: FallbackReason | None = None
    """Why the rules answered: ``timeout``, ``rejected`` (dead-lettered by the pipeline),
    ``kafka_unavailable`` (not connected), ``kafka_error`` (the broker refused the request)."""
    rules: list[str] = msgspec.field(default_factory=list)
    """For a fallback: the rules that fired, e.g. ``amount_over_2000``."""
    latency_ms: _Ms
    """Time from receiving the request to answering it, measured by the service."""


class StoredDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Answer of ``GET /v1/decisions/{event_id}``: the pipeline's score read from
    ``fraud.scores`` (the model's decision even when the synchronous answer was a fallback)."""

    event_id: _Id
    card_id: _Id
    decision: Decision
    score: Annotated[float, Meta(ge=0.0, le=1.0)]
    model_version: str
    degraded: bool
    scored_at: float


class RecommendRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Body of ``POST /v1/recommend``."""

    user_id: _Id
    k: Annotated[int, Meta(ge=1, le=RECO_MAX_K)] = 10
    candidate_ids: (
        Annotated[list[_Id], Meta(min_length=1, max_length=RECO_MAX_CANDIDATES)] | None
    ) = None
    """Rank only these items; absent = the whole catalogue."""


class Recommendations(msgspec.Struct, frozen=True, kw_only=True):
    """A user's top-k items and where they came from."""

    user_id: _Id
    items: list[RecoItem]
    """Best first; at most the request's ``k`` (fewer when fewer qualify). Scores are the
    model's for ``pipeline`` and ``stored``; for ``popular``, the item's number of training
    interactions."""
    source: RecoSource
    """``pipeline`` (fresh from the reco lane), ``stored`` (latest result seen on
    ``reco.results``), ``popular`` (most popular items of the served model's training data)."""
    model_version: str
    request_id: str | None = None
    """The reco request whose result these items are (``pipeline`` and ``stored``)."""
    scored_at: float | None = None
    """When the pipeline scored the items (absent for ``popular``)."""
    fallback_reason: FallbackReason | None = None
    """Why the pipeline's answer was not used (``POST /v1/recommend`` only)."""
    latency_ms: _Ms = 0.0
    """Time from receiving the request to answering it, measured by the service."""


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /healthz`` and ``GET /readyz``."""

    status: Literal["ok", "ready", "not_ready"]
    checks: dict[str, bool] = msgspec.field(default_factory=dict)
    """Readiness: each dependency and whether it is connected."""
