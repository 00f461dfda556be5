"""Shared test plumbing: the shared corpus, the project's fixtures, an isolated environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from epicrisis.config import get_settings

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS_DIRS = ("synthea-r4", "clinosim")
_ABSENT = f"shared corpus not found at {SHARED_DATA} (CI has it at ../shared)"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; the test is skipped, saying where it looked, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(_ABSENT)
    return SHARED_DATA


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking ``corpus_bundle`` runs once per Bundle of the shared corpus.

    ``@pytest.mark.corpus("clinosim")`` narrows it to some folders of ``shared/data/fhir``
    (default: synthea-r4 and clinosim); without the corpus there is one skipped case.
    """
    if "corpus_bundle" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("corpus")
    folders = marker.args if marker is not None and marker.args else CORPUS_DIRS
    paths = sorted(
        path
        for folder in folders
        if (SHARED_DATA / "fhir" / folder).is_dir()
        for path in (SHARED_DATA / "fhir" / folder).glob("*.json")
    )
    if paths:
        metafunc.parametrize(
            "corpus_bundle", paths, ids=[f"{p.parent.name}/{p.name}" for p in paths]
        )
    else:
        metafunc.parametrize(
            "corpus_bundle", [pytest.param(None, marks=pytest.mark.skip(reason=_ABSENT))]
        )


def _drop_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EPICRISIS_"):
            monkeypatch.delenv(name)
    # Servers and workers started by tests serve /metrics on any free port, as they do gRPC.
    monkeypatch.setenv("EPICRISIS_METRICS_PORT", "0")
    get_settings.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def isolated_session_env() -> Iterator[None]:
    """No ``EPICRISIS_*`` setting from the developer's shell, even in module-scoped fixtures."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _drop_settings(monkeypatch)
        yield


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nor one that an earlier test set and left behind."""
    _drop_settings(monkeypatch)
