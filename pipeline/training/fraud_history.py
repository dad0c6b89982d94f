"""Seeded build of the fraud v2 model folder (``models/fraud-v2``): fast + per-card history.

Lives here: :func:`build_fraud_v2_model` and ``python -m pipeline.training.fraud_history``.
Data from :mod:`pipeline.training.history_data`, ``StandardScaler`` + ``MLPClassifier``, the v1
export/quantise/card path; FP32 and INT8 are evaluated with history and with defaults only.

Why (192, 128) hidden units: INT8 pays off only once the hidden x hidden MatMul dominates.
Single-thread INT8/FP32 rows/s at batch 256 on the 2-core build machine (static QDQ):
(32, 16) 0.8-0.9x, (128, 64) 1.3-1.5x, (128, 128) 1.5-1.9x, (192, 128) 1.5-2.1x, (256, 128)
1.8-2.2x.  The K=30 first layer is not faster in INT8 at any width.  (192, 128) is the
narrowest that kept >= 1.5x on a loaded machine; wider models are slower in absolute terms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.features.cardhistory import FRAUD_V2_FEATURE_NAMES, HISTORY_VERSION, TAUS_S
from pipeline.inference.model import CARD_FILE

# The v1 build's helpers (private there) are reused so v1 and v2 cards follow the same rules.
from pipeline.training import fraud_model as v1
from pipeline.training import model_card as v1_md
from pipeline.training import onnx_export
from pipeline.training.history_data import HistoryStreamGenerator, TrainTestData, train_test_data
from pipeline.training.onnx_export import (
    QuantCandidate,
    export_mlp,
    max_abs_diff,
    measure_rows_per_s,
    predict_bytes,
    quantize_candidates,
)

__all__ = ["build_fraud_v2_model", "main"]

NAME = "fraud"
VERSION = "v2"
INPUT_NAME = "features"
OUTPUT_NAME = "p_fraud"
HIDDEN_LAYERS = (192, 128)
_MLP_PARAMS: dict[str, Any] = {
    "hidden_layer_sizes": HIDDEN_LAYERS,
    "activation": "relu",
    "solver": "adam",
    "batch_size": 512,  # 2.5x fewer optimizer steps per epoch than sklearn's 200, same AUC
    "learning_rate_init": 0.002,
    "max_iter": 30,  # early stopping ends training after 10-20 epochs
    "early_stopping": True,
    "n_iter_no_change": 4,
}
START_TS = 1_700_000_000.0
MEAN_GAP_S = 5.0  # ~13k events per simulated day: 250k events span ~19 days
N_CARDS = 4000
N_WARMUP = 30_000  # the first ~2.5 days only fill the history; nothing is trained on them
DEFAULTS_SHARE = 0.3  # share of training rows added again with history blanked
CALIBRATION_ROWS = 20_000
BENCH_BATCHES = (1, 8, 32, 128, 256, 512)
BENCH_ROUNDS = 7
# Rebuilds on the shared machine measured one INT8 graph 10-20% apart: v1's 3% tie band would
# pick among the static variants by noise, so within 10% of the fastest the best AUC wins.
SPEED_TIE = 0.10
MAX_EXPORT_DIFF = 1e-4
TARGET_MIN_AUC = 0.95
TARGET_SPEEDUP_B256 = 1.5
_SETTINGS: dict[str, Any] = {
    "activation_type": "QUInt8",  # U8 activations x S8 weights: the x86 VNNI kernels' pair
    "weight_type": "QInt8",
    "per_channel": False,
    "calibration": "MinMax",
    "quantized_ops": ["Gemm"],
}

_LIMITATIONS = (
    "Trained and tested on synthetic data (pipeline.training.history_data, the test set is "
    "the same simulated world later in time); real fraud differs and drifts. A serving demo.",
    "History features assume the slow path has applied every earlier transaction and label "
    "of the card; rows with a missing or stale snapshot get defaults and score like the "
    "defaults-only row of the metrics.",
    "INT8 pays off at batch >= 128; at batch 1-32 it measured 0.65-1.4x FP32 across builds.",
    "Throughput is from a shared 2-core build machine (best of interleaved rounds, wall "
    "clock) and varies between rebuilds (load average recorded); the INT8 file is the same "
    "for a seed only as long as the candidates' speed ranking is.",
)


def _train(x: NDArray[np.float32], y: NDArray[np.int8], seed: int) -> Pipeline:
    mlp = MLPClassifier(**_MLP_PARAMS, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("mlp", mlp)]).fit(x, y)


def _export_verified(pipe: Pipeline, x_test: NDArray[np.float32]) -> tuple[bytes, float]:
    fp32 = export_mlp(pipe, len(FRAUD_V2_FEATURE_NAMES), INPUT_NAME, OUTPUT_NAME)
    # The graph rewrite must be an exact re-expression of the sklearn model.
    diff = max_abs_diff(predict_bytes(fp32, x_test), pipe.predict_proba(x_test)[:, 1])
    if diff > MAX_EXPORT_DIFF:
        raise RuntimeError(f"ONNX graph disagrees with sklearn by {diff:.3g}")
    return fp32, diff


def _extra_candidates(fp32: bytes, calibration: NDArray[np.float32]) -> list[QuantCandidate]:
    """Variants beyond v1's three: first layer left in FP32, and the QOperator format.

    Keeping the K=30 first Gemm in FP32 avoids quantising the raw features with one scale for
    all columns (flags next to counts up to 32): scores stay within ~0.04 of FP32 instead of
    ~0.5, for a few % of speed.  QOperator loses to QDQ, which ORT fuses into a chain of
    QGemm kernels passing uint8 activations.
    """
    first_gemm = next(n.name for n in onnx.load_from_string(fp32).graph.node if n.op_type == "Gemm")
    variants: dict[str, tuple[QuantFormat, list[str], dict[str, Any]]] = {
        "static_qdq_fp32_first_layer": (
            QuantFormat.QDQ,
            [first_gemm],
            {"OpTypesToExcludeOutputQuantization": ["Gemm"]},
        ),
        "static_qoperator": (QuantFormat.QOperator, [], {}),
    }
    out = []
    with (
        tempfile.TemporaryDirectory(prefix="inferlane-quant-") as tmp,
        onnx_export._no_preprocess_hint(),
    ):
        src = Path(tmp) / "fp32.onnx"
        src.write_bytes(fp32)
        for method, (fmt, exclude, extra) in variants.items():
            dst = Path(tmp) / f"{method}.onnx"
            reader = onnx_export._CalibrationReader(calibration, INPUT_NAME)
            quantize_static(
                src, dst, reader, quant_format=fmt, op_types_to_quantize=["Gemm"],
                nodes_to_exclude=exclude, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra,
            )  # fmt: skip
            settings = _SETTINGS | {"format": fmt.name, "calibration_rows": len(calibration)}
            settings |= {"fp32_nodes": exclude, "extra_options": extra}
            out.append(QuantCandidate(method, onnx_export._canonical(dst), settings))
    return out


def _quantize(
    fp32: bytes, data: TrainTestData, fp32_auc: float
) -> tuple[QuantCandidate, dict[str, Any]]:
    stride = max(1, len(data.x_train) // CALIBRATION_ROWS)
    calibration = np.ascontiguousarray(data.x_train[::stride][:CALIBRATION_ROWS])
    candidates = quantize_candidates(fp32, calibration, INPUT_NAME)
    candidates += _extra_candidates(fp32, calibration)
    y, x = data.y_test, data.x_test
    aucs = {c.method: float(roc_auc_score(y, predict_bytes(c.model, x))) for c in candidates}
    models = {"fp32": fp32} | {c.method: c.model for c in candidates}
    rates = measure_rows_per_s(models, data.x_test, (256,), rounds=BENCH_ROUNDS)
    speed = {name: r[256] for name, r in rates.items()}
    eligible = [speed[c.method] for c in candidates if aucs[c.method] >= fp32_auc - v1.MAX_AUC_DROP]
    fastest = max(eligible, default=0.0)  # v1's chooser then breaks the banded tie by AUC
    banded = {k: fastest if v >= fastest * (1.0 - SPEED_TIE) else v for k, v in speed.items()}
    chosen = v1._choose_int8(candidates, fp32_auc, aucs, banded)
    return chosen, {
        "method": chosen.method,
        "settings": chosen.settings,
        "rule": (
            f"fastest at batch 256 among candidates within {v1.MAX_AUC_DROP} ROC-AUC of FP32; "
            f"speeds within {SPEED_TIE:.0%} count as a tie, broken by higher ROC-AUC"
        ),
        "candidates": {
            c.method: {
                "roc_auc": round(aucs[c.method], 6),
                "rows_per_s_b256": round(speed[c.method]),
                "speedup_vs_fp32_b256": round(speed[c.method] / speed["fp32"], 3),
            }
            for c in candidates
        },
    }


def _metrics(
    data: TrainTestData, fp32: bytes, int8: bytes
) -> tuple[dict[str, Any], NDArray[np.float32]]:
    """Held-out metrics with history and with defaults only; also returns INT8 scores."""
    scores = {
        (precision, inputs): predict_bytes(blob, x)
        for precision, blob in (("fp32", fp32), ("int8", int8))
        for inputs, x in (("history", data.x_test), ("defaults", data.x_test_defaults))
    }
    p_int8 = scores["int8", "history"]
    metrics: dict[str, Any] = v1._metrics(data.y_test, scores["fp32", "history"], p_int8)
    metrics["defaults_only"] = {
        "fp32": v1._scores(data.y_test, scores["fp32", "defaults"]),
        "int8": v1._scores(data.y_test, scores["int8", "defaults"]),
        "note": "same model and test rows, every history feature set to its default",
    }
    metrics["test_rows_without_history"] = data.info["test_rows_without_history"]
    return metrics, p_int8


def _benchmark(fp32: bytes, int8: bytes, x_test: NDArray[np.float32]) -> dict[str, Any]:
    models = {"fp32": fp32, "int8": int8}
    rates = measure_rows_per_s(models, x_test, BENCH_BATCHES, rounds=BENCH_ROUNDS)
    return {
        "intra_op_threads": 1,
        "rounds": BENCH_ROUNDS,
        "machine": f"{platform.machine()}, {os.cpu_count() or 1} logical CPUs",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "rows_per_s": {
            name: {str(size): round(rate) for size, rate in by_size.items()}
            for name, by_size in rates.items()
        },
    }


def _targets(metrics: dict[str, Any], benchmark: dict[str, Any]) -> dict[str, Any]:
    fp32_auc, int8_auc = metrics["fp32"]["roc_auc"], metrics["int8"]["roc_auc"]
    defaults_auc = metrics["defaults_only"]["int8"]["roc_auc"]
    rates = benchmark["rows_per_s"]
    speedup = rates["int8"]["256"] / rates["fp32"]["256"]
    drop, gain = round(fp32_auc - int8_auc, 6), round(int8_auc - defaults_auc, 6)
    targets: dict[str, dict[str, Any]] = {
        "int8_roc_auc_with_history": {"min": TARGET_MIN_AUC, "value": int8_auc},
        "int8_auc_drop_vs_fp32": {"max": v1.MAX_AUC_DROP, "value": drop},
        "int8_auc_gain_over_defaults_only": {"min": 0.0, "value": gain},
        "int8_speedup_b256": {"min": TARGET_SPEEDUP_B256, "value": round(speedup, 3)},
    }
    for t in targets.values():
        t["met"] = t["value"] >= t["min"] if "min" in t else t["value"] <= t["max"]
    return targets


def _training_info(seed: int, pipe: Pipeline, data: TrainTestData, n_train: int) -> dict[str, Any]:
    mlp: MLPClassifier = pipe.named_steps["mlp"]
    params = ", ".join(f"{k}={v!r}" for k, v in _MLP_PARAMS.items())
    return {
        "seed": seed,
        "n_warmup": N_WARMUP,
        "n_train": n_train,
        "n_test": len(data.y_test),
        "rows_fitted": len(data.y_train),
        "defaults_share": DEFAULTS_SHARE,
        "n_cards": N_CARDS,
        "start_ts": START_TS,
        "mean_gap_s": MEAN_GAP_S,
        "model": f"StandardScaler + MLPClassifier({params}, random_state={seed})",
        "n_iter": int(mlp.n_iter_),
        **data.info,
    }


def _card(targets: dict[str, Any], **parts: Any) -> dict[str, Any]:
    """The v1 card (same schema and rules) with the v2 identity, features and extras."""
    card: dict[str, Any] = v1._card(**parts)
    training = parts["training"]
    return card | {
        "version": VERSION,
        "description": (
            "Binary classifier scoring card transactions with P(fraud) from per-event (fast) "
            "features plus per-card history features kept by the slow path "
            "(pipeline.features.cardhistory)."
        ),
        "feature_set": "fast+history",
        "feature_names": list(FRAUD_V2_FEATURE_NAMES),
        "targets": targets,
        "history": {
            "module": "pipeline.features.cardhistory",
            "state_version": HISTORY_VERSION,
            "time_constants_s": list(TAUS_S),
            "defaults": "every history feature 0.0 (h_has_history = 0) when degraded",
        },
        "limitations": list(_LIMITATIONS),
        "reproduce": (
            f"python -m pipeline.training.fraud_history --out models/{NAME}-{VERSION} --seed "
            f"{training['seed']} --n-train {training['n_train']} --n-test {training['n_test']}"
        ),
    }


def _data_md(card: dict[str, Any]) -> str:
    t, m = card["training"], card["metrics"]
    return (
        f"Synthetic stream from `pipeline.training.history_data.HistoryStreamGenerator` (seed "
        f"{t['seed']}, {t['n_cards']:,} cards, {t['days']} simulated days, {t['labels']:,} "
        f"delayed labels), replayed through `pipeline.features.cardhistory` so every transaction "
        f"sees its card's state just before it. The first {t['n_warmup']:,} transactions only "
        f"fill the history; the next {t['n_train']:,} train (plus "
        f"{t['defaults_rows_added']:,} copies with history blanked); the last {t['n_test']:,} "
        f"(from day {t['test_starts_day']}) "
        f"are the held-out test set (fraud share {m['test_fraud_rate']:.4f}; "
        f"{m['test_rows_without_history']:.2%} of its rows have no earlier card history)."
    )


def _history_md(card: dict[str, Any]) -> list[str]:
    m = card["metrics"]
    header = "| | FP32 ROC-AUC | INT8 ROC-AUC | FP32 PR-AUC | INT8 PR-AUC |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for label, src in (("with history", m), ("defaults only", m["defaults_only"])):
        cells = [f"{src[p][k]:.4f}" for k in ("roc_auc", "pr_auc") for p in ("fp32", "int8")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Defaults only: {m['defaults_only']['note']}.", "", "## Targets (issue 4)", ""]
    lines += ["| target | bound | measured | met |", "|---|---:|---:|---|"]
    for name, v in card["targets"].items():
        bound = f">= {v['min']}" if "min" in v else f"<= {v['max']}"
        lines.append(f"| {name} | {bound} | {v['value']} | {'yes' if v['met'] else '**no**'} |")
    return lines


def render_card_md(card: dict[str, Any]) -> str:
    """Markdown card for v2: the v1 sections plus the history comparison and the targets."""
    t, n_features = card["training"], len(card["feature_names"])
    lines = [
        f"# Model card: {card['name']} {card['version']}", "", card["description"], "",
        "## Data", "", _data_md(card), "", "## Model", "",
        f"{t['model']}; stopped after {t['n_iter']} epochs. {card['graph']['rewrite']} Input "
        f"`{card['input_name']}` float32 [batch, {n_features}], output `{card['output_name']}` "
        "float32 [batch, 1] = P(fraud).", "",
        f"Features ({n_features}): " + ", ".join(f"`{n}`" for n in card["feature_names"]) + ".",
        "", "## Metrics (held-out test set, with history)", "", *v1_md._metrics_table(card), "",
        "## With history vs defaults only", "", *_history_md(card), "",
        "## Quantization", "", *v1_md._quantization_section(card), "",
        "## Suggested thresholds (INT8 scores, with history)", "",
        *v1_md._threshold_section(card), "", "## Throughput", "", *v1_md._latency_table(card),
        "", f"Load average (1 min) when measured: {card['benchmark']['load_average_1m']}.", "",
        "## Limitations", "", *(f"- {item}" for item in card["limitations"]), "",
        "## Reproduce", "", "```", card["reproduce"], "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def build_fraud_v2_model(
    out_dir: Path,
    seed: int = 11,
    n_train: int = 150_000,
    n_test: int = 60_000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the fraud v2 folder in ``out_dir`` and return the card dict written there."""
    say = progress or (lambda _msg: None)
    say(f"generating and replaying {N_WARMUP + n_train + n_test:,} transactions (seed {seed})")
    data = train_test_data(
        HistoryStreamGenerator(seed, n_cards=N_CARDS, start_ts=START_TS, mean_gap_s=MEAN_GAP_S),
        n_warmup=N_WARMUP, n_train=n_train, n_test=n_test, defaults_share=DEFAULTS_SHARE,
        seed=seed,
    )  # fmt: skip
    say(f"training StandardScaler + MLPClassifier{HIDDEN_LAYERS} on {len(data.y_train):,} rows")
    pipe = _train(data.x_train, data.y_train, seed)
    say("exporting to ONNX")
    fp32, export_diff = _export_verified(pipe, data.x_test)
    fp32_auc = float(roc_auc_score(data.y_test, predict_bytes(fp32, data.x_test)))
    say("quantising to INT8 (candidates)")
    chosen, quantization = _quantize(fp32, data, fp32_auc)
    metrics, p_int8 = _metrics(data, fp32, chosen.model)
    say("measuring throughput")
    benchmark = _benchmark(fp32, chosen.model, data.x_test)
    card = _card(
        _targets(metrics, benchmark),
        files=v1._write_models(out_dir, fp32, chosen.model),
        metrics=metrics,
        thresholds=v1._thresholds(data.y_test, p_int8),
        quantization=quantization,
        export_diff=export_diff,
        benchmark=benchmark,
        training=_training_info(seed, pipe, data, n_train),
    )
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (out_dir / "CARD.md").write_text(render_card_md(card), encoding="utf-8")
    say(f"wrote {out_dir}")
    return card


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m pipeline.training.fraud_history --out models/fraud-v2``."""
    parser = argparse.ArgumentParser(description="Build the fraud v2 (fast+history) model folder.")
    parser.add_argument("--out", type=Path, default=Path("models/fraud-v2"))
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--n-train", type=int, default=150_000)
    parser.add_argument("--n-test", type=int, default=60_000)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    card = build_fraud_v2_model(
        args.out, args.seed, args.n_train, args.n_test, lambda m: print(f"[build] {m}", flush=True)
    )
    summary = {name: target["value"] for name, target in card["targets"].items()}
    print(f"[build] done in {time.perf_counter() - start:.1f}s: {summary}", flush=True)


if __name__ == "__main__":
    main()
