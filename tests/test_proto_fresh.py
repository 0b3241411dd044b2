"""The committed generated code must be what `python tools/gen_proto.py` emits from proto/flkit.proto."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "gen_proto.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("flkit_pb2.py", "flkit_pb2.pyi", "flkit_pb2_grpc.py"):
        committed = (REPO / "flkit" / "wire" / name).read_text()
        fresh = (tmp_path / name).read_text()
        assert committed == fresh, f"flkit/wire/{name} is stale: run `python tools/gen_proto.py`"
