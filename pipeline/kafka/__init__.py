"""The Kafka runtime every lane runs on.

* :mod:`~pipeline.kafka.connection` - aiokafka clients from settings (security, renewable producer).
* :mod:`~pipeline.kafka.faustapp` - the worker's faust app (web, metrics, consumer fixes).
* :mod:`~pipeline.kafka.lane` - the lane loop: fetch, hand a batch to a handler, commit what is
  done.
* :mod:`~pipeline.kafka.producer` - batched sends with acknowledgement tracking.
* :mod:`~pipeline.kafka.offsets` - which offsets are safe to commit.
* :mod:`~pipeline.kafka.transactions` - exactly-once lanes: results and offsets of each input
  partition in one Kafka transaction, fenced per partition.
* :mod:`~pipeline.kafka.acls` - the least-privilege ACLs of each process.
* :mod:`~pipeline.kafka.topics` - the topic declarations, their creation and the partition-count
  check.
* :mod:`~pipeline.kafka.partitioner` - key -> partition (murmur2, crc32) and the misrouting check.
* :mod:`~pipeline.kafka.deadletter` - the DLQ record shape.
* :mod:`~pipeline.kafka.supervisor` - what a lane crash does: end the worker or restart the lane.
* :mod:`~pipeline.kafka.process` - process tuning of a worker (GC, nice).
"""

from pipeline import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "acls": ["ROLES", "Grant", "LaneRights", "acl_arguments", "kafka_acls_commands",
        "lane_rights", "role_grants"],
    "connection": ["PRODUCER_STATE_LOST", "KafkaAccessError", "ProducerHandle", "ProducerRetired",
        "client_kwargs", "connection_problem", "explained_start", "make_admin",
        "make_consumer", "make_producer", "security_kwargs", "ssl_context", "start_reader",
        "topic_partitions"],
    "deadletter": ["RAW_MAX_BYTES", "dead_letter"],
    "faustapp": ["attach_lane", "broker_credentials", "create_app", "put_back"],
    "lane": ["Handler", "Lane", "LaneContext", "LaneStats", "PartitionRecords", "Record"],
    "offsets": ["Chunk", "OffsetTracker"],
    "partitioner": ["PARTITIONERS", "Partitioner", "PartitionerCheck", "partition_for",
        "producer_partitioner"],
    "process": ["tune_process"],
    "producer": ["BatchSender"],
    "supervisor": ["LaneState", "LaneSupervisor", "lane_states"],
    "transactions": ["FENCED", "TransactionalSender", "Transactions", "transactional_id"],
    "topics": ["TOPICS", "Replication", "TopicSpec", "archived_topics", "check_partitions",
        "ensure_topics", "replication_for", "spec", "topic_configs", "topic_specs",
        "without_leaders"],
})
