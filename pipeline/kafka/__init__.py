"""The Kafka runtime every lane runs on.

* :mod:`~pipeline.kafka.connection` - aiokafka clients from settings (security, renewable producer).
* :mod:`~pipeline.kafka.faustapp` - the worker's faust app (web, metrics, consumer fixes).
* :mod:`~pipeline.kafka.lane` - the lane loop: fetch, hand a batch to a handler, commit what is
  done.
* :mod:`~pipeline.kafka.producer` - batched sends with acknowledgement tracking.
* :mod:`~pipeline.kafka.offsets` - which offsets are safe to commit.
* :mod:`~pipeline.kafka.topics` - the topic declarations and their creation.
* :mod:`~pipeline.kafka.deadletter` - the DLQ record shape.
* :mod:`~pipeline.kafka.process` - process tuning of a worker (GC, nice).
"""

from pipeline import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "connection": ["PRODUCER_STATE_LOST", "ProducerHandle", "ProducerRetired", "client_kwargs",
        "make_consumer", "make_producer", "security_kwargs", "ssl_context", "start_reader",
        "topic_partitions"],
    "deadletter": ["RAW_MAX_BYTES", "dead_letter"],
    "faustapp": ["broker_credentials", "create_app", "put_back"],
    "lane": ["Handler", "Lane", "LaneContext", "LaneStats", "PartitionRecords", "Record"],
    "offsets": ["Chunk", "OffsetTracker"],
    "process": ["tune_process"],
    "producer": ["BatchSender"],
    "topics": ["TOPICS", "TopicSpec", "archived_topics", "ensure_topics", "spec", "topic_configs",
        "without_leaders", "topic_specs"],
})
