"""Generate flkit/wire/flkit_pb2*.py from proto/flkit.proto.

Why a script and not a bare protoc call: protoc emits ``import flkit_pb2`` in
the gRPC module, which only works when the output folder is on sys.path. We
rewrite it to a package-relative import so the generated code lives inside
``flkit.wire``. Run from the repository root:  python tools/gen_proto.py
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "flkit.proto"
DEFAULT_OUT = ROOT / "flkit" / "wire"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into out_dir and return their paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO.parent}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_mod = out_dir / "flkit_pb2_grpc.py"
    text = grpc_mod.read_text()
    text = re.sub(r"^import flkit_pb2 as", "from . import flkit_pb2 as", text, flags=re.M)
    grpc_mod.write_text(text)
    return [out_dir / "flkit_pb2.py", out_dir / "flkit_pb2.pyi", grpc_mod]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
