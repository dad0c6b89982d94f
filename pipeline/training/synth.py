"""Seeded synthetic card-transaction generator and deliberately invalid events.

Lives here:

* :class:`TransactionGenerator` - a deterministic (per seed) stream of card transactions in
  the pipeline's wire format plus a fraud label, used by model training, the demo producer,
  benchmarks and tests.
* :data:`INVALID_KINDS`, :func:`make_invalid` and :func:`invalid_reason_field` - raw Kafka
  values that the validator must reject, for dead-letter-queue demos and tests.

The simulated world: every card has a home country, an ecommerce propensity, an activity
weight and a lognormal "typical amount" scale.  The generator's clock advances with
exponential gaps whose rate follows a UTC day curve, so volume is low at night.  Fraud is
more likely at night, comes in short bursts on compromised cards, skews to ecom/ATM, foreign
merchants, risky merchant categories and amounts well above the card's usual scale, but
every one of those signals also occurs in legitimate traffic, so the label is not trivially
separable from the event alone.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

__all__ = [
    "INVALID_KINDS",
    "CardProfile",
    "TransactionGenerator",
    "invalid_reason_field",
    "make_invalid",
]

COUNTRY_CURRENCY: dict[str, str] = {
    "DE": "EUR", "FR": "EUR", "ES": "EUR", "IT": "EUR", "NL": "EUR", "BE": "EUR",
    "IE": "EUR", "PT": "EUR", "AT": "EUR", "GB": "GBP", "US": "USD", "PL": "PLN",
    "SE": "SEK", "CH": "CHF", "NG": "NGN", "BR": "BRL", "RU": "RUB", "CN": "CNY",
    "RO": "RON", "TR": "TRY", "TH": "THB", "AE": "AED", "MX": "MXN",
}  # fmt: skip

_HOME_COUNTRIES: dict[str, float] = {
    "DE": 0.20, "FR": 0.17, "ES": 0.12, "IT": 0.12, "GB": 0.12, "NL": 0.08,
    "US": 0.07, "BE": 0.04, "IE": 0.03, "PT": 0.03, "PL": 0.02,
}  # fmt: skip
# Legitimate cross-border spend: holidays and foreign web shops.
_TRAVEL_COUNTRIES: dict[str, float] = {
    "ES": 0.15, "FR": 0.12, "IT": 0.12, "US": 0.12, "GB": 0.10, "DE": 0.08, "PT": 0.06,
    "NL": 0.05, "AT": 0.05, "CH": 0.05, "TR": 0.04, "TH": 0.03, "AE": 0.02, "MX": 0.01,
}  # fmt: skip
# Where cloned / stolen card data tends to be cashed out.
_FRAUD_COUNTRIES: dict[str, float] = {
    "NG": 0.12, "BR": 0.12, "RU": 0.10, "CN": 0.10, "RO": 0.10, "US": 0.12, "GB": 0.08,
    "TR": 0.08, "MX": 0.06, "TH": 0.06, "AE": 0.06,
}  # fmt: skip

# ISO 18245 merchant category codes with weights per channel.
_POS_MCCS: dict[int, float] = {
    5411: 0.25, 5812: 0.14, 5814: 0.10, 5541: 0.10, 5311: 0.06, 5912: 0.06, 4111: 0.06,
    5691: 0.06, 5999: 0.06, 4121: 0.03, 5732: 0.03, 7011: 0.02, 5942: 0.02, 5944: 0.01,
}  # fmt: skip
_ECOM_MCCS: dict[int, float] = {
    5999: 0.22, 5691: 0.14, 4814: 0.10, 5732: 0.10, 4511: 0.08, 7011: 0.08, 5942: 0.08,
    5411: 0.06, 5812: 0.04, 7995: 0.04, 5967: 0.03, 4829: 0.03,
}  # fmt: skip
_RISKY_MCCS: dict[int, float] = {
    5732: 0.25, 7995: 0.20, 4829: 0.20, 6051: 0.15, 5967: 0.10, 5944: 0.10,
}  # fmt: skip
_ATM_MCC = 6011
# Log-scale shift of the amount by category: taxis are cheap, flights are not.
_MCC_AMOUNT_SHIFT: dict[int, float] = {
    5411: 0.0, 5812: -0.1, 5814: -0.9, 5541: 0.2, 5311: 0.3, 5912: -0.4, 4111: -1.0,
    4121: -0.3, 5691: 0.4, 5999: 0.0, 5732: 1.0, 5944: 1.5, 7011: 1.5, 4511: 2.0,
    4814: 0.0, 5942: -0.3, 7995: 0.2, 4829: 1.0, 6051: 1.0, 5967: 0.0, 6011: 0.8,
}  # fmt: skip

# Relative transaction volume per UTC hour (people sleep, so nights are quiet).
_HOURLY_VOLUME: tuple[float, ...] = (
    0.15, 0.10, 0.08, 0.08, 0.10, 0.20, 0.40, 0.70, 0.90, 1.00, 1.05, 1.10,
    1.20, 1.15, 1.10, 1.10, 1.15, 1.20, 1.10, 1.00, 0.80, 0.60, 0.45, 0.30,
)  # fmt: skip
# Relative fraud propensity per UTC hour: fraudsters favour the hours victims are asleep.
_HOURLY_FRAUD: tuple[float, ...] = (
    3.0, 3.0, 3.0, 3.0, 3.0, 2.5, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0,
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.4, 1.8, 2.2,
)  # fmt: skip

_LEGIT_ATM_RATE = 0.04
_LEGIT_FOREIGN_POS = 0.05
_LEGIT_FOREIGN_ECOM = 0.15
_FRAUD_CHANNELS: dict[str, float] = {"ecom": 0.55, "pos": 0.30, "atm": 0.15}
_FRAUD_FOREIGN = 0.55
_FRAUD_RISKY_MCC = 0.45
_FRAUD_AMOUNT_SHIFT = 1.1
_FRAUD_AMOUNT_SIGMA = 0.9
_FRAUD_BURST_REUSE = 0.5
_MAX_COMPROMISED = 32
_MERCHANTS_PER_CELL = 40
_MAX_AMOUNT = 25_000.0

_BLOCK = 2048  # events' worth of random numbers drawn per numpy call
_U_PER_EVENT = 11
_ID_BYTES = 16


class _Choice:
    """Weighted categorical sampling by inverse CDF on a caller-supplied uniform."""

    def __init__(self, weights: dict[Any, float]) -> None:
        self.values: list[Any] = list(weights)
        total = sum(weights.values())
        self.cum: list[float] = list(itertools.accumulate(w / total for w in weights.values()))

    def pick(self, u: float) -> Any:
        """Return the value whose CDF interval contains ``u`` in [0, 1)."""
        return self.values[min(bisect.bisect_right(self.cum, u), len(self.values) - 1)]


@dataclass(frozen=True)
class CardProfile:
    """Static behaviour of one simulated card (what per-card history features can learn)."""

    card_id: str
    home_country: str
    amount_mu: float
    amount_sigma: float
    ecom_propensity: float


_HOME = _Choice(_HOME_COUNTRIES)
_TRAVEL = _Choice(_TRAVEL_COUNTRIES)
_FRAUD_WHERE = _Choice(_FRAUD_COUNTRIES)
_POS = _Choice(_POS_MCCS)
_ECOM = _Choice(_ECOM_MCCS)
_RISKY = _Choice(_RISKY_MCCS)
_FRAUD_CHANNEL = _Choice(_FRAUD_CHANNELS)


def _hourly_fraud_probability(fraud_rate: float) -> list[float]:
    """Per-UTC-hour fraud probability whose volume-weighted mean equals ``fraud_rate``."""
    volume = sum(_HOURLY_VOLUME)
    mean_mult = sum(v * m for v, m in zip(_HOURLY_VOLUME, _HOURLY_FRAUD, strict=True)) / volume
    return [min(1.0, fraud_rate * m / mean_mult) for m in _HOURLY_FRAUD]


class TransactionGenerator:
    """Deterministic stream of labelled synthetic card transactions.

    ``fraud_rate`` is the day-averaged share of fraudulent events; the instantaneous rate is
    higher at night.  ``mean_gap_s`` is the mean time between events at average daytime
    volume; training uses a large gap so the data spans days and hour-of-day patterns
    appear, while the demo uses a small one.  When ``start_ts`` is None the clock starts at
    the current wall time (the only non-deterministic input).
    """

    def __init__(
        self,
        seed: int = 0,
        fraud_rate: float = 0.02,
        n_cards: int = 5000,
        start_ts: float | None = None,
        *,
        mean_gap_s: float = 0.05,
    ) -> None:
        if not 0.0 <= fraud_rate <= 1.0:
            raise ValueError(f"fraud_rate must be within [0, 1], got {fraud_rate}")
        if n_cards < 1:
            raise ValueError(f"n_cards must be >= 1, got {n_cards}")
        if mean_gap_s <= 0.0:
            raise ValueError(f"mean_gap_s must be > 0, got {mean_gap_s}")
        self._rng = np.random.default_rng(seed)
        self._ts = float(time.time() if start_ts is None else start_ts)
        self._mean_gap_s = mean_gap_s
        self._fraud_by_hour = _hourly_fraud_probability(fraud_rate)
        self.cards: tuple[CardProfile, ...] = self._make_cards(n_cards)
        activity = self._rng.gamma(0.8, 1.0, size=n_cards)
        self._card_cum: list[float] = (np.cumsum(activity) / activity.sum()).tolist()
        self._compromised: list[int] = []
        self._u: list[list[float]] = []
        self._z: list[float] = []
        self._ids: bytes = b""
        self._pos = _BLOCK

    def _make_cards(self, n_cards: int) -> tuple[CardProfile, ...]:
        homes = self._rng.random(n_cards).tolist()
        mus = self._rng.normal(3.3, 0.6, size=n_cards).tolist()
        sigmas = self._rng.uniform(0.45, 0.9, size=n_cards).tolist()
        ecom = self._rng.beta(2.0, 5.0, size=n_cards).tolist()
        return tuple(
            CardProfile(f"card-{i:06d}", _HOME.pick(homes[i]), mus[i], sigmas[i], ecom[i])
            for i in range(n_cards)
        )

    def _refill(self) -> None:
        # One numpy call per block instead of a dozen per event keeps generation ~10 us/event.
        self._u = self._rng.random((_BLOCK, _U_PER_EVENT)).tolist()
        self._z = self._rng.standard_normal(_BLOCK).tolist()
        self._ids = self._rng.bytes(_BLOCK * _ID_BYTES)
        self._pos = 0

    def _advance_clock(self, u: float) -> float:
        hour = int(self._ts // 3600) % 24
        self._ts += -math.log1p(-u) * self._mean_gap_s / _HOURLY_VOLUME[hour]
        return self._ts

    def next(self) -> tuple[dict[str, Any], int]:
        """Return the next ``(transaction, is_fraud)`` pair; the dict is JSON-ready."""
        if self._pos >= _BLOCK:
            self._refill()
        i = self._pos
        self._pos += 1
        u, z = self._u[i], self._z[i]
        event_id = self._ids[i * _ID_BYTES : (i + 1) * _ID_BYTES].hex()
        ts = self._advance_clock(u[0])
        fraud = u[1] < self._fraud_by_hour[int(ts // 3600) % 24]
        card_idx = self._pick_card(u[2], u[3], fraud)
        card = self.cards[card_idx]
        if fraud:
            channel, country, mcc, log_amount = self._fraud_shape(card, u, z)
        else:
            channel, country, mcc, log_amount = self._legit_shape(card, u, z)
        amount = self._amount(log_amount, channel, u[8], fraud)
        txn: dict[str, Any] = {
            "event_id": event_id,
            "card_id": card.card_id,
            "merchant_id": f"m-{country.lower()}-{mcc}-{int(u[10] * _MERCHANTS_PER_CELL):03d}",
            "amount": amount,
            "currency": self._currency(country, channel, u[9]),
            "mcc": mcc,
            "country": country,
            "card_country": card.home_country,
            "channel": channel,
            "ts": round(ts, 3),
        }
        return txn, int(fraud)

    def batch(self, n: int) -> tuple[list[dict[str, Any]], NDArray[np.int8]]:
        """Return ``n`` transactions and their labels; identical to ``n`` calls of next()."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        txns: list[dict[str, Any]] = []
        labels = np.zeros(n, dtype=np.int8)
        for k in range(n):
            txn, labels[k] = self.next()
            txns.append(txn)
        return txns, labels

    def _pick_card(self, u_card: float, u_reuse: float, fraud: bool) -> int:
        if fraud and self._compromised and u_reuse < _FRAUD_BURST_REUSE:
            # Stolen cards are used repeatedly in a short window before they are blocked.
            return self._compromised[int(u_card * len(self._compromised))]
        idx = min(bisect.bisect_right(self._card_cum, u_card), len(self.cards) - 1)
        if fraud:
            self._compromised.append(idx)
            del self._compromised[:-_MAX_COMPROMISED]
        return idx

    @staticmethod
    def _legit_shape(card: CardProfile, u: list[float], z: float) -> tuple[str, str, int, float]:
        if u[4] < _LEGIT_ATM_RATE:
            channel = "atm"
        elif u[4] < _LEGIT_ATM_RATE + card.ecom_propensity:
            channel = "ecom"
        else:
            channel = "pos"
        foreign_p = _LEGIT_FOREIGN_ECOM if channel == "ecom" else _LEGIT_FOREIGN_POS
        country = _TRAVEL.pick(u[6]) if u[5] < foreign_p else card.home_country
        if channel == "atm":
            mcc = _ATM_MCC
        else:
            mcc = int((_ECOM if channel == "ecom" else _POS).pick(u[7]))
        log_amount = card.amount_mu + _MCC_AMOUNT_SHIFT[mcc] + card.amount_sigma * z
        return channel, country, mcc, log_amount

    @staticmethod
    def _fraud_shape(card: CardProfile, u: list[float], z: float) -> tuple[str, str, int, float]:
        channel = str(_FRAUD_CHANNEL.pick(u[4]))
        country = _FRAUD_WHERE.pick(u[6]) if u[5] < _FRAUD_FOREIGN else card.home_country
        if channel == "atm":
            mcc = _ATM_MCC
        elif u[7] < _FRAUD_RISKY_MCC:
            mcc = int(_RISKY.pick(u[7] / _FRAUD_RISKY_MCC))
        else:
            # Reuse the tail of the uniform so the benign pick stays independent of the first.
            tail = (u[7] - _FRAUD_RISKY_MCC) / (1.0 - _FRAUD_RISKY_MCC)
            mcc = int((_ECOM if channel == "ecom" else _POS).pick(tail))
        log_amount = (
            card.amount_mu + _FRAUD_AMOUNT_SHIFT + _MCC_AMOUNT_SHIFT[mcc] + _FRAUD_AMOUNT_SIGMA * z
        )
        return channel, country, mcc, log_amount

    @staticmethod
    def _amount(log_amount: float, channel: str, u_round: float, fraud: bool) -> float:
        amount = min(math.exp(log_amount), _MAX_AMOUNT)
        if channel == "atm":
            return float(max(20, 20 * round(amount / 20)))
        # Card testers and cash-out scripts like round numbers; shoppers rarely pay them.
        if u_round < (0.30 if fraud else 0.03):
            step = 50 if amount > 200 else 10
            return float(max(step, step * round(amount / step)))
        return max(0.5, round(amount, 2))

    @staticmethod
    def _currency(country: str, channel: str, u_cur: float) -> str:
        # Foreign web shops often charge in USD regardless of where they are registered.
        if channel == "ecom" and u_cur < 0.10:
            return "USD"
        return COUNTRY_CURRENCY[country]


INVALID_KINDS: tuple[str, ...] = (
    "not_json",
    "not_object",
    "missing_field",
    "negative_amount",
    "nan_amount",
    "bad_currency",
    "bad_channel",
    "wrong_type",
    "empty_event_id",
)

_REASON_FIELD: dict[str, str] = {
    "not_json": "value",
    "not_object": "value",
    "missing_field": "amount",
    "negative_amount": "amount",
    "nan_amount": "amount",
    "bad_currency": "currency",
    "bad_channel": "channel",
    "wrong_type": "mcc",
    "empty_event_id": "event_id",
}

_NAN_SENTINEL = "__inferlane_nan__"


def invalid_reason_field(kind: str) -> str:
    """Name of the field the validator's rejection reason must mention for ``kind``."""
    try:
        return _REASON_FIELD[kind]
    except KeyError:
        known = ", ".join(INVALID_KINDS)
        raise ValueError(f"unknown invalid kind {kind!r}; expected one of: {known}") from None


def make_invalid(kind: str, rng: np.random.Generator, base: dict[str, Any]) -> bytes:
    """Return raw Kafka value bytes for a deliberately bad variant of ``base``.

    ``base`` is a valid transaction (it is not modified); ``rng`` supplies the garbage for
    ``not_json`` and the magnitude for ``negative_amount``.
    """
    invalid_reason_field(kind)  # rejects unknown kinds with a helpful message
    if kind == "not_json":
        # 0xFF can never start UTF-8 text, so no JSON parser can accept these bytes.
        return b"\xff" + rng.bytes(15) + b"{{not json"
    if kind == "not_object":
        return orjson.dumps(list(base.values()))
    event = dict(base)
    if kind == "missing_field":
        del event["amount"]
    elif kind == "negative_amount":
        event["amount"] = -round(float(rng.uniform(0.01, 500.0)), 2)
    elif kind == "nan_amount":
        # orjson refuses to emit NaN, so splice the bare token in as text.
        event["amount"] = _NAN_SENTINEL
        return orjson.dumps(event).replace(f'"{_NAN_SENTINEL}"'.encode(), b"NaN")
    elif kind == "bad_currency":
        event["currency"] = "EURO"
    elif kind == "bad_channel":
        event["channel"] = "fax"
    elif kind == "wrong_type":
        event["mcc"] = "abc"
    elif kind == "empty_event_id":
        event["event_id"] = ""
    return orjson.dumps(event)
