"""A TGI simulator: Hugging Face text-generation-inference's HTTP protocol, without a GPU.

Tests, development and load tests need a TGI that answers at once, on a laptop, and that
fails on demand. The simulator serves TGI 3.x's routes and shapes (``/info``, ``/health``,
``/generate``, ``/generate_stream``, ``/`` (compat), ``/v1/chat/completions``,
``/tokenize``, ``/chat_tokenize``, ``/v1/models``, ``/metrics``), TGI's validation rules and
error shapes, errors inside 200 streams, 429 past ``max_concurrent_requests`` and refused
connections while "loading". Latency is slept with asyncio, so one process holds hundreds
of generations. Its answer to the epicrisis prompt is JSON built from the prompt's own
cited lines (:mod:`epicrisis.llm.simulator.answer`), never from the summarizer.

Control routes (not TGI's): ``GET /__sim/state`` (faults, counters) and
``POST /__sim/faults`` (``{"malformed": {"next": 2}, "overloaded": {"probability": 0.1},
"reload": 3, "first_token_seconds": 0.5, "clear": true, "reset_counters": true}``).

Public API: :class:`SimulatorConfig`, :class:`Simulator`, :func:`build_app`,
:func:`serve`, :class:`SimulatorThread`, and :func:`add_arguments` with
:func:`config_from_args` for the ``epicrisis tgi-sim`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import threading
from collections.abc import Awaitable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from aiohttp import web

from epicrisis.llm.simulator.config import MODEL_ID, TGI_VERSION, SimulatorConfig
from epicrisis.llm.simulator.faults import FAULT_KINDS, FaultKind, FaultSpec, parse_kind
from epicrisis.llm.simulator.server import Simulator

__all__ = [
    "FAULT_KINDS",
    "MODEL_ID",
    "TGI_VERSION",
    "FaultSpec",
    "Simulator",
    "SimulatorConfig",
    "SimulatorThread",
    "add_arguments",
    "build_app",
    "config_from_args",
    "serve",
]

T = TypeVar("T")


def build_app(config: SimulatorConfig) -> web.Application:
    """The aiohttp application alone (for aiohttp's test server: no loading, no reloads)."""
    return Simulator(config).app


async def serve(config: SimulatorConfig) -> None:
    """Run the simulator until SIGINT or SIGTERM (``epicrisis tgi-sim``)."""
    simulator = Simulator(config)
    await simulator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    loading = f", loading for {config.load_seconds:g} s" if config.load_seconds else ""
    sys.stderr.write(
        f"TGI simulator for {config.model_id} on http://{_url_host(config.host)}:"
        f"{simulator.port}{loading} (control: /__sim/state, /__sim/faults)\n"
    )
    try:
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await simulator.stop()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class SimulatorThread:
    """The simulator on its own event loop in a daemon thread, for synchronous callers.

    ``with SimulatorThread(SimulatorConfig(port=0)) as sim: httpx2.get(sim.base_url + ...)``.
    The port is bound on entry; with a load delay it starts listening later
    (``sim.wait_listening()``).
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tgi-simulator", daemon=True
        )
        self._simulator: Simulator | None = None

    @property
    def simulator(self) -> Simulator:
        if self._simulator is None:
            raise RuntimeError("the simulator thread is not running")
        return self._simulator

    @property
    def port(self) -> int:
        return self.simulator.port

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.port}"

    def call(self, coroutine: Awaitable[T], timeout: float = 30.0) -> T:
        """Run ``coroutine`` on the simulator's loop and wait for its result."""

        async def wrapped() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout)

    def wait_listening(self, timeout: float = 30.0) -> None:
        self.call(self.simulator.wait_listening(), timeout)

    def __enter__(self) -> SimulatorThread:
        self._thread.start()

        async def create() -> Simulator:
            simulator = Simulator(self.config)
            await simulator.start()
            return simulator

        try:
            self._simulator = self.call(create())
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            if self._simulator is not None:
                self.call(self._simulator.stop())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


# -- command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``epicrisis tgi-sim`` flags (destinations start with ``sim_``)."""
    d = SimulatorConfig()
    add = parser.add_argument
    add(
        "--host",
        metavar="HOST",
        dest="sim_host",
        default=d.host,
        help="address to bind (default %(default)s: loopback only)",
    )
    add(
        "--port",
        metavar="PORT",
        dest="sim_port",
        type=_port,
        default=d.port,
        help="port to listen on, 0 for any free one (default %(default)s)",
    )
    add(
        "--model-id",
        metavar="ID",
        dest="sim_model_id",
        default=d.model_id,
        help="model id to report",
    )
    add(
        "--max-input-tokens",
        metavar="N",
        dest="sim_max_input_tokens",
        type=_positive,
        default=d.max_input_tokens,
    )
    add(
        "--max-total-tokens",
        metavar="N",
        dest="sim_max_total_tokens",
        type=_positive,
        default=d.max_total_tokens,
    )
    add(
        "--max-concurrent-requests",
        metavar="N",
        dest="sim_max_concurrent_requests",
        type=_positive,
        default=d.max_concurrent_requests,
        help="in-flight limit; past it, 429 (default %(default)s)",
    )
    add("--max-best-of", metavar="N", dest="sim_max_best_of", type=_positive, default=d.max_best_of)
    add(
        "--max-stop-sequences",
        metavar="N",
        dest="sim_max_stop_sequences",
        type=_positive,
        default=d.max_stop_sequences,
    )
    add(
        "--first-token-latency",
        dest="sim_first_token_seconds",
        type=_seconds,
        default=d.first_token_seconds,
        metavar="SECONDS",
        help="time to first token",
    )
    add(
        "--token-latency",
        dest="sim_token_seconds",
        type=_seconds,
        default=d.token_seconds,
        metavar="SECONDS",
        help="time per further token",
    )
    add(
        "--load-delay",
        dest="sim_load_seconds",
        type=_seconds,
        default=d.load_seconds,
        metavar="SECONDS",
        help="refuse connections this long after start, as TGI loading",
    )
    add(
        "--tokenizer",
        dest="sim_tokenizer",
        metavar="PATH",
        type=_existing_file,
        default=None,
        help="a tokenizer.json for exact token counts (default: a Llama-3-like rule)",
    )
    add("--seed", metavar="N", dest="sim_seed", type=int, default=None, help="seed for fault draws")
    add(
        "--fault",
        dest="sim_faults",
        action="append",
        type=_fault_probability,
        default=[],
        metavar="KIND=PROBABILITY",
        help=f"inject a fault on each request with this probability; KIND is one of "
        f"{', '.join(FAULT_KINDS)} (repeatable)",
    )
    add(
        "--fault-next",
        dest="sim_faults_next",
        action="append",
        type=_fault_count,
        default=[],
        metavar="KIND=N",
        help="inject a fault on the next N requests (repeatable)",
    )
    add(
        "--slow-seconds",
        dest="sim_slow_seconds",
        type=_seconds,
        default=d.slow_seconds,
        metavar="SECONDS",
        help="extra time to first token of the slow fault (default %(default)s)",
    )
    add(
        "--loading-seconds",
        dest="sim_loading_seconds",
        type=_seconds,
        default=d.loading_seconds,
        metavar="SECONDS",
        help="how long the loading fault refuses connections (default %(default)s)",
    )
    add(
        "--stop-on-eot",
        dest="sim_stop_on_eot",
        action="store_true",
        help="end plain-text answers at <|eot_id|> (Med42's own config does not)",
    )
    add(
        "--chat-stream-errors",
        dest="sim_chat_stream_errors",
        choices=("tgi", "openai"),
        default=d.chat_stream_errors,
        help="shape of error events in chat streams (default %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The config the parsed flags describe (``ValueError`` if they contradict each other)."""
    faults: dict[str, FaultSpec] = {}
    for kind, probability in args.sim_faults:
        faults.setdefault(kind, FaultSpec()).probability = probability
    for kind, count in args.sim_faults_next:
        faults.setdefault(kind, FaultSpec()).next = count
    return SimulatorConfig(
        host=args.sim_host,
        port=args.sim_port,
        model_id=args.sim_model_id,
        max_input_tokens=args.sim_max_input_tokens,
        max_total_tokens=args.sim_max_total_tokens,
        max_concurrent_requests=args.sim_max_concurrent_requests,
        max_best_of=args.sim_max_best_of,
        max_stop_sequences=args.sim_max_stop_sequences,
        first_token_seconds=args.sim_first_token_seconds,
        token_seconds=args.sim_token_seconds,
        load_seconds=args.sim_load_seconds,
        slow_seconds=args.sim_slow_seconds,
        loading_seconds=args.sim_loading_seconds,
        tokenizer_path=args.sim_tokenizer,
        seed=args.sim_seed,
        faults=faults,
        stop_on_eot=args.sim_stop_on_eot,
        chat_stream_errors=args.sim_chat_stream_errors,
    )


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return value


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text}")
    return value


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _split_fault(text: str) -> tuple[FaultKind, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND=VALUE: {text}")
    try:
        return parse_kind(name), value
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fault_probability(text: str) -> tuple[FaultKind, float]:
    kind, value = _split_fault(text)
    try:
        probability = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a probability: {text}") from None
    if not 0.0 <= probability <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability is between 0 and 1: {text}")
    return kind, probability


def _fault_count(text: str) -> tuple[FaultKind, int]:
    kind, value = _split_fault(text)
    count = _int(value)
    if count < 0:
        raise argparse.ArgumentTypeError(f"a count is not negative: {text}")
    return kind, count
