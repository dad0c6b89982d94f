"""``latency.png``: p50 and p99 latency against offered load (log x), and drain throughput.

Only measured values are drawn; a scenario without a number is left out of its line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.axes import Axes  # noqa: E402

from pipeline.bench.stats import ScenarioResult  # noqa: E402

__all__ = ["plot_results"]


def _latency_panel(ax: Axes, results: list[ScenarioResult], labels: dict[str, str]) -> None:
    for index, (impl, label) in enumerate(labels.items()):
        points = sorted((r.offered_rate or r.target_rate or 0.0, r.latency)
                        for r in results
                        if r.impl == impl and r.latency is not None and r.scenario != "drain")
        if not points:
            continue
        x = [p[0] for p in points]
        ax.plot(x, [p[1].p99_ms for p in points], marker="o", color=f"C{index}",
                label=f"{label} p99")
        ax.plot(x, [p[1].p50_ms for p in points], marker="s", linestyle="--",
                color=f"C{index}", label=f"{label} p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (events/s)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("latency vs offered load")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7)


def _drain_panel(ax: Axes, results: list[ScenarioResult], labels: dict[str, str]) -> None:
    names: list[str] = []
    values: list[float] = []
    colors: list[str] = []
    for index, (impl, label) in enumerate(labels.items()):
        for r in results:
            if r.impl == impl and r.scenario == "drain" and r.achieved_rate is not None:
                names.append(label.replace(" (yardstick)", "\n(yardstick)"))
                values.append(r.achieved_rate)
                colors.append(f"C{index}")
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), names, fontsize=7)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_ylabel("events/s")
    ax.set_title("backlog drain throughput")


def plot_results(results: list[ScenarioResult], labels: dict[str, str], path: Path) -> Path:
    """Draw both panels into ``path`` (PNG)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    try:
        _latency_panel(left, results, labels)
        _drain_panel(right, results, labels)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
