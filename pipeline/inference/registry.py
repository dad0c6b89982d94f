"""The model registry: versioned model folders in a local directory or under an ``s3://`` prefix.

Layout: every folder directly under the registry root that holds a ``card.json`` is one model
version; the card names the model and its version (``fraud`` / ``v2``), the folder name is free
(``models/fraud-v2``, ``s3://bucket/models/fraud-2026-11-22``). Publishing a version = copying
its folder in, card last (a reader that sees the card sees its files; the sha256 in the card is
checked at load anyway, so a half-copied file is refused, not served).

Selecting: ``latest`` = the highest version of a model name (versions compare by their numbers,
``v10`` > ``v9``), or a pinned version string. S3 folders are downloaded to a local cache
(``<state_dir>/registry/``) before loading; loading always goes through
:func:`pipeline.inference.model.verified_session` (sha256 of every file against the card).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError, SinkError
from pipeline.inference.model import CARD_FILE, parse_files
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings

__all__ = ["ModelRegistry", "RegistryEntry", "publish", "version_key"]

log = logging.getLogger(__name__)


def version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Sort key: numeric runs compare as numbers (``v10`` after ``v9``), text as text."""
    return tuple((int(part), "") if part.isdigit() else (-1, part)
                 for part in re.findall(r"\d+|\D+", version))


@dataclass(frozen=True)
class RegistryEntry:
    """One model version found in the registry."""

    name: str
    version: str
    location: str
    """Local folder path, or the S3 key prefix of the folder (ending in ``/``)."""
    card_sha256: str
    """sha256 of the card's bytes: a re-published version with other files is a new entry."""

    @property
    def label(self) -> str:
        return f"{self.name}-{self.version}"


class ModelRegistry:
    """Lists model versions under ``uri`` and makes one available as a local folder."""

    def __init__(self, settings: Settings, uri: str | None = None) -> None:
        self.settings = settings
        self.uri = uri or settings.model_registry
        match = re.fullmatch(r"s3://([^/]+)/?(.*)", self.uri)
        self._bucket: str | None = match.group(1) if match else None
        prefix = match.group(2) if match else ""
        self._prefix = prefix if not prefix or prefix.endswith("/") else f"{prefix}/"
        self._root = None if match else Path(self.uri)

    @property
    def is_s3(self) -> bool:
        return self._bucket is not None

    async def entries(self) -> list[RegistryEntry]:
        """Every readable version (unreadable cards are logged and skipped)."""
        if self._root is not None:
            return await asyncio.to_thread(self._local_entries, self._root)
        return await self._s3_entries()

    async def select(self, name: str, version: str = "latest") -> RegistryEntry:
        """The entry for ``name`` at ``version`` (``latest``: highest); ModelLoadError if none."""
        candidates = [e for e in await self.entries() if e.name == name]
        if version != "latest":
            candidates = [e for e in candidates if e.version == version]
        if not candidates:
            raise ModelLoadError(f"no model {name!r} version {version!r} in registry {self.uri}")
        return max(candidates, key=lambda e: version_key(e.version))

    async def fetch(self, entry: RegistryEntry) -> Path:
        """A local folder holding ``entry``'s card and files (downloaded from S3 if needed)."""
        if self._root is not None:
            return Path(entry.location)
        target = (self.settings.state_dir / "registry" /
                  f"{entry.label}-{entry.card_sha256[:12]}")
        if (target / CARD_FILE).is_file():
            return target
        return await self._download(entry, target)

    # --- local ----------------------------------------------------------------------------
    @staticmethod
    def _local_entries(root: Path) -> list[RegistryEntry]:
        if not root.is_dir():
            raise ModelLoadError(f"model registry {root} is not a directory")
        found = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            card = folder / CARD_FILE
            if not card.is_file():
                continue
            try:
                blob = card.read_bytes()
            except OSError as exc:
                log.warning("registry: cannot read %s: %s", card, exc)
                continue
            entry = _entry(blob, str(folder), str(card))
            if entry is not None:
                found.append(entry)
        return found

    # --- S3 -------------------------------------------------------------------------------
    async def _s3_entries(self) -> list[RegistryEntry]:
        found = []
        async with S3Store(self.settings) as store:
            cards = [key async for key, _ in store.list_objects(self._prefix, bucket=self._bucket)
                     if key.endswith(f"/{CARD_FILE}")
                     and key[len(self._prefix):].count("/") == 1]
            for key in cards:
                blob = await store.get(key, bucket=self._bucket)
                entry = _entry(blob, key[: -len(CARD_FILE)], f"s3://{self._bucket}/{key}")
                if entry is not None:
                    found.append(entry)
        return found

    async def _download(self, entry: RegistryEntry, target: Path) -> Path:
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        async with S3Store(self.settings) as store:
            card_blob = await store.get(entry.location + CARD_FILE, bucket=self._bucket)
            if hashlib.sha256(card_blob).hexdigest() != entry.card_sha256:
                raise ModelLoadError(f"registry: card of {entry.label} changed while fetching")
            files = parse_files(json.loads(card_blob), entry.location + CARD_FILE)
            for model_file in files.values():
                try:
                    body = await store.get(entry.location + model_file.path,
                                           bucket=self._bucket)
                except SinkError as exc:
                    raise ModelLoadError(f"registry: cannot fetch {model_file.path} of "
                                         f"{entry.label}: {exc}") from exc
                destination = partial / model_file.path
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(body)
            # The card goes in last: a folder with a card is complete.
            (partial / CARD_FILE).write_bytes(card_blob)
        partial.rename(target)
        log.info("registry: fetched %s from s3://%s/%s to %s", entry.label, self._bucket,
                 entry.location, target)
        return target


def _entry(blob: bytes, location: str, where: str) -> RegistryEntry | None:
    try:
        raw: Any = json.loads(blob)
        name, version = raw["name"], raw["version"]
        if not isinstance(name, str) or not isinstance(version, str):
            raise TypeError("name and version must be strings")
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("registry: skipping %s: not a usable model card (%s)", where, exc)
        return None
    return RegistryEntry(name, version, location, hashlib.sha256(blob).hexdigest())


async def publish(settings: Settings, source: Path, uri: str | None = None,
                  folder: str | None = None, version: str | None = None) -> str:
    """Copy the model folder ``source`` into the registry, card last; return where it went.

    The card's sha256 entries are checked first, so a broken folder is never published.
    ``version`` replaces the card's version (the files and their hashes stay). The folder name
    defaults to ``<name>-<version>``; an existing folder, or an existing version of the same
    model, is refused.
    """
    from pipeline.inference.model import load_card, verified_bytes

    card = await asyncio.to_thread(load_card, source)
    for entry in card.files.values():  # raises ModelLoadError on a missing or changed file
        await asyncio.to_thread(verified_bytes, source, entry)
    card_blob = (source / CARD_FILE).read_bytes()
    if version is not None:
        raw = json.loads(card_blob)
        raw["version"] = version
        card_blob = (json.dumps(raw, indent=2) + "\n").encode()
    version = version or card.version
    registry = ModelRegistry(settings, uri)
    if any(e.name == card.name and e.version == version for e in await registry.entries()):
        raise ModelLoadError(f"registry {registry.uri} already has {card.name} {version}")
    name = folder or f"{card.name}-{version}"
    files = [source / entry.path for entry in card.files.values()] + [source / "CARD.md"]
    files = [path for path in files if path.is_file()]
    if registry._root is not None:
        target = registry._root / name
        if target.exists():
            raise ModelLoadError(f"registry {registry.uri} already has a folder {name!r}")
        staging = registry._root / f".{name}.partial"
        await asyncio.to_thread(_copy_files, files, source, staging)
        (staging / CARD_FILE).write_bytes(card_blob)
        staging.rename(target)
        return str(target)
    prefix = f"{registry._prefix}{name}/"
    async with S3Store(settings) as store:
        existing = [key async for key, _ in store.list_objects(prefix, bucket=registry._bucket)]
        if existing:
            raise ModelLoadError(f"registry {registry.uri} already has a folder {name!r}")
        for path in files:
            await store.put(prefix + str(path.relative_to(source)), path.read_bytes(),
                            bucket=registry._bucket)
        await store.put(prefix + CARD_FILE, card_blob, bucket=registry._bucket)
    return f"s3://{registry._bucket}/{prefix}"


def _copy_files(files: list[Path], source: Path, staging: Path) -> None:
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    for path in files:
        target = staging / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
