"""Run a worker as a child process: for the demo, the tests and the benchmarks.

A :class:`WorkerProcess` starts ``faust -A agents worker`` (or any command given as ``argv``)
in its own session with a given environment, waits until the ready mark appears in its log, and
stops it with SIGTERM (graceful: lanes flush and commit) or SIGKILL (crash tests). Whatever the
process leaves behind in its session is killed when it is stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.dev.stack import free_port
from pipeline.errors import StackError
from pipeline.services.http import SERVICE_READY_MARK

__all__ = ["FAUST_READY_MARK", "SERVICE_READY_MARK", "ServiceProcess", "WorkerProcess",
           "faust_worker_argv", "wait_all_ready"]

FAUST_READY_MARK = "[^Worker]: Ready"


def faust_worker_argv(app_module: str = "agents", *, web: bool = False) -> list[str]:
    """``python -m faust -A <app_module> worker -l info`` (``--without-web`` unless ``web``)."""
    argv = [sys.executable, "-m", "faust", "-A", app_module, "worker", "-l", "info"]
    return argv if web else [*argv, "--without-web"]


class WorkerProcess:
    """One worker process with its own log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *, web: bool = False,
                 cwd: Path | None = None, argv: Sequence[str] | None = None,
                 ready_mark: str = FAUST_READY_MARK, label: str = "worker") -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.cwd = cwd
        self.argv = list(argv) if argv is not None else faust_worker_argv(web=web)
        self.ready_mark = ready_mark
        self.label = label
        self.started_at: float | None = None
        self.ready_at: float | None = None
        """Wall time at which the ready mark appeared (the benchmark times drains from it)."""
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self, *, ready_timeout_s: float = 60.0) -> float:
        """Start and wait until ready; return the ready wall time. :class:`StackError` if it
        exits or is not ready in time."""
        self.spawn()
        return self.wait_ready(ready_timeout_s)

    def spawn(self) -> None:
        """Start the process without waiting (several workers then boot side by side); follow
        with :meth:`wait_ready`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.cwd is not None:
            self.cwd.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.started_at = time.time()
            self._popen = subprocess.Popen(  # noqa: S603 - argv built by this module or caller
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True)

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Wait for the ready mark of the spawned process; return (and keep) its wall time."""
        self.ready_at = self._wait_ready(timeout_s)
        return self.ready_at

    def _wait_ready(self, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.poll_ready():
                return time.time()
            time.sleep(0.01)
        raise self.not_ready(timeout_s)

    def poll_ready(self) -> bool:
        """True once the ready mark is in the log; :class:`StackError` if the process exited."""
        if not self.alive:
            raise StackError(f"{self.label} exited during start-up; log {self.log_path}:\n"
                             f"{self.log_tail()}")
        return self.ready_mark in self._new_log()

    def not_ready(self, timeout_s: float) -> StackError:
        """The error for a process not ready after ``timeout_s``."""
        return StackError(f"{self.label} not ready after {timeout_s:.0f}s; log {self.log_path}:"
                          f"\n{self.log_tail()}")

    def _new_log(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_text(self) -> str:
        """Everything this process logged since its last start."""
        return self._new_log()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._new_log().splitlines()[-lines:])

    def terminate(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM and wait (graceful: lanes finish, flush and commit); SIGKILL after timeout.

        Returns the exit code (None if it was never started). Idempotent.
        """
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
        return code if code is not None else self._popen.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (a crash: nothing is flushed)."""
        if self._popen is not None and self.alive:
            os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait(timeout=5)


class ServiceProcess(WorkerProcess):
    """``inferlane serve <service> --port <free port> [args]``; ``url`` is its base URL. Ready
    once its Kafka clients are connected (or at ``ready_mark``)."""

    def __init__(self, service: str, env: dict[str, str], log_path: Path, *args: str,
                 ready_mark: str = SERVICE_READY_MARK, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(env, log_path, cwd=cwd, label=f"serve {service}",
                         ready_mark=ready_mark,
                         argv=[sys.executable, "-m", "pipeline.cli", "serve", service,
                               "--port", str(self.port), *args])


def wait_all_ready(processes: Sequence[WorkerProcess], timeout_s: float = 60.0) -> None:
    """Wait for the ready marks of processes spawned side by side, each timed when it appears
    (waiting for one after the other would time a later one when the earlier was ready)."""
    pending = list(processes)
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() >= deadline:
            raise pending[0].not_ready(timeout_s)
        for process in list(pending):
            if process.poll_ready():
                process.ready_at = time.time()
                pending.remove(process)
        time.sleep(0.01)
