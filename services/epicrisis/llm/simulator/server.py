"""The simulator's HTTP server: TGI's routes on aiohttp, the generation pipeline, control.

:class:`Simulator` owns the listener as well as the routes, because TGI's loading behaviour
is about the socket: while the model loads (at start, or on a "loading" fault) the port is
bound but does not listen, so clients get connection refused, not an HTTP error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from epicrisis.llm.simulator import engine as engine
from epicrisis.llm.simulator.answer import is_answer_schema, parse_prompt, user_text
from epicrisis.llm.simulator.config import SimulatorConfig, Slot, Stats
from epicrisis.llm.simulator.faults import (
    ANSWER_FAULTS,
    FaultBoard,
    FaultKind,
    FaultUpdate,
    answer_text,
    parse_update,
)
from epicrisis.llm.simulator.listener import Listener
from epicrisis.llm.simulator.protocol import (
    BodyRejected,
    ChatRequest,
    CompatGenerateRequest,
    GenerateParameters,
    GenerateRequest,
    Limits,
    M,
    TGIError,
    generation_error,
    incomplete,
    overloaded,
    parse_body,
    sampling,
    validate,
    validation_error,
)
from epicrisis.llm.simulator.tokens import chat_template, load_tokenizer

PAYLOAD_LIMIT = 2_000_000  # TGI's default --payload-limit


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_TICK = 0.002  # seconds: tokens due sooner than this are sent with the ones before
_OOM = "Server error: CUDA out of memory (simulated fault)"
_ASSERT = "Server error: device-side assert triggered (simulated fault)"


@dataclass(frozen=True, slots=True)
class _Run:
    """What the model will do for one request: its tokens and the faults it meets."""

    gen: engine.Generated
    error: FaultKind | None  # generation, incomplete or stream_error
    ttft: float  # time to first token
    reload: bool  # a "loading" fault: close the listener after answering


class Simulator:
    """One simulated TGI server: its routes, its generation pipeline, faults and counters.

    ``await start()`` binds the port at once (so ``port`` is known) but listens only when
    the load delay has passed: until then connections are refused, as with a loading TGI.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer_path)
        self.faults = FaultBoard(config.faults, config.seed)
        self._seeds = random.Random(None if config.seed is None else config.seed + 1)
        self.first_token_seconds = config.first_token_seconds
        self.token_seconds = config.token_seconds
        self.slow_seconds = config.slow_seconds
        self.loading_seconds = config.loading_seconds
        self.stats = Stats()
        self.limits = Limits(
            config.max_input_tokens,
            config.max_total_tokens,
            config.max_best_of,
            config.max_stop_sequences,
            config.max_top_n_tokens,
        )
        self.app = self._build_app()
        self.listener = Listener(self.app, config.host, config.port)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def listening(self) -> bool:
        return self.listener.listening

    async def start(self) -> None:
        """Bind the port; listen now, or after ``load_seconds`` (refusing until then)."""
        await self.listener.open(self.config.load_seconds)

    async def wait_listening(self) -> None:
        await self.listener.wait_listening()

    async def stop(self) -> None:
        await self.listener.close()

    def reload_soon(self, seconds: float) -> None:
        """Refuse connections for ``seconds``, once the answer being sent has gone out."""
        self.listener.background(self.listener.reload(seconds, after=0.05))

    # -- the application ---------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=PAYLOAD_LIMIT)
        routes = [
            ("GET", "/info", self.info),
            ("GET", "/health", self.health),
            ("GET", "/ping", self.health),
            ("GET", "/metrics", self.metrics),
            ("GET", "/v1/models", self.models),
            ("POST", "/", self.compat_generate),
            ("POST", "/generate", self.generate),
            ("POST", "/generate_stream", self.generate_stream),
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/tokenize", self.tokenize),
            ("POST", "/chat_tokenize", self.chat_tokenize),
            ("GET", "/__sim/state", self.state),
            ("POST", "/__sim/faults", self.set_faults),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Errors in TGI's shapes, and a count per route and status."""
        route = request.match_info.route.resource
        label = route.canonical if route is not None else "other"
        try:
            response = await handler(request)
        except BodyRejected as exc:
            response = web.Response(status=exc.status, text=exc.text, content_type="text/plain")
        except TGIError as exc:
            response = _json(exc.body(), status=exc.status)
        except web.HTTPException as exc:  # unknown route or method: axum answers empty
            response = web.Response(status=exc.status, headers=exc.headers)
        if not label.startswith("/__sim/"):
            self.stats.record(label, response.status)
        return response

    async def _read(self, request: web.Request, model: type[M]) -> M:
        return parse_body(await request.read(), request.content_type, model)

    # -- TGI routes --------------------------------------------------------------------

    async def info(self, request: web.Request) -> web.Response:
        return _json(engine.info_body(self.config))

    async def health(self, request: web.Request) -> web.Response:
        if self.faults.fire("unhealthy"):
            return _json({"error": "unhealthy", "error_type": "healthcheck"}, status=503)
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        """TGI answers a list (``ModelsInfo``) whose items are the OpenAPI's ``ModelInfo``."""
        model = self.config.model_id
        item = {"id": model, "object": "model", "created": 0, "owned_by": model}
        return _json({"object": "list", "data": [item]})

    async def tokenize(self, request: web.Request) -> web.Response:
        req = await self._read(request, GenerateRequest)
        tokens = self.tokenizer.encode(req.inputs, add_special_tokens=True)
        return _json([engine.simple_token(t, req.inputs) for t in tokens])

    async def chat_tokenize(self, request: web.Request) -> web.Response:
        req = await self._read(request, ChatRequest)
        text = chat_template([(m.role, m.text()) for m in req.messages])
        tokens = self.tokenizer.encode(text, add_special_tokens=False)
        return _json(
            {
                "tokenize_response": [engine.simple_token(t, text) for t in tokens],
                "templated_text": text,
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            text=engine.metrics_text(self.stats, self.config), content_type="text/plain"
        )

    async def generate(self, request: web.Request) -> web.Response:
        req = await self._read(request, GenerateRequest)
        job, gen, headers = await self._complete(req.inputs, req.parameters, full_text=False)
        return _json(engine.generate_body(job, gen), headers=headers)

    async def compat_generate(self, request: web.Request) -> web.StreamResponse:
        """``POST /``: where huggingface_hub's ``text_generation`` goes with a base URL.

        The model's pipeline tag is text-generation, so TGI defaults ``return_full_text``
        to true here: the prompt comes back in front of the answer unless told otherwise.
        """
        req = await self._read(request, CompatGenerateRequest)
        if req.stream:
            return await self._stream(request, req.inputs, req.parameters, full_text=True)
        job, gen, headers = await self._complete(req.inputs, req.parameters, full_text=True)
        return _json([engine.generate_body(job, gen)], headers=headers)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        req = await self._read(request, GenerateRequest)
        return await self._stream(request, req.inputs, req.parameters, full_text=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._read(request, ChatRequest)
        inputs = chat_template([(m.role, m.text()) for m in req.messages])
        # TGI's chat route: temperature 0 means greedy; logprobs become token details.
        greedy = req.temperature == 0.0
        params = GenerateParameters(
            do_sample=not greedy,
            temperature=None if greedy else req.temperature,
            top_p=req.top_p,
            frequency_penalty=req.frequency_penalty,
            max_new_tokens=req.max_tokens,
            stop=req.stop or [],
            seed=req.seed,
            grammar=req.response_format,
            details=True,
            top_n_tokens=req.top_logprobs,
        )
        ctx = engine.ChatContext(
            model_id=self.config.model_id,
            fingerprint=self.config.fingerprint,
            logprobs=bool(req.logprobs),
            top_logprobs=req.top_logprobs or 0,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )
        if req.stream:
            return await self._stream(request, inputs, params, full_text=False, chat=ctx)
        job, gen, headers = await self._complete(inputs, params, full_text=False, chat=True)
        return _json(engine.chat_body(ctx, job, gen), headers=headers)

    # -- the generation pipeline -------------------------------------------------------

    def _admit(self) -> Slot:
        """Take a slot, or 429 past ``max_concurrent_requests`` (or on the fault)."""
        self.stats.request_count += 1
        if self.stats.in_flight >= self.config.max_concurrent_requests or self.faults.fire(
            "overloaded"
        ):
            raise overloaded()
        return Slot(self.stats)

    def _job(
        self, inputs: str, p: GenerateParameters, *, stream: bool, full_text: bool, chat: bool
    ) -> engine.Job:
        """Validate as TGI's router does, in its order, and fix what the model will run."""
        schema, tokens, max_new_tokens = validate(
            inputs, p, self.tokenizer, self.limits, stream=stream, chat=chat
        )
        if self.faults.fire("validation"):
            total = self.config.max_total_tokens
            raise validation_error(
                f"`inputs` tokens + `max_new_tokens` must be <= {total}. Given: "
                f"{len(tokens)} `inputs` tokens and {total - len(tokens) + 1} `max_new_tokens`"
            )
        seed = self._seeds.randrange(2**63) if p.seed is None else p.seed
        return engine.Job(
            inputs=inputs,
            input_tokens=tuple(tokens),
            prompt=parse_prompt(user_text(inputs)),
            schema=schema,
            max_new_tokens=max_new_tokens,
            stop=tuple(p.stop),
            seed=seed if sampling(p) else None,
            details=p.details,
            decoder_input_details=p.decoder_input_details,
            top_n_tokens=p.top_n_tokens or 0,
            best_of=p.best_of or 1,
            return_full_text=full_text if p.return_full_text is None else p.return_full_text,
        )

    def _run(self, job: engine.Job, *, stream: bool) -> _Run:
        """The tokens, and the faults this request meets."""
        errors: tuple[FaultKind, ...] = ("generation", "incomplete")
        error = self.faults.first(errors + (("stream_error",) if stream else ()))
        answer_fault = None
        if error is None and job.json and is_answer_schema(job.schema):
            answer_fault = self.faults.first(ANSWER_FAULTS)
        ttft = self.first_token_seconds + (self.slow_seconds if self.faults.fire("slow") else 0)
        reload = self.faults.fire("loading")
        answer = answer_text(job.schema, job.prompt, answer_fault, self.faults)
        eot_ends = job.json or self.config.stop_on_eot
        return _Run(
            engine.plan(job, answer, self.tokenizer, eot_ends=eot_ends), error, ttft, reload
        )

    def _finish(self, run: _Run | None, slot: Slot | None) -> None:
        """Free the slot; a "loading" fault closes the listener once the answer is out."""
        if slot is not None:
            slot.release()
        if run is not None and run.reload:
            self.reload_soon(self.loading_seconds)

    def _succeeded(self, job: engine.Job, gen: engine.Generated, started: float) -> None:
        self.stats.success += 1
        self.stats.input_tokens += len(job.input_tokens)
        self.stats.generated_tokens += len(gen.tokens)
        self.stats.duration_seconds += time.monotonic() - started

    async def _complete(
        self, inputs: str, p: GenerateParameters, *, full_text: bool, chat: bool = False
    ) -> tuple[engine.Job, engine.Generated, dict[str, str]]:
        started = time.monotonic()
        slot: Slot | None = None
        run: _Run | None = None
        try:
            slot = self._admit()
            job = self._job(inputs, p, stream=False, full_text=full_text, chat=chat)
            run = self._run(job, stream=False)
            await _sleep(run.ttft)
            if run.error == "generation":
                raise generation_error(_OOM)
            slot.generating()
            await _sleep(self.token_seconds * max(0, len(run.gen.tokens) - 1))
            if run.error == "incomplete":
                raise incomplete(stream=False)
        except TGIError as exc:
            self.stats.failures[exc.failure_label] += 1
            raise
        finally:
            self._finish(run, slot)
        self._succeeded(job, run.gen, started)
        return job, run.gen, engine.timing_headers(job, run.gen, started)

    async def _stream(
        self,
        request: web.Request,
        inputs: str,
        p: GenerateParameters,
        *,
        full_text: bool,
        chat: engine.ChatContext | None = None,
    ) -> web.StreamResponse:
        """An SSE stream; TGI answers 200 and reports any error as an event."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "x-compute-type": "gpu+optimized",
                "x-compute-characters": str(len(inputs)),
            }
        )
        await response.prepare(request)
        started = time.monotonic()
        slot: Slot | None = None
        run: _Run | None = None
        try:
            slot = self._admit()
            job = self._job(inputs, p, stream=True, full_text=full_text, chat=chat is not None)
            run = self._run(job, stream=True)
            await _sleep(run.ttft)
            if run.error == "generation":
                raise generation_error(_OOM)
            slot.generating()
            gen = run.gen
            cut = len(gen.tokens) // 2 if run.error in ("incomplete", "stream_error") else -1
            # Token i is due token_seconds * i after the first; tokens already due go out in
            # one write, so a busy event loop falls behind in writes, not in the pace.
            loop = asyncio.get_running_loop()
            first = loop.time()
            pending: list[bytes] = []
            for index in range(len(gen.tokens)):
                delay = first + index * self.token_seconds - loop.time()
                if delay > _TICK:
                    await response.write(b"".join(pending))
                    pending.clear()
                    await asyncio.sleep(delay)
                if index == cut:
                    await response.write(b"".join(pending))
                    raise (
                        incomplete(stream=True)
                        if run.error == "incomplete"
                        else generation_error(_ASSERT)
                    )
                events = (
                    engine.chat_events(chat, job, gen, index)
                    if chat is not None
                    else [engine.stream_event(job, gen, index)]
                )
                pending.extend(_sse(event) for event in events)
            await response.write(b"".join(pending))
            self._succeeded(job, gen, started)
        except TGIError as exc:
            self.stats.failures[exc.failure_label] += 1
            with contextlib.suppress(ConnectionResetError):
                await response.write(_sse(self._stream_error(exc, chat is not None)))
        except ConnectionResetError:  # the client went away mid-stream
            return response
        finally:
            self._finish(run, slot)
        with contextlib.suppress(ConnectionResetError):
            if chat is not None:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response

    def _stream_error(self, exc: TGIError, chat: bool) -> dict[str, Any]:
        if chat and self.config.chat_stream_errors == "openai":
            return {"error": {"message": exc.message, "http_status_code": 422}}
        return exc.body()

    # -- control routes ----------------------------------------------------------------

    def state_body(self) -> dict[str, Any]:
        return {
            "model_id": self.config.model_id,
            "port": self.port,
            "listening": self.listening,
            "tokenizer": self.tokenizer.name,
            "seed": self.config.seed,
            "first_token_seconds": self.first_token_seconds,
            "token_seconds": self.token_seconds,
            "slow_seconds": self.slow_seconds,
            "loading_seconds": self.loading_seconds,
            "max_concurrent_requests": self.config.max_concurrent_requests,
            **self.faults.snapshot(),
            "counters": {**self.stats.as_dict(), "reloads": self.listener.reloads},
        }

    async def state(self, request: web.Request) -> web.Response:
        return _json(self.state_body())

    async def set_faults(self, request: web.Request) -> web.StreamResponse:
        """Change faults and latency at run time; ``reload`` closes the listener now."""
        try:
            update = parse_update(await request.read())
        except ValueError as exc:
            return _json({"error": str(exc), "error_type": "validation"}, status=422)
        self._apply(update)
        response = _json(self.state_body())
        if update.reload is not None:
            await response.prepare(request)  # answer before the listener goes away
            await response.write_eof()
            self.reload_soon(update.reload)
        return response

    def _apply(self, update: FaultUpdate) -> None:
        if update.clear:
            self.faults.clear()
        if update.reset_counters:
            self.stats.reset()
            self.faults.fired.clear()
        for kind, spec in update.specs.items():
            self.faults.set(kind, spec)
        for name, value in update.settings.items():
            setattr(self, name, value)


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def _json(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=_wire(body), status=status, content_type="application/json", headers=headers
    )


def _sse(event: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _wire(value: Any) -> str:
    """JSON as serde_json writes it: compact, UTF-8 kept."""
    return orjson.dumps(value).decode()
