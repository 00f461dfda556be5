"""The TGI simulator over real loopback HTTP: TGI's shapes, errors, limits, faults, answers.

Every body is checked against TGI's own OpenAPI document (``shared/reference``); the
clients are the ones the project uses (huggingface_hub's ``InferenceClient``) and raw
httpx2 (the HTTP client huggingface_hub 2.x is built on). No test asserts a timing: where
a test needs requests to overlap it holds them with a long time to first token and polls
``/__sim/state``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import pytest
from aiohttp import test_utils
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import (
    GenerationError,
    HfHubHTTPError,
    IncompleteGenerationError,
    OverloadedError,
    TextGenerationError,
    ValidationError,
)
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from epicrisis.llm.simulator import (
    FAULT_KINDS,
    MODEL_ID,
    FaultSpec,
    SimulatorConfig,
    SimulatorThread,
    add_arguments,
    build_app,
    config_from_args,
    serve,
)
from epicrisis.llm.simulator.answer import parse_prompt
from epicrisis.llm.simulator.tokens import RuleTokenizer, pieces
from epicrisis.pipeline import build_prompt, load_stay
from epicrisis.prompt import (
    ANSWER_SCHEMA,
    PromptResult,
    build_messages,
    load_tokenizer,
    verify_answer,
)
from epicrisis.stay import Stay
from sim_control import refused, wait_until

ROOT = Path(__file__).resolve().parents[1]
OPENAPI = ROOT.parent / "shared" / "reference" / "tgi-openapi.json"
SAMPLE = ROOT / "services" / "epicrisis" / "samples" / "sample-stay.json"
DEATH = ROOT / "tests" / "fixtures" / "death-in-hospital.json"
LLAMA3 = ROOT.parent / "shared" / "data" / "tokenizer" / "llama3-tokenizer.json"
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA},
}
EOT = "<|eot_id|>"

Check = Callable[[str, Any], None]


# -- plumbing ---------------------------------------------------------------------------


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema objects as JSON Schema: ``nullable`` becomes a null alternative."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k not in ("nullable", "example")}
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@pytest.fixture(scope="module")
def check() -> Check:
    """``check("Info", body)`` validates ``body`` against that OpenAPI component schema."""
    if not OPENAPI.is_file():
        pytest.skip(f"TGI's OpenAPI document not found at {OPENAPI} (CI has ../shared)")
    document = _json_schema(json.loads(OPENAPI.read_text(encoding="utf-8")))
    registry: Registry[Any] = Registry().with_resource(
        "tgi", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    validators: dict[str, jsonschema.Draft202012Validator] = {}

    def validate(component: str, body: Any) -> None:
        assert component in document["components"]["schemas"], component
        if component not in validators:
            schema = {"$ref": f"tgi#/components/schemas/{component}"}
            validators[component] = jsonschema.Draft202012Validator(schema, registry=registry)
        validators[component].validate(body)

    return validate


@pytest.fixture
def start() -> Iterator[Callable[..., SimulatorThread]]:
    """Start simulators on free loopback ports; all are stopped after the test."""
    running: list[SimulatorThread] = []

    def start_one(**options: Any) -> SimulatorThread:
        options.setdefault("seed", 11)
        sim = SimulatorThread(SimulatorConfig(port=0, **options))
        running.append(sim.__enter__())
        return sim

    yield start_one
    for sim in running:
        sim.__exit__(None, None, None)


@pytest.fixture
def sim(start: Callable[..., SimulatorThread]) -> SimulatorThread:
    return start()


@pytest.fixture
def http(sim: SimulatorThread) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=sim.base_url, timeout=30) as client:
        yield client


@pytest.fixture
def client(sim: SimulatorThread) -> Iterator[InferenceClient]:
    with InferenceClient(base_url=sim.base_url, timeout=30) as hf:
        yield hf


@pytest.fixture(scope="module")
def sample() -> tuple[PromptResult, Stay]:
    bundle = SAMPLE.read_bytes()
    return build_prompt(bundle), load_stay(bundle)


def faults(http: httpx2.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/__sim/faults", json=body)
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def state(http: httpx2.Client) -> dict[str, Any]:
    body: dict[str, Any] = http.get("/__sim/state").json()
    return body


def sse(response: httpx2.Response) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    assert response.headers["content-type"].startswith("text/event-stream")
    return [
        line[len("data:") :].strip()
        for line in response.text.splitlines()
        if line.startswith("data:")
    ]


def chat_body(prompt: PromptResult, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tgi",
        "messages": [dict(m) for m in prompt.messages],
        "max_tokens": 1536,
        "temperature": 0,
        "stop": [EOT],
        "response_format": {"type": "json_object", "value": ANSWER_SCHEMA},
        **extra,
    }


# -- TGI's routes and shapes -----------------------------------------------------------


def test_info_health_models_metrics(http: httpx2.Client, check: Check) -> None:
    info = http.get("/info")
    assert info.status_code == 200
    check("Info", info.json())
    document = json.loads(OPENAPI.read_text(encoding="utf-8"))
    assert set(info.json()) == set(document["components"]["schemas"]["Info"]["properties"])
    assert info.json()["model_id"] == MODEL_ID
    assert info.json()["max_concurrent_requests"] == 128

    health = http.get("/health")
    assert (health.status_code, health.content) == (200, b"")

    models = http.get("/v1/models").json()  # TGI answers a list of the OpenAPI's ModelInfo
    assert models["object"] == "list"
    for model in models["data"]:
        check("ModelInfo", model)

    http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for series in (
        "tgi_queue_size 0",
        "tgi_batch_current_size 0",
        "tgi_request_count 1",
        "tgi_request_success 1",
    ):
        assert series in metrics.text.splitlines()


def test_generate_with_details(http: httpx2.Client, check: Check) -> None:
    response = http.post(
        "/generate",
        json={
            "inputs": "Summarize the stay.",
            "parameters": {
                "max_new_tokens": 6,
                "details": True,
                "decoder_input_details": True,
                "top_n_tokens": 2,
                "best_of": 2,
                "do_sample": True,
            },
        },
    )
    assert response.status_code == 200
    body = response.json()
    check("GenerateResponse", body)
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == len(details["tokens"]) == 6
    assert body["generated_text"] == "".join(t["text"] for t in details["tokens"])
    assert details["prefill"][0] == {"id": 128000, "text": "<|begin_of_text|>", "logprob": None}
    assert len(details["best_of_sequences"]) == 1
    assert details["seed"] is not None
    assert response.headers["x-generated-tokens"] == "6"

    plain = http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    check("GenerateResponse", plain.json())
    assert set(plain.json()) == {"generated_text"}


def test_stop_sequences_and_tokenize(http: httpx2.Client, check: Check) -> None:
    text = "This is a simulated answer: the prompt has no cited lines to summarize."
    stopped = http.post(
        "/generate",
        json={"inputs": "Hi", "parameters": {"stop": ["prompt"], "details": True}},
    ).json()
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"] == text[: text.index("prompt") + len("prompt")]

    tokens = http.post("/tokenize", json={"inputs": "Creatinine 2.1 mg/dL"}).json()
    check("TokenizeResponse", tokens)
    assert tokens[0]["id"] == 128000  # <|begin_of_text|>, as TGI adds it
    assert "".join(t["text"] for t in tokens) == "Creatinine 2.1 mg/dL"
    assert all("Creatinine 2.1 mg/dL"[t["start"] : t["stop"]] == t["text"] for t in tokens)

    templated = http.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    check("ChatTokenizeResponse", templated.json())
    assert templated.json()["templated_text"].endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_generate_stream_events(http: httpx2.Client, check: Check) -> None:
    response = http.post(
        "/generate_stream",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 30, "details": True}},
    )
    assert response.status_code == 200
    events = [json.loads(data) for data in sse(response)]
    for event in events:
        check("StreamResponse", event)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    final = events[-1]
    assert final["details"]["finish_reason"] == "eos_token" or len(events) == 30
    assert final["generated_text"] == "".join(
        e["token"]["text"] for e in events if not e["token"]["special"]
    )
    assert all(e["generated_text"] is None for e in events[:-1])


# -- the answer ------------------------------------------------------------------------


def test_chat_completion_answer_verifies(
    client: InferenceClient, http: httpx2.Client, sample: tuple[PromptResult, Stay], check: Check
) -> None:
    prompt, stay = sample
    out = client.chat_completion(
        messages=[dict(m) for m in prompt.messages],
        response_format=JSON_SCHEMA_FORMAT,
        max_tokens=1536,
        temperature=0.0,
        stop=[EOT],
    )
    answer = out.choices[0].message.content
    assert answer is not None
    verification = verify_answer(answer, prompt, stay)
    assert verification.ok, verification.problems
    assert verification.answer is not None and len(verification.answer.hospital_course) >= 3
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > 1000
    assert out.usage.completion_tokens > 100

    raw = http.post("/v1/chat/completions", json=chat_body(prompt))
    check("ChatCompletion", raw.json())
    assert raw.json()["choices"][0]["message"]["content"] == answer


def test_death_summary_has_no_instructions(client: InferenceClient) -> None:
    bundle = DEATH.read_bytes()
    prompt, stay = build_prompt(bundle), load_stay(bundle)
    assert prompt.died_in_hospital
    out = client.chat_completion(
        messages=[dict(m) for m in prompt.messages],
        response_format=JSON_SCHEMA_FORMAT,
        max_tokens=1536,
        temperature=0.0,
        stop=[EOT],
    )
    answer = out.choices[0].message.content
    assert answer is not None
    assert json.loads(answer)["discharge_instructions"] == []
    verification = verify_answer(answer, prompt, stay)
    assert verification.ok, verification.problems


def test_chat_stream(
    client: InferenceClient, http: httpx2.Client, sample: tuple[PromptResult, Stay], check: Check
) -> None:
    prompt, stay = sample
    chunks = list(
        client.chat_completion(
            messages=[dict(m) for m in prompt.messages],
            response_format=JSON_SCHEMA_FORMAT,
            max_tokens=1536,
            temperature=0.0,
            stop=[EOT],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert verify_answer(text, prompt, stay).ok
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 100

    raw = http.post("/v1/chat/completions", json=chat_body(prompt, stream=True))
    assert raw.status_code == 200
    data = sse(raw)
    assert data[-1] == "[DONE]"
    for payload in data[:-1]:
        check("ChatCompletionChunk", json.loads(payload))
    finishes = [json.loads(p)["choices"][0]["finish_reason"] for p in data[:-1]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}


def test_text_generation_with_the_client(
    client: InferenceClient, sample: tuple[PromptResult, Stay]
) -> None:
    prompt, _ = sample
    # huggingface_hub posts to "/" with a base URL; TGI then defaults return_full_text to
    # true (the model's pipeline tag is text-generation): the prompt comes back in front.
    full = client.text_generation(prompt.user, max_new_tokens=20)
    assert full.startswith(prompt.user) and len(full) > len(prompt.user)
    answer = client.text_generation(prompt.user, max_new_tokens=20, return_full_text=False)
    assert full == prompt.user + answer

    detailed = client.text_generation(
        prompt.user, max_new_tokens=20, return_full_text=False, details=True
    )
    assert detailed.details is not None
    assert detailed.details.finish_reason == "length"
    assert detailed.details.generated_tokens == 20

    streamed = list(client.text_generation(prompt.user, max_new_tokens=20, stream=True))
    assert "".join(streamed) == answer

    grammar = {"type": "json", "value": ANSWER_SCHEMA}
    as_json = client.text_generation(
        prompt.user, grammar=grammar, max_new_tokens=1536, return_full_text=False
    )
    assert set(json.loads(as_json)) == {"hospital_course", "discharge_instructions", "follow_up"}


def test_async_client_many_at_once(
    sim: SimulatorThread, http: httpx2.Client, sample: tuple[PromptResult, Stay]
) -> None:
    prompt, stay = sample
    faults(http, {"first_token_seconds": 0.2, "token_seconds": 0.001, "overloaded": {"next": 1}})

    async def scenario() -> tuple[list[str | None], BaseException | None]:
        async with AsyncInferenceClient(base_url=sim.base_url, timeout=60) as client:
            try:
                await client.text_generation("Hello", max_new_tokens=2)
                refused = None
            except OverloadedError as exc:
                refused = exc
            outs = await asyncio.gather(
                *(
                    client.chat_completion(
                        messages=[dict(m) for m in prompt.messages],
                        response_format=JSON_SCHEMA_FORMAT,
                        max_tokens=1536,
                        temperature=0.0,
                        stop=[EOT],
                    )
                    for _ in range(12)
                )
            )
            return [o.choices[0].message.content for o in outs], refused

    answers, refused = asyncio.run(scenario())
    assert isinstance(refused, OverloadedError)
    assert len(set(answers)) == 1 and answers[0] is not None
    assert verify_answer(answers[0], prompt, stay).ok
    assert state(http)["counters"]["max_in_flight"] > 1


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object", "value": ANSWER_SCHEMA},
        {"type": "json", "value": ANSWER_SCHEMA},
        {"type": "json", "value": json.dumps(ANSWER_SCHEMA)},
        {"type": "json_schema", "value": {"name": "answer", "schema": ANSWER_SCHEMA}},
    ],
    ids=["json_object", "json", "json-as-string", "json_schema"],
)
def test_grammar_forms(
    http: httpx2.Client, sample: tuple[PromptResult, Stay], response_format: dict[str, Any]
) -> None:
    prompt, stay = sample
    response = http.post(
        "/v1/chat/completions", json=chat_body(prompt, response_format=response_format)
    )
    assert response.status_code == 200
    assert verify_answer(response.json()["choices"][0]["message"]["content"], prompt, stay).ok


def test_other_schemas_and_bad_grammars(http: httpx2.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 3},
            "age": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2},
        },
        "required": ["name", "age", "tags"],
    }
    body = {
        "messages": [{"role": "user", "content": "Who?"}],
        "response_format": {"type": "json", "value": schema},
    }
    content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"][
        "content"
    ]
    jsonschema.validate(json.loads(content), schema)

    openai_form = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    unknown = {"type": "xml", "value": "<a/>"}
    for bad in (openai_form, unknown):  # TGI's serde refuses both before validation
        response = http.post("/v1/chat/completions", json={**body, "response_format": bad})
        assert response.status_code == 422
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text.startswith("Failed to deserialize the JSON body into the target type")

    broken = http.post(
        "/v1/chat/completions", json={**body, "response_format": {"type": "json", "value": "{nope"}}
    )
    assert broken.status_code == 422
    assert broken.json()["error"].startswith("Input validation error: grammar is not valid")


def test_plain_text_runs_past_eot_like_med42(
    http: httpx2.Client, start: Callable[..., SimulatorThread]
) -> None:
    messages = [{"role": "user", "content": "[C1] Pneumonia, resolved\nSummarize."}]
    runaway = http.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 60}
    ).json()
    assert runaway["choices"][0]["finish_reason"] == "length"
    assert runaway["usage"]["completion_tokens"] == 60
    assert "assistant\n\nPneumonia, resolved" in runaway["choices"][0]["message"]["content"]

    stopped = http.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 60, "stop": [EOT]}
    ).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == "Pneumonia, resolved [C1]"

    fixed = start(stop_on_eot=True)
    with httpx2.Client(base_url=fixed.base_url) as other:
        body = other.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 60}
        ).json()
    assert body["choices"][0]["message"]["content"] == "Pneumonia, resolved [C1]"


# -- validation and malformed bodies ---------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"temperature": 0.0}, "`temperature` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        (
            {"max_new_tokens": 8192},
            "`inputs` tokens + `max_new_tokens` must be <= 8192. Given: 2 `inputs` tokens and 8192 `max_new_tokens`",
        ),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"top_n_tokens": 9}, "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
    ],
)
def test_validation_errors(
    http: httpx2.Client, check: Check, parameters: dict[str, Any], message: str
) -> None:
    response = http.post("/generate", json={"inputs": "Hello", "parameters": parameters})
    assert response.status_code == 422
    check("ErrorResponse", response.json())
    assert response.json() == {
        "error": f"Input validation error: {message}",
        "error_type": "validation",
    }


def test_chat_validation(http: httpx2.Client, check: Check) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    greedy = http.post(
        "/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 5}
    )
    assert greedy.status_code == 200  # chat: temperature 0 means greedy
    check("ChatCompletion", greedy.json())
    top_p = http.post("/v1/chat/completions", json={"messages": messages, "top_p": 1.0})
    assert top_p.status_code == 422
    assert top_p.json()["error_type"] == "validation"
    empty = http.post("/generate", json={"inputs": ""})
    assert empty.json()["error"] == "Input validation error: `inputs` cannot be empty"
    long = http.post(
        "/generate", json={"inputs": "word " * 9000, "parameters": {"max_new_tokens": 1}}
    )
    assert long.status_code == 422 and "must be <= 8192" in long.json()["error"]


@pytest.mark.parametrize(
    ("content", "headers", "status", "prefix"),
    [
        (
            b"{not json",
            {"content-type": "application/json"},
            400,
            "Failed to parse the request body as JSON",
        ),
        (
            b"",
            {"content-type": "application/json"},
            400,
            "Failed to parse the request body as JSON",
        ),
        (
            b'{"parameters": {}}',
            {"content-type": "application/json"},
            422,
            "Failed to deserialize the JSON body",
        ),
        (
            b'{"inputs": 3}',
            {"content-type": "application/json"},
            422,
            "Failed to deserialize the JSON body",
        ),
        (
            b'{"inputs": "x", "parameters": {"top_p": "high"}}',
            {"content-type": "application/json"},
            422,
            "Failed to deserialize",
        ),
        (
            b'{"inputs": "x"}',
            {"content-type": "text/plain"},
            415,
            "Expected request with `Content-Type: application/json`",
        ),
    ],
)
def test_malformed_bodies_get_plain_text(
    http: httpx2.Client, content: bytes, headers: dict[str, str], status: int, prefix: str
) -> None:
    for route in ("/generate", "/generate_stream", "/"):
        response = http.post(route, content=content, headers=headers)
        assert response.status_code == status
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.text.startswith(prefix)


# -- errors as huggingface_hub raises them ---------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "error_type", "raised"),
    [
        ("validation", 422, "validation", ValidationError),
        ("generation", 424, "generation", GenerationError),
        ("overloaded", 429, "overloaded", OverloadedError),
        ("incomplete", 500, "incomplete_generation", IncompleteGenerationError),
    ],
)
def test_errors_through_the_client(
    client: InferenceClient,
    http: httpx2.Client,
    check: Check,
    kind: str,
    status: int,
    error_type: str,
    raised: type[TextGenerationError],
) -> None:
    faults(http, {kind: {"next": 4}})
    raw = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert raw.status_code == status
    check("ErrorResponse", raw.json())
    assert raw.json()["error_type"] == error_type

    with pytest.raises(raised):  # text_generation: TGI's own error classes
        client.text_generation("Hello", max_new_tokens=5)
    with pytest.raises(HfHubHTTPError) as caught:  # chat_completion: a plain HTTP error
        client.chat_completion(messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    assert not isinstance(caught.value, TextGenerationError)
    assert caught.value.response.status_code == status
    assert caught.value.response.json()["error_type"] == error_type
    with pytest.raises(raised):  # streams answer 200; the error is an event
        list(client.text_generation("Hello", max_new_tokens=5, stream=True))
    assert state(http)["fired"][kind] == 4
    assert (
        http.post(
            "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}}
        ).status_code
        == 200
    )


def test_errors_inside_streams(http: httpx2.Client, client: InferenceClient, check: Check) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 10}}
    faults(http, {"stream_error": {"next": 1}})
    events = sse(http.post("/generate_stream", json=body))
    tokens, error = events[:-1], json.loads(events[-1])
    assert len(tokens) == 5  # half the tokens, then the error
    check("ErrorResponse", error)
    assert error["error_type"] == "generation"

    faults(http, {"incomplete": {"next": 1}})
    last = json.loads(sse(http.post("/generate_stream", json=body))[-1])
    assert last == {"error": "Incomplete generation stream", "error_type": "incomplete_generation"}

    faults(http, {"overloaded": {"next": 1}})
    response = http.post("/generate_stream", json=body)
    assert response.status_code == 200
    assert [json.loads(e) for e in sse(response)] == [
        {"error": "Model is overloaded", "error_type": "overloaded"}
    ]

    bad = http.post("/generate_stream", json={"inputs": "Hello", "parameters": {"top_p": 1.0}})
    assert bad.status_code == 200
    assert json.loads(sse(bad)[0])["error_type"] == "validation"

    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 10, "stream": True}
    faults(http, {"stream_error": {"next": 2}})
    data = sse(http.post("/v1/chat/completions", json=chat))
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error_type"] == "generation"
    with pytest.raises(GenerationError):
        list(client.chat_completion(messages=chat["messages"], max_tokens=10, stream=True))


def test_openai_shaped_chat_stream_errors(start: Callable[..., SimulatorThread]) -> None:
    sim = start(chat_stream_errors="openai", faults={"overloaded": FaultSpec(next=1)})
    with httpx2.Client(base_url=sim.base_url) as http:
        chat = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
        data = sse(http.post("/v1/chat/completions", json=chat))
    assert json.loads(data[0]) == {
        "error": {"message": "Model is overloaded", "http_status_code": 422}
    }
    assert data[-1] == "[DONE]"


# -- answer faults ---------------------------------------------------------------------


def _answers(http: httpx2.Client, prompt: PromptResult, count: int) -> list[str]:
    return [
        http.post("/v1/chat/completions", json=chat_body(prompt)).json()["choices"][0]["message"][
            "content"
        ]
        for _ in range(count)
    ]


def test_malformed_and_off_schema_answers(
    http: httpx2.Client, sample: tuple[PromptResult, Stay]
) -> None:
    prompt, stay = sample
    faults(http, {"malformed": {"next": 6}})
    for answer in _answers(http, prompt, 6):
        with pytest.raises(json.JSONDecodeError):
            json.loads(answer)
        assert [p.rule for p in verify_answer(answer, prompt, stay).issues] == ["json"]

    faults(http, {"off_schema": {"next": 8}})
    for answer in _answers(http, prompt, 8):
        json.loads(answer)  # valid JSON
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(answer), ANSWER_SCHEMA)
        assert not verify_answer(answer, prompt, stay).ok
    assert verify_answer(_answers(http, prompt, 1)[0], prompt, stay).ok  # the countdown is over


def test_unverifiable_answers(http: httpx2.Client, sample: tuple[PromptResult, Stay]) -> None:
    prompt, stay = sample
    faults(http, {"unverifiable": {"probability": 1.0}})
    rules: set[str] = set()
    for answer in _answers(http, prompt, 8):
        jsonschema.validate(json.loads(answer), ANSWER_SCHEMA)  # schema-valid...
        verification = verify_answer(answer, prompt, stay)
        assert not verification.ok  # ...but not grounded
        rules.update(p.rule for p in verification.issues)
    assert rules == {"unknown-handle", "numbers"}


def test_slow_and_unhealthy(http: httpx2.Client, check: Check) -> None:
    faults(http, {"slow": {"next": 1}, "slow_seconds": 0.05, "unhealthy": {"next": 2}})
    assert (
        http.post(
            "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
        ).status_code
        == 200
    )
    for _ in range(2):
        sick = http.get("/health")
        assert sick.status_code == 503
        check("ErrorResponse", sick.json())
        assert sick.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    assert http.get("/health").status_code == 200
    now = state(http)
    assert now["fired"]["slow"] == 1 and now["fired"]["unhealthy"] == 2
    assert now["slow_seconds"] == 0.05


def test_faults_repeat_under_a_seed(start: Callable[..., SimulatorThread]) -> None:
    def statuses(seed: int) -> list[int]:
        sim = start(seed=seed, faults={"generation": FaultSpec(probability=0.5)})
        with httpx2.Client(base_url=sim.base_url) as http:
            return [
                http.post(
                    "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
                ).status_code
                for _ in range(24)
            ]

    first = statuses(5)
    assert set(first) == {200, 424}
    assert statuses(5) == first


# -- concurrency and loading -----------------------------------------------------------


def test_overloaded_past_the_concurrency_limit(
    start: Callable[..., SimulatorThread], check: Check
) -> None:
    limit, extra = 4, 3
    sim = start(max_concurrent_requests=limit, first_token_seconds=60.0)

    async def scenario() -> tuple[list[httpx2.Response], dict[str, Any]]:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
        async with httpx2.AsyncClient(base_url=sim.base_url, timeout=120) as http:
            held = [asyncio.ensure_future(http.post("/generate", json=body)) for _ in range(limit)]
            while (await http.get("/__sim/state")).json()["counters"]["in_flight"] < limit:
                await asyncio.sleep(0.02)
            refused_ = await asyncio.gather(
                *(http.post("/generate", json=body) for _ in range(extra))
            )
            stream = await http.post("/generate_stream", json=body)
            for task in held:  # hang up: TGI (and the simulator) drop the request
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            counters: dict[str, Any] = (await http.get("/__sim/state")).json()["counters"]
            return [*refused_, stream], counters

    responses, counters = asyncio.run(scenario())
    for response in responses[:-1]:
        assert response.status_code == 429
        check("ErrorResponse", response.json())
        assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert responses[-1].status_code == 200
    assert json.loads(sse(responses[-1])[0])["error_type"] == "overloaded"
    assert counters["max_in_flight"] == limit
    assert counters["requests"]["/generate"]["429"] == extra
    with httpx2.Client(base_url=sim.base_url) as http:
        wait_until(lambda: state(http)["counters"]["in_flight"] == 0, "the held requests to end")
        assert 'tgi_request_failure{err="overloaded"} 4' in http.get("/metrics").text


def test_refused_while_loading_and_reloading(start: Callable[..., SimulatorThread]) -> None:
    # Windows of a few seconds: the checks inside each must land before it ends even on a
    # loaded machine (at 1.5 s a starved test thread once met the port open again).
    sim = start(load_seconds=0.5, loading_seconds=4)
    url = sim.base_url  # the port is bound, and refuses until the model has "loaded"
    assert not sim.simulator.listening
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(url + "/health", timeout=5)
    sim.wait_listening()
    assert httpx2.get(url + "/health").status_code == 200

    with httpx2.Client(base_url=url) as http:
        assert faults(http, {"reload": 4})["listening"]
    wait_until(lambda: refused(url), "the reload to close the port")
    with InferenceClient(base_url=url) as client, pytest.raises(httpx2.ConnectError):
        client.text_generation("Hello", max_new_tokens=2)
    sim.wait_listening()

    with httpx2.Client(base_url=url) as http:
        faults(http, {"loading": {"next": 1}})
        served = http.post(
            "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
        )
        assert served.status_code == 200  # the request that meets the fault is answered
    wait_until(lambda: refused(url), "the loading fault to close the port")
    sim.wait_listening()
    with httpx2.Client(base_url=url) as http:
        now = state(http)
    assert now["counters"]["reloads"] == 2 and now["fired"]["loading"] == 1


# -- control, CLI, serve ---------------------------------------------------------------


def test_state_counts_and_bad_fault_updates(http: httpx2.Client) -> None:
    http.get("/info")
    http.post("/generate", json={"inputs": "Hello", "parameters": {"top_p": 2}})
    http.post("/generate", content=b"{", headers={"content-type": "application/json"})
    now = state(http)
    assert now["counters"]["requests"]["/info"] == {"200": 1}
    assert now["counters"]["requests"]["/generate"] == {"400": 1, "422": 1}
    assert now["counters"]["failures"] == {"validation": 1}
    assert set(now["faults"]) == set(FAULT_KINDS)

    for bad in (
        {"bogus": {"next": 1}},
        {"malformed": {"probability": 2}},
        {"malformed": {"often": 1}},
    ):
        response = http.post("/__sim/faults", json=bad)
        assert response.status_code == 422 and response.json()["error_type"] == "validation"
    cleared = faults(http, {"malformed": {"next": 3}, "reset_counters": True})
    assert cleared["faults"]["malformed"] == {"probability": 0.0, "next": 3}
    assert cleared["counters"]["requests"] == {}
    assert faults(http, {"clear": True})["faults"]["malformed"]["next"] == 0


def test_build_app_under_aiohttp_test_server(check: Check) -> None:
    async def scenario() -> tuple[int, Any]:
        app = build_app(SimulatorConfig(port=0))
        async with (
            test_utils.TestServer(app, host="127.0.0.1") as server,
            test_utils.TestClient(server) as client,
        ):
            response = await client.post(
                "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
            )
            return response.status, await response.json()

    status, body = asyncio.run(scenario())
    assert status == 200
    check("GenerateResponse", body)


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(
        parser.parse_args(
            [
                "--port",
                "0",
                "--max-concurrent-requests",
                "7",
                "--first-token-latency",
                "0.2",
                "--token-latency",
                "0.01",
                "--load-delay",
                "3",
                "--seed",
                "9",
                "--fault",
                "overloaded=0.25",
                "--fault-next",
                "off-schema=2",
                "--fault",
                "off_schema=0.5",
            ]
        )
    )
    assert (config.host, config.port, config.max_concurrent_requests) == ("127.0.0.1", 0, 7)
    assert (config.first_token_seconds, config.token_seconds, config.load_seconds) == (
        0.2,
        0.01,
        3.0,
    )
    assert config.faults["overloaded"].probability == 0.25
    assert (config.faults["off_schema"].next, config.faults["off_schema"].probability) == (2, 0.5)
    assert config_from_args(parser.parse_args([])) == SimulatorConfig()
    for bad in (
        ["--fault", "gremlins=0.1"],
        ["--fault", "overloaded=2"],
        ["--port", "70000"],
        ["--token-latency", "-1"],
        ["--fault-next", "slow"],
        ["--tokenizer", "/nonexistent/tokenizer.json"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_serve_until_cancelled(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> int:
        task = asyncio.ensure_future(serve(SimulatorConfig(port=0)))
        while "http://" not in (line := capsys.readouterr().err):
            await asyncio.sleep(0.02)
        url = line.split()[line.split().index("on") + 1]
        async with httpx2.AsyncClient(base_url=url) as http:
            status = (await http.get("/health")).status_code
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return status

    assert asyncio.run(scenario()) == 200


def test_exact_tokens_with_the_llama3_tokenizer(
    start: Callable[..., SimulatorThread], sample: tuple[PromptResult, Stay]
) -> None:
    """With ``--tokenizer``, usage counts match the project's exact prompt count."""
    if not LLAMA3.is_file():
        pytest.skip(f"Llama 3 tokenizer not found at {LLAMA3} (CI has ../shared)")
    sim = start(tokenizer_path=str(LLAMA3))
    stay = sample[1]
    prompt = build_messages(stay, tokenizer=load_tokenizer(LLAMA3))
    with httpx2.Client(base_url=sim.base_url) as http:
        tokens = http.post("/tokenize", json={"inputs": "Hello world"}).json()
        # This tokenizer.json adds no <|begin_of_text|> itself (a ByteLevel post-processor)
        assert [(t["id"], t["text"]) for t in tokens][-2:] == [(9906, "Hello"), (1917, " world")]
        out = http.post("/v1/chat/completions", json=chat_body(prompt)).json()
    assert verify_answer(out["choices"][0]["message"]["content"], prompt, stay).ok
    assert prompt.exact and out["usage"]["prompt_tokens"] == prompt.token_count


def test_rule_tokens_cover_the_text() -> None:
    text = "[O5] 2024-06-16 05:41 Hemoglobin 9.9 g/dL (L; ref 13.5-17.5) — SpO2 96%, T 36.3°C"
    tokens = pieces(RuleTokenizer(), text)
    assert "".join(t.text for t in tokens) == text
    assert RuleTokenizer().encode(text, add_special_tokens=False) == RuleTokenizer().encode(
        text, add_special_tokens=False
    )
    assert parse_prompt(text).lines[0].handles == ("O5",)
