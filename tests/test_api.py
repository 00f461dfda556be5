"""The public API is what the README shows: summarize, render, build_prompt on the sample."""

from __future__ import annotations

import json
from importlib import resources

import epicrisis


def test_the_readme_api_works_on_the_shipped_sample() -> None:
    sample = resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
    summary = epicrisis.summarize(sample)
    assert isinstance(summary, epicrisis.DischargeSummary)
    assert json.loads(epicrisis.render(summary, "json"))["kind"] == "discharge-summary"
    assert "DISCHARGE SUMMARY" in epicrisis.render(summary, "text")
    assert json.loads(epicrisis.render(summary, "fhir"))["type"] == "document"
    prompt = epicrisis.build_prompt(sample, max_input_tokens=4096)
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert prompt.token_count <= 4096


def test_everything_exported_exists() -> None:
    for name in epicrisis.__all__:
        assert hasattr(epicrisis, name), name
