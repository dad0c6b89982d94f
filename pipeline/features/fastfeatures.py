"""Fast per-event features for the fraud model (hot path, no per-card history).

Lives here: :data:`FAST_FEATURE_NAMES`, the column order the model is trained and served
with, and :func:`fast_features`, which turns a batch of validated wire transactions into a
float32 matrix.  Everything is derived from the event itself, so a batch can be scored without
any state.  Slow per-card history features will be appended as a second name tuple and
function; the model card pins the exact name list, so a model can never be served with
columns it was not trained on.

Cost model: one Python pass per field to pull values out of the dicts (list comprehensions),
then a handful of vectorised numpy operations on the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["FAST_FEATURE_NAMES", "RISKY_MCCS", "fast_features"]

FAST_FEATURE_NAMES: tuple[str, ...] = (
    "log_amount",
    "round_amount",
    "foreign",
    "ch_pos",
    "ch_ecom",
    "ch_atm",
    "risky_mcc",
    "mcc_travel",
    "mcc_telecom_wire",
    "mcc_retail",
    "mcc_financial",
    "mcc_services",
    "hour_sin",
    "hour_cos",
    "is_night",
)

# Categories card schemes and acquirers flag as high-risk: wire transfer, electronics,
# direct marketing, quasi-cash (crypto, money orders), jewellery, gambling.
RISKY_MCCS: frozenset[int] = frozenset({4829, 5732, 5944, 5967, 6051, 7995})

_COL = {name: i for i, name in enumerate(FAST_FEATURE_NAMES)}
_CHANNEL_COL = {"pos": _COL["ch_pos"], "ecom": _COL["ch_ecom"], "atm": _COL["ch_atm"]}
# (first MCC of the range, column); ranges follow ISO 18245's top-level groupings.
_MCC_GROUPS: tuple[tuple[int, int], ...] = (
    (3000, _COL["mcc_travel"]),  # airlines, car rental, hotels chains, transport
    (4800, _COL["mcc_telecom_wire"]),  # telecom, utilities, money transfer
    (5000, _COL["mcc_retail"]),
    (6000, _COL["mcc_financial"]),  # ATM cash, quasi-cash
    (7000, _COL["mcc_services"]),  # hotels, entertainment, gambling, professional services
)
_NIGHT_END_S = 6 * 3600  # 00:00-05:59 UTC
_DAY_S = 86400.0


def _lookup_tables() -> tuple[NDArray[np.bool_], NDArray[np.intp]]:
    # Tables indexed by MCC turn set membership and range bucketing into a single gather.
    risky = np.zeros(10_000, dtype=np.bool_)
    risky[sorted(RISKY_MCCS)] = True
    # MCCs below 3000 belong to no group; they get an out-of-range column and are dropped.
    group_col = np.full(10_000, len(FAST_FEATURE_NAMES), dtype=np.intp)
    for start, col in _MCC_GROUPS:
        group_col[start:] = col
    return risky, group_col


_RISKY_LUT, _GROUP_COL_LUT = _lookup_tables()


def fast_features(txns: Sequence[Mapping[str, Any]]) -> NDArray[np.float32]:
    """Return the ``(len(txns), len(FAST_FEATURE_NAMES))`` float32 feature matrix.

    ``txns`` must already be validated wire dicts (numeric ``amount``/``ts``, int ``mcc``).
    Unknown channels leave all channel columns at zero rather than raising.
    """
    n = len(txns)
    n_cols = len(FAST_FEATURE_NAMES)
    if n == 0:
        return np.zeros((0, n_cols), dtype=np.float32)
    amount = np.array([t["amount"] for t in txns], dtype=np.float64)
    ts = np.array([t["ts"] for t in txns], dtype=np.float64)
    mcc = np.array([t["mcc"] for t in txns], dtype=np.intp)
    foreign = [t["country"] != t["card_country"] for t in txns]
    channel_col = [_CHANNEL_COL.get(t["channel"], n_cols) for t in txns]

    # One spare column absorbs scatter writes for "no such group/channel".
    out = np.zeros((n, n_cols + 1), dtype=np.float32)
    rows = np.arange(n)
    out[:, _COL["log_amount"]] = np.log1p(amount)
    cents = np.rint(amount * 100.0)
    out[:, _COL["round_amount"]] = (cents % 1000.0 == 0.0) & (cents > 0.0)
    out[:, _COL["foreign"]] = foreign
    out[rows, channel_col] = 1.0
    np.clip(mcc, 0, 9999, out=mcc)
    out[:, _COL["risky_mcc"]] = _RISKY_LUT[mcc]
    out[rows, _GROUP_COL_LUT[mcc]] = 1.0
    second_of_day = np.mod(ts, _DAY_S)
    angle = second_of_day * (2.0 * math.pi / _DAY_S)
    out[:, _COL["hour_sin"]] = np.sin(angle)
    out[:, _COL["hour_cos"]] = np.cos(angle)
    out[:, _COL["is_night"]] = second_of_day < _NIGHT_END_S
    # ORT wants C-contiguous input; copying 60 bytes/row is cheaper than masking scatters.
    return np.ascontiguousarray(out[:, :n_cols])
