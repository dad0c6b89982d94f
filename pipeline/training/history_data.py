"""Synthetic transaction stream whose fraud needs per-card history, plus its replay.

Lives here:

* :class:`HistoryStreamGenerator` - a seeded, time-ordered stream of transactions and delayed
  fraud labels (:class:`LabelledStream`).  Legitimate traffic comes from
  :class:`pipeline.training.synth.TransactionGenerator` (``fraud_rate=0``) with three kinds of noise
  added: per-card spending levels, trips abroad, habitual foreign web shops, short legitimate
  bursts and occasional big purchases.  Fraud comes in *episodes* on compromised cards (card
  testing then cash-out, cash-out, quiet domestic takeover), bursts minutes apart; half the
  cards are attacked again days later, often after chargebacks arrived.  Per event fraud looks
  only mildly unusual (night, ecom, foreign, risky category), so fast features separate it
  poorly; velocity, amount vs. the card's own scale, new country and prior labels do well.
* :func:`replay` - applies the stream in event-time order to
  :func:`pipeline.features.cardhistory.update_with_transaction` /
  :func:`~pipeline.features.cardhistory.update_with_label` and returns each transaction's card
  snapshot *before* it, exactly what the slow path holds.
* :func:`feature_matrices` - fast + history features, with history and "defaults only".
* :func:`train_test_data` - all of the above, split in time into warm-up, train and test.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.features.cardhistory import (
    FRAUD_V2_FEATURE_NAMES,
    CardHistory,
    history_features,
    update_with_label,
    update_with_transaction,
)
from pipeline.features.fastfeatures import fast_features
from pipeline.training.synth import COUNTRY_CURRENCY, CardProfile, TransactionGenerator

__all__ = [
    "HistoryStreamGenerator",
    "LabelledStream",
    "TrainTestData",
    "feature_matrices",
    "replay",
    "train_test_data",
]

DAY_S = 86_400.0
_FRAUD_COUNTRIES = ("NG", "BR", "RU", "CN", "RO", "US", "GB", "TR", "MX", "TH", "AE")
_TRAVEL_COUNTRIES = ("ES", "FR", "IT", "US", "GB", "DE", "PT", "NL", "AT", "CH", "TR", "TH")
_RISKY_MCCS = (5732, 7995, 4829, 6051, 5967, 5944)
_ECOM_MCCS = (5999, 5691, 4814, 5732, 4511, 7011, 5942, 5411)
_POS_MCCS = (5411, 5812, 5541, 5311, 5912, 5691, 5999, 5814)
_ATM_MCC = 6011

# Episode starts per legitimate event (x1.8 at 00-05 UTC, victims asleep): ~2% fraud.
_EPISODE_P = 0.0033
_NIGHT_MULT = 1.8
_REATTACK_P = 0.5
_REATTACK_MEAN_S = 8 * DAY_S
_FRAUD_FOREIGN_P = 0.4
_CHARGEBACK_P = 0.85
_CONFIRM_P = 0.35
_RECENT_CARDS = 4096
_WEALTH_SD = 0.8  # sd of the per-card log spending level added to synth's amounts
_TRIP_P = 0.003
_BURST_P = 0.03
_BIG_P = 0.01
_FRIENDLY_CHARGEBACK_P = 0.002
_LEGIT_LABEL_P = 0.01


@dataclass(frozen=True)
class LabelledStream:
    """Transactions (time-ordered, with 0/1 fraud truth) and labels (time-ordered by ``ts``)."""

    txns: list[dict[str, Any]]
    is_fraud: NDArray[np.int8]
    labels: list[dict[str, Any]]


@dataclass(frozen=True)
class _Trip:
    country: str
    until: float


class HistoryStreamGenerator:
    """Seeded generator of :class:`LabelledStream` (see the module docstring for the world).

    Scheduled events (fraud bursts, legitimate follow-ups, labels) sit in a heap and are merged
    with the legitimate stream by event time, so the output is strictly time-ordered.
    """

    def __init__(
        self, seed: int, n_cards: int = 4000, start_ts: float = 1.7e9, mean_gap_s: float = 5.0
    ) -> None:
        self._legit = TransactionGenerator(
            seed=seed, fraud_rate=0.0, n_cards=n_cards, start_ts=start_ts, mean_gap_s=mean_gap_s
        )
        # Simulation draws, not secrets; random.Random is ~20x faster per scalar than numpy.
        self._rnd = random.Random(seed)  # noqa: S311
        self._cards: dict[str, CardProfile] = {c.card_id: c for c in self._legit.cards}
        self._heap: list[tuple[float, int, str, dict[str, Any]]] = []
        self._seq = 0
        self._trips: dict[str, _Trip] = {}
        self._recent: list[str] = []
        self._wealth = {c.card_id: self._rnd.gauss(0.0, _WEALTH_SD) for c in self._legit.cards}
        self._abroad = {
            c.card_id: self._rnd.choice([k for k in _TRAVEL_COUNTRIES if k != c.home_country])
            for c in self._legit.cards
        }
        # One generator for the object's lifetime, so consecutive stream() calls continue it.
        self._merged = self._events()

    def stream(self, n_txns: int) -> LabelledStream:
        """Return the next ``n_txns`` transactions and every label dated before the last one."""
        txns: list[dict[str, Any]] = []
        fraud: list[int] = []
        labels: list[dict[str, Any]] = []
        for kind, event in self._merged:
            if kind == "label":
                labels.append(event)
                continue
            is_fraud = int(event.pop("_fraud"))
            txns.append(event)
            fraud.append(is_fraud)
            self._schedule_labels(event, is_fraud)
            if len(txns) == n_txns:
                break
        return LabelledStream(txns, np.asarray(fraud, dtype=np.int8), labels)

    def _events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            txn, _ = self._legit.next()
            while self._heap and self._heap[0][0] <= txn["ts"]:
                _, _, kind, event = heapq.heappop(self._heap)
                yield kind, event
            self._legit_noise(txn)
            self._maybe_start_episode(txn["ts"])
            self._remember(txn["card_id"])
            txn["_fraud"] = 0
            yield "txn", txn

    def _push(self, ts: float, kind: str, event: dict[str, Any]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (ts, self._seq, kind, event))

    def _event_id(self) -> str:
        return self._rnd.getrandbits(128).to_bytes(16, "big").hex()

    def _legit_noise(self, txn: dict[str, Any]) -> None:
        self._legit_place(txn)
        r = self._rnd
        # Per-card spending level on top of synth's: absolute amounts then say little about
        # whether an amount is unusual for *this* card; the card's history does.
        scale = math.exp(self._wealth[txn["card_id"]])
        if r.random() < _BIG_P:  # a flight, a laptop: far above the card's usual spend
            scale *= math.exp(r.uniform(1.0, 2.5))
        _rescale(txn, scale)
        if r.random() < _BURST_P:  # split payments, retries, a shopping street
            ts = txn["ts"]
            for _ in range(r.randint(1, 3)):
                ts += r.expovariate(1.0 / 120.0)
                follow = dict(txn, event_id=self._event_id(), ts=round(ts, 3), _fraud=0)
                follow["amount"] = round(max(0.5, txn["amount"] * math.exp(r.gauss(0.0, 0.5))), 2)
                if r.random() < 0.5:
                    follow["merchant_id"] = txn["merchant_id"][:-3] + f"{r.randrange(40):03d}"
                self._push(ts, "txn", follow)

    def _legit_place(self, txn: dict[str, Any]) -> None:
        """Trips move in-person spend abroad for days; other foreign spend is a habit."""
        r = self._rnd
        card_id = txn["card_id"]
        home = self._cards[card_id].home_country
        trip = self._trips.get(card_id)
        if trip is not None and trip.until < txn["ts"]:
            del self._trips[card_id]
            trip = None
        if trip is None and r.random() < _TRIP_P:
            country = r.choice([c for c in _TRAVEL_COUNTRIES if c != home])
            trip = self._trips[card_id] = _Trip(country, txn["ts"] + r.uniform(2.0, 12.0) * DAY_S)
        if trip is not None and txn["channel"] != "ecom":
            _relocate(txn, trip.country)
        elif txn["country"] != home:  # the same foreign web shop / border town every time
            _relocate(txn, self._abroad[card_id])

    def _remember(self, card_id: str) -> None:
        if len(self._recent) < _RECENT_CARDS:
            self._recent.append(card_id)
        else:
            self._recent[self._rnd.randrange(_RECENT_CARDS)] = card_id

    def _maybe_start_episode(self, ts: float) -> None:
        night = int(ts // 3600) % 24 < 6
        if self._recent and self._rnd.random() < _EPISODE_P * (_NIGHT_MULT if night else 1.0):
            # A card drawn from a reservoir of recent legitimate traffic: busy cards are exposed
            # (and stolen) more often, but the burst is not timed right after the owner's use.
            card = self._cards[self._rnd.choice(self._recent)]
            self._episode(card, ts + self._rnd.expovariate(1.0 / 300.0), first=True)

    def _episode(self, card: CardProfile, start: float, *, first: bool) -> None:
        """Schedule one fraud burst on ``card`` (and maybe a later re-attack)."""
        r = self._rnd
        style = r.choices(("testing", "cashout", "takeover"), weights=(0.2, 0.4, 0.4))[0]
        foreign = style != "takeover" and r.random() < _FRAUD_FOREIGN_P
        country = r.choice(_FRAUD_COUNTRIES) if foreign else card.home_country
        gap = {"testing": 60.0, "cashout": 240.0, "takeover": 600.0}[style]
        ts = start
        ids: list[str] = []
        for channel, mcc, amount in self._episode_shapes(style, card):
            txn = self._make_txn(card, ts, channel, country, mcc, amount)
            ids.append(txn["event_id"])
            self._push(ts, "txn", txn)
            ts += r.expovariate(1.0 / gap)
        if r.random() < _CONFIRM_P:  # the cardholder calls the bank: the whole burst confirmed
            when = ts + r.uniform(2.0 * 3600.0, 3.0 * DAY_S)
            for event_id in ids:
                self._push(when, "label", _label(event_id, card.card_id, "confirmed_fraud", when))
        if first and r.random() < _REATTACK_P:  # leaked card data gets sold on and used again
            self._episode(card, ts + r.expovariate(1.0 / _REATTACK_MEAN_S), first=False)

    def _episode_shapes(self, style: str, card: CardProfile) -> list[tuple[str, int, float]]:
        r = self._rnd
        shapes: list[tuple[str, int, float]] = []
        if style == "takeover":  # home country, ordinary shops, somewhat above usual amounts
            for _ in range(r.randint(3, 7)):
                channel = "ecom" if r.random() < card.ecom_propensity + 0.2 else "pos"
                mcc = r.choice(_ECOM_MCCS if channel == "ecom" else _POS_MCCS)
                amount = math.exp(self._mu(card) + 1.0 + 0.4 * r.gauss(0.0, 1.0))
                shapes.append((channel, mcc, round(amount, 2)))
            return shapes
        if style == "testing":  # small web purchases check that the stolen card works
            for _ in range(r.randint(2, 5)):
                shapes.append(("ecom", r.choice(_ECOM_MCCS), round(r.uniform(1.0, 12.0), 2)))
        if style == "cashout" or r.random() < 0.7:  # most card tests are followed by cash-out
            for _ in range(r.randint(2, 5) if style == "cashout" else r.randint(1, 3)):
                channel = r.choices(("ecom", "pos", "atm"), weights=(0.4, 0.45, 0.15))[0]
                amount = math.exp(self._mu(card) + r.uniform(1.0, 2.2))
                shapes.append((channel, *self._cashout_mcc_amount(channel, amount)))
        return shapes

    def _mu(self, card: CardProfile) -> float:
        return card.amount_mu + self._wealth[card.card_id]

    def _cashout_mcc_amount(self, channel: str, amount: float) -> tuple[int, float]:
        r = self._rnd
        amount = min(amount, 25e3)
        if channel == "atm":
            return _ATM_MCC, float(max(20, 20 * round(amount / 20)))
        if r.random() < 0.25:
            mcc = r.choice(_RISKY_MCCS)
        else:
            mcc = r.choice(_ECOM_MCCS if channel == "ecom" else _POS_MCCS)
        if r.random() < 0.15:  # cash-out scripts like round numbers
            step = 50 if amount > 200 else 10
            return mcc, float(max(step, step * round(amount / step)))
        return mcc, round(amount, 2)

    def _make_txn(
        self, card: CardProfile, ts: float, channel: str, country: str, mcc: int, amount: float
    ) -> dict[str, Any]:
        usd = channel == "ecom" and self._rnd.random() < 0.1
        return {
            "event_id": self._event_id(),
            "card_id": card.card_id,
            "merchant_id": f"m-{country.lower()}-{mcc}-{self._rnd.randrange(40):03d}",
            "amount": amount,
            "currency": "USD" if usd else COUNTRY_CURRENCY[country],
            "mcc": mcc,
            "country": country,
            "card_country": card.home_country,
            "channel": channel,
            "ts": round(ts, 3),
            "_fraud": 1,
        }

    def _schedule_labels(self, txn: dict[str, Any], is_fraud: int) -> None:
        r = self._rnd
        ts = txn["ts"]
        if is_fraud and r.random() < _CHARGEBACK_P:
            kind, when = "chargeback", ts + r.uniform(1.0, 30.0) * DAY_S
        elif not is_fraud and r.random() < _FRIENDLY_CHARGEBACK_P:  # disputes of real purchases
            kind, when = "chargeback", ts + r.uniform(5.0, 45.0) * DAY_S
        elif not is_fraud and r.random() < _LEGIT_LABEL_P:  # reviewed and cleared
            kind, when = "legit", ts + r.uniform(3600.0, 2.0 * DAY_S)
        else:
            return
        self._push(when, "label", _label(txn["event_id"], txn["card_id"], kind, when))


def _label(event_id: str, card_id: str, kind: str, ts: float) -> dict[str, Any]:
    return {"event_id": event_id, "card_id": card_id, "label": kind, "ts": round(ts, 3)}


def _rescale(txn: dict[str, Any], scale: float) -> None:
    amount = min(txn["amount"] * scale, 25e3)
    if txn["channel"] == "atm":
        txn["amount"] = float(max(20, 20 * round(amount / 20)))
    else:
        txn["amount"] = round(max(0.5, amount), 2)


def _relocate(txn: dict[str, Any], country: str) -> None:
    txn["country"] = country
    txn["currency"] = COUNTRY_CURRENCY[country]
    txn["merchant_id"] = f"m-{country.lower()}-{txn['mcc']}-{txn['merchant_id'][-3:]}"


def replay(stream: LabelledStream) -> list[CardHistory | None]:
    """Return, per transaction, its card's history snapshot just before it (None if new).

    Labels dated at or before a transaction are applied first, as the slow path would have.
    """
    history: dict[str, CardHistory] = {}
    snapshots: list[CardHistory | None] = []
    labels = stream.labels
    j = 0
    for txn in stream.txns:
        while j < len(labels) and labels[j]["ts"] <= txn["ts"]:
            card = labels[j]["card_id"]
            history[card] = update_with_label(history.get(card), labels[j])
            j += 1
        card = txn["card_id"]
        before = history.get(card)
        snapshots.append(before)
        history[card] = update_with_transaction(before, txn)
    return snapshots


def feature_matrices(
    txns: list[dict[str, Any]], snapshots: list[CardHistory | None]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Return fast+history features with the replayed history and with defaults only.

    Replayed snapshots are exact as of each transaction, so nothing is stale here; rows of
    cards without any earlier event are degraded in both matrices, as they are when served.
    """
    fast = fast_features(txns)
    hist, _ = history_features(snapshots, txns, now=math.inf, max_staleness_s=math.inf)
    none, _ = history_features([None] * len(txns), txns, now=math.inf, max_staleness_s=math.inf)
    return np.hstack([fast, hist]), np.hstack([fast, none])


@dataclass(frozen=True)
class TrainTestData:
    """Feature matrices split in event time: train rows come before test rows."""

    x_train: NDArray[np.float32]
    y_train: NDArray[np.int8]
    x_test: NDArray[np.float32]
    x_test_defaults: NDArray[np.float32]
    y_test: NDArray[np.int8]
    info: dict[str, Any]


def train_test_data(
    gen: HistoryStreamGenerator,
    *,
    n_warmup: int,
    n_train: int,
    n_test: int,
    defaults_share: float,
    seed: int,
) -> TrainTestData:
    """Generate, replay and featurise ``n_warmup + n_train + n_test`` transactions.

    Warm-up rows only fill the history.  A random ``defaults_share`` of the training rows is
    appended again with history defaults, so the model learns the fast-only fallback it needs
    for degraded rows; the test set comes with both variants for the comparison.
    """
    stream = gen.stream(n_warmup + n_train + n_test)
    x_hist, x_defaults = feature_matrices(stream.txns, replay(stream))
    y = stream.is_fraud
    train, test = slice(n_warmup, n_warmup + n_train), slice(n_warmup + n_train, None)
    blank = np.random.default_rng(seed).random(n_train) < defaults_share
    has_history = FRAUD_V2_FEATURE_NAMES.index("h_has_history")
    start = stream.txns[0]["ts"]
    info = {
        "train_fraud_rate": round(float(y[train].mean()), 6),
        "test_fraud_rate": round(float(y[test].mean()), 6),
        "test_rows_without_history": round(float(1.0 - x_hist[test, has_history].mean()), 6),
        "days": round((stream.txns[-1]["ts"] - start) / DAY_S, 2),
        "test_starts_day": round((stream.txns[test.start]["ts"] - start) / DAY_S, 2),
        "labels": len(stream.labels),
        "defaults_rows_added": int(blank.sum()),
    }
    return TrainTestData(
        x_train=np.vstack([x_hist[train], x_defaults[train][blank]]),
        y_train=np.concatenate([y[train], y[train][blank]]),
        x_test=np.ascontiguousarray(x_hist[test]),
        x_test_defaults=np.ascontiguousarray(x_defaults[test]),
        y_test=y[test],
        info=info,
    )
