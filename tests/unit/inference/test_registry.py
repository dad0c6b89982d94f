"""Model registry (local folder) selection and the swap slot."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ModelLoadError
from pipeline.inference.registry import ModelRegistry, publish, version_key
from pipeline.inference.serving import ModelFollower, Slot
from pipeline.settings import load_settings

MODELS = Path(__file__).resolve().parents[3] / "models"


def _copy(root: Path, source: str, folder: str, version: str) -> None:
    shutil.copytree(MODELS / source, root / folder)
    card = json.loads((root / folder / "card.json").read_text())
    card["version"] = version
    (root / folder / "card.json").write_text(json.dumps(card))


def test_versions_compare_by_their_numbers() -> None:
    assert sorted(["v10", "v9", "v2", "v1"], key=version_key) == ["v1", "v2", "v9", "v10"]
    assert version_key("2026.11.2") > version_key("2026.9.30")


async def test_local_registry_selects_latest_or_pinned_and_skips_bad_cards(
        tmp_path: Path) -> None:
    _copy(tmp_path, "fraud", "a", "v9")
    _copy(tmp_path, "fraud-v2", "b", "v10")
    _copy(tmp_path, "reco", "c", "v1")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "card.json").write_text("{not json")
    (tmp_path / "no-card").mkdir()
    registry = ModelRegistry(load_settings(), str(tmp_path))
    entries = await registry.entries()
    assert sorted((e.name, e.version) for e in entries) == [
        ("fraud", "v10"), ("fraud", "v9"), ("reco", "v1")]
    latest = await registry.select("fraud")
    assert (latest.version, Path(latest.location).name) == ("v10", "b")
    assert (await registry.select("fraud", "v9")).location.endswith("/a")
    assert await registry.fetch(latest) == tmp_path / "b"
    with pytest.raises(ModelLoadError, match="no model 'fraud' version 'v3'"):
        await registry.select("fraud", "v3")


async def test_follower_offers_a_new_version_once_and_remembers_refusals(
        tmp_path: Path) -> None:
    _copy(tmp_path, "fraud-v2", "v2", "v2")
    settings = load_settings(model_registry=str(tmp_path))
    follower = ModelFollower(settings, "fraud", version="latest", pinned_dir=None)
    assert follower.follows
    assert await follower.initial() == tmp_path / "v2"
    assert await follower.newer() is None
    _copy(tmp_path, "fraud", "v3", "v3")
    found = await follower.newer()
    assert found is not None and found[1] == tmp_path / "v3"
    follower.refuse(found[0], "test")
    assert await follower.newer() is None  # refused: not offered again
    pinned = ModelFollower(settings, "fraud", version="latest", pinned_dir=tmp_path / "v2")
    assert not pinned.follows and await pinned.initial() == tmp_path / "v2"


async def test_slot_replace_waits_until_the_old_value_is_unused() -> None:
    slot: Slot[str] = Slot("old")
    released = asyncio.Event()

    async def call() -> str:
        with slot.use() as value:
            await released.wait()
            return value

    task = asyncio.create_task(call())
    await asyncio.sleep(0)
    replacing = asyncio.create_task(slot.replace("new"))
    await asyncio.sleep(0.01)
    assert slot.value == "new" and not replacing.done()  # new calls get "new" already
    with slot.use() as value:
        assert value == "new"
    released.set()
    assert await task == "old"  # the running call kept its value to the end
    assert await replacing == "old"


async def test_publish_checks_files_and_refuses_duplicates(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    settings = load_settings(model_registry=str(registry))
    where = await publish(settings, MODELS / "fraud", version="v5")
    assert Path(where) == registry / "fraud-v5"
    entry = await ModelRegistry(settings).select("fraud")
    assert entry.version == "v5" and Path(entry.location) == registry / "fraud-v5"
    assert not list(registry.glob(".*partial"))
    with pytest.raises(ModelLoadError, match="already has fraud v5"):
        await publish(settings, MODELS / "fraud", version="v5", folder="other")
    broken = tmp_path / "broken"
    shutil.copytree(MODELS / "fraud", broken)
    (broken / "fraud.int8.onnx").write_bytes(b"not the model")
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        await publish(settings, broken, version="v6")
    assert not (registry / "fraud-v6").exists()
