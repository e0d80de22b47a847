"""Real processes for integration tests: agents, brokers; started, awaited, stopped with nothing left behind.

Every agent logs a line ``ready: <url>`` once it serves; ``Proc.ready()``
waits for it and returns the URL. The process machinery is ``splitglm.processes``
(the demo uses it too); this module adds the test-only real Mosquitto broker.
"""

from __future__ import annotations

import time
from pathlib import Path

from splitglm.processes import READY, Proc, free_port, mosquitto_binary  # noqa: F401 -- re-exported for the tests

ROOT = Path(__file__).resolve().parents[1]


class Mosquitto:
    """A real Mosquitto broker on a free loopback port, with persistence so it can be restarted."""

    def __init__(self, folder: Path):
        self.folder, self.port = Path(folder), free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = self.folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\nset_tcp_nodelay true\npersistence true\n"
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
