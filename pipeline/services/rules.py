"""The fraud-check service's rules fallback: answers when the model's score is not back in time.

Deliberately simple, explainable and fast (a few µs): each rule that fires adds its weight to a
risk score in [0, 1], and the score maps to a decision with fixed cut-offs. The rules only see
the transaction itself (no card history), so they are much weaker than the model
(docs/services.md quotes both on the same synthetic data); they exist so that a slow or absent
pipeline degrades the decision instead of delaying or failing it.

| rule | fires when | weight |
|---|---|---|
| ``amount_over_1000`` | amount >= 1,000 | 0.25 |
| ``amount_over_5000`` | amount >= 5,000 (on top of the above) | 0.25 |
| ``cross_border`` | merchant country != card country | 0.25 |
| ``risky_mcc`` | MCC 4829 (money transfer), 6051 (quasi-cash), 7995 (gambling) | 0.25 |
| ``foreign_atm`` | ATM withdrawal abroad | 0.15 |
| ``ecom_over_500`` | e-commerce, amount >= 500 | 0.15 |
| ``round_amount`` | not ATM, amount >= 100 and a multiple of 50 | 0.10 |

Decision: ``decline`` at a risk score >= 0.75, ``review`` at >= 0.40, else ``approve``. Amounts
are compared in the transaction's own currency units (no conversion).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RULES_DECLINE", "RULES_REVIEW", "RULES_VERSION", "RulesVerdict", "evaluate"]

RULES_VERSION = "rules-v1"
RULES_REVIEW = 0.40
RULES_DECLINE = 0.75
_RISKY_MCCS = frozenset({4829, 6051, 7995})


@dataclass(frozen=True, slots=True)
class RulesVerdict:
    """Risk score, decision and the names of the rules that fired."""

    score: float
    decision: str
    fired: tuple[str, ...]


def _fired(txn: Mapping[str, Any]) -> list[tuple[str, float]]:
    amount = float(txn["amount"])
    cross_border = txn["country"] != txn["card_country"]
    channel = txn["channel"]
    checks = (
        ("amount_over_1000", amount >= 1000, 0.25),
        ("amount_over_5000", amount >= 5000, 0.25),
        ("cross_border", cross_border, 0.25),
        ("risky_mcc", int(txn["mcc"]) in _RISKY_MCCS, 0.25),
        ("foreign_atm", channel == "atm" and cross_border, 0.15),
        ("ecom_over_500", channel == "ecom" and amount >= 500, 0.15),
        ("round_amount", channel != "atm" and amount >= 100 and amount % 50 == 0, 0.10),
    )
    return [(name, weight) for name, fires, weight in checks if fires]


def evaluate(txn: Mapping[str, Any]) -> RulesVerdict:
    """The rules' verdict on a transaction that passed the :class:`schemas.Transaction` check."""
    fired = _fired(txn)
    score = min(1.0, round(sum(weight for _, weight in fired), 4))
    decision = ("decline" if score >= RULES_DECLINE else
                "review" if score >= RULES_REVIEW else "approve")
    return RulesVerdict(score, decision, tuple(name for name, _ in fired))
