"""Unit tests for pipeline.kafka.topics: which topics each lane uses and what the archive reads."""

from __future__ import annotations

import pytest

from agents.archive import ArchiveHandler
from pipeline.errors import TopicError
from pipeline.kafka.topics import TOPICS, Replication, archived_topics, replication_for, topic_specs
from pipeline.settings import KNOWN_LANES, load_settings


def _names(lanes: list[str] | None) -> set[str]:
    return {spec.name for spec in topic_specs(lanes)}


def test_each_lane_declares_its_topics() -> None:
    assert {"fraud.requests", "fraud.scores", "fraud.requests.dlq"} <= _names(["fraud"])
    assert "fraud.requests" in _names(["history"])  # the slow path reads the fraud requests
    assert _names(["reco"]) == {"reco.requests", "reco.results", "reco.requests.dlq"}
    assert _names(None) == {spec.name for spec in TOPICS}
    assert {spec.lane for spec in TOPICS} <= set(KNOWN_LANES)


def test_archive_reads_every_realtime_result_topic() -> None:
    assert archived_topics() == ["fraud.scores", "reco.results"]
    # A worker that only archives still creates (and so can subscribe to) every result topic.
    assert _names(["archive"]) == {"fraud.scores", "reco.results"}
    assert _names(["reco", "archive"]) == {"reco.requests", "reco.results",
                                           "reco.requests.dlq", "fraud.scores"}
    settings = load_settings(topic_prefix="p.")
    assert ArchiveHandler(settings).topics == ("p.fraud.scores", "p.reco.results")


def test_dead_letter_topics_have_one_partition_and_results_are_realtime() -> None:
    for spec in TOPICS:
        if spec.name.endswith(".dlq"):
            assert spec.partitions == 1, spec
        if spec.results:
            assert spec.realtime and spec.partitions is None, spec


def test_replication_follows_the_cluster_unless_set() -> None:
    auto = load_settings()
    assert replication_for(auto, 1) == Replication(1, 1)
    assert replication_for(auto, 2) == Replication(2, 1)
    assert replication_for(auto, 3) == Replication(3, 2)  # one broker may fail
    assert replication_for(auto, 6) == Replication(3, 2)
    assert replication_for(load_settings(replication_factor=2), 3) == Replication(2, 1)
    assert replication_for(load_settings(min_insync_replicas=3), 5) == Replication(3, 3)


def test_impossible_replication_is_a_clear_error() -> None:
    with pytest.raises(TopicError, match=r"INFERLANE_REPLICATION_FACTOR=3 .* has 1 broker"):
        replication_for(load_settings(replication_factor=3), 1)
    with pytest.raises(TopicError, match=r"INFERLANE_MIN_INSYNC_REPLICAS=3 is more than the 2"):
        replication_for(load_settings(min_insync_replicas=3), 2)
