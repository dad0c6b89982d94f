"""CPU time of a process tree from ``/proc`` (Linux), sampled in a background thread.

``tree_cpu_seconds(pid)`` = utime + stime of ``pid`` and of every live descendant, plus the
cutime + cstime each of them holds for children it has already reaped, in seconds. A
:class:`CpuSampler` records ``(wall time, cpu seconds)`` pairs every ``interval_s`` so that the
CPU spent between two wall-clock instants (e.g. "SUT ready" and "last result received", known
only afterwards) is read off by linear interpolation. :class:`ForeignCpuSampler` does the same
for every process *outside* a tree (other users of a shared machine, which distort a benchmark).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["CpuSampler", "ForeignCpuSampler", "descendants", "parse_stat_ticks", "peak_rss_mb",
           "rss_mb", "steal_ticks", "tree_cpu_seconds"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def parse_stat_ticks(stat: str) -> int:
    """utime + stime + cutime + cstime (clock ticks) from the text of ``/proc/<pid>/stat``."""
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    return sum(int(value) for value in fields[11:15])


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (via ``/proc/<pid>/task/<tid>/children``), breadth first."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = list((_PROC / str(parent) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            queue.extend(children)
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its children; None when ``pid`` is gone."""
    try:
        ticks = parse_stat_ticks((_PROC / str(pid) / "stat").read_text())
    except (OSError, IndexError, ValueError):
        return None
    for child in descendants(pid):
        try:
            ticks += parse_stat_ticks((_PROC / str(child) / "stat").read_text())
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile: its time moves to its parent's cutime when reaped
    return ticks / CLK_TCK


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of ``pid`` in MiB; None when unavailable."""
    return _status_mib(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    """Resident set size now (VmRSS) of ``pid`` in MiB; None when unavailable."""
    return _status_mib(pid, "VmRSS")


def _status_mib(pid: int, field: str) -> float | None:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


class CpuSampler:
    """Sample the CPU seconds of a process tree until stopped or the process is gone."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"cpu-{pid}", daemon=True)

    def start(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample(self) -> float | None:
        """Take one sample now; return it (None when the process is gone)."""
        value = tree_cpu_seconds(self.pid)
        if value is not None:
            with self._lock:
                self.times.append(time.time())
                self.cpu.append(value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.sample() is None:
                return

    def at(self, when: float) -> float | None:
        """CPU seconds at wall time ``when`` (interpolated, clamped to the sampled range)."""
        with self._lock:
            if not self.times:
                return None
            return float(np.interp(when, self.times, self.cpu))

    def between(self, start: float | None, end: float | None) -> float | None:
        """CPU seconds spent between two wall-clock instants; None if either is unknown."""
        if start is None or end is None:
            return None
        first, last = self.at(start), self.at(end)
        if first is None or last is None:
            return None
        return max(last - first, 0.0)


def _own_ticks(stat: str) -> int:
    """utime + stime (clock ticks) of one process, without its reaped children."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def steal_ticks() -> int:
    """Clock ticks the hypervisor has taken from this (virtual) machine since boot."""
    try:
        fields = (_PROC / "stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) if len(fields) > 8 else 0
    except (OSError, ValueError):
        return 0


class ForeignCpuSampler(CpuSampler):
    """CPU seconds the run did not get: used by processes outside ``pid``'s tree, plus stolen
    by the hypervisor (``steal`` in ``/proc/stat``), accumulated sample by sample.

    Each process counts with its own utime + stime (not its reaped children, which would count
    twice); a process that starts and ends between two samples is missed, so this is a lower
    bound. Kernel threads (empty command line) are left out.
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        super().__init__(pid, interval_s)
        self._last: dict[int, int] = {}
        self._total_ticks = 0
        self._steal = steal_ticks()

    def sample(self) -> float | None:
        own = {self.pid, *descendants(self.pid)}
        seen: dict[int, int] = {}
        for entry in _PROC.iterdir():
            if not entry.name.isdigit() or int(entry.name) in own:
                continue
            try:
                if not (entry / "cmdline").read_bytes():
                    continue
                ticks = _own_ticks((entry / "stat").read_text())
            except (OSError, IndexError, ValueError):
                continue
            pid = int(entry.name)
            seen[pid] = ticks
            if pid in self._last:
                self._total_ticks += max(ticks - self._last[pid], 0)
        self._last = seen
        steal = steal_ticks()
        self._total_ticks += max(steal - self._steal, 0)
        self._steal = steal
        value = self._total_ticks / CLK_TCK
        with self._lock:
            self.times.append(time.time())
            self.cpu.append(value)
        return value
