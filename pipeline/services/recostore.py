"""What the recommendation service answers with when the pipeline does not: the latest top-k
per user read from ``reco.results``, and the served model's popular items.

* :class:`LatestResults` - user id -> the last :class:`~schemas.RecoResult` read for the user
  (a :class:`~pipeline.services.stream.BoundedStore`: at most ``max_users`` users, the least
  recently updated one evicted). Results are kept as compact msgspec-encoded arrays (about
  0.5 KB per user at k = 10 with its key, against 3.4 KB as parsed JSON), decoded when read.
* :class:`PopularItems` / :func:`read_popular` - the ``popular_items`` of a reco model folder's
  card, with the ``model_version`` string the lane reports for it; the service reads the folder
  of the version the workers serve (same selection,
  :func:`pipeline.inference.serving.follower_for`).
* :func:`top_k` - the first ``k`` of a ranked list, keeping only candidates when given.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from pipeline.errors import ModelLoadError
from pipeline.inference.model import Precision, verified_bytes
from pipeline.inference.recomodel import RecoCard, load_reco_card
from pipeline.services.stream import BoundedStore
from schemas import RecoItem, RecoResult

__all__ = ["LatestResults", "PopularItems", "StoredResult", "read_popular", "top_k"]

log = logging.getLogger(__name__)


class StoredResult(msgspec.Struct, frozen=True, array_like=True):
    """What is kept of a user's latest result (encoded as a JSON array, field names dropped)."""

    request_id: str
    model_version: str
    scored_at: float
    items: list[tuple[str, float]]
    """``(item_id, score)``, best first."""

    def ranked(self) -> list[RecoItem]:
        """The items as :class:`RecoItem`, best first."""
        return [RecoItem(item_id=item_id, score=score) for item_id, score in self.items]


_DECODER = msgspec.json.Decoder(StoredResult)
_ENCODER = msgspec.json.Encoder()


class LatestResults:
    """The latest reco result per user, for at most ``max_users`` users."""

    def __init__(self, max_users: int) -> None:
        self._store: BoundedStore[bytes] = BoundedStore(max_users)
        self.invalid = 0
        """Records of ``reco.results`` that are not a :class:`RecoResult` (skipped)."""

    @property
    def max_users(self) -> int:
        """The bound: most users kept at once."""
        return self._store.max_entries

    @property
    def evicted(self) -> int:
        """Users dropped so far to stay within ``max_users``."""
        return self._store.evicted

    def __len__(self) -> int:
        return len(self._store)

    def put(self, value: dict[str, Any]) -> bool:
        """Keep ``value`` (a parsed ``reco.results`` record) as its user's latest result;
        False (and counted in ``invalid``) when it is not a valid :class:`RecoResult`."""
        try:
            result = msgspec.convert(value, RecoResult)
        except msgspec.ValidationError as exc:
            self.invalid += 1
            log.warning("recommendations: skipping a reco.results record: %s", exc)
            return False
        kept = StoredResult(result.request_id, result.model_version, result.scored_at,
                            [(item.item_id, item.score) for item in result.items])
        self._store.put(result.user_id, _ENCODER.encode(kept))
        return True

    def get(self, user_id: str) -> StoredResult | None:
        """The latest result kept for ``user_id``, or None."""
        raw = self._store.get(user_id)
        return None if raw is None else _DECODER.decode(raw)


@dataclass(frozen=True)
class PopularItems:
    """The served reco model's most popular training items, most first."""

    model_version: str
    """The served version's identity as the lane reports it, e.g. ``reco-v1-int8``."""
    items: tuple[RecoItem, ...]
    """Score = the item's number of training interactions."""

    @classmethod
    def from_card(cls, card: RecoCard, precision: Precision) -> PopularItems:
        """The card's popular items, for the card served at ``precision``."""
        items = tuple(RecoItem(item_id=p.item_id, score=float(p.interactions))
                      for p in card.popular_items)
        return cls(card.served_version(precision), items)


def read_popular(model_dir: Path, precision: Precision) -> PopularItems:
    """The popular items of the reco folder ``model_dir`` served at ``precision`` (blocking:
    run it in a thread). The served file's sha256 is checked as the workers check it, so a
    version they refuse is refused here too (:class:`~pipeline.errors.ModelLoadError`)."""
    card = load_reco_card(model_dir)
    entry = card.files.get(precision)
    if entry is None:
        raise ModelLoadError(f"card in {model_dir} lists no {precision!r} file")
    verified_bytes(model_dir, entry)
    popular = PopularItems.from_card(card, precision)
    if not popular.items:
        log.warning("recommendations: the card of %s has no popular_items; the popular "
                    "fallback answers with no items", popular.model_version)
    return popular


def top_k(ranked: Iterable[RecoItem], k: int,
          candidate_ids: Sequence[str] | None = None) -> list[RecoItem]:
    """The first ``k`` items of ``ranked`` (best first), only those in ``candidate_ids`` when
    given; fewer when fewer qualify."""
    allowed = None if candidate_ids is None else frozenset(candidate_ids)
    picked: list[RecoItem] = []
    for item in ranked:
        if len(picked) == k:
            break
        if allowed is None or item.item_id in allowed:
            picked.append(item)
    return picked
