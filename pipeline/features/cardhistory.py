"""Per-card history ("slow path") state and the history features the fraud v2 model reads.

Lives here:

* :class:`CardHistory` - the compact, immutable per-card state a faust Table keeps (one value
  per ``card_id``), with :func:`to_bytes` / :func:`from_bytes` for its changelog.
* :func:`update_with_transaction` / :func:`update_with_label` - pure state transitions the
  slow-path agent applies to every transaction and every delayed fraud label.
* :data:`HISTORY_FEATURE_NAMES` / :func:`history_features` - the fast path turns a batch of
  snapshots (whatever the table holds right now; it never waits) into a feature matrix.
* :data:`FRAUD_V2_FEATURE_NAMES` - fast features followed by history features.

Windows.  Counts and amount sums are exponentially decayed with time constants 1 h, 24 h and
30 d: on each transaction ``c <- c * exp(-dt / tau) + 1``.  ``c`` approximates a sliding-window
count over roughly the last ``tau`` seconds (an event ``tau`` ago weighs 1/e) while needing one
float instead of a list of timestamps.  The amount's log-scale mean and spread come from decayed
sums of ``x`` and ``x**2`` over 30 d (``x = log1p(amount)``; the weight sum is the 30 d count).
Merchants seen in the last 24 h and countries seen in the last 30 d are kept as bounded
``id -> last_seen`` maps (at most 32 entries each, oldest evicted first).

Event time only.  Aggregates are stored as of ``last_ts`` (the newest transaction seen) and are
only ever decayed forward.  An out-of-order transaction (older than ``last_ts``) is added with
the weight it has at ``last_ts`` (``exp(-(last_ts - ts) / tau)``), which is exactly what in-order
arrival would have produced, and does not change ``last_ts``, the last country or the undo
fields below.

Snapshot races.  The fast path may read a snapshot that the slow path has already updated with
the very transaction being scored.  The state remembers the id of its newest transaction and
just enough about the state before it (``prev_*`` fields) for :func:`history_features` to
subtract that transaction again, so features always describe the past only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import chain
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from pipeline.features.fastfeatures import FAST_FEATURE_NAMES

__all__ = [
    "DEFAULT_HISTORY_FEATURES",
    "FRAUD_V2_FEATURE_NAMES",
    "HISTORY_FEATURE_NAMES",
    "HISTORY_VERSION",
    "LABELS",
    "CardHistory",
    "from_bytes",
    "history_features",
    "to_bytes",
    "update_with_label",
    "update_with_transaction",
    "with_default_history",
]

HISTORY_VERSION = 1
TAUS_S: tuple[float, float, float] = (3600.0, 86_400.0, 30 * 86_400.0)
MERCHANT_WINDOW_S = 86_400.0
COUNTRY_WINDOW_S = 30 * 86_400.0
MAX_TRACKED = 32
LABELS: frozenset[str] = frozenset({"chargeback", "confirmed_fraud", "legit"})

# Prior for the card's log-amount scale, worth PRIOR_WEIGHT transactions: with little history
# the z-score compares against the population (mean ~3.4, sd ~1 for log1p(amount)) instead of
# dividing by the zero spread of one or two past amounts.
PRIOR_MEAN = 3.4
PRIOR_SD = 1.0
PRIOR_WEIGHT = 2.0
MIN_SD = 0.25
Z_CLIP = 8.0


class CardHistory(msgspec.Struct, frozen=True, array_like=True):
    """Compact per-card state; every field has an "empty card" default.

    Decayed aggregates (``cnt_*``, ``amt_*``, ``logamt_*``) are as of ``last_ts``.  ``merchants``
    / ``countries`` are ids with ``*_seen`` last-seen times in the parallel tuple, newest first.
    ``last_event_id`` and ``prev_*`` describe the newest transaction and the state before it
    (see the module docstring).  ``updated_at`` is the newest event time (transaction or label)
    applied; ``last_ts`` is 0.0 until the first transaction.
    """

    v: int = HISTORY_VERSION
    updated_at: float = 0.0
    last_ts: float = 0.0
    cnt_1h: float = 0.0
    cnt_24h: float = 0.0
    cnt_30d: float = 0.0
    amt_1h: float = 0.0
    amt_24h: float = 0.0
    amt_30d: float = 0.0
    logamt_sum: float = 0.0
    logamt_sq_sum: float = 0.0
    merchants: tuple[str, ...] = ()
    merchants_seen: tuple[float, ...] = ()
    countries: tuple[str, ...] = ()
    countries_seen: tuple[float, ...] = ()
    last_country: str = ""
    chargebacks: int = 0
    confirmed_frauds: int = 0
    last_event_id: str = ""
    prev_ts: float = 0.0
    prev_country: str = ""
    prev_merchant_seen: float = 0.0
    prev_country_seen: float = 0.0
    src_offset: int = -1
    """Offset in its ``fraud.requests`` partition of the newest transaction applied (-1: none).
    The fast path reads the partition's highest ``src_offset`` as "the slow path has applied
    everything up to here" (see :mod:`pipeline.features.historyview`)."""
    label_offset: int = -1
    """Offset in its ``fraud.labels`` partition of the newest label applied (-1: none)."""


_EMPTY = CardHistory()
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(CardHistory)


def to_bytes(h: CardHistory) -> bytes:
    """Serialise ``h`` as a msgpack array (field order = declaration order, ``v`` first)."""
    return _ENCODER.encode(h)


def from_bytes(b: bytes) -> CardHistory:
    """Inverse of :func:`to_bytes`; raises ValueError for other versions or garbage."""
    try:
        h = _DECODER.decode(b)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a CardHistory v{HISTORY_VERSION} value: {exc}") from exc
    if h.v != HISTORY_VERSION:
        raise ValueError(f"CardHistory version {h.v} is not supported (want {HISTORY_VERSION})")
    return h


def _touch(
    ids: tuple[str, ...], seen: tuple[float, ...], key: str, ts: float, oldest: float
) -> tuple[tuple[str, ...], tuple[float, ...], float]:
    """Record ``key`` at ``ts``; drop entries last seen at or before ``oldest``; keep 32 newest.

    Returns the new parallel tuples and the previous last-seen time of ``key`` (0.0 if none).
    """
    last = dict(zip(ids, seen, strict=True))
    prev = last.get(key, 0.0)
    last[key] = max(prev, ts)
    kept = sorted(((s, k) for k, s in last.items() if s > oldest), reverse=True)[:MAX_TRACKED]
    return tuple(k for _, k in kept), tuple(s for s, _ in kept), prev


def _aggregates(h: CardHistory, ts: float, amount: float) -> dict[str, float]:
    """Decayed counts and sums of ``h`` plus one transaction at ``ts`` (as of the newer time)."""
    if ts >= h.last_ts:  # decay the state forward to ts, then add the event at full weight
        decay = [math.exp(-(ts - h.last_ts) / tau) for tau in TAUS_S]
        weight = [1.0, 1.0, 1.0]
    else:  # late event: the state stays at last_ts, the event enters already decayed
        decay = [1.0, 1.0, 1.0]
        weight = [math.exp(-(h.last_ts - ts) / tau) for tau in TAUS_S]
    x = math.log1p(amount)
    return {
        "cnt_1h": h.cnt_1h * decay[0] + weight[0],
        "cnt_24h": h.cnt_24h * decay[1] + weight[1],
        "cnt_30d": h.cnt_30d * decay[2] + weight[2],
        "amt_1h": h.amt_1h * decay[0] + weight[0] * amount,
        "amt_24h": h.amt_24h * decay[1] + weight[1] * amount,
        "amt_30d": h.amt_30d * decay[2] + weight[2] * amount,
        "logamt_sum": h.logamt_sum * decay[2] + weight[2] * x,
        "logamt_sq_sum": h.logamt_sq_sum * decay[2] + weight[2] * x * x,
    }


def update_with_transaction(
    h: CardHistory | None, txn: Mapping[str, Any], *, offset: int = -1
) -> CardHistory:
    """Return the state after ``txn`` (a validated wire transaction) on top of ``h``.

    ``offset`` is the transaction's offset in its ``fraud.requests`` partition (-1 offline).
    """
    h = h or _EMPTY
    ts = float(txn["ts"])
    ref = max(ts, h.last_ts)
    merchants, merchants_seen, prev_m = _touch(
        h.merchants, h.merchants_seen, str(txn["merchant_id"]), ts, ref - MERCHANT_WINDOW_S
    )
    countries, countries_seen, prev_c = _touch(
        h.countries, h.countries_seen, str(txn["country"]), ts, ref - COUNTRY_WINDOW_S
    )
    newest: dict[str, Any] = {}
    if ts >= h.last_ts:  # a late event leaves "last"/"prev" describing the newest one
        newest = {
            "last_country": str(txn["country"]),
            "last_event_id": str(txn.get("event_id", "")),
            "prev_ts": h.last_ts,
            "prev_country": h.last_country,
            "prev_merchant_seen": prev_m,
            "prev_country_seen": prev_c,
        }
    return msgspec.structs.replace(
        h,
        updated_at=max(h.updated_at, ts),
        last_ts=ref,
        src_offset=max(h.src_offset, offset),
        merchants=merchants,
        merchants_seen=merchants_seen,
        countries=countries,
        countries_seen=countries_seen,
        **_aggregates(h, ts, float(txn["amount"])),
        **newest,
    )


def update_with_label(h: CardHistory | None, label: Mapping[str, Any]) -> CardHistory:
    """Return the state after a delayed fraud label for one of the card's transactions.

    ``label["label"]`` is ``chargeback``, ``confirmed_fraud`` or ``legit`` (which only advances
    ``updated_at``).  Labels are counted, not de-duplicated: exactly-once delivery of the labels
    topic (faust's processing guarantee) is what keeps a redelivered label from counting twice.
    """
    kind = label["label"]
    if kind not in LABELS:
        raise ValueError(f"label must be one of {sorted(LABELS)}, got {kind!r}")
    h = h or _EMPTY
    return msgspec.structs.replace(
        h,
        updated_at=max(h.updated_at, float(label["ts"])),
        chargebacks=h.chargebacks + (kind == "chargeback"),
        confirmed_frauds=h.confirmed_frauds + (kind == "confirmed_fraud"),
    )


HISTORY_FEATURE_NAMES: tuple[str, ...] = (
    "h_cnt_1h",  # log1p of the decayed transaction counts before this one
    "h_cnt_24h",
    "h_cnt_30d",
    "h_amt_1h",  # log1p of the decayed amount sums
    "h_amt_24h",
    "h_amt_30d",
    "h_amount_z",  # (log1p(amount) - card mean) / card spread, clipped to +-8
    "h_merchants_24h",  # distinct merchants in the 24 h before the transaction
    "h_countries_24h",  # distinct merchant countries in the 24 h before
    "h_country_changed",  # merchant country differs from the previous transaction's
    "h_country_new_30d",  # merchant country not used by the card in the previous 30 d
    "h_log_since_last",  # log1p seconds since the previous transaction
    "h_chargebacks",  # log1p of prior chargebacks on the card
    "h_confirmed_frauds",  # log1p of prior confirmed frauds on the card
    "h_has_history",  # 1 when the card has at least one earlier transaction in the state
)
FRAUD_V2_FEATURE_NAMES: tuple[str, ...] = FAST_FEATURE_NAMES + HISTORY_FEATURE_NAMES
# Degraded rows (no snapshot, or a stale one) and cards without an earlier transaction get all
# zeros: "no activity, nothing unusual", and h_has_history = 0 tells the model these are
# defaults.  Training data contains such rows (every card's first transaction, plus a copy of
# part of the training set with history blanked), so the model falls back to the fast features.
DEFAULT_HISTORY_FEATURES: tuple[float, ...] = (0.0,) * len(HISTORY_FEATURE_NAMES)


def with_default_history(fast: NDArray[np.float32]) -> NDArray[np.float32]:
    """Fast feature rows followed by :data:`DEFAULT_HISTORY_FEATURES` (no snapshot at hand)."""
    defaults = np.broadcast_to(np.asarray(DEFAULT_HISTORY_FEATURES, np.float32),
                               (fast.shape[0], len(DEFAULT_HISTORY_FEATURES)))
    return np.hstack([fast, defaults])

_H = {name: i for i, name in enumerate(HISTORY_FEATURE_NAMES)}
_TAUS = np.asarray(TAUS_S)
# Numeric state pulled into one (rows, fields) matrix per batch by _fresh_features.
_NUMERIC = (
    "last_ts", "cnt_1h", "cnt_24h", "cnt_30d", "amt_1h", "amt_24h", "amt_30d",
    "logamt_sum", "logamt_sq_sum", "chargebacks", "confirmed_frauds", "prev_ts",
    "prev_merchant_seen", "prev_country_seen",
)  # fmt: skip
_S = {name: i for i, name in enumerate(_NUMERIC)}
_STATE = attrgetter(*_NUMERIC)


def history_features(
    histories: Sequence[CardHistory | None],
    txns: Sequence[Mapping[str, Any]],
    *,
    now: float,
    max_staleness_s: float,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Return the ``(n, len(HISTORY_FEATURE_NAMES))`` float32 matrix and the degraded flags.

    Row ``i`` describes card history strictly before ``txns[i]``, decayed to its ``ts``.
    ``histories[i]`` is the snapshot of that card (None if the table has none).  A row is
    degraded, and gets :data:`DEFAULT_HISTORY_FEATURES`, when the snapshot is None or was last
    updated more than ``max_staleness_s`` before ``now`` (pass ``math.inf`` to accept any age).
    A row whose snapshot holds no transaction before this one is degraded too (its features
    are the defaults either way): whether the slow path has already applied a card's first
    transaction when the fast path reads it must not change the flag.
    A snapshot older than the transaction is decayed forward to it; a snapshot newer than the
    transaction cannot be decayed back and is used as it is.  A snapshot whose newest
    transaction *is* this one (same ``event_id``) has it subtracted again; one that holds it
    only as a late, out-of-order event cannot tell and keeps it.

    ``updated_at`` is event time, so ``now - updated_at`` grows both while the slow path lags
    and while the card is simply quiet.  The history of a quiet card is still right, so keep
    ``max_staleness_s`` long (days) and watch slow-path lag through its consumer lag.
    """
    n = len(txns)
    if len(histories) != n:
        raise ValueError(f"got {len(histories)} histories for {n} transactions")
    out = np.zeros((n, len(HISTORY_FEATURE_NAMES)), dtype=np.float32)
    degraded = np.fromiter(
        (h is None or now - h.updated_at > max_staleness_s for h in histories), np.bool_, n
    )
    rows = np.flatnonzero(~degraded)
    if rows.size == n:
        out[:] = _fresh_features([h for h in histories if h is not None], txns)
    elif rows.size:
        picked = [histories[i] for i in rows.tolist()]
        out[rows] = _fresh_features(
            [h for h in picked if h is not None], [txns[i] for i in rows.tolist()]
        )
    degraded[rows] = out[rows, _H["h_has_history"]] == 0.0
    return out, degraded


def _fresh_features(hs: list[CardHistory], txns: Sequence[Mapping[str, Any]]) -> NDArray[Any]:
    m = len(hs)
    st = np.array([_STATE(h) for h in hs], dtype=np.float64).reshape(m, len(_NUMERIC))
    ts = np.array([t["ts"] for t in txns], dtype=np.float64)
    amount = np.array([t["amount"] for t in txns], dtype=np.float64)
    # The slow path may already have applied this very transaction; subtract it again.
    ids = [t.get("event_id") for t in txns]
    incl = np.fromiter(
        (h.last_event_id != "" and h.last_event_id == i for h, i in zip(hs, ids, strict=True)),
        np.bool_,
        m,
    )
    prev_ts = np.where(incl, st[:, _S["prev_ts"]], st[:, _S["last_ts"]])
    has_prior = prev_ts > 0.0
    out = np.zeros((m, len(HISTORY_FEATURE_NAMES)), dtype=np.float64)
    _decayed_columns(out, st, ts, amount, incl)
    day_ago = ts - MERCHANT_WINDOW_S
    fresh_m = incl & (st[:, _S["prev_merchant_seen"]] <= day_ago)
    fresh_c = incl & (st[:, _S["prev_country_seen"]] <= day_ago)
    out[:, _H["h_merchants_24h"]] = _window_counts([h.merchants_seen for h in hs], day_ago)
    out[:, _H["h_merchants_24h"]] -= fresh_m
    out[:, _H["h_countries_24h"]] = _window_counts([h.countries_seen for h in hs], day_ago)
    out[:, _H["h_countries_24h"]] -= fresh_c
    _country_columns(out, hs, txns, incl, ts)
    out[:, _H["h_log_since_last"]] = np.log1p(np.maximum(ts - prev_ts, 0.0))
    out[:, _H["h_has_history"]] = 1.0
    # Without an earlier transaction every transaction-derived column takes its default.
    out[~has_prior, : _H["h_chargebacks"]] = 0.0
    out[~has_prior, _H["h_has_history"]] = 0.0
    out[:, _H["h_chargebacks"]] = np.log1p(st[:, _S["chargebacks"]])
    out[:, _H["h_confirmed_frauds"]] = np.log1p(st[:, _S["confirmed_frauds"]])
    return out


def _decayed_columns(
    out: NDArray[np.float64],
    st: NDArray[np.float64],
    ts: NDArray[np.float64],
    amount: NDArray[np.float64],
    incl: NDArray[np.bool_],
) -> None:
    """Fill the count, amount-sum and z-score columns of ``out`` (state decayed to ``ts``)."""
    decay = np.exp(-np.maximum(ts - st[:, _S["last_ts"]], 0.0)[:, None] / _TAUS)
    own = incl.astype(np.float64)
    x = np.log1p(amount)
    cnt = np.maximum(st[:, _S["cnt_1h"] : _S["cnt_30d"] + 1] * decay - own[:, None], 0.0)
    amt = st[:, _S["amt_1h"] : _S["amt_30d"] + 1] * decay - (own * amount)[:, None]
    out[:, _H["h_cnt_1h"] : _H["h_cnt_30d"] + 1] = np.log1p(cnt)
    out[:, _H["h_amt_1h"] : _H["h_amt_30d"] + 1] = np.log1p(np.maximum(amt, 0.0))
    weight = cnt[:, 2] + PRIOR_WEIGHT
    s1 = st[:, _S["logamt_sum"]] * decay[:, 2] - own * x + PRIOR_WEIGHT * PRIOR_MEAN
    s2 = st[:, _S["logamt_sq_sum"]] * decay[:, 2] - own * x * x
    s2 += PRIOR_WEIGHT * (PRIOR_SD**2 + PRIOR_MEAN**2)
    mean = s1 / weight
    sd = np.sqrt(np.maximum(s2 / weight - mean * mean, MIN_SD**2))
    out[:, _H["h_amount_z"]] = np.clip((x - mean) / sd, -Z_CLIP, Z_CLIP)


def _country_columns(
    out: NDArray[np.float64],
    hs: list[CardHistory],
    txns: Sequence[Mapping[str, Any]],
    incl: NDArray[np.bool_],
    ts: NDArray[np.float64],
) -> None:
    """Fill country-changed and new-country-in-30-d (per-row lookups, no numpy form)."""
    changed = []
    seen = []
    for h, t, own in zip(hs, txns, incl.tolist(), strict=True):
        country = t["country"]
        if own:  # the snapshot already holds this transaction: look at the state before it
            changed.append(country != h.prev_country)
            seen.append(h.prev_country_seen)
        else:
            changed.append(country != h.last_country)
            seen.append(_seen(h, country))
    out[:, _H["h_country_changed"]] = changed
    out[:, _H["h_country_new_30d"]] = np.asarray(seen) <= ts - COUNTRY_WINDOW_S


def _window_counts(seen: list[tuple[float, ...]], since: NDArray[np.float64]) -> NDArray[np.intp]:
    """Per row, how many of its last-seen times are after ``since`` (one flat numpy pass).

    No upper bound: a snapshot newer than the transaction has overwritten last-seen times, so
    an entry seen again later says nothing about whether it was seen before; count it.
    """
    m = len(seen)
    lengths = np.fromiter(map(len, seen), np.intp, m)
    flat = np.fromiter(chain.from_iterable(seen), np.float64, int(lengths.sum()))
    row = np.repeat(np.arange(m), lengths)
    hit = flat > since[row]
    return np.bincount(row[hit], minlength=m)


def _seen(h: CardHistory, country: str) -> float:
    try:
        return h.countries_seen[h.countries.index(country)]
    except ValueError:
        return 0.0
