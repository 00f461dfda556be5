"""The LLM backend over real loopback HTTP against the TGI simulator: verify, retry, fall back.

Each test starts its own simulator (or shares the module's clean one) on a free port and
drives it with faults through ``POST /__sim/faults``; what the backend did is read from the
simulator's counters (``/__sim/state``) and the pool's stats. No test asserts a timing:
concurrency is shown by the simulator's ``max_in_flight`` under a backlog, retries by
request counts.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from aiohttp import web
from huggingface_hub.errors import (
    GenerationError,
    HfHubHTTPError,
    IncompleteGenerationError,
    InferenceTimeoutError,
    OverloadedError,
    ValidationError,
)

from epicrisis.config import get_settings
from epicrisis.errors import (
    BackendError,
    BackendGenerationError,
    BackendOverloadedError,
    BackendRejectedError,
    BackendUnavailableError,
    ConfigurationError,
    EpicrisisError,
    StayError,
)
from epicrisis.llm.backend import (
    EXTRACTIVE_GENERATOR,
    LLM_GENERATOR,
    RetryPolicy,
    llm_summary,
    summarize_stay_llm,
)
from epicrisis.llm.client import EOT, EndpointClient, backend_error, parse_error
from epicrisis.llm.pool import EndpointPool
from epicrisis.llm.simulator import MODEL_ID, SimulatorConfig, SimulatorThread
from epicrisis.pipeline import load_stay
from epicrisis.prompt import ANSWER_SCHEMA, OUTPUT_RESERVE_TOKENS
from epicrisis.stay import Stay
from epicrisis.summary.model import DischargeSummary
from sim_control import CHAT, chat_counts, refused, set_faults, sim_state, wait_until

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "services" / "epicrisis" / "samples" / "sample-stay.json"
DEATH = ROOT / "tests" / "fixtures" / "death-in-hospital.json"
FAST = RetryPolicy(max_attempts=6, total_seconds=30.0, base_seconds=0.01, max_backoff_seconds=0.1)


# -- plumbing ---------------------------------------------------------------------------


@pytest.fixture
def start() -> Iterator[Callable[..., SimulatorThread]]:
    """Start simulators on free loopback ports; all are stopped after the test."""
    running: list[SimulatorThread] = []

    def start_one(**options: Any) -> SimulatorThread:
        options.setdefault("seed", 7)
        sim = SimulatorThread(SimulatorConfig(port=0, **options))
        running.append(sim.__enter__())
        return sim

    yield start_one
    for sim in running:
        sim.__exit__(None, None, None)


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimulatorThread]:
    """One clean simulator for the tests that inject no fault."""
    with SimulatorThread(SimulatorConfig(port=0, seed=7)) as sim:
        yield sim


@pytest.fixture(scope="module")
def sample_bundle() -> bytes:
    return SAMPLE.read_bytes()


@pytest.fixture(scope="module")
def sample(sample_bundle: bytes) -> Stay:
    return load_stay(sample_bundle)


def pool_for(*urls: str, **options: Any) -> EndpointPool:
    options.setdefault("eject_seconds", 0.02)
    options.setdefault("max_eject_seconds", 0.2)
    return EndpointPool(list(urls), **options)


def summarize(
    stay: Stay, *urls: str, **options: Any
) -> tuple[DischargeSummary, list[Any], EndpointPool]:
    """One summary through a fresh pool; the pool's stats after it."""

    async def run() -> tuple[DischargeSummary, list[Any], EndpointPool]:
        async with pool_for(*urls) as pool:
            summary = await llm_summary(stay, pool, retry=FAST, **options)
            return summary, pool.stats(), pool

    return asyncio.run(run())


def bundle_names(bundle: bytes) -> set[str]:
    """Every way a reference may name an entry of the Bundle: ``Type/id`` and fullUrl."""
    names: set[str] = set()
    for entry in json.loads(bundle)["entry"]:
        resource = entry.get("resource", {})
        if "id" in resource:
            names.add(f"{resource['resourceType']}/{resource['id']}")
        if "fullUrl" in entry:
            names.add(entry["fullUrl"])
    return names


def assert_verified_llm(summary: DischargeSummary, bundle: bytes) -> None:
    """LLM prose, not a fallback, every sentence cited, and every citation in the Bundle."""
    prov = summary.provenance
    assert prov.backend == "llm" and prov.generator == LLM_GENERATOR
    assert not prov.fallback and prov.fallback_reason is None
    assert prov.model == MODEL_ID
    assert prov.grounding == 1.0
    assert prov.prompt_tokens and prov.generated_tokens
    course = summary.section("hospital_course")
    assert course is not None and course.narrative
    for section in summary.sections:
        assert all(sentence.sources for sentence in section.narrative), section.key
    cited = summary.source_references()
    assert cited and set(cited) <= bundle_names(bundle)


def without_timings(summary: DischargeSummary) -> dict[str, Any]:
    data = summary.model_dump(mode="json")
    data["provenance"]["timings_ms"] = None
    return data


# -- summaries that verify --------------------------------------------------------------


def test_sample_stay_verifies_and_cites_only_its_bundle(
    shared_sim: SimulatorThread, sample: Stay, sample_bundle: bytes
) -> None:
    first, stats, _ = summarize(sample, shared_sim.base_url)
    assert_verified_llm(first, sample_bundle)
    assert set(first.provenance.timings_ms or {}) >= {"prompt", "generation", "verify", "total"}
    assert stats[0].requests == 1 and stats[0].failures == {}
    assert stats[0].limit == 128 and stats[0].model_id == MODEL_ID
    again, _, _ = summarize(sample, shared_sim.base_url)
    assert without_timings(again) == without_timings(first)  # deterministic under the seed


def test_death_summary_has_no_instructions(shared_sim: SimulatorThread) -> None:
    bundle = DEATH.read_bytes()
    summary, _, _ = summarize(load_stay(bundle), shared_sim.base_url)
    assert summary.kind == "death-summary"
    assert summary.section("discharge_instructions") is None
    assert_verified_llm(summary, bundle)


@pytest.mark.corpus("clinosim", "synthea-r4")
def test_every_corpus_stay_summarizes_without_fallback(
    shared_sim: SimulatorThread, corpus_bundle: Path
) -> None:
    bundle = corpus_bundle.read_bytes()
    try:
        stay = load_stay(bundle)
    except StayError:
        pytest.skip("this Bundle has no finished inpatient stay")
    summary, stats, _ = summarize(stay, shared_sim.base_url)
    assert_verified_llm(summary, bundle)
    assert stats[0].failures == {}


def test_prompt_budget_follows_the_endpoint_info(
    start: Callable[..., SimulatorThread], sample: Stay
) -> None:
    sim = start(max_input_tokens=3000, max_total_tokens=4096)
    summary, _, _ = summarize(sample, sim.base_url)
    assert not summary.provenance.fallback
    # 4096 - 2048 leaves 2,048 tokens: the sample's 5,700-token prompt must be cut, and say so
    assert summary.provenance.omitted and all(o.count > 0 for o in summary.provenance.omitted)
    assert chat_counts(sim.base_url) == {"200": 1}  # never a 422 for length
    with pytest.raises(ConfigurationError, match="leaves no room"):
        summarize(sample, sim.base_url, max_output_tokens=4096)


# -- transport failures: retried --------------------------------------------------------


def test_overloaded_is_retried(start: Callable[..., SimulatorThread], sample: Stay) -> None:
    sim = start()
    set_faults(sim.base_url, {"overloaded": {"next": 2}})
    summary, stats, _ = summarize(sample, sim.base_url)
    assert not summary.provenance.fallback
    assert chat_counts(sim.base_url) == {"200": 1, "429": 2}
    assert stats[0].failures == {"overloaded": 2} and stats[0].healthy


def test_unhealthy_endpoint_is_probed_back(
    start: Callable[..., SimulatorThread], sample: Stay
) -> None:
    sim = start()
    set_faults(sim.base_url, {"overloaded": {"next": 1}, "unhealthy": {"next": 2}})
    summary, stats, _ = summarize(sample, sim.base_url)
    assert not summary.provenance.fallback
    counters = sim_state(sim.base_url)["counters"]["requests"]
    assert counters["/health"] == {"200": 1, "503": 2}  # ejected until /health said 200
    assert counters[CHAT] == {"200": 1, "429": 1}
    assert stats[0].failures == {"overloaded": 1, "unavailable": 2}


def test_refused_connection_while_loading_is_retried(
    start: Callable[..., SimulatorThread], sample: Stay
) -> None:
    sim = start(loading_seconds=1.0)
    set_faults(sim.base_url, {"reload": 1.0})
    wait_until(lambda: refused(sim.base_url), "the reload to close the port")
    summary, stats, _ = summarize(sample, sim.base_url)
    assert not summary.provenance.fallback
    assert stats[0].failures.get("unavailable", 0) >= 1
    assert chat_counts(sim.base_url) == {"200": 1}


def test_generation_failure_is_retried_once(
    start: Callable[..., SimulatorThread], sample: Stay
) -> None:
    sim = start()
    set_faults(sim.base_url, {"incomplete": {"next": 1}})
    summary, _, _ = summarize(sample, sim.base_url)
    assert not summary.provenance.fallback
    assert chat_counts(sim.base_url) == {"200": 1, "500": 1}

    set_faults(sim.base_url, {"generation": {"next": 2}, "reset_counters": True})
    with pytest.raises(BackendGenerationError) as caught:
        summarize(sample, sim.base_url)
    assert caught.value.status == 424 and caught.value.error_type == "generation"
    assert chat_counts(sim.base_url) == {"424": 2}  # one retry, not more


def test_rejected_request_is_raised_at_once(
    start: Callable[..., SimulatorThread], sample: Stay
) -> None:
    sim = start()
    set_faults(sim.base_url, {"validation": {"next": 1}})
    with pytest.raises(BackendRejectedError) as caught:
        summarize(sample, sim.base_url)
    error = caught.value
    assert error.status == 422 and error.error_type == "validation" and not error.retryable
    assert error.endpoint == 0
    assert error.parameters == ("inputs", "max_new_tokens")  # named, not quoted
    assert "Input validation error" not in str(error) and "Given" not in str(error)
    assert chat_counts(sim.base_url) == {"422": 1}


def test_retries_stop_at_the_attempt_bound(
    start: Callable[..., SimulatorThread], sample: Stay
) -> None:
    sim = start()
    set_faults(sim.base_url, {"overloaded": {"probability": 1.0}})
    with pytest.raises(BackendOverloadedError) as caught:
        summarize(sample, sim.base_url)
    assert caught.value.retryable and caught.value.status == 429
    assert chat_counts(sim.base_url) == {"429": FAST.max_attempts}


# -- answers that fail verification: one retry, then the flagged fallback ---------------


@pytest.mark.parametrize(
    ("kind", "rules"),
    [
        ("malformed", {"json"}),
        ("off_schema", {"schema", "missing-cites"}),
        ("unverifiable", {"unknown-handle", "numbers"}),
    ],
)
def test_bad_answers_fall_back_after_one_retry(
    start: Callable[..., SimulatorThread], sample: Stay, kind: str, rules: set[str]
) -> None:
    sim = start()
    set_faults(sim.base_url, {kind: {"next": 2}})
    summary, _, _ = summarize(sample, sim.base_url)
    prov = summary.provenance
    assert prov.fallback and prov.backend == "llm" and prov.generator == EXTRACTIVE_GENERATOR
    assert prov.model == MODEL_ID and prov.grounding is None
    reason = prov.fallback_reason or ""
    assert reason.startswith("the LLM answer failed verification 2 times (rules: ")
    named = set(reason.split("(rules: ")[1].rstrip(")").split(", "))
    assert named and named <= rules
    assert chat_counts(sim.base_url) == {"200": 2}  # the first answer and its one retry
    assert sim_state(sim.base_url)["fired"][kind] == 2
    course = summary.section("hospital_course")
    assert course is not None and course.narrative  # the extractive prose, cited
    assert all(s.sources for s in course.narrative)


def test_a_bad_answer_then_a_good_one_is_not_a_fallback(
    start: Callable[..., SimulatorThread], sample: Stay, sample_bundle: bytes
) -> None:
    sim = start()
    set_faults(sim.base_url, {"unverifiable": {"next": 1}})
    summary, _, _ = summarize(sample, sim.base_url, seed=41)
    assert_verified_llm(summary, sample_bundle)
    assert chat_counts(sim.base_url) == {"200": 2}


# -- several endpoints ------------------------------------------------------------------


def test_a_health_check_is_not_held_up_by_an_endpoint_that_never_answers(
    shared_sim: SimulatorThread,
) -> None:
    """A port that accepts connections and then says nothing (a hung host): its probe times
    out and leaves the rotation; the healthy endpoint still makes the answer True."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"

        async def run() -> tuple[bool, list[Any]]:
            async with pool_for(silent_url, shared_sim.base_url) as pool:
                answered = await asyncio.wait_for(pool.check_health(timeout=0.5), 10)
                return answered, pool.stats()

        answered, stats = asyncio.run(run())
    assert answered
    assert not stats[0].healthy and stats[1].healthy


def test_one_endpoint_down_moves_traffic_to_the_other(
    start: Callable[..., SimulatorThread], sample: Stay, sample_bundle: bytes
) -> None:
    down, up = start(loading_seconds=60.0), start()
    set_faults(down.base_url, {"reload": 60.0})
    wait_until(lambda: refused(down.base_url), "the endpoint to go down")
    count = 4

    async def run() -> tuple[list[DischargeSummary], list[Any]]:
        async with pool_for(down.base_url, up.base_url) as pool:
            summaries = await asyncio.gather(
                *(llm_summary(sample, pool, retry=FAST) for _ in range(count))
            )
            return list(summaries), pool.stats()

    summaries, stats = asyncio.run(run())
    for summary in summaries:
        assert_verified_llm(summary, sample_bundle)
    assert chat_counts(up.base_url) == {"200": count}
    assert not stats[0].healthy and stats[0].failures.get("unavailable", 0) >= 1
    assert stats[0].requests == 0  # it never held a generation
    assert stats[1].healthy and stats[1].requests == count and stats[1].failures == {}


def test_pool_keeps_the_endpoint_limit_in_flight(
    start: Callable[..., SimulatorThread],
    sample: Stay,
    sample_bundle: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit, backlog = 4, 10
    sim = start(max_concurrent_requests=limit, first_token_seconds=0.3)
    monkeypatch.setattr("epicrisis.llm.client.CLIENT_CONNECTIONS", 2)  # shards past 2 open

    async def run() -> tuple[list[DischargeSummary], list[Any], int]:
        async with pool_for(sim.base_url) as pool:
            summaries = await asyncio.gather(
                *(llm_summary(sample, pool, retry=FAST) for _ in range(backlog))
            )
            return list(summaries), pool.stats(), pool.endpoints[0].client.inference_clients

    summaries, stats, clients = asyncio.run(run())
    for summary in summaries:
        assert_verified_llm(summary, sample_bundle)
    counters = sim_state(sim.base_url)["counters"]
    assert counters["max_in_flight"] == limit  # kept full, never past it (no 429)
    assert counters["requests"][CHAT] == {"200": backlog}
    assert stats[0].limit == limit and stats[0].in_flight == 0
    assert clients == 2


def test_pool_limit_is_capped_by_settings(
    start: Callable[..., SimulatorThread], sample: Stay
) -> None:
    sim = start(max_concurrent_requests=50)

    async def run() -> list[Any]:
        async with pool_for(sim.base_url, max_in_flight=3) as pool:
            await llm_summary(sample, pool, retry=FAST)
            return pool.stats()

    assert asyncio.run(run())[0].limit == 3


# -- OpenAI-compatible servers ----------------------------------------------------------


class Front:
    """A server in front of the simulator that records chat bodies.

    ``openai=True`` plays vLLM: no ``/info``, ``/v1/models`` with ``max_model_len``, and
    OpenAI's ``json_schema`` response format (rewritten into TGI's for the simulator).
    """

    def __init__(self, upstream: str, *, openai: bool) -> None:
        self.upstream = upstream
        self.openai = openai
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []  # the Authorization header of each chat request
        self.app = web.Application()
        self.app.router.add_get("/info", self.info)
        self.app.router.add_get("/health", self.forward)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post(CHAT, self.chat)

    async def info(self, request: web.Request) -> web.StreamResponse:
        if self.openai:
            return web.json_response({"detail": "Not Found"}, status=404)
        return await self.forward(request)

    async def models(self, request: web.Request) -> web.StreamResponse:
        if not self.openai:
            return await self.forward(request)
        item = {"id": MODEL_ID, "object": "model", "owned_by": "vllm", "max_model_len": 8192}
        return web.json_response({"object": "list", "data": [item]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if self.openai:
            fmt = body["response_format"]
            assert fmt["type"] == "json_schema" and "value" not in fmt
            body = {**body, "response_format": {"type": "json_schema", "value": fmt["json_schema"]}}
        return await self.forward(request, body)

    async def forward(
        self, request: web.Request, body: dict[str, Any] | None = None
    ) -> web.StreamResponse:
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, self.upstream + request.path, json=body) as answer,
        ):
            return web.Response(
                status=answer.status, body=await answer.read(), content_type=answer.content_type
            )

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("openai", [False, True], ids=["tgi", "openai-compatible"])
@pytest.mark.parametrize("api_key", [None, "k3y"], ids=["no-key", "key"])
def test_request_shape_for_tgi_and_openai_compatible_servers(
    shared_sim: SimulatorThread,
    sample: Stay,
    sample_bundle: bytes,
    monkeypatch: pytest.MonkeyPatch,
    openai: bool,
    api_key: str | None,
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_this_server")  # never sent to an endpoint
    front = Front(shared_sim.base_url, openai=openai)

    async def run() -> tuple[DischargeSummary, Any]:
        async with front.serving() as url:
            base = url + ("/v1" if openai else "")  # OpenAI clients are often given .../v1
            async with pool_for(base, api_key=api_key) as pool:
                summary = await llm_summary(sample, pool, retry=FAST)
                return summary, pool.endpoints[0].info

    summary, info = asyncio.run(run())
    assert_verified_llm(summary, sample_bundle)
    assert info.dialect == ("openai" if openai else "tgi") and info.max_total_tokens == 8192
    (body,) = front.bodies
    expected_format = (
        {
            "type": "json_schema",
            "json_schema": {"name": "epicrisis_answer", "schema": ANSWER_SCHEMA},
        }
        if openai
        else {"type": "json_object", "value": ANSWER_SCHEMA}  # huggingface_hub's TGI grammar
    )
    assert body["response_format"] == expected_format
    assert body["model"] == MODEL_ID and body["stop"] == [EOT]
    assert body["max_tokens"] == OUTPUT_RESERVE_TOKENS
    assert body["temperature"] == 0.2 and body["top_p"] == 0.75
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert front.auth == [f"Bearer {api_key}" if api_key else None]


# -- the client on its own --------------------------------------------------------------


def test_client_info_health_and_refusals(
    start: Callable[..., SimulatorThread], sample: Stay
) -> None:
    sim = start(max_concurrent_requests=16)

    async def run() -> None:
        client = EndpointClient(sim.base_url + "/", index=3)
        try:
            info = await client.info()
            assert (info.model_id, info.max_concurrent_requests) == (MODEL_ID, 16)
            assert (info.max_input_tokens, info.max_total_tokens, info.dialect) == (
                8191,
                8192,
                "tgi",
            )
            assert await client.health()
            with pytest.raises(ConfigurationError, match="top_p"):
                await client.chat(
                    [], schema=ANSWER_SCHEMA, max_tokens=5, temperature=0.2, top_p=1.0
                )
        finally:
            await client.aclose()
        dead = EndpointClient("http://127.0.0.1:9", index=5)  # discard: nothing listens
        try:
            assert not await dead.health()
            with pytest.raises(BackendUnavailableError) as caught:
                await dead.info()
            assert caught.value.endpoint == 5 and caught.value.retryable
        finally:
            await dead.aclose()

    asyncio.run(run())


def test_synchronous_entry_point_reads_the_settings(
    shared_sim: SimulatorThread, sample: Stay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EPICRISIS_LLM_URLS", f" {shared_sim.base_url}/ ,")
    monkeypatch.setenv("EPICRISIS_LLM_TEMPERATURE", "0.3")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.llm_urls == [shared_sim.base_url]
    summary = summarize_stay_llm(sample)
    assert summary.provenance.backend == "llm" and not summary.provenance.fallback


# -- settings ---------------------------------------------------------------------------


def test_llm_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    assert settings.llm_urls == []
    assert settings.llm_max_output_tokens == OUTPUT_RESERVE_TOKENS
    assert 0 < settings.llm_top_p < 1 and settings.llm_temperature == 0.2
    with pytest.raises(ConfigurationError, match="EPICRISIS_LLM_URLS"):
        EndpointPool.from_settings(settings)

    monkeypatch.setenv("EPICRISIS_LLM_URLS", "http://tgi-0:8080,https://tgi-1/v1/")
    monkeypatch.setenv("EPICRISIS_LLM_API_KEY", "s3cret")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.llm_urls == ["http://tgi-0:8080", "https://tgi-1/v1"]
    assert "s3cret" not in repr(settings)

    for name, value in (
        ("EPICRISIS_LLM_URLS", "user:pw@tgi-0:8080"),  # no scheme; and never echoed
        ("EPICRISIS_LLM_TOP_P", "1.0"),  # TGI's 422
        ("EPICRISIS_LLM_TEMPERATURE", "0"),
    ):
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            get_settings.cache_clear()
            with pytest.raises(ConfigurationError) as caught:
                get_settings()
            assert name.removeprefix("EPICRISIS_").lower() in str(caught.value)
            assert "user:pw" not in str(caught.value)
    get_settings.cache_clear()


# -- error parsing ----------------------------------------------------------------------

PHI = "Jane Q. Doe, MRN 12345678"


@pytest.mark.parametrize(
    ("status", "payload", "kind", "expected"),
    [
        # plain-text 4xx: the router could not read the body
        (
            400,
            b"Failed to parse the request body as JSON: expected value at line 1 column 1",
            BackendRejectedError,
            {"status": 400, "error_type": None},
        ),
        (
            415,
            "Expected request with `Content-Type: application/json`",
            BackendRejectedError,
            {"status": 415},
        ),
        (
            422,
            f'Failed to deserialize the JSON body into the target type: invalid type: string "{PHI}"',
            BackendRejectedError,
            {"status": 422, "parameters": ()},
        ),
        # TGI's {"error", "error_type"}
        (
            422,
            {
                "error": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                "error_type": "validation",
            },
            BackendRejectedError,
            {"error_type": "validation", "parameters": ("top_p",)},
        ),
        (
            429,
            b'{"error":"Model is overloaded","error_type":"overloaded"}',
            BackendOverloadedError,
            {"status": 429},
        ),
        (
            424,
            {
                "error": "Request failed during generation: Server error: CUDA OOM",
                "error_type": "generation",
            },
            BackendGenerationError,
            {"status": 424},
        ),
        (
            500,
            {"error": "Incomplete generation", "error_type": "incomplete_generation"},
            BackendGenerationError,
            {"error_type": "incomplete_generation"},
        ),
        (
            503,
            {"error": "unhealthy", "error_type": "healthcheck"},
            BackendUnavailableError,
            {"status": 503},
        ),
        # an error event inside a 200 stream: no status, the type decides
        (
            None,
            'data: {"error":"Model is overloaded","error_type":"overloaded"}',
            BackendOverloadedError,
            {"status": 429},
        ),
        # OpenAI-style {"error": {"message", "type", "code"}}
        (
            None,
            {"error": {"message": f"bad value '{PHI}'", "http_status_code": 422}},
            BackendRejectedError,
            {"status": 422},
        ),
        (
            400,
            {
                "error": {
                    "message": f"[{{'loc': ('body', 'top_p'), 'input': '{PHI}'}}]",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            },
            BackendRejectedError,
            {"error_type": "BadRequestError", "parameters": ("top_p",)},
        ),
        (
            401,
            {"error": {"message": "Unauthorized", "type": "invalid_request_error"}},
            BackendRejectedError,
            {"status": 401},
        ),
        # vLLM's older flat shape
        (
            404,
            {
                "object": "error",
                "message": "The model `x` does not exist.",
                "type": "NotFoundError",
                "code": 404,
            },
            BackendRejectedError,
            {"error_type": "NotFoundError"},
        ),
        (502, None, BackendUnavailableError, {"status": 502}),
        (504, "", BackendUnavailableError, {"status": 504}),
        (500, b"Internal Server Error", BackendGenerationError, {"status": 500}),
        (None, None, BackendGenerationError, {"status": None}),
        (
            None,
            {"error": "x", "error_type": "bad type with spaces"},
            BackendGenerationError,
            {"error_type": None},
        ),
    ],
)
def test_parse_error(
    status: int | None,
    payload: Any,
    kind: type[BackendError],
    expected: dict[str, Any],
) -> None:
    error = parse_error(status, payload)
    assert type(error) is kind
    assert isinstance(error, EpicrisisError)
    assert error.retryable is (kind is not BackendRejectedError)
    assert error.max_retries == (1 if kind is BackendGenerationError else None)
    for name, value in expected.items():
        assert getattr(error, name) == value, name
    assert "Jane" not in str(error) and "12345678" not in str(error)
    placed = parse_error(status, payload, endpoint=2)
    assert placed.endpoint == 2 and "(LLM endpoint 2" in str(placed)
    copy = pickle.loads(pickle.dumps(placed))  # Celery ships errors between processes
    assert type(copy) is kind and str(copy) == str(placed)
    assert (copy.endpoint, copy.status, copy.retryable) == (2, placed.status, placed.retryable)


def _response(status: int, body: dict[str, Any]) -> httpx2.Response:
    return httpx2.Response(status, json=body, request=httpx2.Request("POST", "http://tgi/x"))


@pytest.mark.parametrize(
    ("exc", "kind", "status"),
    [
        (OverloadedError("Model is overloaded"), BackendOverloadedError, 429),
        (ValidationError(f"Input validation error: `seed` {PHI}"), BackendRejectedError, 422),
        (GenerationError("CUDA out of memory"), BackendGenerationError, 424),
        (IncompleteGenerationError("Incomplete generation"), BackendGenerationError, 500),
        (InferenceTimeoutError("Inference call timed out"), BackendUnavailableError, None),
        (
            HfHubHTTPError(
                "429 Too Many Requests",
                response=_response(
                    429, {"error": "Model is overloaded", "error_type": "overloaded"}
                ),
            ),
            BackendOverloadedError,
            429,
        ),
        (
            HfHubHTTPError(
                f"422 {PHI}",
                response=_response(422, {"error": f"bad {PHI}", "error_type": "validation"}),
            ),
            BackendRejectedError,
            422,
        ),
        (httpx2.ConnectError("Connection refused"), BackendUnavailableError, None),
        (httpx2.ReadTimeout("timed out"), BackendUnavailableError, None),
        (httpx2.RemoteProtocolError("peer closed"), BackendUnavailableError, None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_client_exceptions_map_to_backend_errors(
    exc: BaseException, kind: type[BackendError], status: int | None
) -> None:
    error = backend_error(exc, endpoint=1)
    assert type(error) is kind
    assert error is not None and error.status == status and error.endpoint == 1
    assert "Jane" not in str(error)
    assert backend_error(ValueError("not ours")) is None
