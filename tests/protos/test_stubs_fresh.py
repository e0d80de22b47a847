"""The committed protobuf stubs match splitglm.proto (CI fails when stale)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generate_check_passes():
    proc = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grpc_stub_imports_package_module():
    text = (REPO / "protos" / "splitglm_pb2_grpc.py").read_text()
    assert "from protos import splitglm_pb2" in text
