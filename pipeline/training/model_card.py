"""Render the human-readable ``CARD.md`` from a model folder's ``card.json`` dict.

Lives here: :func:`render_card_md`.  Every number in the Markdown comes from the card dict,
so the two files cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["render_card_md"]


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _metrics_table(card: Mapping[str, Any]) -> list[str]:
    m = card["metrics"]
    files = card["files"]
    lines = [
        "| | FP32 | INT8 |",
        "|---|---:|---:|",
        f"| ROC-AUC | {m['fp32']['roc_auc']:.4f} | {m['int8']['roc_auc']:.4f} |",
        f"| PR-AUC (average precision) | {m['fp32']['pr_auc']:.4f} | {m['int8']['pr_auc']:.4f} |",
        f"| File | `{files['fp32']['path']}` | `{files['int8']['path']}` |",
        f"| Size (bytes) | {files['fp32']['bytes']:,} | {files['int8']['bytes']:,} |",
        f"| sha256 | `{files['fp32']['sha256']}` | `{files['int8']['sha256']}` |",
    ]
    lines.append("")
    lines.append(
        f"INT8 vs FP32 score difference on the test set: mean "
        f"{m['int8_vs_fp32']['mean_abs_diff']:.2e}, max {m['int8_vs_fp32']['max_abs_diff']:.2e}."
    )
    return lines


def _latency_table(card: Mapping[str, Any]) -> list[str]:
    bench = card["benchmark"]
    rates = bench["rows_per_s"]
    lines = [
        f"Rows/s, single ORT intra-op thread, CPUExecutionProvider, measured at build time on "
        f"the build machine ({bench['machine']}); best of {bench['rounds']} rounds.",
        "",
        "| batch | FP32 rows/s | INT8 rows/s | INT8 / FP32 |",
        "|---:|---:|---:|---:|",
    ]
    for size in rates["fp32"]:
        fp32, int8 = rates["fp32"][size], rates["int8"][size]
        lines.append(f"| {size} | {_fmt_rate(fp32)} | {_fmt_rate(int8)} | {int8 / fp32:.2f} |")
    return lines


def _quantization_section(card: Mapping[str, Any]) -> list[str]:
    q = card["quantization"]
    lines = [f"Chosen method: **{q['method']}** ({q['rule']})", ""]
    lines += ["| candidate | ROC-AUC | rows/s @256 |", "|---|---:|---:|"]
    for name, cand in q["candidates"].items():
        lines.append(f"| {name} | {cand['roc_auc']:.4f} | {_fmt_rate(cand['rows_per_s_b256'])} |")
    return lines


def _threshold_section(card: Mapping[str, Any]) -> list[str]:
    lines = ["| action | score >= | precision | recall | share of traffic flagged |"]
    lines.append("|---|---:|---:|---:|---:|")
    for action, stats in card["threshold_stats"].items():
        lines.append(
            f"| {action} | {card['thresholds'][action]:.4f} | {stats['precision']:.3f} "
            f"| {stats['recall']:.3f} | {stats['flag_rate']:.4f} |"
        )
    lines += ["", card["threshold_rule"]]
    return lines


def render_card_md(card: Mapping[str, Any]) -> str:
    """Return the Markdown model card for ``card`` (the dict written to card.json)."""
    t = card["training"]
    features = ", ".join(f"`{n}`" for n in card["feature_names"])
    lines = [
        f"# Model card: {card['name']} {card['version']}",
        "",
        card["description"],
        "",
        "## Data",
        "",
        f"Synthetic card transactions from `pipeline.training.synth.TransactionGenerator` (seed "
        f"{t['seed']}, {t['n_cards']:,} cards, day-averaged fraud rate {t['fraud_rate']}). "
        f"The first {t['n_train']:,} events train the model, the next {t['n_test']:,} events "
        f"(later in time) are the held-out test set (fraud share "
        f"{card['metrics']['test_fraud_rate']:.4f}).",
        "",
        "## Model",
        "",
        f"{t['model']}; stopped after {t['n_iter']} epochs. {card['graph']['rewrite']} "
        f"Input `{card['input_name']}` float32 [batch, {len(card['feature_names'])}], "
        f"output `{card['output_name']}` float32 [batch, 1] = P(fraud).",
        "",
        f"Features ({len(card['feature_names'])}): {features}.",
        "",
        "## Metrics (held-out test set)",
        "",
        *_metrics_table(card),
        "",
        "## Quantization",
        "",
        *_quantization_section(card),
        "",
        "## Suggested thresholds (INT8 scores)",
        "",
        *_threshold_section(card),
        "",
        "## Throughput",
        "",
        *_latency_table(card),
        "",
        "## Limitations",
        "",
        *(f"- {item}" for item in card["limitations"]),
        "",
        "## Reproduce",
        "",
        "```",
        card["reproduce"],
        "```",
        "",
    ]
    return "\n".join(lines)
