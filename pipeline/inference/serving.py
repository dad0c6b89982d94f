"""Model lifecycle pieces shared by the model lanes: which version to serve, and swapping it.

* :class:`ModelFollower` picks the version a lane serves (a pinned folder, or ``latest`` / a
  pinned version from the :mod:`registry <pipeline.inference.registry>`) and, while the worker runs,
  notices a newer one, has the lane load it and install it (:meth:`ModelFollower.follow`).
  A version that failed to load (sha256 mismatch, bad card, graph rejected) is remembered by
  its card's hash and not retried until it is re-published.
* :class:`Slot` holds what the lane serves with (model, thresholds, batcher). A handler call
  takes the current value once (:meth:`Slot.use`) and uses it for all its rows, so features,
  model and ``model_version`` always agree; :meth:`Slot.replace` installs a fully loaded and
  warmed successor atomically between calls and returns the old one once no call uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Generic, TypeVar

from pipeline.errors import ModelLoadError, SinkError
from pipeline.inference.registry import ModelRegistry, RegistryEntry
from pipeline.metrics import MODEL_LOAD_FAILURES, MODEL_SWAPS
from pipeline.settings import Settings

__all__ = ["ModelFollower", "Slot", "follower_for", "fraud_model_path", "model_path",
           "model_path_now"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelFollower:
    """The model version a lane should serve now, from a pinned folder or the registry."""

    def __init__(self, settings: Settings, name: str, *, version: str,
                 pinned_dir: Path | None) -> None:
        self.settings = settings
        self.name = name
        self.version = version
        self.pinned_dir = pinned_dir
        self.registry = None if pinned_dir is not None else ModelRegistry(settings)
        self.current: RegistryEntry | None = None
        self._refused: set[str] = set()

    @property
    def follows(self) -> bool:
        """True when new versions can appear (registry, ``latest``, polling on)."""
        return (self.registry is not None and self.version == "latest"
                and self.settings.model_poll_interval_s > 0)

    async def initial(self) -> Path:
        """The folder to load at start (ModelLoadError when there is none)."""
        if self.registry is None:
            assert self.pinned_dir is not None  # noqa: S101 - one of the two is set
            return self.pinned_dir
        entry = await self.registry.select(self.name, self.version)
        path = await self.registry.fetch(entry)
        self.current = entry
        return path

    async def newer(self) -> tuple[RegistryEntry, Path] | None:
        """A version to switch to, fetched locally, or None when the served one is still it."""
        if self.registry is None:
            return None
        try:
            entry = await self.registry.select(self.name, self.version)
        except (ModelLoadError, SinkError) as exc:
            log.warning("%s: registry check failed (still serving %s): %s", self.name,
                        self.current.label if self.current else "?", exc)
            return None
        if entry == self.current or entry.card_sha256 in self._refused:
            return None
        try:
            return entry, await self.registry.fetch(entry)
        except (ModelLoadError, SinkError, OSError) as exc:
            self.refuse(entry, str(exc))
            return None

    def refuse(self, entry: RegistryEntry, reason: str) -> None:
        """Never try this publication of a version again (until its card changes)."""
        self._refused.add(entry.card_sha256)
        log.error("%s: refusing model %s from %s: %s; still serving %s", self.name, entry.label,
                  entry.location, reason, self.current.label if self.current else "?")

    def accept(self, entry: RegistryEntry) -> None:
        self.current = entry

    async def follow(self, load: Callable[[Path], Awaitable[T]],
                     install: Callable[[T], Awaitable[None]]) -> None:
        """Run until cancelled: every poll interval, ``load`` a newer version (sha256-checked
        and warmed, off the loop) and ``install`` it; a version that fails to load is refused
        and counted, and the served one stays."""
        while True:
            await asyncio.sleep(self.settings.model_poll_interval_s)
            found = await self.newer()
            if found is None:
                continue
            entry, path = found
            try:
                value = await load(path)
            except ModelLoadError as exc:
                MODEL_LOAD_FAILURES.labels(self.name, self.name).inc()
                self.refuse(entry, str(exc))
                continue
            await install(value)
            self.accept(entry)
            MODEL_SWAPS.labels(self.name, self.name).inc()


class Slot(Generic[T]):
    """The value a lane serves with, replaced atomically between handler calls."""

    def __init__(self, value: T) -> None:
        self._value = value
        self._users: dict[int, int] = {}
        self._idle: dict[int, asyncio.Event] = {}

    @property
    def value(self) -> T:
        return self._value

    @contextlib.contextmanager
    def use(self) -> Iterator[T]:
        """The current value, for the whole of one handler call."""
        value = self._value
        key = id(value)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield value
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                if key in self._idle:
                    self._idle.pop(key).set()

    async def replace(self, value: T) -> T:
        """Install ``value``; return the old one once no call still uses it."""
        old, self._value = self._value, value
        key = id(old)
        if self._users.get(key):
            idle = self._idle.setdefault(key, asyncio.Event())
            await idle.wait()
        return old


def follower_for(settings: Settings, name: str) -> ModelFollower:
    """The follower of model ``name`` per ``INFERLANE_<NAME>_MODEL_VERSION`` / ``_MODEL_DIR``."""
    return ModelFollower(settings, name, version=getattr(settings, f"{name}_model_version"),
                         pinned_dir=getattr(settings, f"{name}_model_dir"))


async def model_path(settings: Settings, name: str) -> Path:
    """The folder of the version of model ``name`` the settings select (fetched if in S3)."""
    return await follower_for(settings, name).initial()


async def fraud_model_path(settings: Settings) -> Path:
    """:func:`model_path` of the fraud model."""
    return await model_path(settings, "fraud")


def model_path_now(settings: Settings, name: str) -> Path:
    """:func:`model_path` for synchronous callers (load generators, benchmarks)."""
    with ThreadPoolExecutor(max_workers=1) as pool:  # its own loop, whatever the caller runs
        return pool.submit(asyncio.run, model_path(settings, name)).result()
