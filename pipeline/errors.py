"""The exception tree of inferlane.

Every error the library raises on purpose derives from one root, and carries a ``retriable``
flag so callers decide retry-or-give-up with a lookup instead of a guess::

    InferlaneError                  (retriable = False)
    ├── ConfigError                 bad or missing settings
    ├── StackError                  the embedded local stack cannot start or stop
    │   ├── PrerequisiteMissingError  Java 17+ or the fetched Kafka broker is missing
    │   └── PortInUseError          a requested port is already taken
    ├── ModelLoadError              a model file is missing, corrupt or does not match its card
    ├── TopicError                  topics cannot be created or do not match their spec
    └── SinkError                   an S3 call failed      (retriable unless e.g. 404/403)

Bad *input* is never an exception: it becomes a :class:`schemas.DeadLetter` record.
"""

from __future__ import annotations

__all__ = [
    "EXIT_CONFIG",
    "EXIT_LANE_CRASHED",
    "ConfigError",
    "InferlaneError",
    "ModelLoadError",
    "PortInUseError",
    "PrerequisiteMissingError",
    "SinkError",
    "StackError",
    "StartCheckError",
    "TopicError",
]


class InferlaneError(Exception):
    """Root of every error inferlane raises on purpose."""

    retriable: bool = False


class ConfigError(InferlaneError):
    """Settings are invalid or incomplete."""


class StackError(InferlaneError):
    """The embedded local stack (broker, S3) could not be started, reached or stopped."""


class PrerequisiteMissingError(StackError):
    """Java 17+ is not installed, or the Kafka broker's jars are not fetched (``make install``)."""


class PortInUseError(StackError):
    """A port asked for explicitly is already bound by another process."""


class ModelLoadError(InferlaneError):
    """A model file is missing, corrupt (sha256 mismatch) or inconsistent with its card."""


class TopicError(InferlaneError):
    """Topics could not be created, or exist with an incompatible layout."""


class StartCheckError(ConfigError):
    """A worker's start check failed: the deployment does not match what the lanes need (a
    topic's partition count, an unreachable bucket). The message names the cause and the fix;
    the worker exits with :data:`EXIT_CONFIG` before consuming anything."""


EXIT_CONFIG = 78
"""Exit code of a worker whose start checks failed (``EX_CONFIG`` of sysexits.h)."""
EXIT_LANE_CRASHED = 70
"""Exit code of a worker ended by a lane crash it cannot recover from (``EX_SOFTWARE``)."""


class SinkError(InferlaneError):
    """An S3 (sink or source) call failed. ``retriable`` says whether trying again can help:
    true for connection errors, timeouts, throttling and 5xx; false for e.g. a missing key."""

    retriable = True

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable
