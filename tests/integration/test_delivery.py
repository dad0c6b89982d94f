"""Delivery under failure: a poisoned batch still scores its good records.

Scale-out (a revoke) and scale-in (a SIGTERM hand-over) without any event scored twice are in
test_group_membership.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper

from pipeline.dev.processes import WorkerProcess
from pipeline.features.fastfeatures import FAST_FEATURE_NAMES
from pipeline.inference.model import load_card
from pipeline.kafka.connection import make_producer
from pipeline.training.synth import TransactionGenerator
from tests.integration.conftest import REPO, EnvFactory, ready_settings
from tests.integration.test_fraud_lane import _read_all, _readers

WorkerFactory = Callable[..., WorkerProcess]
_POISON_AMOUNT = 5_000_000.0  # log1p(amount) = 15.4: past the model's lookup table


def _poisoned_model_dir(tmp: Path) -> Path:
    """A real ONNX model that fails at run time on rows with a huge amount.

    It looks column 0 (log1p(amount)) up in a 15-entry table with Gather: onnxruntime raises
    "indices element out of data bounds" for log amounts >= 15, for the whole batch.
    """
    table = helper.make_tensor("table", TensorProto.FLOAT, [15], np.linspace(0.05, 0.95, 15))
    nodes = [
        helper.make_node("Constant", [], ["starts"], value=helper.make_tensor(
            "s", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["ends"], value=helper.make_tensor(
            "e", TensorProto.INT64, [1], [1])),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor(
            "a", TensorProto.INT64, [1], [1])),
        helper.make_node("Slice", ["features", "starts", "ends", "axes"], ["log_amount"]),
        helper.make_node("Cast", ["log_amount"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["p_fraud"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "poison",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                       ["batch", len(FAST_FEATURE_NAMES)])],
        [helper.make_tensor_value_info("p_fraud", TensorProto.FLOAT, ["batch", 1])],
        initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    blob = model.SerializeToString()
    onnx.checker.check_model(model)
    target = tmp / "poison-model"
    target.mkdir()
    card = json.loads((REPO / "models" / "fraud" / "card.json").read_text())
    entry = {"path": "poison.onnx", "sha256": hashlib.sha256(blob).hexdigest(),
             "bytes": len(blob)}
    card["version"] = "poison"
    card["files"] = {"fp32": entry, "int8": entry}
    (target / "poison.onnx").write_bytes(blob)
    (target / "card.json").write_text(json.dumps(card))
    assert load_card(target).files["int8"].sha256 == entry["sha256"]
    return target


async def test_poisoned_batch_scores_its_good_records(
    test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    env = test_env(lanes="fraud", fraud_model_dir=str(_poisoned_model_dir(tmp_path)))
    settings = await ready_settings(env)
    worker_factory(env)
    generator = TransactionGenerator(seed=9)
    events = [generator.next()[0] for _ in range(400)]
    poison = {events[i]["event_id"] for i in (7, 150, 333)}
    for event in events:
        if event["event_id"] in poison:
            event["amount"] = _POISON_AMOUNT
    scores, dlq = await _readers(settings)
    producer = make_producer(settings)
    async with scores, dlq:
        await producer.start()
        try:
            # One produce call, so the worker fetches them together: poisoned batches.
            await asyncio.gather(*[
                await producer.send(settings.topic("fraud.requests"), orjson.dumps(e),
                                    key=e["card_id"].encode()) for e in events])
        finally:
            await producer.stop()
        good = {e["event_id"] for e in events} - poison
        assert not await scores.wait_for(good, timeout_s=30)
        assert await dlq.wait_for_count(len(poison), timeout_s=30) == len(poison)
    assert set(scores.results) == good, "every good record is scored, no poisoned one"
    letters = [orjson.loads(v) for _, v in await _read_all(settings,
                                                          settings.topic("fraud.requests.dlq"))]
    assert {orjson.loads(letter["raw"])["event_id"] for letter in letters} == poison
    assert all(letter["error"] == "inference" for letter in letters)
    assert all("model failed on this record" in letter["reason"] for letter in letters)
