"""ONNX model runtime: model cards and the verified, thread-safe scorer.

Lives here:

* :class:`ModelFile` / :class:`ModelCard` and :func:`load_card` - the parsed ``card.json`` of a
  model folder (what was trained, on which features, file hashes, metrics, thresholds).
* :func:`session_options` - the ONNX Runtime settings used for serving and benchmarking.
* :class:`OnnxScorer` - loads one precision of a model after checking its sha256 and feature
  list against the card, and turns a float32 feature matrix into P(fraud) per row.

All load-time problems surface as :class:`pipeline.errors.ModelLoadError`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from pipeline.errors import ModelLoadError
from pipeline.features.cardhistory import (
    FRAUD_V2_FEATURE_NAMES,
    HISTORY_FEATURE_NAMES,
    with_default_history,
)
from pipeline.features.fastfeatures import FAST_FEATURE_NAMES

__all__ = [
    "CARD_FILE",
    "ORT_ERRORS",
    "ModelCard",
    "ModelFile",
    "OnnxScorer",
    "Precision",
    "SERVED_FEATURE_SETS",
    "load_card",
    "parse_files",
    "read_card_json",
    "require_field",
    "session_options",
    "verified_bytes",
    "verified_session",
]

CARD_FILE = "card.json"
Precision = Literal["int8", "fp32"]

# ORT's Python exceptions derive straight from Exception; list them instead of catching it.
ORT_ERRORS: tuple[type[Exception], ...] = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)


@dataclass(frozen=True)
class ModelFile:
    """One ONNX file of a model: path relative to the model folder, sha256 hex, size."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelCard:
    """The parsed ``card.json`` of a model folder; ``raw`` keeps every field as written."""

    name: str
    version: str
    feature_names: tuple[str, ...]
    input_name: str
    output_name: str
    files: Mapping[str, ModelFile]
    metrics: Mapping[str, Any]
    thresholds: Mapping[str, float]
    quantization: Mapping[str, Any]
    raw: Mapping[str, Any]


def require_field(raw: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """``raw[key]`` if it is a ``kind`` (bools are not ints), else :class:`ModelLoadError`."""
    value = raw.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelLoadError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def parse_files(raw: Mapping[str, Any], where: str) -> dict[str, ModelFile]:
    """The ``files`` section of a card: precision -> :class:`ModelFile`."""
    files: dict[str, ModelFile] = {}
    for precision, entry in require_field(raw, "files", dict, where).items():
        if not isinstance(entry, dict):
            raise ModelLoadError(f"{where}: files.{precision} must be an object")
        sub = f"{where} files.{precision}"
        files[str(precision)] = ModelFile(
            path=require_field(entry, "path", str, sub),
            sha256=require_field(entry, "sha256", str, sub).lower(),
            bytes=require_field(entry, "bytes", int, sub),
        )
    return files


def read_card_json(model_dir: Path) -> tuple[dict[str, Any], str]:
    """``model_dir/card.json`` as a dict, and its path for messages; ModelLoadError if bad."""
    where = str(model_dir / CARD_FILE)
    try:
        raw = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read model card {where}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: top level must be a JSON object")
    return raw, where


def load_card(model_dir: Path) -> ModelCard:
    """Read and validate ``model_dir/card.json``; raise ModelLoadError if unusable."""
    raw, where = read_card_json(model_dir)
    names = require_field(raw, "feature_names", list, where)
    if not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"{where}: feature_names must be a list of strings")
    thresholds = raw.get("thresholds", {})
    if not isinstance(thresholds, dict) or not all(
        isinstance(v, int | float) for v in thresholds.values()
    ):
        raise ModelLoadError(f"{where}: thresholds must map names to numbers")
    return ModelCard(
        name=require_field(raw, "name", str, where),
        version=require_field(raw, "version", str, where),
        feature_names=tuple(names),
        input_name=require_field(raw, "input_name", str, where),
        output_name=require_field(raw, "output_name", str, where),
        files=parse_files(raw, where),
        metrics=raw.get("metrics", {}),
        thresholds={str(k): float(v) for k, v in thresholds.items()},
        quantization=raw.get("quantization", {}),
        raw=raw,
    )


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """ORT options for serving: fixed thread counts, all graph optimisations on."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    # Batches arrive one at a time per session; parallel branches do not exist in this graph.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def verified_bytes(model_dir: Path, entry: ModelFile) -> bytes:
    """The file's bytes, after checking their sha256 against the card."""
    path = model_dir / entry.path
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc
    actual = hashlib.sha256(blob).hexdigest()
    if actual != entry.sha256:
        raise ModelLoadError(
            f"sha256 mismatch for {path}: card expects {entry.sha256}, file has {actual}"
        )
    return blob


#: Feature layouts this runtime can compute: fast only (v1), fast + slow-path history (v2).
SERVED_FEATURE_SETS: tuple[tuple[str, ...], ...] = (FAST_FEATURE_NAMES, FRAUD_V2_FEATURE_NAMES)


class OnnxScorer:
    """A loaded, verified model that maps feature rows (fast, or fast + history) to P(fraud).

    Build it with :meth:`load`.  :meth:`predict` keeps no per-call Python state and ORT's
    ``run`` is thread-safe, so one scorer may be shared by a thread pool.
    """

    def __init__(self, card: ModelCard, precision: Precision, session: ort.InferenceSession):
        """Wrap an already-created session; prefer :meth:`load`, which verifies the files."""
        self._card = card
        self._precision: Precision = precision
        self._session = session
        self._input_name = card.input_name
        self._output_names = [card.output_name]
        self._n_features = len(card.feature_names)

    @classmethod
    def load(
        cls, model_dir: Path, precision: Precision = "int8", intra_op_threads: int = 1
    ) -> OnnxScorer:
        """Load ``precision`` from ``model_dir`` after checking hash, features and graph I/O."""
        card = load_card(model_dir)
        if card.feature_names not in SERVED_FEATURE_SETS:
            raise ModelLoadError(
                f"model {card.name}-{card.version} expects features {list(card.feature_names)}"
                f" but this runtime computes {list(FAST_FEATURE_NAMES)}, optionally followed"
                f" by {list(HISTORY_FEATURE_NAMES)}"
            )
        entry, session = verified_session(model_dir, card.files, precision, intra_op_threads)
        _check_io(session, card, model_dir / entry.path)
        return cls(card, precision, session)

    @property
    def card(self) -> ModelCard:
        """The model card the scorer was loaded from."""
        return self._card

    @property
    def precision(self) -> Precision:
        """Which file of the card is being served ("int8" or "fp32")."""
        return self._precision

    @property
    def version(self) -> str:
        """Model identity for logs and scored events, e.g. ``fraud-v1-int8``."""
        return f"{self._card.name}-{self._card.version}-{self._precision}"

    @property
    def uses_history(self) -> bool:
        """True when the model reads slow-path history features after the fast ones."""
        return self._n_features == len(FRAUD_V2_FEATURE_NAMES)

    def predict_fast(self, fast: NDArray[np.float32]) -> NDArray[np.float32]:
        """P(fraud) from fast features alone: a history model gets default history (degraded).

        For callers without a history snapshot (batch backfills, yardstick benchmarks); their
        results must carry ``degraded = scorer.uses_history``.
        """
        return self.predict(with_default_history(fast) if self.uses_history else fast)

    def predict(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        """Return P(fraud) per row, shape ``(n,)``, for a ``(n, n_features)`` matrix."""
        if features.ndim != 2 or features.shape[1] != self._n_features:
            raise ValueError(
                f"features must have shape (n, {self._n_features}), got {features.shape}"
            )
        if features.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        x = np.ascontiguousarray(features, dtype=np.float32)
        (scores,) = self._session.run(self._output_names, {self._input_name: x})
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    def warm_up(self, batch_sizes: Sequence[int] = (1, 8, 32, 128, 256)) -> float:
        """Run each batch size a few times so first real requests skip lazy init; seconds."""
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for size in batch_sizes:
            x = rng.standard_normal((size, self._n_features)).astype(np.float32)
            for _ in range(3):
                self.predict(x)
        return time.perf_counter() - start

    def batch_seconds(self, rows: int, repeats: int = 25) -> float:
        """Median wall time of one ``predict`` over ``rows`` rows (after warm-up)."""
        x = np.random.default_rng(1).standard_normal((rows, self._n_features)).astype(np.float32)
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.predict(x)
            timings.append(time.perf_counter() - start)
        return float(np.median(timings))


def verified_session(model_dir: Path, files: Mapping[str, ModelFile], precision: Precision,
                     intra_op_threads: int) -> tuple[ModelFile, ort.InferenceSession]:
    """The card's ``precision`` file as an ORT session, built from sha256-checked bytes."""
    entry = files.get(precision)
    if entry is None:
        raise ModelLoadError(f"card in {model_dir} lists no {precision!r} file")
    blob = verified_bytes(model_dir, entry)
    try:
        # Build from the hashed bytes so the file cannot change between check and load.
        session = ort.InferenceSession(
            blob, session_options(intra_op_threads), providers=["CPUExecutionProvider"]
        )
    except ORT_ERRORS as exc:
        raise ModelLoadError(f"onnxruntime rejected {model_dir / entry.path}: {exc}") from exc
    return entry, session


def _check_io(session: ort.InferenceSession, card: ModelCard, path: Path) -> None:
    inputs = session.get_inputs()
    outputs = {o.name for o in session.get_outputs()}
    if len(inputs) != 1 or inputs[0].name != card.input_name:
        found = [i.name for i in inputs]
        raise ModelLoadError(f"{path}: expected single input {card.input_name!r}, found {found}")
    width = inputs[0].shape[-1] if inputs[0].shape else None
    if width != len(card.feature_names):
        raise ModelLoadError(
            f"{path}: input width {width} != {len(card.feature_names)} card features"
        )
    if card.output_name not in outputs:
        raise ModelLoadError(f"{path}: output {card.output_name!r} not in {sorted(outputs)}")
