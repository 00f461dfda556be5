"""The committed epicrisis.v1 modules are what protos/generate.py makes of the protos today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "services" / "epicrisis" / "v1"


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted((tmp_path / "epicrisis" / "v1").iterdir())
    assert [p.name for p in fresh] == sorted(p.name for p in GENERATED.glob("*_pb2*"))
    for path in fresh:
        assert path.read_bytes() == (GENERATED / path.name).read_bytes(), (
            f"{path.name} is stale: run python protos/generate.py"
        )
