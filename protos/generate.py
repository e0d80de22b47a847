"""Generate the Python stubs of protos/splitglm.proto: ``python -m protos.generate``.

Run from anywhere; paths are resolved from the repository root so the gRPC stub
imports ``from protos import splitglm_pb2``. ``--check`` regenerates into a
temporary folder and exits 1 when the committed stubs differ (for CI).
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/splitglm.proto"
STUBS = ("protos/splitglm_pb2.py", "protos/splitglm_pb2.pyi", "protos/splitglm_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc with ``-I<repo root>`` writing the three stubs under ``out_dir``."""
    proto_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{proto_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(REPO_ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def stale_stubs() -> list[str]:
    """Return the committed stubs that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [s for s in STUBS if not (REPO_ROOT / s).is_file()
                or not filecmp.cmp(Path(tmp) / s, REPO_ROOT / s, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed stubs are stale instead of writing them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.check:
        generate(REPO_ROOT)
        log.info("generated %s", ", ".join(STUBS))
        return 0
    stale = stale_stubs()
    if stale:
        log.error("stale protobuf stubs: %s; run `python -m protos.generate` and commit them",
                  ", ".join(stale))
        return 1
    log.info("protobuf stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
