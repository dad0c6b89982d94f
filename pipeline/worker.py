"""Run ``faust -A agents worker`` as a child process: for the demo, the tests and benchmarks.

A :class:`WorkerProcess` starts the worker with a given environment, waits until faust reports
it ready (and every requested lane has joined its group), and stops it with SIGTERM (graceful:
lanes flush and commit) or SIGKILL (crash tests).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import StackError

__all__ = ["WorkerProcess"]

_READY_MARK = "[^Worker]: Ready"


class WorkerProcess:
    """One ``faust -A agents worker`` process with its own log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *, web: bool = False,
                 cwd: Path | None = None) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.web = web
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self, *, ready_timeout_s: float = 60.0) -> None:
        """Start the worker and wait until it is ready; raise :class:`StackError` if it dies."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [sys.executable, "-m", "faust", "-A", "agents", "worker", "-l", "info"]
        if not self.web:
            argv.append("--without-web")
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(  # noqa: S603 - fixed argv
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True)
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise StackError(f"worker exited during start-up; log {self.log_path}:\n"
                                 f"{self.log_tail()}")
            if _READY_MARK in self._new_log():
                return
            time.sleep(0.1)
        raise StackError(f"worker not ready after {timeout_s:.0f}s; log {self.log_path}:\n"
                         f"{self.log_tail()}")

    def _new_log(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._new_log().splitlines()[-lines:])

    def terminate(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM and wait (graceful: lanes finish, flush and commit); SIGKILL after timeout."""
        if self._popen is None:
            return None
        if self.alive:
            self._popen.send_signal(signal.SIGTERM)
        try:
            return self._popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self._popen.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (a crash: nothing is flushed)."""
        if self._popen is not None and self.alive:
            os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait(timeout=5)
