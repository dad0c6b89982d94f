"""Facts about the machine and code a benchmark ran on, for ``results.json``.

The git commit is read from the ``.git`` files of the checkout (no git command is run); it is
``None`` outside a checkout.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "git_commit", "machine_info"]

PACKAGES: tuple[str, ...] = (
    "inferlane", "faust-streaming", "mode-streaming", "aiokafka", "onnxruntime", "numpy",
    "orjson", "msgspec", "uvloop", "matplotlib",
)
_REPO = Path(__file__).resolve().parents[2]


def _first_line_with(path: Path, prefix: str) -> str | None:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def git_commit(repo: Path = _REPO) -> str | None:
    """The commit HEAD points at, from ``.git/HEAD`` and the refs; None if unknown.

    In a ``git worktree`` checkout ``.git`` is a file naming the worktree's own git dir (its
    HEAD), whose ``commondir`` holds the shared refs.
    """
    git = repo / ".git"
    try:
        if git.is_file() and (link := git.read_text().strip()).startswith("gitdir:"):
            git = repo / link.split(":", 1)[1].strip()
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head or None
    ref = head.split(":", 1)[1].strip()
    try:
        common = git / (git / "commondir").read_text().strip()
    except OSError:
        common = git
    for folder in dict.fromkeys((git, common)):
        try:
            return (folder / ref).read_text().strip()
        except OSError:
            pass
    try:
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(f" {ref}"):
                return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS, Python, package versions and git commit."""
    mem = _first_line_with(Path("/proc/meminfo"), "MemTotal")
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _first_line_with(Path("/proc/cpuinfo"), "model name"),
        "mem_total": mem,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(),
        "loadavg_at_start": list(os.getloadavg()),
        **_broker_info(),
    }


def _broker_info() -> dict[str, Any]:
    """The local stack's broker: Apache Kafka's version and the Java that runs it."""
    from pipeline.dev.kafkadist import KAFKA_VERSION, PrerequisiteError, find_kafka

    try:
        dist = find_kafka()
    except PrerequisiteError as exc:
        return {"kafka_broker": None, "java": None, "broker_error": str(exc)}
    return {"kafka_broker": f"Apache Kafka {KAFKA_VERSION} (KRaft)",
            "java": f"{dist.java_major} ({dist.java})"}
