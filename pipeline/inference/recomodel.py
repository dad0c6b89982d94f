"""Recommender runtime: the verified ``models/reco`` graph behind a small, thread-safe API.

Lives here:

* the graph contract shared with :mod:`pipeline.training.reco_model` - input/output names and the
  ``-1`` padding id for candidate lists;
* :class:`IdFormat` - external ids (``user-000123``, ``item-00042``) <-> table indices;
* :class:`RecoCard` / :func:`load_reco_card` - the parsed ``card.json`` of the folder (with
  its ``popular_items``, :class:`PopularItem`);
* :class:`RecoScorer` - loads one precision after checking its sha256 against the card and
  returns top-k items per user, over the whole catalogue or over request candidates.

The graph does lookup, scoring and TopK(k_max); Python only slices to the request's k.
All load-time problems surface as :class:`pipeline.errors.ModelLoadError`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from pipeline.errors import ModelLoadError
from pipeline.inference.model import (
    ModelFile,
    Precision,
    parse_files,
    read_card_json,
    require_field,
    verified_session,
)

__all__ = [
    "CANDIDATES_INPUT",
    "GRAPH_IO",
    "ITEM_IDS",
    "ITEMS_OUTPUT",
    "PAD_ID",
    "PopularItem",
    "SCORES_OUTPUT",
    "USER_IDS",
    "USER_INPUT",
    "IdFormat",
    "RecoCard",
    "RecoScorer",
    "load_reco_card",
]

USER_INPUT = "user_index"
CANDIDATES_INPUT = "candidates"
ITEMS_OUTPUT = "top_items"
SCORES_OUTPUT = "top_scores"
PAD_ID = -1  # pads short candidate rows; scores -inf inside the graph, so it ranks last
GRAPH_IO = {
    USER_INPUT: "int64 [batch]: user embedding rows (the runtime maps user-NNNNNN ids)",
    CANDIDATES_INPUT: f"int64 [batch, C]: item indices to rank, {PAD_ID} pads; C = 0 ranks "
    "the whole catalogue",
    ITEMS_OUTPUT: "int64 [batch, min(k_max, C or n_items)]: item indices, best first "
    "(candidate ids on the candidates path)",
    SCORES_OUTPUT: "float32 [batch, same]: user . item scores, descending",
}

Int64s = NDArray[np.int64]


@dataclass(frozen=True)
class IdFormat:
    """External id scheme: ``prefix`` + index zero-padded to ``digits`` (``item-00042``)."""

    prefix: str
    digits: int

    def format(self, index: int) -> str:
        """External id of table row ``index``."""
        return f"{self.prefix}{index:0{self.digits}d}"

    def parse(self, external: str, size: int) -> int | None:
        """Row index of ``external``, or None unless it is well formed and below ``size``."""
        digits = external[len(self.prefix) :] if external.startswith(self.prefix) else ""
        # Exact width only: "user-123" and "user-0000123" are different, unknown users.
        if len(digits) != self.digits or not (digits.isascii() and digits.isdigit()):
            return None
        index = int(digits)
        return index if index < size else None


USER_IDS = IdFormat("user-", 6)  # what new builds write to the card; loading reads the card
ITEM_IDS = IdFormat("item-", 5)


@dataclass(frozen=True)
class PopularItem:
    """One entry of a card's ``popular_items``."""

    item_id: str
    interactions: int
    """Training interactions with the item (the popularity baseline's score)."""


@dataclass(frozen=True)
class RecoCard:
    """The parsed ``card.json`` of a recommender folder; ``raw`` keeps every field."""

    name: str
    version: str
    n_users: int
    n_items: int
    k_max: int
    user_ids: IdFormat
    item_ids: IdFormat
    files: Mapping[str, ModelFile]
    metrics: Mapping[str, Any]
    raw: Mapping[str, Any]
    popular_items: tuple[PopularItem, ...] = ()
    """The most-interacted training items, most first; empty when the card has none (cards
    built before the field existed)."""

    def served_version(self, precision: Precision) -> str:
        """Model identity of this card served at ``precision``, e.g. ``reco-v1-int8``."""
        return f"{self.name}-{self.version}-{precision}"


def _id_format(raw: Mapping[str, Any], key: str, where: str) -> IdFormat:
    ids = require_field(require_field(raw, "ids", dict, where), key, dict, f"{where} ids")
    return IdFormat(require_field(ids, "prefix", str, where),
                    require_field(ids, "digits", int, where))


def _popular_items(raw: Mapping[str, Any], item_ids: IdFormat, n_items: int,
                   where: str) -> tuple[PopularItem, ...]:
    entries = raw.get("popular_items", [])
    if not isinstance(entries, list):
        raise ModelLoadError(f"{where}: field 'popular_items' must be list, got {entries!r}")
    items = []
    for n, entry in enumerate(entries):
        sub = f"{where} popular_items[{n}]"
        if not isinstance(entry, dict):
            raise ModelLoadError(f"{sub}: must be an object")
        item_id = require_field(entry, "item_id", str, sub)
        if item_ids.parse(item_id, n_items) is None:
            raise ModelLoadError(f"{sub}: {item_id!r} is not an item of this model")
        items.append(PopularItem(item_id, require_field(entry, "interactions", int, sub)))
    return tuple(items)


def load_reco_card(model_dir: Path) -> RecoCard:
    """Read and validate ``model_dir/card.json``; raise ModelLoadError if unusable."""
    raw, where = read_card_json(model_dir)
    files = parse_files(raw, where)
    n_items = require_field(raw, "n_items", int, where)
    item_ids = _id_format(raw, "item", where)
    return RecoCard(
        name=require_field(raw, "name", str, where),
        version=require_field(raw, "version", str, where),
        n_users=require_field(raw, "n_users", int, where),
        n_items=n_items,
        k_max=require_field(raw, "k_max", int, where),
        user_ids=_id_format(raw, "user", where),
        item_ids=item_ids,
        files=files,
        metrics=raw.get("metrics", {}),
        raw=raw,
        popular_items=_popular_items(raw, item_ids, n_items, where),
    )


def _int64(values: Int64s, what: str) -> Int64s:
    array = np.asarray(values)
    # Refuse floats instead of truncating them into some other user's or item's index.
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)


class RecoScorer:
    """A loaded, verified recommender graph returning top-k items per user.

    Build it with :meth:`load`.  Methods keep no per-call state and ORT's ``run`` is
    thread-safe, so one scorer may be shared by a thread pool.
    """

    def __init__(self, card: RecoCard, precision: Precision, session: ort.InferenceSession):
        """Wrap an already-created session; prefer :meth:`load`, which verifies the file."""
        self._card = card
        self._precision: Precision = precision
        self._session = session
        self._outputs = [ITEMS_OUTPUT, SCORES_OUTPUT]

    @classmethod
    def load(
        cls, model_dir: Path, precision: Precision = "int8", intra_op_threads: int = 1
    ) -> RecoScorer:
        """Load ``precision`` from ``model_dir`` after checking its sha256 and graph I/O."""
        card = load_reco_card(model_dir)
        entry, session = verified_session(model_dir, card.files, precision, intra_op_threads)
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [USER_INPUT, CANDIDATES_INPUT] or outputs != [ITEMS_OUTPUT, SCORES_OUTPUT]:
            raise ModelLoadError(
                f"{model_dir / entry.path}: unexpected graph I/O {inputs} -> {outputs}"
            )
        return cls(card, precision, session)

    @property
    def card(self) -> RecoCard:
        """The model card the scorer was loaded from."""
        return self._card

    @property
    def precision(self) -> Precision:
        """Which file of the card is being served ("int8" or "fp32")."""
        return self._precision

    @property
    def version(self) -> str:
        """Model identity for logs and results, e.g. ``reco-v1-int8``."""
        return self._card.served_version(self._precision)

    @property
    def k_max(self) -> int:
        """Largest k a request may ask for (the graph's fixed TopK)."""
        return self._card.k_max

    def user_index(self, user_id: str) -> int | None:
        """Embedding row of ``user_id`` (``user-000123``), or None for unknown users."""
        return self._card.user_ids.parse(user_id, self._card.n_users)

    def item_index(self, item_id: str) -> int | None:
        """Catalogue index of ``item_id`` (``item-00042``), or None for unknown items."""
        return self._card.item_ids.parse(item_id, self._card.n_items)

    def item_id(self, index: int) -> str:
        """External id of catalogue index ``index``."""
        if not 0 <= index < self._card.n_items:
            raise ValueError(f"item index {index} outside [0, {self._card.n_items})")
        return self._card.item_ids.format(index)

    def recommend(self, user_indices: Int64s, k: int) -> tuple[Int64s, NDArray[np.float32]]:
        """Top-``k`` catalogue items per user: indices and scores ``(n, k)``, best first.

        Items the user already interacted with are not removed (the graph has no history).
        """
        users = self._users(user_indices)
        self._check_k(k)
        empty = np.empty((len(users), 0), dtype=np.int64)  # 0 candidates = full catalogue
        return self._run(users, empty, k)

    def recommend_candidates(
        self, user_indices: Int64s, candidates: Int64s, k: int | None = None
    ) -> tuple[Int64s, NDArray[np.float32]]:
        """Rank each row of ``candidates`` (item indices, ``PAD_ID`` pads) for its user.

        Returns candidate item indices and scores, shape ``(n, min(k, C))``, best first;
        ``k`` defaults to ``min(k_max, C)``.  Padding sorts last (score -inf, id ``PAD_ID``);
        duplicated candidates are scored, and returned, once per occurrence.
        """
        users = self._users(user_indices)
        cands = _int64(candidates, "candidates")
        if cands.ndim != 2 or cands.shape[0] != len(users) or cands.shape[1] == 0:
            raise ValueError(f"candidates must have shape ({len(users)}, C >= 1)")
        if cands.size and (cands.min() < PAD_ID or cands.max() >= self._card.n_items):
            raise ValueError(f"candidate ids must be in [0, {self._card.n_items}) or {PAD_ID}")
        width = min(self.k_max, cands.shape[1]) if k is None else k
        self._check_k(width)
        return self._run(users, cands, min(width, cands.shape[1]))

    def warm_up(self, batch_sizes: Sequence[int] = (1, 8, 32, 128)) -> float:
        """Run both paths per batch size so first requests skip lazy init; seconds taken."""
        start = time.perf_counter()
        for size in batch_sizes:
            users = (np.arange(size, dtype=np.int64) * 7919) % self._card.n_users
            cands = (users[:, None] + np.arange(8)) % self._card.n_items
            for _ in range(3):
                self.recommend(users, self.k_max)
                self.recommend_candidates(users, cands)
        return time.perf_counter() - start

    def _users(self, user_indices: Int64s) -> Int64s:
        users = _int64(user_indices, "user_indices")
        if users.ndim != 1:
            raise ValueError(f"user_indices must be 1-D, got shape {users.shape}")
        if users.size and (users.min() < 0 or users.max() >= self._card.n_users):
            raise ValueError(f"user indices must be in [0, {self._card.n_users})")
        return users

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k must be in [1, {self.k_max}], got {k}")

    def _run(self, users: Int64s, cands: Int64s, k: int) -> tuple[Int64s, NDArray[np.float32]]:
        if len(users) == 0:
            return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
        feed = {USER_INPUT: users, CANDIDATES_INPUT: cands}
        items, scores = self._session.run(self._outputs, feed)
        return (
            np.ascontiguousarray(items[:, :k], dtype=np.int64),
            np.ascontiguousarray(scores[:, :k], dtype=np.float32),
        )
