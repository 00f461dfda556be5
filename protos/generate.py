"""Generate the Python modules of the protos into services/ (committed; a test checks them).

    python protos/generate.py            write services/epicrisis/v1/*_pb2*.py(i)
    python protos/generate.py --out DIR  write them under DIR instead (the freshness test)

``--proto_path`` is this folder, so generated imports are absolute (``epicrisis.v1``).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTOS = sorted(HERE.rglob("*.proto"))


def generate(out: Path) -> None:
    well_known = resources.files("grpc_tools").joinpath("_proto")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={HERE}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(HERE)) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "services")
    generate(parser.parse_args().out)
