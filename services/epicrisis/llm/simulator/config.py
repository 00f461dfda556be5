"""The simulator's settings and counters (shared by its server, its CLI and its tests)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from epicrisis.llm.simulator.faults import FaultSpec, parse_kind

MODEL_ID = "m42-health/Llama3-Med42-70B"
TGI_VERSION = "3.3.6"
ChatStreamErrors = Literal["tgi", "openai"]


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulator presents itself, how fast it is and how it fails.

    The defaults are Med42-v2 (8,192-token context) on a TGI with its default limits.
    """

    host: str = "127.0.0.1"  # loopback only unless asked
    port: int = 8080  # 0 picks a free port (read it from Simulator.port)
    model_id: str = MODEL_ID
    version: str = TGI_VERSION
    max_input_tokens: int = 8191
    max_total_tokens: int = 8192
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    validation_workers: int = 2
    first_token_seconds: float = 0.0  # time to first token
    token_seconds: float = 0.0  # time per further token
    load_seconds: float = 0.0  # refuse connections this long after start (model loading)
    slow_seconds: float = 2.0  # extra time to first token of the "slow" fault
    loading_seconds: float = 5.0  # how long the "loading" fault refuses connections
    tokenizer_path: str | None = None  # a tokenizer.json for exact counts, else the rule
    seed: int | None = None  # fault draws (and sampling seeds) repeat under the same seed
    faults: Mapping[str, FaultSpec] = field(default_factory=dict)
    stop_on_eot: bool = False  # True: end plain text at <|eot_id|> (fixing Med42's config)
    chat_stream_errors: ChatStreamErrors = "tgi"  # "openai": {"error": {"message", ...}}

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535 (got {self.port})")
        if not 0 < self.max_input_tokens < self.max_total_tokens:
            raise ValueError("max_input_tokens must be positive and below max_total_tokens")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be at least 1")
        for name in (
            "first_token_seconds",
            "token_seconds",
            "load_seconds",
            "slow_seconds",
            "loading_seconds",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative")
        for kind in self.faults:
            parse_kind(kind)

    @property
    def fingerprint(self) -> str:
        """``system_fingerprint`` of chat answers: TGI's version and docker label."""
        return f"{self.version}-native"


@dataclass(slots=True)
class Stats:
    """Counters for ``/__sim/state`` and ``/metrics``."""

    requests: dict[str, Counter[int]] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    queued: int = 0  # admitted, waiting for the first token
    generating: int = 0
    request_count: int = 0
    success: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    generated_tokens: int = 0
    duration_seconds: float = 0.0

    def reset(self) -> None:
        """Zero the counters; the gauges of requests now in flight stay true."""
        self.requests = {}
        self.max_in_flight = self.in_flight
        self.request_count = self.success = self.input_tokens = self.generated_tokens = 0
        self.failures = Counter()
        self.duration_seconds = 0.0

    def record(self, route: str, status: int) -> None:
        self.requests.setdefault(route, Counter())[status] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": {
                route: {str(status): n for status, n in sorted(counts.items())}
                for route, counts in sorted(self.requests.items())
            },
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "queued": self.queued,
            "generating": self.generating,
            "request_count": self.request_count,
            "success": self.success,
            "failures": dict(self.failures),
            "input_tokens": self.input_tokens,
            "generated_tokens": self.generated_tokens,
        }


class Slot:
    """A request's place among the ``max_concurrent_requests`` (queued, then generating)."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._generating = False
        stats.in_flight += 1
        stats.queued += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)

    def generating(self) -> None:
        if not self._generating:
            self._generating = True
            self._stats.queued -= 1
            self._stats.generating += 1

    def release(self) -> None:
        self._stats.in_flight -= 1
        if self._generating:
            self._stats.generating -= 1
        else:
            self._stats.queued -= 1
