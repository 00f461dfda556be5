"""Which backend writes a job's prose: the one the request names, else the deployment's.

The default is the LLM when ``EPICRISIS_LLM_URLS`` is set, the extractive templates when it
is not. A request for the LLM on a deployment without one fails the job, saying so. The
endpoint pool belongs to an event loop, so there is one per loop: the embedded server's, or
the one loop of a worker process, which all that process's jobs share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from epicrisis.config import Settings
from epicrisis.errors import ConfigurationError
from epicrisis.llm.backend import llm_summary
from epicrisis.llm.pool import HEALTH_PROBE_SECONDS, EndpointPool
from epicrisis.observability import metrics
from epicrisis.pipeline import summarize_stay
from epicrisis.serving.jobs import JobOptions
from epicrisis.stay import Stay
from epicrisis.summary.model import DischargeSummary

JobSummarizer = Callable[[Stay, JobOptions], Awaitable[DischargeSummary]]


class BackendChooser:
    """A :data:`JobSummarizer` that routes each job to its backend."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pools: dict[asyncio.AbstractEventLoop, EndpointPool] = {}

    async def __call__(self, stay: Stay, options: JobOptions) -> DischargeSummary:
        backend = options.backend or ("llm" if self._settings.llm_urls else "extractive")
        if backend == "extractive":
            summary = await asyncio.to_thread(summarize_stay, stay)
        elif not self._settings.llm_urls:
            raise ConfigurationError("this deployment has no LLM endpoint (EPICRISIS_LLM_URLS)")
        else:
            summary = await llm_summary(
                stay,
                self._pool(),
                max_output_tokens=options.max_output_tokens,
                settings=self._settings,
            )
        metrics.record_summary(summary)
        return summary

    async def llm_health(self, timeout: float = HEALTH_PROBE_SECONDS) -> bool | None:
        """Whether some LLM endpoint answers ``/health`` now; None without one configured."""
        if not self._settings.llm_urls:
            return None
        return await self._pool().check_health(timeout)

    def _pool(self) -> EndpointPool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = EndpointPool.from_settings(self._settings)
            self._pools[loop] = pool
            metrics.watch_pool(pool)
        return pool

    async def aclose(self) -> None:
        """Close the pool of the running loop (the others close with their loops)."""
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.aclose()
