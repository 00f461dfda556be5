"""Clients of the Epicrisis gRPC API, for integration engines: plain Python objects, no protobuf.

    from epicrisis.client import Client

    with Client("summarizer.internal:50051") as client:
        job = client.summarize(bundle_bytes, idempotency_key="adt-A03-12345")
        if job.summary is not None:
            print(job.summary.section("discharge_diagnosis"))

:class:`AsyncClient` has the same methods as coroutines. Failures raise
:class:`ClientError` subclasses; :mod:`epicrisis.client.bulk` is ``epicrisis submit``.
"""

from epicrisis.client._core import RetryPolicy
from epicrisis.client.aio import AsyncClient
from epicrisis.client.errors import (
    ClientError,
    DeadlineExceeded,
    InvalidBundle,
    JobNotFound,
    Overloaded,
)
from epicrisis.client.model import (
    JobError,
    JobResult,
    Progress,
    job_from_message,
    summary_from_message,
)
from epicrisis.client.sync import Client
from epicrisis.serving.jobs import JobState

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "DeadlineExceeded",
    "InvalidBundle",
    "JobError",
    "JobNotFound",
    "JobResult",
    "JobState",
    "Overloaded",
    "Progress",
    "RetryPolicy",
    "job_from_message",
    "summary_from_message",
]
