"""The systems under test: what each implementation runs, with which environment, and a
process handle that starts one, tells when it reported ready, and always stops it.

* ``a`` - inferlane's fraud lane: the real ``faust -A agents worker``, ``INFERLANE_LANES=fraud``;
* ``b`` - yardstick: a naive faust agent (:mod:`pipeline.bench.naive_faust`);
* ``c`` - yardstick: a bare aiokafka loop (:mod:`pipeline.bench.bare_loop`).

Every run of an implementation gets its own topic prefix, app id (so consumer groups) and log.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StackError
from pipeline.settings import Settings, load_settings

__all__ = ["BARE_READY_MARK", "IMPLS", "FAUST_READY_MARK", "ImplSpec", "SutProcess",
           "impl_env", "parse_logged_stats", "settings_for"]

FAUST_READY_MARK = "[^Worker]: Ready"
BARE_READY_MARK = "bare_loop: ready"


@dataclass(frozen=True)
class ImplSpec:
    """One implementation: short key, label for the report, command line, ready log mark."""

    key: str
    label: str
    argv: tuple[str, ...]
    ready_mark: str
    yardstick: bool


def _faust(app_module: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "faust", "-A", app_module, "worker", "-l", "info",
            "--without-web")


IMPLS: dict[str, ImplSpec] = {
    "a": ImplSpec("a", "inferlane fraud lane", _faust("agents"), FAUST_READY_MARK, False),
    "b": ImplSpec("b", "naive faust agent (yardstick)", _faust("pipeline.bench.naive_faust"),
                  FAUST_READY_MARK, True),
    "c": ImplSpec("c", "bare aiokafka loop (yardstick)",
                  (sys.executable, "-m", "pipeline.bench.bare_loop"), BARE_READY_MARK, True),
}


def impl_env(base: dict[str, str], *, tag: str, impl: str, phase: str,
             state_dir: Path) -> dict[str, str]:
    """``INFERLANE_*`` variables of one run: own prefix, app id (groups) and state dir."""
    run = f"{impl}-{phase}"
    return {
        **base,
        "INFERLANE_TOPIC_PREFIX": f"bench{tag}.{run}.",
        "INFERLANE_APP_ID": f"bench{tag}-{run}",
        "INFERLANE_WORKER_ID": "bench",
        "INFERLANE_LANES": "fraud",
        "INFERLANE_WEB_ENABLED": "false",
        "INFERLANE_STATE_DIR": str(state_dir / run),
    }


def settings_for(env: dict[str, str]) -> Settings:
    """The :class:`Settings` the child processes will build from ``env``."""
    prefix = "INFERLANE_"
    return load_settings(**{k[len(prefix):].lower(): v for k, v in env.items()
                            if k.startswith(prefix)})


_FIELD = re.compile(r"(\w+)=(\{[^}]*\}|[^,)]+)")


def parse_logged_stats(log: str, name: str) -> dict[str, Any] | None:
    """Fields of the last ``<name>(a=1, b={...}, ...)`` dataclass repr in a log; None if absent.

    Reads what the SUT itself logged (the lane logs ``LaneStats(...)`` every 10 s and at stop;
    a ``BatchStats(...)`` line is picked up the same way if the lane logs one). Values that are
    Python literals (ints, dicts) are parsed, anything else is kept as text.
    """
    found = re.findall(rf"{re.escape(name)}\(([^()]*)\)", log)
    if not found:
        return None
    fields: dict[str, Any] = {}
    for key, raw in _FIELD.findall(found[-1]):
        try:
            fields[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            fields[key] = raw.strip()
    return fields


class SutProcess:
    """One system-under-test process in its own session, logging to ``log_path``."""

    def __init__(self, spec: ImplSpec, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.spec = spec
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.cwd = cwd
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self, ready_timeout_s: float = 90.0) -> float:
        """Start the process; return the wall time at which its ready mark appeared."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = time.time()
            self._popen = subprocess.Popen(  # noqa: S603 - argv built by this module
                list(self.spec.argv), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, start_new_session=True)
        self.ready_at = self._wait_ready(ready_timeout_s)
        return self.ready_at

    def _wait_ready(self, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        offset = 0
        seen = ""
        while time.monotonic() < deadline:
            if not self.alive:
                raise StackError(f"{self.spec.label} exited during start-up; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                chunk = log.read()
            offset += len(chunk)
            seen = seen[-200:] + chunk.decode(errors="replace")
            if self.spec.ready_mark in seen:
                return time.time()
            time.sleep(0.01)
        raise StackError(f"{self.spec.label} not ready after {timeout_s:.0f}s; "
                         f"log {self.log_path}:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful), SIGKILL the process group after ``timeout_s``; idempotent."""
        if self._popen is None:
            return None
        if self.alive:
            self._popen.send_signal(signal.SIGTERM)
        try:
            code: int | None = self._popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        # Whatever the main process left behind in its session goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)
        if code is None:
            code = self._popen.wait(timeout=5)
        return code
