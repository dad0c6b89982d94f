"""The Apache Kafka broker of the local stack: fetched from Maven Central, cached, found.

``make install`` runs ``python -m pipeline.dev.kafkadist fetch``: Maven copies the runtime jars of
``deploy/kafka/pom.xml`` (``org.apache.kafka:kafka_2.13`` + ``kafka-tools`` at
:data:`KAFKA_VERSION`, with log4j2's slf4j binding) into ``<cache>/kafka-<version>/libs``.

The cache is ``$INFERLANE_CACHE_DIR``, else ``$XDG_CACHE_HOME/inferlane``, else
``~/.cache/inferlane``. The jars are copied into a temporary directory and renamed into place
with a ``.complete`` marker, so an interrupted fetch never leaves a half-filled cache that looks
ready. ``INFERLANE_KAFKA_LIBS`` points at a directory of Kafka jars fetched some other way (an
unpacked Kafka distribution's ``libs/``).

Only the standard library is used here: the module runs before or without the project's
dependencies (``python -m pipeline.dev.kafkadist where`` prints the cache).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KAFKA_VERSION", "MIN_JAVA", "KafkaDist", "PrerequisiteError", "cache_dir",
           "ensure_kafka", "find_kafka", "java_major"]

KAFKA_VERSION = "4.4.0"
"""The broker version of tests, demo and benchmarks; docker-compose.yml runs the same one."""
MIN_JAVA = 17
"""Kafka 4.x brokers need Java 17 or newer."""

_POM = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "pom.xml"
_MARKER = ".complete"
_INSTALL_HINT = ("install OpenJDK 17+ and Maven 3.8+ (Debian/Ubuntu: `apt-get install "
                 "openjdk-17-jdk-headless maven`; macOS: `brew install openjdk@17 maven`)")


class PrerequisiteError(RuntimeError):
    """Java or Maven is missing or too old, or the broker jars could not be fetched."""


@dataclass(frozen=True)
class KafkaDist:
    """A usable broker: the ``java`` to run it with and the directory of its jars."""

    java: str
    java_major: int
    libs: Path
    version: str

    @property
    def classpath(self) -> str:
        return str(self.libs / "*")


def cache_dir() -> Path:
    if os.environ.get("INFERLANE_CACHE_DIR"):
        return Path(os.environ["INFERLANE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "inferlane"
    return Path.home() / ".cache" / "inferlane"


def _libs_dir(version: str) -> Path:
    return cache_dir() / f"kafka-{version}" / "libs"


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise PrerequisiteError(f"java is not installed (the local Kafka broker needs it): "
                                f"{_INSTALL_HINT}")
    return found


def java_major(java: str) -> int:
    """The major version of ``java`` (``java -version`` prints ``openjdk version "17.0.9"``)."""
    out = subprocess.run([java, "-version"], capture_output=True, text=True,  # noqa: S603
                         timeout=30, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise PrerequisiteError(f"cannot tell the version of {java}: {out.stderr.strip()[:200]}")
    major = int(match.group(1))
    # Java 8 and older print "1.8.0_x".
    return int(match.group(2) or 0) if major == 1 else major


def _checked_java() -> tuple[str, int]:
    java = _java()
    major = java_major(java)
    if major < MIN_JAVA:
        raise PrerequisiteError(f"{java} is Java {major}; Kafka {KAFKA_VERSION} needs Java "
                                f"{MIN_JAVA}+: {_INSTALL_HINT}")
    return java, major


def _jars_in(libs: Path) -> bool:
    return libs.is_dir() and any(libs.glob("kafka_2.13-*.jar"))


def _present_libs(version: str) -> Path | None:
    """The jar directory to use: ``INFERLANE_KAFKA_LIBS`` (checked) or the complete cache;
    None when the cache is not (completely) fetched."""
    given = os.environ.get("INFERLANE_KAFKA_LIBS")
    if given:
        if not _jars_in(Path(given)):
            raise PrerequisiteError(f"INFERLANE_KAFKA_LIBS={given} holds no kafka_2.13-*.jar")
        return Path(given)
    libs = _libs_dir(version)
    return libs if (libs / _MARKER).exists() else None


def find_kafka(version: str = KAFKA_VERSION) -> KafkaDist:
    """The broker ready to run; raise :class:`PrerequisiteError` saying how to get it."""
    java, major = _checked_java()
    libs = _present_libs(version)
    if libs is None:
        raise PrerequisiteError(
            f"the Kafka {version} broker is not fetched yet ({_libs_dir(version)}): run "
            f"`make install` or `python -m pipeline.dev.kafkadist fetch`")
    return KafkaDist(java, major, libs, version)


def ensure_kafka(version: str = KAFKA_VERSION) -> KafkaDist:
    """Fetch the broker's jars with Maven unless cached; return the broker."""
    java, major = _checked_java()
    present = _present_libs(version)
    if present is not None:
        return KafkaDist(java, major, present, version)
    mvn = shutil.which("mvn")
    if mvn is None:
        raise PrerequisiteError(f"mvn is not installed (it fetches the Kafka broker from Maven "
                                f"Central): {_INSTALL_HINT}")
    libs = _libs_dir(version)
    libs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    argv = [mvn, "-B", "-q", "-f", str(_POM), f"-Dkafka.version={version}",
            "dependency:copy-dependencies", "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}"]
    print(f"fetching Kafka {version} with Maven into {libs} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0 or not _jars_in(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (done.stdout + done.stderr).strip()[-2000:]
        raise PrerequisiteError(f"Maven could not fetch Kafka {version} (rc {done.returncode}); "
                                f"is Maven Central reachable?\n{tail}")
    (tmp / _MARKER).write_text(f"kafka {version} fetched in {time.monotonic() - started:.1f}s\n")
    if libs.exists():
        shutil.rmtree(libs)
    tmp.rename(libs)
    return KafkaDist(java, major, libs, version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dev.kafkadist",
        description="Fetch (with Maven) or locate the Apache Kafka broker of the local stack.")
    parser.add_argument("command", choices=["fetch", "where"],
                        help="fetch: download the jars unless cached; where: print the jar dir")
    parser.add_argument("--version", default=KAFKA_VERSION, help="Kafka version (%(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            started = time.monotonic()
            dist = ensure_kafka(args.version)
            jars = len(list(dist.libs.glob("*.jar")))
            print(f"kafka {dist.version}: {jars} jars in {dist.libs} "
                  f"({time.monotonic() - started:.1f}s)")
        else:
            print(find_kafka(args.version).libs)
    except PrerequisiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
