"""Fraud scoring shared by every path that scores transactions: thresholds and decisions, the
:class:`schemas.FraudScore` fields, the feature parts a model takes, and scoring without a slow
path.

The real-time lane (:mod:`agents.fraud`), the batch lane (:mod:`agents.batch`), the serverless
function (:mod:`pipeline.serverless`) and the benchmarks' baselines all decide with the same
:class:`Thresholds` and write the same fields, so a score means the same wherever it was made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from pipeline.features.cardhistory import with_default_history
from pipeline.features.fastfeatures import fast_features
from pipeline.inference.model import OnnxScorer
from pipeline.settings import Settings

__all__ = ["Features", "Thresholds", "decide", "encode_score", "score_default_history",
           "score_fields"]


@dataclass(frozen=True)
class Thresholds:
    """Score cut-offs: ``score >= decline`` declines, ``score >= review`` reviews, else approve."""

    review: float
    decline: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.review <= self.decline <= 1.0:
            raise ValueError(f"need 0 <= review <= decline <= 1, got {self}")

    @classmethod
    def for_model(cls, settings: Settings, scorer: OnnxScorer) -> Thresholds:
        card = scorer.card.thresholds
        review = settings.fraud_review_threshold
        decline = settings.fraud_decline_threshold
        return cls(review=card["review"] if review is None else review,
                   decline=card["decline"] if decline is None else decline)


def decide(scores: NDArray[np.float32], thresholds: Thresholds) -> list[str]:
    """Map scores to ``approve`` / ``review`` / ``decline``, vectorised."""
    codes = (scores >= thresholds.review).astype(np.int8) + (scores >= thresholds.decline)
    labels = ("approve", "review", "decline")
    return [labels[c] for c in codes.tolist()]


def score_fields(txn: dict[str, Any], score: float, decision: str, version: str,
                 now: float, degraded: bool, reason: str = "no_history") -> dict[str, Any]:
    """The :class:`schemas.FraudScore` fields of one scored transaction (real-time and batch);
    ``reason`` is the ``degraded_reason`` when ``degraded``."""
    return {
        "event_id": txn["event_id"], "card_id": txn["card_id"], "score": score,
        "decision": decision, "model_version": version, "degraded": degraded,
        "scored_at": now, "sent_at": txn.get("sent_at"),
        "degraded_reason": (reason or "no_history") if degraded else None,
    }


def encode_score(txn: dict[str, Any], score: float, decision: str, version: str,
                 now: float, degraded: bool, reason: str = "no_history") -> bytes:
    """The :class:`schemas.FraudScore` JSON of one scored transaction."""
    return orjson.dumps(score_fields(txn, score, decision, version, now, degraded, reason))


def score_default_history(scorer: OnnxScorer, thresholds: Thresholds,
                          valid: Sequence[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """FraudScore fields of validated transactions scored with no history snapshot at hand.

    The lane's own path when it has no history view (:meth:`Features.for_model`): fast
    features, default history for a model that reads history, and ``degraded`` exactly when
    it does. For callers without a slow path: batch backfills and the serverless function.
    """
    if not valid:
        return []
    x, degraded = Features(fast_features(valid), None, None).for_model(scorer)
    scores = scorer.predict(x)
    decisions = decide(scores, thresholds)
    version = scorer.version
    return [score_fields(t, s, d, version, now, f) for t, s, d, f in zip(
        valid, scores.tolist(), decisions, degraded.tolist(), strict=True)]



@dataclass(frozen=True)
class Features:
    """One call's feature parts; each model takes the columns it was trained on."""

    fast: NDArray[np.float32]
    history: NDArray[np.float32] | None
    degraded: NDArray[np.bool_] | None
    """Per row, True when the history part holds defaults."""
    reasons: Sequence[str] | None = None
    """Per row, why its history part is degraded ("" when it is not): ``no_history``,
    ``stale``, ``loading`` (defaults) or ``misrouted`` (the record's partition's history,
    which may be a part of the card's)."""

    def for_model(self, scorer: OnnxScorer) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """The scorer's input matrix and per-row degraded flags."""
        n = self.fast.shape[0]
        if not scorer.uses_history:
            return self.fast, np.zeros(n, dtype=np.bool_)
        if self.history is None or self.degraded is None:  # no view yet: default history
            return with_default_history(self.fast), np.ones(n, dtype=np.bool_)
        return np.hstack([self.fast, self.history]), self.degraded
