"""Real processes for integration tests: agents, brokers; started, awaited, stopped with nothing left behind.

Every agent logs a line ``ready: <url>`` once it serves; ``Proc.ready()``
waits for it and returns the URL.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"ready: (\S+)")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose merged output is collected line by line."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None):
        self.name, self.args = name, args
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def python(cls, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        return cls(name, [sys.executable, "-m", module, *args], env)

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 120.0) -> re.Match:
        """The first output line matching ``pattern`` (already printed or to come)."""
        pattern = re.compile(pattern)
        for line in list(self.lines):
            if m := pattern.search(line):
                return m
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                code = self.popen.wait()
                raise RuntimeError(f"{self.name} exited ({code}) before {pattern.pattern!r}:\n{self.output}")
            if m := pattern.search(line):
                return m
        raise TimeoutError(f"{self.name}: no {pattern.pattern!r} within {timeout} s:\n{self.output}")

    def ready(self, timeout: float = 120.0) -> str:
        return self.wait_for(READY, timeout).group(1)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; return the exit code."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if not found:
        raise RuntimeError("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    return found


class Mosquitto:
    """A real Mosquitto broker on a free loopback port, with persistence so it can be restarted."""

    def __init__(self, folder: Path):
        self.folder, self.port = Path(folder), free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = self.folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\n"
            f"persistence_location {self.folder}/\nautosave_interval 1\n"
        )
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.proc = Proc("mosquitto", [mosquitto_binary(), "-c", str(self.conf), "-v"])
        self.proc.wait_for(r"mosquitto version .* running", timeout=20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
