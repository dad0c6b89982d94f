"""Event shapes on the wire: the single source of truth for every topic's value.

Each shape is a frozen :class:`msgspec.Struct` whose annotations carry the constraints, so the
same class validates incoming JSON (see :mod:`schemas.validation`) and exports the JSON Schema
(see :mod:`schemas.jsonschema`). Values travel as UTF-8 JSON encoded with orjson; unknown extra
fields are ignored (producers may add fields without breaking consumers).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "RECO_DEFAULT_K",
    "RECO_MAX_CANDIDATES",
    "RECO_MAX_K",
    "BatchChunk",
    "BatchCounts",
    "BatchJob",
    "BatchRecord",
    "BatchResult",
    "Channel",
    "DeadLetter",
    "Decision",
    "DegradedReason",
    "FraudLabel",
    "FraudScore",
    "Label",
    "RecoItem",
    "RecoRequest",
    "RecoResult",
    "ShadowScore",
    "Transaction",
]

Channel = Literal["pos", "ecom", "atm"]
Decision = Literal["approve", "review", "decline"]
Label = Literal["chargeback", "confirmed_fraud", "legit"]

# Pattern end: Python's ``$`` (msgspec's check) also matches before a final newline, so "EUR\n"
# would pass ``^[A-Z]{3}$``; ``(?!\n)$`` is the end of the string in Python and ECMA regexes
# (the exported JSON Schema) alike.
_END = r"(?!\n)$"
_Id = Annotated[str, Meta(min_length=1, max_length=128)]
_Country = Annotated[str, Meta(pattern="^[A-Z]{2}" + _END)]
# Epoch seconds; bounded so a millisecond timestamp sent by mistake is rejected, not misread.
_EpochS = Annotated[float, Meta(ge=0.0, le=1e10)]
_Probability = Annotated[float, Meta(ge=0.0, le=1.0)]

#: ``k`` of a :class:`RecoRequest` that does not say.
RECO_DEFAULT_K = 10
#: Largest ``k`` the schema admits; the served model's ``k_max`` may be lower (then: DLQ).
RECO_MAX_K = 100
#: Longest ``candidate_ids`` list: ranking is per request, so the list bounds its cost.
RECO_MAX_CANDIDATES = 1000


class Transaction(msgspec.Struct, frozen=True, kw_only=True):
    """A card transaction to score, value of ``fraud.requests`` (key: ``card_id``)."""

    event_id: _Id
    """Unique id of the event; results carry it back."""
    card_id: _Id
    merchant_id: _Id
    amount: Annotated[float, Meta(ge=0.0, le=1e9)]
    """Amount in ``currency`` units; finite, >= 0 (NaN and Infinity are rejected)."""
    currency: Annotated[str, Meta(pattern="^[A-Z]{3}" + _END)]
    """ISO 4217 code, three upper-case letters."""
    mcc: Annotated[int, Meta(ge=0, le=9999)]
    """Merchant category code."""
    country: _Country
    """Merchant country, ISO 3166 alpha-2."""
    card_country: _Country
    """Card issuing country, ISO 3166 alpha-2."""
    channel: Channel
    ts: _EpochS
    """When the transaction happened, epoch seconds."""
    sent_at: _EpochS | None = None
    """When the event was produced, epoch seconds; end-to-end latency is counted from it."""


DegradedReason = Literal["no_history", "stale", "loading", "misrouted"]


class FraudScore(msgspec.Struct, frozen=True, kw_only=True):
    """The fraud lane's answer for one transaction, value of ``fraud.scores`` (key: ``card_id``)."""

    event_id: _Id
    card_id: _Id
    score: _Probability
    """Model probability that the transaction is fraud."""
    decision: Decision
    """``score`` mapped through the lane's review/decline thresholds."""
    model_version: str
    degraded: bool
    """True when the score could not use the card's full slow-path history."""
    scored_at: _EpochS
    sent_at: _EpochS | None = None
    """Copied from the request so readers can measure end-to-end latency."""
    degraded_reason: DegradedReason | None = None
    """Why ``degraded``: ``no_history`` (no earlier transaction of the card), ``stale`` (the
    slow path lags more than its bound), ``loading`` (the history view is still loading),
    ``misrouted`` (the record is on a partition its key does not hash to with the expected
    partitioner, so the card's history may be split: a producer misconfiguration, see
    docs/producers.md). ``None`` when not degraded."""


class ShadowScore(msgspec.Struct, frozen=True, kw_only=True):
    """A shadow model's score for a sampled transaction, value of ``fraud.shadow`` (key:
    ``card_id``), next to what the served model said. Never used for decisions."""

    event_id: _Id
    card_id: _Id
    score: _Probability
    decision: Decision
    """The shadow model's decision under its own card's thresholds."""
    model_version: str
    """The shadow version, e.g. ``fraud-v1-int8``."""
    degraded: bool
    primary_score: _Probability
    primary_decision: Decision
    primary_model_version: str
    scored_at: _EpochS


class FraudLabel(msgspec.Struct, frozen=True, kw_only=True):
    """A late verdict on a past transaction, value of ``fraud.labels`` (key: ``card_id``).

    Labels arrive days after the transaction (chargebacks, analyst reviews); the slow path counts
    ``chargeback`` and ``confirmed_fraud`` into the card's history. ``legit`` only moves the
    history's clock.
    """

    event_id: _Id
    """The labelled transaction's ``event_id``."""
    card_id: _Id
    label: Label
    ts: _EpochS
    """When the verdict was made, epoch seconds."""


class RecoRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request for the top-k items of one user, value of ``reco.requests`` (key: ``user_id``)."""

    request_id: _Id
    """Unique id of the request; the result carries it back."""
    user_id: _Id
    """A user the model knows (``user-000123``); unknown users are dead-lettered."""
    k: Annotated[int, Meta(ge=1, le=RECO_MAX_K)] = RECO_DEFAULT_K
    """How many items to return, best first (at most the served model's ``k_max``)."""
    candidate_ids: (
        Annotated[list[_Id], Meta(min_length=1, max_length=RECO_MAX_CANDIDATES)] | None
    ) = None
    """Rank only these items (``item-00042``); absent = rank the whole catalogue. Duplicates
    count once; ids the model does not know are dropped (counted in the result); a list with
    no known id at all is dead-lettered."""
    sent_at: _EpochS | None = None
    """When the request was produced, epoch seconds; end-to-end latency is counted from it."""


class RecoItem(msgspec.Struct, frozen=True, kw_only=True):
    """One recommended item and its model score (higher is better)."""

    item_id: _Id
    score: float


class RecoResult(msgspec.Struct, frozen=True, kw_only=True):
    """The reco lane's answer to one request, value of ``reco.results`` (key: ``user_id``)."""

    request_id: _Id
    user_id: _Id
    items: list[RecoItem]
    """Exactly ``min(k, available)`` items, best first: ``available`` is the catalogue size, or
    the number of distinct known candidates when the request named candidates."""
    model_version: str
    """E.g. ``reco-v1-int8``."""
    scored_at: _EpochS
    sent_at: _EpochS | None = None
    """Copied from the request so readers can measure end-to-end latency."""
    dropped_candidates: Annotated[int, Meta(ge=0)] = 0
    """Candidate ids of the request that the model does not know (left out of the ranking)."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A record the pipeline could not process, value of ``<topic>.dlq`` (original key kept)."""

    error: str
    """Machine-readable class of failure: ``invalid_json``, ``schema``, ``inference``, ..."""
    reason: str
    """Human-readable reason naming the field and the problem."""
    topic: str
    partition: int
    offset: int
    raw: str
    """The original value: UTF-8 text, or base64 when ``raw_encoding`` says so."""
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    lane: str = ""
    failed_at: _EpochS = 0.0


_S3Uri = Annotated[str, Meta(pattern="^s3://[^/]+(/.*)?" + _END)]
BatchModel = Literal["fraud"]


class BatchJob(msgspec.Struct, frozen=True, kw_only=True):
    """A bulk scoring job over S3 objects, value of ``batch.jobs`` (key: ``job_id``)."""

    job_id: Annotated[str, Meta(pattern="^[A-Za-z0-9._-]{1,128}" + _END)]
    """Also the folder of the outputs: letters, digits, ``.``, ``_``, ``-``."""
    model: BatchModel
    input_uri: _S3Uri
    """``s3://bucket/key`` of one JSONL object, or ``s3://bucket/prefix/`` for every object under
    it; ``.gz`` objects are read as gzip (one chunk each: gzip cannot be split)."""
    output_uri: _S3Uri | None = None
    """Where outputs go; default ``s3://<bucket>/batch/<job_id>/``."""


class BatchRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One record to score without hurry, value of ``batch.requests`` (key: ``job_id``)."""

    job_id: Annotated[str, Meta(pattern="^[A-Za-z0-9._-]{1,128}" + _END)]
    model: BatchModel
    payload: Transaction


class BatchChunk(msgspec.Struct, frozen=True, kw_only=True):
    """One share of a job (internal ``batch.chunks`` topic): lines of one object starting in
    ``[byte_start, byte_end)``; the unit a worker scores and writes."""

    job_id: str
    model: BatchModel
    chunk_id: int
    chunks_total: int
    bucket: str
    key: str
    byte_start: int
    byte_end: int
    object_size: int
    gzip: bool
    output_bucket: str
    output_prefix: str


class BatchCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Rows read, scored and dead-lettered."""

    read: int = 0
    scored: int = 0
    dead_lettered: int = 0


class BatchResult(msgspec.Struct, frozen=True, kw_only=True):
    """Progress of a job, value of ``batch.results`` (key: ``job_id``)."""

    job_id: str
    status: Literal["planned", "chunk_done", "completed", "failed", "records_written"]
    chunks_total: int = 0
    chunk_id: int | None = None
    counts: BatchCounts = BatchCounts()
    output_keys: list[str] = msgspec.field(default_factory=list)
    error: str = ""
    at: _EpochS = 0.0

