"""Local and development tooling (not imported by the lanes).

* :mod:`~pipeline.dev.kafkadist` - fetches the pinned Apache Kafka with Maven.
* :mod:`~pipeline.dev.stack` - the local stack: KRaft Kafka node(s) and the S3 server.
* :mod:`~pipeline.dev.kafkanode` - one node's ``server.properties``, JVM settings, readiness probe.
* :mod:`~pipeline.dev.tls` - a throwaway CA and broker certificate for a TLS listener.
* :mod:`~pipeline.dev.kafkatools` - a secure stack's CA, admin, and Kafka's admin tools.
* :mod:`~pipeline.dev.processes` - workers and services as child processes.
* :mod:`~pipeline.dev.loadgen`, :mod:`~pipeline.dev.recogen` - load generators.
* :mod:`~pipeline.dev.demo` - ``make demo``.
"""

from pipeline import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "demo": ["WARMUP_S", "WORKER_LAYOUT", "DemoSummary", "RecoSummary", "render_summary",
        "run_demo"],
    "kafkanode": ["JIT_MODES", "JVM_FLAGS", "KAFKA_HEAP_MB", "LOG4J2", "LOG4J2_TOOLS",
        "KafkaNode", "QuorumState", "Secured", "heap_from_env", "jit_from_env", "kafka_probe",
        "kafka_uuid", "kafka_warm_up", "partition_leaders", "quorum_state", "run_admin",
        "server_properties", "under_replicated"],
    "kafkatools": ["ADMIN_PROPERTIES", "KafkaTools", "make_secured"],
    "kafkadist": ["KAFKA_VERSION", "MIN_JAVA", "KafkaDist", "PrerequisiteError", "cache_dir",
        "ensure_kafka", "find_kafka", "java_major"],
    "loadgen": ["FRAUD", "RECO", "HistoryTransactionSource", "ProduceReport", "RequestSource",
        "ResultReader", "SideRecord", "TransactionSource", "Workload", "produce_requests",
        "produce_transactions", "snapshot_end_offsets", "write_transactions_jsonl"],
    "processes": ["FAUST_READY_MARK", "SERVICE_READY_MARK", "ServiceProcess", "WorkerProcess",
        "faust_worker_argv", "wait_all_ready"],
    "recogen": ["RECO_INVALID_KINDS", "RecoRequestSource", "reco_reason_field"],
    "tls": ["CertificateAuthority", "make_ca", "make_server_cert"],
    "stack": ["DUMMY_S3_KEY", "LocalStack", "ManagedProcess", "StackEndpoints", "bench_stack",
        "free_port", "s3_probe"],
})
