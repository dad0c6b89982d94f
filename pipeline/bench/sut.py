"""The systems under test: what each implementation runs, with which environment, and a
process handle that starts one, tells when it reported ready, and always stops it.

* ``a`` - inferlane's fraud lane: the real ``faust -A agents worker``, ``INFERLANE_LANES=fraud``;
* ``b`` - yardstick: a naive faust agent (:mod:`pipeline.bench.naive_faust`);
* ``c`` - yardstick: a bare aiokafka loop (:mod:`pipeline.bench.bare_loop`);
* ``r`` - inferlane's reco lane: the real worker, ``INFERLANE_LANES=reco``, reco requests;
* ``w`` - the default worker a new user starts: every lane in one ``faust -A agents worker``
  (fraud, reco, history, archive, batch), fraud traffic;
* ``s`` - two processes: the real-time lanes (fraud, reco), and the lanes off the latency path
  (history, archive, batch);
* ``t`` - three processes: the real-time lanes, the history slow path, archive and batch.

Every run of an implementation gets its own topic prefix, app id (so consumer groups) and log.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.dev.loadgen import FRAUD, RECO, Workload
from pipeline.dev.processes import (
    FAUST_READY_MARK,
    WorkerProcess,
    faust_worker_argv,
    wait_all_ready,
)
from pipeline.settings import KNOWN_LANES, Settings, load_settings

__all__ = ["BARE_READY_MARK", "IMPLS", "FAUST_READY_MARK", "ImplSpec", "SutProcess",
           "impl_env", "parse_batcher_stats", "parse_logged_stats", "settings_for"]

BARE_READY_MARK = "bare_loop: ready"


@dataclass(frozen=True)
class ImplSpec:
    """One implementation: short key, label for the report, command line, ready log mark, the
    lanes it serves (``INFERLANE_LANES``) and the traffic it gets."""

    key: str
    label: str
    argv: tuple[str, ...]
    ready_mark: str
    yardstick: bool
    lanes: str = "fraud"
    workload: Workload = FRAUD
    companion_lanes: str | None = None
    """Lanes of more worker processes started with this one, ``;`` between processes (the fraud
    history slow path runs in its own process, as deployed); their CPU is not in the SUT's CPU
    figures."""
    env: tuple[tuple[str, str], ...] = ()
    """More ``INFERLANE_*`` settings of its processes (e.g. the delivery mode)."""


def _faust(app_module: str) -> tuple[str, ...]:
    return tuple(faust_worker_argv(app_module))


IMPLS: dict[str, ImplSpec] = {
    "a": ImplSpec("a", "inferlane fraud lane (+ history worker)", _faust("agents"),
                  FAUST_READY_MARK, False, companion_lanes="history"),
    "e": ImplSpec("e", "inferlane fraud lane, exactly-once (+ history worker)",
                  _faust("agents"), FAUST_READY_MARK, False, companion_lanes="history",
                  env=(("INFERLANE_DELIVERY", "exactly_once"),)),
    "b": ImplSpec("b", "naive faust agent (yardstick)", _faust("pipeline.bench.naive_faust"),
                  FAUST_READY_MARK, True),
    "c": ImplSpec("c", "bare aiokafka loop (yardstick)",
                  (sys.executable, "-m", "pipeline.bench.bare_loop"), BARE_READY_MARK, True),
    "r": ImplSpec("r", "inferlane reco lane", _faust("agents"), FAUST_READY_MARK, False,
                  lanes="reco", workload=RECO),
    "w": ImplSpec("w", "default worker (every lane in one process)", _faust("agents"),
                  FAUST_READY_MARK, False, lanes=",".join(KNOWN_LANES)),
    "s": ImplSpec("s", "split worker (fraud,reco | history,archive,batch)", _faust("agents"),
                  FAUST_READY_MARK, False, lanes="fraud,reco",
                  companion_lanes="history,archive,batch"),
    "t": ImplSpec("t", "three workers (fraud,reco | history | archive,batch)", _faust("agents"),
                  FAUST_READY_MARK, False, lanes="fraud,reco",
                  companion_lanes="history;archive,batch"),
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
        "INFERLANE_LANES": IMPLS[impl].lanes,
        "INFERLANE_WEB_ENABLED": "false",
        "INFERLANE_STATE_DIR": str(state_dir / run),
        **dict(IMPLS[impl].env),
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


_LABELLED_BATCH_STATS = re.compile(r"'(\w+)': BatchStats\(([^()]*)\)")


def parse_batcher_stats(log: str) -> dict[str, Any] | None:
    """The last batcher counters a lane logged: ``BatchStats`` fields, or for a lane with one
    batcher per path (``{'catalogue': BatchStats(...), ...}``) those fields per path."""
    lines = [line for line in log.splitlines() if "BatchStats(" in line]
    if not lines:
        return None
    labelled = _LABELLED_BATCH_STATS.findall(lines[-1])
    if not labelled:
        return parse_logged_stats(lines[-1], "BatchStats")
    return {label: parse_logged_stats(f"BatchStats({body})", "BatchStats")
            for label, body in labelled}


class SutProcess(WorkerProcess):
    """One system-under-test process (see :class:`pipeline.dev.processes.WorkerProcess`)."""

    def __init__(self, spec: ImplSpec, env: dict[str, str], log_path: Path, cwd: Path,
                 *, workers: int = 1) -> None:
        super().__init__(env, log_path, cwd=cwd, argv=spec.argv, ready_mark=spec.ready_mark,
                         label=spec.label)
        self.spec = spec
        worker_id = env.get("INFERLANE_WORKER_ID", "bench")
        # More members of the same consumer groups, each with its own static member id: they
        # boot side by side with this one and share its partitions.
        self.peers = [
            WorkerProcess({**env, "INFERLANE_WORKER_ID": f"{worker_id}-{index}"},
                          log_path.with_name(f"{log_path.stem}-peer{index}.log"), cwd=cwd,
                          argv=spec.argv, ready_mark=spec.ready_mark,
                          label=f"{spec.label}: peer {index}")
            for index in range(1, workers)]
        self.companions = [
            WorkerProcess(
                {**env, "INFERLANE_LANES": lanes,
                 "INFERLANE_WORKER_ID": f"{worker_id}-companion{index or ''}"},
                log_path.with_name(f"{log_path.stem}-{lanes.replace(',', '-')}.log"), cwd=cwd,
                label=f"{spec.label}: {lanes} worker")
            for index, lanes in enumerate((spec.companion_lanes or "").split(";")) if lanes]
        self.companion = self.companions[0] if self.companions else None

    def start(self, *, ready_timeout_s: float = 90.0) -> float:
        """Start the companion (and wait for it), then this process and its peers side by side;
        return the wall time the first of them was ready (work can start from then on)."""
        for companion in self.companions:
            companion.start(ready_timeout_s=ready_timeout_s)
        for process in (self, *self.peers):
            process.spawn()
        wait_all_ready([self, *self.peers], ready_timeout_s)
        self.ready_at = min(p.ready_at for p in (self, *self.peers) if p.ready_at is not None)
        return self.ready_at

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful), SIGKILL the process group after ``timeout_s``; idempotent."""
        code = self.terminate(timeout_s)
        for peer in self.peers:
            peer.terminate(timeout_s)
        for companion in self.companions:
            companion.terminate(timeout_s)
        return code
