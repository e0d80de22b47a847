"""The wheels each compose image installs: ``python deploy/compose/requirements.py OUT_DIR``.

Writes, for the images that deploy/compose/build-images.sh builds offline:

- ``splitglm.txt``: the project's own dependencies (pyproject.toml) less those no
  service imports (``NOT_SERVED``), for the cloud, edge, device agent and secrets;
- ``sensors.txt``: what the sensor simulator imports (no torch);
- ``constraints.txt``: every package pinned to the version this interpreter's
  environment runs (its ``pip freeze``, less editable installs), so the images
  run the versions the tests ran.

pip then downloads the wheels on the host (``pip download -r ROLE.txt -c
constraints.txt``) and installs them inside the image with ``--no-index``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
# conversion (gguf), plots (matplotlib), the ONNX Runtime backend (a plan whose compression names it needs the
# full `pip install .`), the embedded demo broker (amqtt) and accelerate (unused): no compose service imports them
NOT_SERVED = {"gguf", "accelerate", "matplotlib", "onnx", "onnxruntime", "onnxscript", "amqtt"}
# device_agent.simulator: MQTT, settings, logging (the OpenTelemetry API for log records' trace ids)
SENSORS = ["paho-mqtt", "pydantic", "pydantic-settings", "pyyaml", "python-json-logger", "opentelemetry-api"]


def _name(requirement: str) -> str:
    """PEP 503's normal form of a requirement's project name."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()).lower()


def served_requirements() -> list[str]:
    """pyproject's dependencies that some compose service imports."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [r for r in project["dependencies"] if _name(r) not in NOT_SERVED]


def constraints(python: str = sys.executable) -> list[str]:
    """``name==version`` of every package in the environment (the project itself left out, installed or not)."""
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    project = _name(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
    return [line for line in frozen if "==" in line and _name(line) != project]


def main(out: str) -> int:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    pins = constraints()
    pinned = {_name(line) for line in pins}
    missing = [r for r in served_requirements() + SENSORS if _name(r) not in pinned]
    if missing:
        raise SystemExit(f"error: not installed in {sys.prefix}: {', '.join(missing)}")
    for name, lines in (("splitglm.txt", served_requirements()), ("sensors.txt", SENSORS),
                        ("constraints.txt", pins)):
        (folder / name).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
