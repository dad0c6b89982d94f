"""Seeded build of the recommender folder (``models/reco``): ALS embeddings -> ONNX -> INT8.

Lives here: :func:`train_als` (implicit ALS), :func:`build_graph` (lookup, scoring and TopK in
one graph), :func:`build_reco_model` (data, training, INT8 candidates, evaluation of every
served graph through ORT on all users, throughput, card; only throughput depends on the
clock) and ``python -m pipeline.training.reco_model --out models/reco``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from statistics import geometric_mean
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import scipy
import scipy.sparse as sp
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from onnxruntime import quantization as oq

import pipeline.inference.recomodel as api
from pipeline.inference.model import CARD_FILE, session_options
from pipeline.inference.recomodel import CANDIDATES_INPUT, ITEMS_OUTPUT, SCORES_OUTPUT, USER_INPUT
from pipeline.training import reco_data as rd

__all__ = ["build_graph", "build_reco_model", "main", "train_als"]

NAME, VERSION, OPSET, K_MAX = "reco", "v1", 17, 100
DIM, ALPHA, REG, ITERATIONS = 16, 40.0, 10.0, 10
BENCH_BATCHES, BENCH_CANDIDATES, EVAL_K = (1, 8, 32, 128, 512), 100, 10
MAX_RECALL_DROP, BENCH_ROUNDS = 0.01, 7
BENCH_DISTINCT_FEEDS = 32  # feeds cycled per batch size (see _rows_per_s)
# TopK dominates every INT8 variant, so their speed gaps are mostly noise on a shared box;
# speed only disqualifies a candidate that is clearly slower than the fastest one.
SPEED_FLOOR = 0.75
Floats = NDArray[np.float32]
Quantized = dict[str, tuple[bytes, dict[str, Any]]]

_LIMITATIONS = (
    "Synthetic data from a low-rank softmax model; real feedback is not low-rank and drifts.",
    "The graph ranks the whole catalogue including items the user already has; filter them "
    "(k_max leaves room) or pass candidates.  No cold start: unknown users resolve to None.",
    "TopK over the catalogue dominates the cost (about 35-50 us per user at any batch size), so "
    "INT8 buys a ~4x smaller file, not speed.",
    "Throughput numbers are from the build machine and vary between rebuilds; files and "
    "metrics are reproducible from the seed unless a candidate's speed crosses the floor.",
)


def train_als(
    data: rd.RecoData, dim: int = DIM, alpha: float = ALPHA, reg: float = REG,
    iterations: int = ITERATIONS, seed: int = 5,
) -> tuple[Floats, Floats]:
    """Implicit ALS (Hu, Koren, Volinsky 2008) with confidence ``1 + alpha`` on observed pairs.

    Each half-step solves ``(F'F + alpha * sum_i f_i f_i' + reg I) x = (1 + alpha) sum_i f_i``
    exactly for every row; the per-row sums of outer products come from one sparse product
    with the row-wise outer products of the fixed factors, so there is no loop over rows.
    """
    ones = np.ones(len(data.train_items), dtype=np.float32)
    shape = (data.n_users, data.n_items)
    by_user = sp.csr_matrix((ones, data.train_items, data.train_indptr), shape=shape)
    by_item = by_user.T.tocsr()
    items = np.random.default_rng(seed).standard_normal((data.n_items, dim)).astype(np.float32)
    items *= np.float32(0.01)
    users = np.zeros((data.n_users, dim), dtype=np.float32)
    for _ in range(iterations):
        users = _als_half_step(by_user, items, alpha, reg)
        items = _als_half_step(by_item, users, alpha, reg)
    return users, items


def _als_half_step(interactions: Any, fixed: Floats, alpha: float, reg: float) -> Floats:
    dim = fixed.shape[1]
    base = fixed.T @ fixed + np.float32(reg) * np.eye(dim, dtype=np.float32)
    outer = (fixed[:, :, None] * fixed[:, None, :]).reshape(len(fixed), dim * dim)
    out = np.empty((interactions.shape[0], dim), dtype=np.float32)
    for lo in range(0, interactions.shape[0], 20_000):  # bounds the (rows, dim, dim) buffer
        part = interactions[lo : lo + 20_000]
        gram = base + np.float32(alpha) * (part @ outer).reshape(-1, dim, dim)
        rhs = np.float32(1.0 + alpha) * (part @ fixed)
        out[lo : lo + len(rhs)] = np.linalg.solve(gram, rhs[..., None])[..., 0]
    return out


def build_graph(users: Floats, items: Floats) -> onnx.ModelProto:
    """Gather the user row, MatMul against all items, then an If on the candidate count C.

    C = 0: TopK(k_max) over the whole catalogue. C > 0: GatherElements picks the candidates'
    scores from the same score row (pads < 0 score -inf), TopK(min(k_max, C)), and the
    positions map back to candidate ids. One file serves both request kinds, and candidate
    requests skip the expensive full-catalogue TopK because only the taken branch runs.
    """
    full = helper.make_graph(
        [helper.make_node("TopK", ["scores", "k_max"], ["f_scores", "f_items"], axis=1)],
        "full_catalogue", [], [_value("f_items", TensorProto.INT64), _value("f_scores")])
    nodes = [
        helper.make_node("Gather", ["user_embedding", USER_INPUT], ["user_vec"], axis=0),
        helper.make_node("MatMul", ["user_vec", "item_embedding_t"], ["scores"]),
        helper.make_node("Shape", [CANDIDATES_INPUT], ["n_cand"], start=1, end=2),
        helper.make_node("Equal", ["n_cand", "zero_1d"], ["no_candidates"]),
        helper.make_node("If", ["no_candidates"], [ITEMS_OUTPUT, SCORES_OUTPUT],
                         then_branch=full, else_branch=_candidate_branch()),
    ]
    tables: dict[str, NDArray[Any]] = {
        "user_embedding": users.astype(np.float32),
        "item_embedding_t": np.ascontiguousarray(items.T, np.float32),
        "k_max": np.array([K_MAX], np.int64), "zero": np.array(0, np.int64),
        "zero_1d": np.array([0], np.int64), "neg_inf": np.array(-np.inf, np.float32)}
    inits = [numpy_helper.from_array(value, name) for name, value in tables.items()]
    inputs = [helper.make_tensor_value_info(USER_INPUT, TensorProto.INT64, ["batch"]),
              _value(CANDIDATES_INPUT, TensorProto.INT64, "n_candidates")]
    outputs = [_value(ITEMS_OUTPUT, TensorProto.INT64, "k"), _value(SCORES_OUTPUT, dim="k")]
    graph = helper.make_graph(nodes, "reco_topk", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="inferlane")
    model.ir_version = 8  # the IR version that introduced opset 17
    onnx.checker.check_model(model, full_check=True)
    return model


def _candidate_branch() -> onnx.GraphProto:
    # Reads ``scores``, ``candidates`` and ``n_cand`` from the outer graph (ONNX scoping).
    return helper.make_graph([
        helper.make_node("Max", [CANDIDATES_INPUT, "zero"], ["safe"]),
        helper.make_node("GatherElements", ["scores", "safe"], ["raw"], axis=1),
        helper.make_node("Less", [CANDIDATES_INPUT, "zero"], ["pad"]),
        helper.make_node("Where", ["pad", "neg_inf", "raw"], ["masked"]),
        helper.make_node("Min", ["k_max", "n_cand"], ["k_cand"]),
        helper.make_node("TopK", ["masked", "k_cand"], ["c_scores", "pos"], axis=1),
        helper.make_node("GatherElements", [CANDIDATES_INPUT, "pos"], ["c_items"], axis=1),
    ], "candidates", [], [_value("c_items", TensorProto.INT64), _value("c_scores")])


def _value(name: str, dtype: int = TensorProto.FLOAT, dim: str | None = None) -> Any:
    return helper.make_tensor_value_info(name, dtype, ["batch", dim])


def _feed(users: NDArray[np.int64], cands: NDArray[np.int64] | None = None) -> dict[str, Any]:
    cands = np.empty((len(users), 0), dtype=np.int64) if cands is None else cands
    return {USER_INPUT: users, CANDIDATES_INPUT: cands}


class _Calibration(oq.CalibrationDataReader):  # type: ignore[misc]
    """Full-catalogue feeds over a strided user sample for static range calibration."""

    def __init__(self, n_users: int, rows: int = 20_000, batch: int = 1000) -> None:
        users = np.arange(0, n_users, max(1, n_users // rows), dtype=np.int64)
        self._feeds: Iterator[dict[str, Any]] = iter(
            _feed(users[i : i + batch]) for i in range(0, len(users), batch))

    def get_next(self) -> dict[str, Any] | None:
        """Next calibration feed, or None when exhausted."""
        return next(self._feeds, None)


def _quantize(fp32: bytes, n_users: int) -> Quantized:
    """INT8 candidates: dynamic (per-tensor / per-item weights) and static QDQ per-item.

    All quantise Gather (the user table, uint8 per tensor) and MatMul (the item table, int8);
    scores stay float so TopK ranks them at full resolution.
    """
    ops, root = ["Gather", "MatMul"], logging.getLogger()
    out: Quantized = {}
    root.addFilter(_drop_preprocess_hint)
    try:
        with tempfile.TemporaryDirectory(prefix="inferlane-reco-") as tmp:
            src = Path(tmp) / "fp32.onnx"
            src.write_bytes(fp32)
            for per_item in (False, True):
                name = "dynamic_per_item" if per_item else "dynamic"
                oq.quantize_dynamic(src, Path(tmp) / name, op_types_to_quantize=ops,
                                    per_channel=per_item, weight_type=oq.QuantType.QInt8)
                out[name] = (_if_last(Path(tmp) / name), {"weight_type": "QInt8",
                                                          "per_channel": per_item, "ops": ops})
            oq.quantize_static(
                src, Path(tmp) / "qdq", _Calibration(n_users), quant_format=oq.QuantFormat.QDQ,
                op_types_to_quantize=ops, per_channel=True,
                activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
                extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
            out["static_qdq_per_item"] = (_if_last(Path(tmp) / "qdq"), {
                "format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
                "per_channel": True, "calibration": "MinMax", "ops": ops})
    finally:
        root.removeFilter(_drop_preprocess_hint)
    return out


def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    # The quantiser suggests ORT's pre-processing on every call; this graph is already minimal.
    return "pre-processing before quantization" not in record.getMessage()


def _if_last(source: Path | onnx.ModelProto) -> bytes:
    # The quantisers sort nodes by explicit inputs only, so the If (whose branches read
    # ``scores`` from the outer scope) can land before the node producing ``scores``.
    model = onnx.load(source) if isinstance(source, Path) else source
    nodes = sorted(model.graph.node, key=lambda n: n.op_type == "If")  # stable: order kept
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    # Deterministic serialisation: identical graphs give identical bytes and hashes.
    return bytes(model.SerializeToString(deterministic=True))


def _rows_per_s(
    models: dict[str, bytes], data: rd.RecoData, n_cand: int, rounds: int = BENCH_ROUNDS
) -> dict[str, dict[str, int]]:
    """Best-of-``rounds`` single-thread requests/s per model and batch size.

    Rounds interleave the models so a burst of load on the shared machine hits all alike. Each
    call gets other users (a cycle of distinct feeds): timing one input over and over lets the
    CPU's branch predictor learn TopK's comparisons and overstates small batches 2-3x.
    """
    rng = np.random.default_rng(0)
    feeds = {b: [_feed(rng.integers(0, data.n_users, b),
                       rng.integers(0, data.n_items, (b, n_cand)) if n_cand else None)
                 for _ in range(BENCH_DISTINCT_FEEDS)]
             for b in BENCH_BATCHES}
    sessions = {name: ort.InferenceSession(blob, session_options(1),
                                           providers=["CPUExecutionProvider"])
                for name, blob in models.items()}
    best = {name: dict.fromkeys(BENCH_BATCHES, 0.0) for name in models}
    for _ in range(rounds):
        for name, session in sessions.items():
            for size, cycle in feeds.items():
                for feed in cycle[:3]:
                    session.run(None, feed)
                calls, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < 0.1:
                    session.run(None, cycle[calls % len(cycle)])
                    calls += 1
                best[name][size] = max(best[name][size], calls * size / elapsed)
    return {name: {str(b): round(r) for b, r in rates.items()} for name, rates in best.items()}


def _choose(cands: dict[str, dict[str, Any]], fp32_recall: float) -> tuple[str, str]:
    """Pick the INT8 file: eligible by recall and speed, then fidelity to FP32, then size."""
    key, fastest = f"recall@{EVAL_K}", max(c["rows_per_s_geomean"] for c in cands.values())
    eligible = {n: c for n, c in cands.items() if c[key] >= fp32_recall - MAX_RECALL_DROP
                and c["rows_per_s_geomean"] >= SPEED_FLOOR * fastest}
    if not eligible:
        raise RuntimeError(f"no INT8 candidate within {MAX_RECALL_DROP} recall of FP32: {cands}")
    chosen = max(eligible, key=lambda n: (eligible[n][f"top{EVAL_K}_overlap_with_fp32"],
                                          -eligible[n]["bytes"]))
    rule = (f"eligible: {key} >= FP32 - {MAX_RECALL_DROP} and geometric-mean rows/s over "
            f"batches {list(BENCH_BATCHES)} (full catalogue, 1 thread) >= {SPEED_FLOOR:.0%} of "
            f"the fastest candidate; then highest top-{EVAL_K} overlap with FP32, then the "
            "smaller file")
    return chosen, rule


def build_reco_model(
    out_dir: Path, seed: int = 5, n_users: int = 100_000, n_items: int = 10_000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the recommender folder in ``out_dir`` and return the card dict written there."""
    say = progress or (lambda _msg: None)
    if n_items < K_MAX:
        raise ValueError(f"n_items must be >= k_max = {K_MAX}")
    data = rd.generate_reco_data(rd.RecoDataConfig(n_users=n_users, n_items=n_items, seed=seed))
    say(f"generated {len(data.train_items):,} training / {len(data.test_items):,} held-out "
        f"interactions for {n_users:,} users x {n_items:,} items (seed {seed})")
    fp32 = _if_last(build_graph(*train_als(data, seed=seed)))
    quantized = _quantize(fp32, n_users)
    say(f"trained ALS (dim {DIM}), exported FP32 + {len(quantized)} INT8 candidates; evaluating")
    models = {"fp32": fp32, **{name: blob for name, (blob, _) in quantized.items()}}
    oracle = _if_last(build_graph(*rd.oracle_tables(data)))
    results = rd.evaluate_graphs(data, {**models, "oracle": oracle}, K_MAX, EVAL_K)
    say(f"metrics {results}; measuring throughput")
    full = _rows_per_s(models, data, 0)
    cands = {name: {**results.pop(name), "bytes": len(quantized[name][0]),
                    "rows_per_s_geomean": round(geometric_mean(full[name].values()))}
             for name in quantized}
    chosen, rule = _choose(cands, results["fp32"][f"recall@{EVAL_K}"])
    int8 = quantized[chosen][0]
    say(f"int8 = {chosen}; measuring the candidates path")
    keep = (f"recall@{EVAL_K}", f"ndcg@{EVAL_K}", f"top{EVAL_K}_overlap_with_fp32")
    results["int8"] = {key: cands[chosen][key] for key in keep}
    quantization = {"method": chosen, "settings": quantized[chosen][1], "rule": rule,
                    "candidates": cands}
    bench = {"intra_op_threads": 1, "rounds": BENCH_ROUNDS, "n_candidates": BENCH_CANDIDATES,
             "machine": f"{platform.machine()}, {os.cpu_count() or 1} logical CPUs",
             "rows_per_s": {"fp32": full["fp32"], "int8": full[chosen]},
             "candidates_rows_per_s": _rows_per_s({"fp32": fp32, "int8": int8}, data,
                                                  BENCH_CANDIDATES)}
    files = _write_models(out_dir, {"fp32": fp32, "int8": int8})
    card = _card(data, files, results, quantization, bench)
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (out_dir / "CARD.md").write_text(_render_md(card), encoding="utf-8")
    return card


def _write_models(out_dir: Path, blobs: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for precision, blob in blobs.items():
        (out_dir / f"{NAME}.{precision}.onnx").write_bytes(blob)
    return {p: {"path": f"{NAME}.{p}.onnx", "sha256": hashlib.sha256(blob).hexdigest(),
                "bytes": len(blob)} for p, blob in blobs.items()}


def _card(data: rd.RecoData, files: dict[str, Any], results: dict[str, Any],
          quantization: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    cfg, recall = data.config, f"recall@{EVAL_K}"
    metrics = {"protocol": rd.PROTOCOL, "eval_users": data.n_users, **results, "targets": {
        f"int8_{recall}_within_{MAX_RECALL_DROP}_of_fp32":
            results["int8"][recall] >= results["fp32"][recall] - MAX_RECALL_DROP,
        f"fp32_{recall}_over_popularity":
            round(results["fp32"][recall] / results["popularity"][recall], 2)}}
    return {
        "name": NAME, "version": VERSION,
        "description": "Top-k items per user from implicit-ALS embeddings; lookup, scoring "
                       "and TopK run inside one ONNX graph; served INT8.",
        "n_users": cfg.n_users, "n_items": cfg.n_items, "dim": DIM, "k_max": K_MAX,
        "ids": {"user": asdict(api.USER_IDS), "item": asdict(api.ITEM_IDS)},
        "pad_id": api.PAD_ID, "opset": OPSET, "input_names": [USER_INPUT, CANDIDATES_INPUT],
        "output_names": [ITEMS_OUTPUT, SCORES_OUTPUT], "io": api.GRAPH_IO,
        "files": files, "metrics": metrics, "quantization": quantization,
        "graph": {"design": " ".join((build_graph.__doc__ or "").split())},
        "benchmark": bench,
        "training": {"seed": cfg.seed, "data": asdict(cfg), "dim": DIM, "alpha": ALPHA,
                     "reg": REG, "iterations": ITERATIONS,
                     "model": f"implicit ALS, confidence 1 + {ALPHA} on observed pairs, "
                              f"L2 {REG}, {ITERATIONS} alternating exact solves",
                     "n_train_interactions": len(data.train_items),
                     "n_test_interactions": len(data.test_items)},
        "popular_items": rd.popular_items(data, K_MAX),
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                     "numpy": np.__version__, "scipy": scipy.__version__,
                     "python": platform.python_version()},
        "limitations": list(_LIMITATIONS),
        "reproduce": f"python -m pipeline.training.reco_model --out models/{NAME} "
                     f"--seed {cfg.seed} --n-users {cfg.n_users} --n-items {cfg.n_items}",
    }


def _render_md(card: dict[str, Any]) -> str:
    m, t, q, b = card["metrics"], card["training"], card["quantization"], card["benchmark"]
    rows = [f"| {label} | {m[key]['recall@10']:.4f} | {m[key]['ndcg@10']:.4f} |"
            for label, key in (("FP32", "fp32"), (f"INT8 ({q['method']})", "int8"),
                               ("popularity", "popularity"), ("oracle (true logits)", "oracle"))]
    quant = [f"| {n} | {c['recall@10']:.4f} | {c['top10_overlap_with_fp32']:.3f} | "
             f"{c['bytes']:,} | {c['rows_per_s_geomean']:,} |" for n, c in q["candidates"].items()]
    full, sub = b["rows_per_s"], b["candidates_rows_per_s"]
    speed = [f"| {s} | {full['fp32'][s]:,} | {full['int8'][s]:,} | {sub['fp32'][s]:,} | "
             f"{sub['int8'][s]:,} |" for s in full["fp32"]]
    return "\n".join([
        f"# Model card: {card['name']} {card['version']}", "", card["description"], "",
        "## Data", "", f"`pipeline.training.reco_data` with {_pairs(t['data'])}: "
        f"{t['n_train_interactions']:,} training / {t['n_test_interactions']:,} held-out "
        "interactions.", "", "## Model and graph", "",
        f"{t['model']}; dim {t['dim']}. {card['graph']['design']}", "",
        *(f"- `{name}`: {doc}" for name, doc in card["io"].items()), "",
        *(f"- {p}: `{f['path']}`, {f['bytes']:,} bytes, sha256 `{f['sha256']}`"
          for p, f in card["files"].items()), "",
        "## Metrics", "", m["protocol"], "", "| model | recall@10 | NDCG@10 |",
        "|---|---:|---:|", *rows, "", f"Targets: {_pairs(m['targets'])}.", "",
        "## Quantization", "", f"Chosen: **{q['method']}** ({q['rule']}).", "",
        "| candidate | recall@10 | top-10 overlap with FP32 | bytes | geo-mean rows/s |",
        "|---|---:|---:|---:|---:|", *quant, "", "## Throughput", "",
        f"Requests (users)/s, {b['intra_op_threads']} ORT thread, best of {b['rounds']} rounds "
        f"on the build machine ({b['machine']}); candidates path with C = {b['n_candidates']}.",
        "", "| batch | FP32 full | INT8 full | FP32 candidates | INT8 candidates |",
        "|---:|---:|---:|---:|---:|", *speed, "", "## Popular items", "",
        f"`popular_items`: the {len(card['popular_items'])} items with the most training "
        "interactions, most first (the popularity baseline; the recommendation service's last "
        "fallback). Top 10: " + ", ".join(f"{p['item_id']} ({p['interactions']:,})"
                                          for p in card["popular_items"][:10]) + ".",
        "", "## Limitations", "",
        *(f"- {item}" for item in card["limitations"]), "", "## Reproduce", "", "```",
        card["reproduce"], "```", ""])


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} = {value}" for key, value in values.items())


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m pipeline.training.reco_model --out models/reco``."""
    parser = argparse.ArgumentParser(description="Build the recommender model folder.")
    parser.add_argument("--out", type=Path, default=Path(f"models/{NAME}"))
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--n-users", type=int, default=100_000)
    parser.add_argument("--n-items", type=int, default=10_000)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    card = build_reco_model(args.out, args.seed, args.n_users, args.n_items, lambda msg: print(
        f"[build {time.perf_counter() - start:5.1f}s] {msg}", flush=True))
    m = card["metrics"]
    print(f"[build] done in {time.perf_counter() - start:.1f}s: recall@10 fp32 "
          f"{m['fp32']['recall@10']} int8 {m['int8']['recall@10']} popularity "
          f"{m['popularity']['recall@10']} ({card['quantization']['method']})", flush=True)


if __name__ == "__main__":
    main()
