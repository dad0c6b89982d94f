"""One frozen settings object, read from the environment (prefix ``INFERLANE_``) once at start-up.

Every knob of the pipeline lives here, with its unit in its name. Nothing else in the library
reads ``os.environ`` for configuration; components receive a :class:`Settings` instance.
See the settings table in README.md (``inferlane settings`` prints the effective values).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.errors import ConfigError

__all__ = ["KNOWN_LANES", "Settings", "load_settings"]

#: Lanes (consumer loops) a worker can serve; ``INFERLANE_LANES`` picks a subset.
KNOWN_LANES: tuple[str, ...] = ("fraud", "reco", "history", "archive", "batch")

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_worker_id() -> str:
    # Stable across restarts of the same host/container: static group membership depends on it.
    return f"{socket.gethostname()}-0"


class Settings(BaseSettings):
    """Effective configuration of one inferlane process (frozen: build a new one to change it)."""

    model_config = SettingsConfigDict(
        env_prefix="INFERLANE_", frozen=True, extra="ignore", case_sensitive=False,
        use_attribute_docstrings=True,
        # A ValidationError would otherwise quote the input (every setting, secrets in clear)
        # in its text, and ConfigError chains it: a traceback in a log would leak them.
        hide_input_in_errors=True,
    )

    # --- Kafka -----------------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list of the Kafka bootstrap brokers."""
    topic_prefix: str = ""
    """Prepended to every topic name (``staging.`` -> ``staging.fraud.requests``)."""
    app_id: str = "inferlane"
    """faust app id; consumer group ids derive from it (``<app_id>-<lane>``)."""
    worker_id: str = Field(default_factory=_default_worker_id)
    """Stable id of this worker: client ids, and ``group.instance.id`` under static membership."""
    static_membership: bool = False
    """Join consumer groups as static members (``group.instance.id`` = ``<worker_id>-<lane>``).

    A restarted worker then gets its partitions back without a rebalance, provided it comes back
    within the session timeout and ``worker_id`` is stable (a StatefulSet ordinal, a compose
    service). Off by default: a dynamic member that dies is expired by the broker after the
    session timeout and its partitions move on, whatever its id (docs/design.md)."""
    realtime_partitions: int = Field(default=4, ge=1)
    """Partition count for real-time topics created by ``inferlane topics create``; workers
    refuse to start when an existing keyed topic has another count (docs/operations.md)."""
    partitioner: Literal["murmur2", "crc32"] = "murmur2"
    """How producers map a key to a partition: ``murmur2`` (the Java client's and aiokafka's
    default; librdkafka: ``partitioner=murmur2_random``) or ``crc32`` (librdkafka's default).
    The pipeline's own producers use it; the fraud and history lanes flag records that
    disagree with it (docs/producers.md)."""
    replication_factor: int | None = Field(default=None, ge=1)
    """Replicas of each topic ``inferlane topics create`` (and a worker's start check) creates;
    unset: from the cluster's size, ``min(brokers, 3)``."""
    min_insync_replicas: int | None = Field(default=None, ge=1)
    """``min.insync.replicas`` of the created topics; unset: 2 with three or more replicas,
    else 1. With ``acks=all`` a write is acknowledged only once that many replicas have it."""
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    commit_interval_ms: int = Field(default=200, ge=10)
    """How often completed offsets are committed (only offsets whose results are acked)."""
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """``exactly_once``: the fraud and reco lanes write each input partition's results, dead
    letters and consumed offsets in one Kafka transaction per ``transaction_interval_ms``
    (``read_committed`` readers see each result once; docs/design.md). ``at_least_once``
    (default): results are visible as soon as they are acknowledged; a crash or a rebalance
    can write some twice (readers key on ``event_id``)."""
    transaction_interval_ms: int = Field(default=20, ge=5)
    """Exactly-once lanes: how long a partition's transaction stays open. A result becomes
    visible when its transaction commits, so this adds up to the interval (plus the commit)
    to its latency; shorter means more transactions per second (docs/performance.md)."""
    commit_on_revoke: bool = True
    """Commit finished work when partitions are revoked, so the next owner does not redo it."""
    leave_group_on_stop: bool = True
    """On a graceful stop, leave the consumer groups so others take the partitions over at once.

    Dynamic members always do. Static members normally do not (a restart then needs no
    rebalance), but then their partitions wait a session timeout for a worker that is not coming
    back; with this on, a static member leaves too (a scale-in hands over at once)."""
    max_in_flight_records: int = Field(default=20_000, ge=1)
    """Backpressure: stop fetching while this many records are consumed but not yet done."""
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest record value a lane processes; a larger one is dead-lettered (``too_large``)
    without being parsed. Default: Kafka's default ``message.max.bytes`` (about 1 MiB)."""

    # --- Kafka security (every aiokafka client and faust's own connection; docs/security.md) -
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT")
    """How clients talk to the brokers: TLS (``SSL``), SASL authentication, or both."""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    """SASL mechanism for the ``SASL_*`` protocols (AWS MSK IAM is not supported)."""
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    """SASL password (secret type, never logged)."""
    kafka_ssl_cafile: FilePath | None = None
    """PEM file of the CA(s) that signed the brokers' certificates (unset: the system CAs)."""
    kafka_ssl_certfile: FilePath | None = None
    """Client certificate (PEM) for mutual TLS; may also hold the private key."""
    kafka_ssl_keyfile: FilePath | None = None
    """Private key (PEM) of the client certificate, when not in the certificate file."""
    kafka_ssl_keyfile_password: SecretStr | None = None
    """Password of an encrypted private key (secret type, never logged)."""

    state_dir: Path = Path(".inferlane")
    """Local working files: faust data dirs, local stack logs and data."""

    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """Event loop of the worker process."""
    gc_freeze: bool = True
    """Freeze start-up objects out of the garbage collector and collect generation 0 less often."""

    # --- S3 ---------------------------------------------------------------------------------
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto); unset = AWS S3 with the standard credential chain."""
    s3_bucket: str = "inferlane"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    """Static S3 key (with the secret key; unset: the standard AWS credential chain)."""
    s3_secret_access_key: SecretStr | None = None

    # --- lanes ------------------------------------------------------------------------------
    lanes: Annotated[tuple[str, ...], NoDecode] = KNOWN_LANES
    """Comma-separated lanes this worker serves (default: all)."""
    web_port: int = Field(default=6066, ge=0, le=65535)
    web_enabled: bool = True

    fraud_batch_max_rows: int = Field(default=256, ge=1, le=65_536)
    fraud_max_wait_ms: float = Field(default=5.0, ge=0.0, le=100.0)
    fraud_budget_ms: float = Field(default=50.0, gt=0.0)
    """End-to-end latency budget from ``sent_at``; results past it are counted as late."""
    model_registry: str = str(_REPO_ROOT / "models")
    """Model registry: a local folder or ``s3://bucket/prefix``; each sub-folder with a
    ``card.json`` is one model version (see pipeline/inference/registry.py)."""
    model_poll_interval_s: float = Field(default=10.0, ge=0.0)
    """How often workers look for a new model version in the registry (0 = never)."""
    fraud_model_version: str = "latest"
    """Fraud model version to serve: ``latest`` (highest in the registry, followed while
    running) or a pinned version such as ``v2``."""
    fraud_model_dir: Path | None = None
    """Serve this model folder instead of the registry's (no polling, no hot swap)."""
    fraud_model_precision: Literal["int8", "fp32"] = "int8"
    fraud_review_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Score at or above which a transaction is sent to review (default: the model card's)."""
    fraud_decline_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Score at or above which a transaction is declined (default: the model card's)."""
    fraud_shadow_version: str | None = None
    """A second fraud model version (from the registry) that scores a sample of the traffic
    to ``fraud.shadow`` without affecting the results; unset = no shadow."""
    fraud_shadow_sample: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of valid transactions the shadow model scores."""
    drift_sample: float = Field(default=0.02, ge=0.0, le=1.0)
    """Share of transactions also scored with the FP32 file of the served version, to export
    the INT8-vs-FP32 score difference and decision flips as metrics (0 = off)."""
    history_max_staleness_ms: float = Field(default=1000.0, gt=0.0)
    """A card's history snapshot is used only when the slow path has applied every earlier
    transaction of the card's partition, or the oldest one it has not applied is at most this old
    relative to the scored event; otherwise the event is scored on default history and marked
    ``degraded``."""
    reco_batch_max_rows: int = Field(default=32, ge=1, le=65_536)
    """Reco lane: most requests of one path (catalogue or candidates) per model hand-off."""
    reco_max_wait_ms: float = Field(default=5.0, ge=0.0, le=100.0)
    """Reco lane: longest a request waits for a second concurrent batch (<= 100)."""
    reco_inline_max_us: float = Field(default=4000.0, ge=0.0)
    """Reco lane: batches estimated to take at most this long run on the event loop, longer
    ones in a thread (0 = always a thread). Measured: on the loop, p99 at 2,000 req/s halves."""
    reco_budget_ms: float = Field(default=100.0, gt=0.0)
    """Reco lane: end-to-end budget from ``sent_at``; results past it are counted as late."""
    reco_model_version: str = "latest"
    """Reco model version to serve: ``latest`` (followed while running) or pinned (``v1``)."""
    reco_model_dir: Path | None = None
    """Reco lane: serve this model folder instead of the registry's (no hot swap)."""
    reco_model_precision: Literal["int8", "fp32"] = "int8"
    """Reco lane: which file of the model card to serve."""
    inline_inference_max_us: float = Field(default=200.0, ge=0.0)
    """Run the model on the event loop when a full batch takes less than this (0 = never)."""
    inference_threads: int = Field(default=1, ge=1, le=64)
    """onnxruntime intra-op threads per session."""

    batch_chunk_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A job's input objects are split into chunks of about this many bytes."""
    batch_process: bool = True
    """Score batch chunks in a child process, so real-time lanes keep the worker's GIL."""
    batch_process_nice: int = Field(default=19, ge=0, le=19)
    """Niceness added to the batch scoring process, so the OS scheduler also puts real-time
    lanes first under CPU contention (0 = same priority as the worker)."""
    batch_yield_ratio: float = Field(default=2.0, ge=0.0, le=100.0)
    """While real-time traffic flows, the batch lane rests this many times as long as each
    slice of scoring took (2.0: batch uses at most a third of the time). 0 = never rests."""
    batch_rows_per_call: int = Field(default=8192, ge=1)
    """Rows per model call in the batch lane (throughput first)."""

    batch_window_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """batch.requests: score and write a window when its records reach this size ..."""
    batch_window_ms: int = Field(default=5_000, ge=100)
    """... or when its first record has waited this long."""

    archive_max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Archive window: close an object when its uncompressed JSONL reaches this size ..."""
    archive_max_age_ms: int = Field(default=60_000, ge=100)
    """... or when its first record has waited this long."""

    # --- serverless function (pipeline/serverless.py) -------------------------------------
    serverless_send_timeout_ms: float = Field(default=10_000.0, gt=0.0, le=900_000.0)
    """Serverless fraud function: longest an invocation waits for its scores and dead letters
    to be acknowledged (also capped by the invocation's remaining time); records not acked by
    then are reported as batch item failures."""

    # --- consumer services (inferlane serve ...) -----------------------------------------------
    service_host: str = "127.0.0.1"
    """Address the HTTP services listen on (``0.0.0.0`` in a container)."""
    service_max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest HTTP request body the services accept (larger: 413)."""
    fraud_check_port: int = Field(default=8081, ge=0, le=65535)
    fraud_check_budget_ms: float = Field(default=50.0, gt=0.0, le=60_000.0)
    """fraud-check: the pipeline's score must be back within this long after the request
    arrived, or the rules answer (``fallback: true``)."""
    fraud_check_decisions_max: int = Field(default=100_000, ge=1)
    """fraud-check: recent pipeline decisions kept for ``GET /v1/decisions/{event_id}``."""
    reco_service_port: int = Field(default=8082, ge=0, le=65535)
    reco_service_deadline_ms: float = Field(default=100.0, gt=0.0, le=60_000.0)
    """recommendations: how long ``POST /v1/recommend`` waits for fresh items before it falls
    back to the stored ones, then to popular items."""
    reco_service_users_max: int = Field(default=100_000, ge=1)
    """recommendations: users whose latest top-k is kept (least recently updated evicted)."""

    @field_validator("lanes", mode="before")
    @classmethod
    def _split_lanes(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("lanes")
    @classmethod
    def _known_lanes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"names no lane; known: {list(KNOWN_LANES)}")
        unknown = sorted(set(value) - set(KNOWN_LANES))
        if unknown:
            raise ValueError(f"unknown lane(s) {unknown}; known: {list(KNOWN_LANES)}")
        return value

    @model_validator(mode="after")
    def _credentials_consistent(self) -> Settings:
        problems = _credential_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def topic(self, name: str) -> str:
        """Full topic name for a logical one (``fraud.scores``) with the configured prefix."""
        return f"{self.topic_prefix}{name}"

    def group_id(self, lane: str) -> str:
        """Consumer group id of a lane; each lane commits its own offsets."""
        return f"{self.app_id}-{lane}"


def _credential_problems(s: Settings) -> list[str]:
    """Kafka security and S3 key combinations that would connect differently than asked."""
    protocol = s.kafka_security_protocol
    sasl = protocol.startswith("SASL_")
    tls = protocol in ("SSL", "SASL_SSL")
    problems = []
    if sasl:
        given = {"INFERLANE_KAFKA_SASL_USERNAME": s.kafka_sasl_username,
                 "INFERLANE_KAFKA_SASL_PASSWORD": s.kafka_sasl_password}
        missing = [name for name, value in given.items() if not value]
        if missing:
            problems.append(f"INFERLANE_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                            f"{' and '.join(missing)}")
    elif s.kafka_sasl_username or s.kafka_sasl_password:
        problems.append(f"INFERLANE_KAFKA_SASL_USERNAME/PASSWORD are set but "
                        f"INFERLANE_KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL "
                        f"(SASL_SSL or SASL_PLAINTEXT)")
    files = [name for name, value in (("INFERLANE_KAFKA_SSL_CAFILE", s.kafka_ssl_cafile),
                                      ("INFERLANE_KAFKA_SSL_CERTFILE", s.kafka_ssl_certfile),
                                      ("INFERLANE_KAFKA_SSL_KEYFILE", s.kafka_ssl_keyfile))
             if value is not None]
    if files and not tls:
        problems.append(f"{', '.join(files)} set but INFERLANE_KAFKA_SECURITY_PROTOCOL="
                        f"{protocol} does not use TLS (SSL or SASL_SSL)")
    if s.kafka_ssl_keyfile is not None and s.kafka_ssl_certfile is None:
        problems.append("INFERLANE_KAFKA_SSL_KEYFILE needs INFERLANE_KAFKA_SSL_CERTFILE")
    if s.kafka_ssl_keyfile_password is not None and s.kafka_ssl_certfile is None:
        problems.append("INFERLANE_KAFKA_SSL_KEYFILE_PASSWORD needs INFERLANE_KAFKA_SSL_CERTFILE")
    if (s.s3_access_key_id is None) != (s.s3_secret_access_key is None):
        # One key alone would silently fall back to the AWS credential chain.
        problems.append("INFERLANE_S3_ACCESS_KEY_ID and INFERLANE_S3_SECRET_ACCESS_KEY go "
                        "together (or neither: the standard AWS credential chain)")
    return problems


def load_settings(**overrides: object) -> Settings:
    """Build :class:`Settings` from the environment; :class:`ConfigError` lists every problem."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from exc


def _describe(err: Any) -> str:
    """One problem of a ValidationError, led by the variable (cross-field ones name theirs).

    Only the location and message are used: pydantic's ``input`` may hold a secret value."""
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"]:
        return msg
    return f"INFERLANE_{'_'.join(str(p) for p in err['loc']).upper()}: {msg}"
