"""Fetching and finding the local stack's Kafka broker: version checks and clear errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.dev import kafkadist
from pipeline.dev.kafkadist import PrerequisiteError


def _fake_java(tmp_path: Path, version_line: str) -> Path:
    java = tmp_path / "bin" / "java"
    java.parent.mkdir(parents=True, exist_ok=True)
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    return java


@pytest.mark.parametrize(("line", "major"), [
    ('openjdk version "17.0.9" 2023-10-17', 17),
    ('openjdk version "21" 2023-09-19', 21),
    ('java version "1.8.0_392"', 8),
])
def test_java_major_reads_every_version_format(tmp_path: Path, line: str, major: int) -> None:
    assert kafkadist.java_major(str(_fake_java(tmp_path, line))) == major


def test_old_or_missing_java_is_a_clear_error(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    _fake_java(tmp_path, 'openjdk version "11.0.2"')
    with pytest.raises(PrerequisiteError, match=r"Java 11; Kafka .* needs Java 17\+"):
        kafkadist.find_kafka()
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(PrerequisiteError, match="java is not installed.*apt-get install"):
        kafkadist.find_kafka()


def test_cache_location_follows_the_environment(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERLANE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kafkadist.cache_dir() == tmp_path / "xdg" / "inferlane"
    monkeypatch.setenv("INFERLANE_CACHE_DIR", str(tmp_path / "own"))
    assert kafkadist.cache_dir() == tmp_path / "own"


def test_a_half_fetched_cache_is_not_used(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("INFERLANE_KAFKA_LIBS", raising=False)
    libs = tmp_path / f"kafka-{kafkadist.KAFKA_VERSION}" / "libs"
    libs.mkdir(parents=True)
    (libs / f"kafka_2.13-{kafkadist.KAFKA_VERSION}.jar").write_bytes(b"")
    with pytest.raises(PrerequisiteError, match="not fetched yet"):
        kafkadist.find_kafka()
    (libs / ".complete").write_text("done\n")
    dist = kafkadist.find_kafka()
    assert dist.libs == libs and dist.classpath == f"{libs}{os.sep}*"


def test_cli_reports_errors_with_exit_code_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("INFERLANE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("INFERLANE_KAFKA_LIBS", raising=False)
    assert kafkadist.main(["where"]) == 2
    assert "make install" in capsys.readouterr().err


def test_cluster_ids_never_look_like_an_option() -> None:
    from pipeline.dev.kafkanode import kafka_uuid as _kafka_uuid

    ids = [_kafka_uuid() for _ in range(2000)]  # a leading "-" is 1 in 64 without the rule
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)


def test_the_pom_maven_fetches_with_is_the_repositorys() -> None:
    """`make install` on a machine without the cached jars runs Maven on this file; a wrong path
    (the package moved to pipeline/dev/ once) is only seen there, so check it here."""
    pom = kafkadist._POM
    assert pom == Path(__file__).resolve().parents[3] / "deploy" / "kafka" / "pom.xml"
    assert "<artifactId>kafka_2.13</artifactId>" in pom.read_text()
