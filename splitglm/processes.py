"""Child processes of the local topology: started, awaited (``ready: <url>`` lines), stopped, never left behind.

Used by ``splitglm demo`` and by the integration tests. Each child runs in its
own session (a terminal's Ctrl-C reaches only the parent, which stops the
children in order) and gets SIGTERM if the parent dies (Linux ``PR_SET_PDEATHSIG``, set by ``setpriv``).
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

SETPRIV = shutil.which("setpriv")  # util-linux (essential on Debian): sets PR_SET_PDEATHSIG, then execs


def _with_parent_death_signal(args: list[str]) -> list[str]:
    """``args`` run so that the child gets SIGTERM if this process dies.

    ``setpriv --pdeathsig`` sets it in the child after the fork and execs the
    command in place (same pid). Not a Python ``preexec_fn``: Python code
    between fork and exec in a process with other threads (gRPC's, torch's)
    can crash the child before it starts (it did: an edge exited -11 with no
    output).
    """
    return [SETPRIV, "--pdeathsig", "TERM", "--", *args] if SETPRIV else args


READY = re.compile(r"ready: ([^\s\"]+)")  # (a JSON log line closes the message with a quote)


def mosquitto_binary() -> str:
    """The installed Mosquitto broker's executable (RuntimeError if there is none)."""
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if not found:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose merged output is collected line by line."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.name, self.args = name, args
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "HF_HUB_OFFLINE": "1",
                    **(env or {})}
        self.popen = subprocess.Popen(
            _with_parent_death_signal(args), cwd=cwd, env=full_env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
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


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process, MiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
