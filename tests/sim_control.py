"""The TGI simulator's control routes (``/__sim/faults``, ``/__sim/state``), by base URL, for
simulators in a thread or in a process of their own."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx2

CHAT = "/v1/chat/completions"


def set_faults(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Apply ``body`` (faults, latencies, ``reload``, ``clear``...); the state after it."""
    response = httpx2.post(base_url + "/__sim/faults", json=body, timeout=10)
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def sim_state(base_url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx2.get(base_url + "/__sim/state", timeout=10).json()
    return body


def chat_counts(base_url: str) -> dict[str, int]:
    """Chat requests answered so far, by HTTP status."""
    counts: dict[str, int] = sim_state(base_url)["counters"]["requests"].get(CHAT, {})
    return counts


def refused(base_url: str) -> bool:
    """Whether the simulator refuses connections now (loading or reloading)."""
    try:
        httpx2.get(base_url + "/health", timeout=5)
    except httpx2.ConnectError:
        return True
    return False


def wait_until(predicate: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Poll ``predicate`` (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)
