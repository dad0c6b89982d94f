"""``inferlane models build``: every committed model folder, rebuilt from its seed.

Each builder generates its data, trains, exports FP32 ONNX, quantizes to INT8, measures quality
of both and rows/s per batch size, and writes ``card.json`` + ``CARD.md`` next to the files. The
same seed gives the same data, training and metrics (throughput figures are measured, so they
vary with the machine and its load).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["BUILDS", "ModelBuild", "build_models"]

Progress_ = Callable[[str], None]


@dataclass(frozen=True)
class ModelBuild:
    """One model folder: where it goes, its default seed and how many progress stages it has."""

    name: str
    out: Path
    seed: int
    stages: int
    run: Callable[[Path, int, Progress_], dict[str, Any]]
    summary: Callable[[dict[str, Any]], str]


def _fraud(out: Path, seed: int, say: Progress_) -> dict[str, Any]:
    from pipeline.training.fraud_model import build_fraud_model

    return build_fraud_model(out, seed=seed, progress=say)


def _fraud_v2(out: Path, seed: int, say: Progress_) -> dict[str, Any]:
    from pipeline.training.fraud_history import build_fraud_v2_model

    return build_fraud_v2_model(out, seed=seed, progress=say)


def _reco(out: Path, seed: int, say: Progress_) -> dict[str, Any]:
    from pipeline.training.reco_model import build_reco_model

    return build_reco_model(out, seed=seed, progress=say)


def _auc(card: dict[str, Any]) -> str:
    m = card["metrics"]
    return f"ROC-AUC fp32 {m['fp32']['roc_auc']:.4f} / int8 {m['int8']['roc_auc']:.4f}"


def _targets(card: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v['value']}" for k, v in card.get("targets", {}).items())


BUILDS: dict[str, ModelBuild] = {
    "fraud": ModelBuild("fraud", Path("models/fraud"), 7, 6, _fraud, _auc),
    "fraud-v2": ModelBuild("fraud-v2", Path("models/fraud-v2"), 11, 6, _fraud_v2, _targets),
    "reco": ModelBuild("reco", Path("models/reco"), 5, 4, _reco,
                       lambda card: str(card.get("metrics", {}))),
}


def build_models(names: list[str], console: Console, *, out: Path | None = None,
                 seed: int | None = None) -> dict[str, dict[str, Any]]:
    """Build the named models with a progress bar per model; return their cards."""
    cards = {}
    columns = (SpinnerColumn(), TextColumn("[bold]{task.fields[model]}[/]"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    for name in names:
        build = BUILDS[name]
        target = out or build.out
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("starting", total=build.stages, model=name)

            def say(message: str, _task: Any = task, _progress: Progress = progress) -> None:
                _progress.update(_task, advance=1, description=message)

            cards[name] = build.run(target, build.seed if seed is None else seed, say)
        console.print(f"[green]built[/] {name} -> {target}: {build.summary(cards[name])}")
    return cards
