"""Clients of the lanes: :mod:`~pipeline.clients.laneclients` (request -> result over Kafka, for
the services and users) and :mod:`~pipeline.clients.batchclient` (submit and follow batch jobs).
"""

from pipeline import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "batchclient": ["read_job_output", "submit_job", "wait_for_job"],
    "laneclients": ["FraudClient", "RecoClient", "Rejected", "ReplyClient", "TimedOut"],
})
