"""Synthetic recommendation requests for the demo, the benchmark and the tests.

:class:`RecoRequestSource` draws users uniformly from the served model's user id space (read
from its card, so every generated user is known to it), asks for ``k`` items, and gives a share
of the requests a candidate list of distinct catalogue items. Deterministic for a seed.
``make_invalid`` produces the bad variants the lane must dead-letter, one per kind of
:data:`RECO_INVALID_KINDS`, each with the field its dead letter's reason starts with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.dev.loadgen import RECO, SideRecord
from pipeline.inference.recomodel import IdFormat, load_reco_card
from schemas import RECO_MAX_CANDIDATES

__all__ = ["RECO_INVALID_KINDS", "RecoRequestSource", "reco_reason_field"]

_REASON_FIELD: dict[str, tuple[str, str]] = {
    "not_json": ("invalid_json", "value"),
    "missing_request_id": ("schema", "request_id"),
    "k_zero": ("schema", "k"),
    "k_as_text": ("schema", "k"),
    "unknown_user": ("unknown_user", "user_id"),
    "too_many_candidates": ("schema", "candidate_ids"),
    "unknown_candidates": ("unknown_items", "candidate_ids"),
}
#: Kinds of deliberately bad requests, in the order the generator cycles through them.
RECO_INVALID_KINDS: tuple[str, ...] = tuple(_REASON_FIELD)


def reco_reason_field(kind: str) -> tuple[str, str]:
    """``(error, field)`` of the dead letter the lane must write for an invalid ``kind``."""
    try:
        return _REASON_FIELD[kind]
    except KeyError:
        raise ValueError(f"unknown invalid kind {kind!r}; expected one of: "
                         f"{', '.join(RECO_INVALID_KINDS)}") from None


class RecoRequestSource:
    """Deterministic stream of valid :class:`schemas.RecoRequest` values for one model."""

    workload = RECO
    invalid_kinds = RECO_INVALID_KINDS

    def __init__(self, seed: int = 0, *, n_users: int, n_items: int, user_ids: IdFormat,
                 item_ids: IdFormat, k: int = 10, candidate_fraction: float = 0.2,
                 candidates: tuple[int, int] = (20, 200)) -> None:
        if not 0.0 <= candidate_fraction <= 1.0:
            raise ValueError(f"candidate_fraction must be within [0, 1], got {candidate_fraction}")
        low, high = candidates
        if not 1 <= low <= high <= min(RECO_MAX_CANDIDATES, n_items):
            raise ValueError(f"candidates must be 1 <= low <= high <= "
                             f"{min(RECO_MAX_CANDIDATES, n_items)}, got {candidates}")
        self._rng = np.random.default_rng(seed)
        self._seed = seed
        self._count = 0
        self.n_users, self.n_items, self.k = n_users, n_items, k
        self.user_ids, self.item_ids = user_ids, item_ids
        self.candidate_fraction, self.candidates = candidate_fraction, candidates

    @classmethod
    def for_model(cls, model_dir: Path, seed: int = 0, **options: Any) -> RecoRequestSource:
        """A source whose users and items are those of the model card in ``model_dir``."""
        card = load_reco_card(model_dir)
        return cls(seed, n_users=card.n_users, n_items=card.n_items, user_ids=card.user_ids,
                   item_ids=card.item_ids, **options)

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` requests."""
        return [self.next() for _ in range(n)]

    def side_records(self) -> list[SideRecord]:
        """Nothing goes along with reco requests."""
        return []

    def next(self) -> dict[str, Any]:
        """The next request."""
        self._count += 1
        rng = self._rng
        request: dict[str, Any] = {
            "request_id": f"req-{self._seed}-{self._count:09d}",
            "user_id": self.user_ids.format(int(rng.integers(self.n_users))),
            "k": self.k,
        }
        if rng.random() < self.candidate_fraction:
            size = int(rng.integers(self.candidates[0], self.candidates[1] + 1))
            items = rng.choice(self.n_items, size=size, replace=False)
            request["candidate_ids"] = [self.item_ids.format(i) for i in items.tolist()]
        return request

    def make_invalid(self, kind: str, rng: np.random.Generator, base: dict[str, Any]) -> bytes:
        """Raw value of a bad variant of ``base`` (not modified)."""
        reco_reason_field(kind)  # rejects unknown kinds
        if kind == "not_json":
            return b"\xff" + rng.bytes(15) + b"{{not json"
        request = dict(base)
        if kind == "missing_request_id":
            del request["request_id"]
        elif kind == "k_zero":
            request["k"] = 0
        elif kind == "k_as_text":
            request["k"] = "10"
        elif kind == "unknown_user":
            request["user_id"] = self.user_ids.format(self.n_users + int(rng.integers(1000)))
        elif kind == "too_many_candidates":
            request["candidate_ids"] = [self.item_ids.format(0)] * (RECO_MAX_CANDIDATES + 1)
        elif kind == "unknown_candidates":
            request["candidate_ids"] = [self.item_ids.format(self.n_items + i) for i in range(3)]
        return orjson.dumps(request)
