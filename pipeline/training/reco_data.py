"""Seeded implicit-feedback data for the recommender, its held-out split and ranking metrics.

Lives here:

* :class:`RecoDataConfig` / :func:`generate_reco_data` - users and items get true latent
  factors; item popularity follows a power law; each user draws 20-60 (configurable) distinct
  items from ``softmax(affinity * user . item + log popularity)`` over the *whole* catalogue.
  Sampling is exact Gumbel-top-k (the top-n of logit + Gumbel noise is a draw of n items
  without replacement), computed in row chunks on two threads with one spawned seed per
  chunk, so the result does not depend on thread scheduling.
* :class:`RecoData` - per-user CSR lists of training items and held-out items (a uniformly
  random ``holdout_fraction`` of each user's draws, at least one), plus the true factors.
* :func:`ranking_metrics` - recall@k and NDCG@k of ranked lists against the held-out items,
  after dropping each user's training items from the list (the evaluation protocol).
* :func:`evaluate_graphs` - the protocol applied to serialized recommender graphs (run
  through ORT over all users) plus the popularity baseline.
* :func:`topk_overlap` - how many of two models' top-k items agree (INT8 vs FP32).
* :func:`popularity_ranking` / :func:`oracle_tables` - baseline and upper-bound inputs.
* :func:`popular_items` - the same popularity order as the card's ``popular_items`` (the
  recommendation service's last fallback).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from pipeline.inference.model import session_options
from pipeline.inference.recomodel import CANDIDATES_INPUT, ITEM_IDS, ITEMS_OUTPUT, USER_INPUT

__all__ = [
    "PROTOCOL",
    "RecoData",
    "RecoDataConfig",
    "evaluate_graphs",
    "generate_reco_data",
    "oracle_tables",
    "popular_items",
    "popularity_order",
    "popularity_ranking",
    "ranking_metrics",
    "topk_overlap",
]

PROTOCOL = (
    "All users are evaluated. Each ranked list (the served graph's top-k_max output) loses the "
    "user's training items; the first 10 remaining items are compared with the user's "
    "held-out items (a random holdout_fraction of its draws, at least one). recall@10 = hits "
    "/ min(10, held-out); NDCG@10 uses binary gains, log2 discounts and the ideal DCG of "
    "min(10, held-out) hits; both are means over users."
)
_CHUNK_ROWS = 512  # 512 x 10k float32 logits = 20 MB per thread: cache-friendly, small peak
_THREADS = 2  # numpy's RNG fill, log and argpartition release the GIL; the build box has 2 cores


@dataclass(frozen=True)
class RecoDataConfig:
    """Everything that determines the generated data; equal configs give equal data."""

    n_users: int = 100_000
    n_items: int = 10_000
    true_dim: int = 16
    affinity: float = 2.5  # std of the user-item preference logit
    popularity_exponent: float = 1.0  # item weight ~ rank ** -exponent
    min_interactions: int = 20
    max_interactions: int = 60
    holdout_fraction: float = 0.2
    seed: int = 5


@dataclass(frozen=True)
class RecoData:
    """Generated interactions: CSR item lists per user for training and held-out evaluation."""

    config: RecoDataConfig
    train_indptr: NDArray[np.int64]
    train_items: NDArray[np.int64]
    test_indptr: NDArray[np.int64]
    test_items: NDArray[np.int64]
    true_user: NDArray[np.float32]
    true_item: NDArray[np.float32]
    item_log_pop: NDArray[np.float32]

    @property
    def n_users(self) -> int:
        """Number of users (rows of every per-user table)."""
        return self.config.n_users

    @property
    def n_items(self) -> int:
        """Number of items in the catalogue."""
        return self.config.n_items

    def item_counts(self) -> NDArray[np.int64]:
        """Training interactions per item (the popularity baseline's score)."""
        return np.bincount(self.train_items, minlength=self.n_items).astype(np.int64)


def generate_reco_data(config: RecoDataConfig | None = None) -> RecoData:
    """Draw factors, popularity and interactions for ``config``; deterministic per config."""
    cfg = config or RecoDataConfig()
    if not 0 < cfg.min_interactions <= cfg.max_interactions <= cfg.n_items:
        raise ValueError("need 0 < min_interactions <= max_interactions <= n_items")
    rng = np.random.default_rng(cfg.seed)
    users = (rng.standard_normal((cfg.n_users, cfg.true_dim)) / np.sqrt(cfg.true_dim)).astype(
        np.float32
    )
    items = rng.standard_normal((cfg.n_items, cfg.true_dim)).astype(np.float32)
    ranks = rng.permutation(cfg.n_items) + 1
    log_pop = (-cfg.popularity_exponent * np.log(ranks)).astype(np.float32)
    drawn = _draw_items(cfg, users * np.float32(cfg.affinity), items, log_pop)
    counts = rng.integers(cfg.min_interactions, cfg.max_interactions + 1, cfg.n_users)
    n_test = np.maximum(1, np.rint(cfg.holdout_fraction * counts)).astype(np.int64)
    # Random priorities pick the held-out draws; padding slots beyond a user's count sort last.
    slot = np.arange(cfg.max_interactions)[None, :]
    priority = rng.random(drawn.shape)
    priority[slot >= counts[:, None]] = 2.0
    shuffled = np.take_along_axis(drawn, np.argsort(priority, axis=1), axis=1)
    test_mask = slot < n_test[:, None]
    train_mask = (slot >= n_test[:, None]) & (slot < counts[:, None])
    train_indptr, train_items = _csr(shuffled, train_mask)
    test_indptr, test_items = _csr(shuffled, test_mask)
    return RecoData(cfg, train_indptr, train_items, test_indptr, test_items, users, items, log_pop)


def _draw_items(
    cfg: RecoDataConfig,
    users: NDArray[np.float32],
    items: NDArray[np.float32],
    log_pop: NDArray[np.float32],
) -> NDArray[np.int64]:
    """Gumbel-top-``max_interactions`` per user, best key first: ``(n_users, max)`` indices."""
    n_chunks = -(-cfg.n_users // _CHUNK_ROWS)
    seeds = np.random.SeedSequence([cfg.seed, 1]).spawn(n_chunks)
    out = np.empty((cfg.n_users, cfg.max_interactions), dtype=np.int64)
    items_t = np.ascontiguousarray(items.T)
    top = cfg.max_interactions

    def draw(chunk: int) -> None:
        lo, hi = chunk * _CHUNK_ROWS, min(cfg.n_users, (chunk + 1) * _CHUNK_ROWS)
        noise = np.random.default_rng(seeds[chunk]).random((hi - lo, cfg.n_items), np.float32)
        # log(-log(u)) is minus a Gumbel draw; u == 0 gives -inf noise, the correct limit.
        with np.errstate(divide="ignore"):
            np.log(noise, out=noise)
            np.negative(noise, out=noise)
            np.log(noise, out=noise)
        logits = users[lo:hi] @ items_t
        logits += log_pop
        neg_keys = np.subtract(noise, logits, out=noise)  # -(logit + Gumbel), in place
        best = np.argpartition(neg_keys, top - 1, axis=1)[:, :top]
        order = np.argsort(np.take_along_axis(neg_keys, best, axis=1), axis=1, kind="stable")
        out[lo:hi] = np.take_along_axis(best, order, axis=1)

    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(draw, range(n_chunks)))
    return out


def _csr(
    table: NDArray[np.int64], mask: NDArray[np.bool_]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    counts = mask.sum(axis=1)
    indptr = np.zeros(len(table) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    # Sorted items per user keep (user, item) keys globally sorted for searchsorted lookups;
    # masked-out slots become int64 max and sort behind each row's real items.
    sorted_rows = np.sort(np.where(mask, table, np.iinfo(np.int64).max), axis=1)
    keep = np.arange(table.shape[1])[None, :] < counts[:, None]
    return indptr, sorted_rows[keep]


def _pair_keys(
    data: RecoData, indptr: NDArray[np.int64], items: NDArray[np.int64]
) -> NDArray[np.int64]:
    users = np.repeat(np.arange(data.n_users, dtype=np.int64), np.diff(indptr))
    return users * data.n_items + items


def _contains(keys: NDArray[np.int64], query: NDArray[np.int64]) -> NDArray[np.bool_]:
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.asarray(keys[pos] == query)


def ranking_metrics(
    data: RecoData, users: NDArray[np.int64], ranked: NDArray[np.int64], k: int = 10
) -> dict[str, float]:
    """Recall@k and NDCG@k of ``ranked`` (row i ranks items for ``users[i]``, best first).

    Protocol: each user's training items are removed from its list, the first ``k`` remaining
    items are the recommendation, and the user's held-out items are the relevant set (binary
    relevance).  recall@k = hits / min(k, |held-out|), so a perfect list scores 1; NDCG@k uses
    log2 discounts and the ideal DCG of min(k, |held-out|) hits.  Means over ``users``.
    The list must be deep enough that k items survive the removal.
    """
    queries = users[:, None] * data.n_items + ranked
    seen = _contains(_pair_keys(data, data.train_indptr, data.train_items), queries)
    if int((~seen).sum(axis=1).min()) < k:
        raise ValueError(f"ranked lists too short: fewer than {k} unseen items for some user")
    # Stable sort of the "seen" flags moves unseen items to the front in their ranked order.
    first = np.argsort(seen, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(queries, first, axis=1)
    hits = _contains(_pair_keys(data, data.test_indptr, data.test_items), top)
    relevant = np.minimum(k, np.diff(data.test_indptr)[users])
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[relevant - 1]
    return {
        f"recall@{k}": round(float(np.mean(hits.sum(axis=1) / relevant)), 4),
        f"ndcg@{k}": round(float(np.mean((hits * discounts).sum(axis=1) / ideal)), 4),
    }


def popularity_order(data: RecoData, depth: int) -> NDArray[np.int64]:
    """The ``depth`` most-interacted training items, most first (ties: lower index first)."""
    return np.argsort(-data.item_counts(), kind="stable")[:depth]


def popularity_ranking(data: RecoData, users: NDArray[np.int64], depth: int) -> NDArray[np.int64]:
    """The ``depth`` most-interacted training items, the same list for every user."""
    return np.broadcast_to(popularity_order(data, depth), (len(users), depth))


def popular_items(data: RecoData, depth: int) -> list[dict[str, Any]]:
    """The card's ``popular_items``: :func:`popularity_order` as ``{item_id, interactions}``
    entries (external ids, training interaction counts), most popular first."""
    counts = data.item_counts()
    return [{"item_id": ITEM_IDS.format(item), "interactions": int(counts[item])}
            for item in popularity_order(data, depth).tolist()]


def oracle_tables(data: RecoData) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """User/item tables whose dot product is the generator's true logit (incl. popularity).

    Ranking by the true logit orders items by their chance of being drawn, so its metrics are
    a practical ceiling for any model learned from this data.
    """
    ones = np.ones((data.n_users, 1), dtype=np.float32)
    users = np.hstack([data.true_user * np.float32(data.config.affinity), ones])
    items = np.hstack([data.true_item, data.item_log_pop[:, None]])
    return users.astype(np.float32), items.astype(np.float32)


def topk_overlap(a: NDArray[np.int64], b: NDArray[np.int64], k: int = 10) -> float:
    """Mean share of items two row-aligned top-k lists have in common (order ignored)."""
    both = np.sort(np.concatenate([a[:, :k], b[:, :k]], axis=1), axis=1)
    distinct = (np.diff(both, axis=1) != 0).sum(axis=1) + 1
    return round(float(np.mean((2 * k - distinct) / k)), 4)


def _graph_top_items(model: bytes, n_users: int) -> NDArray[np.int64]:
    """Full-catalogue top list of every user from a serialized recommender graph."""
    session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
    users, parts = np.arange(n_users, dtype=np.int64), []
    for lo in range(0, n_users, 256):  # small batches: ORT's TopK slows per row on big ones
        batch = users[lo : lo + 256]
        feed = {USER_INPUT: batch, CANDIDATES_INPUT: np.empty((len(batch), 0), np.int64)}
        parts.append(session.run([ITEMS_OUTPUT], feed)[0])
    return np.vstack(parts).astype(np.int64)


def evaluate_graphs(
    data: RecoData, models: dict[str, bytes], depth: int, k: int = 10
) -> dict[str, dict[str, Any]]:
    """:func:`ranking_metrics` of every graph in ``models`` and of the popularity baseline.

    Every entry but ``fp32`` also gets its top-k overlap with the ``fp32`` entry.
    """
    users = np.arange(data.n_users, dtype=np.int64)
    with ThreadPoolExecutor(_THREADS) as pool:  # one single-threaded ORT session per core
        lists = pool.map(lambda blob: _graph_top_items(blob, data.n_users), models.values())
        tops = dict(zip(models, lists, strict=True))
    tops["popularity"] = popularity_ranking(data, users, depth)
    results: dict[str, dict[str, Any]] = {
        name: ranking_metrics(data, users, top, k) for name, top in tops.items()
    }
    for name in models.keys() - {"fp32"}:
        results[name][f"top{k}_overlap_with_fp32"] = topk_overlap(tops[name], tops["fp32"], k)
    return results
