"""``python -m edge_node [--config FILE.yaml] [--flag ...]``: serve a plan's edge tier until SIGTERM/SIGINT.

Exit codes: 0 after a clean shutdown, 2 for invalid settings, 1 when start-up fails.
"""

from __future__ import annotations

import logging
import signal
import sys

from runtime import tracing
from runtime.logs import default_format, setup_logging
from runtime.settings import stop_on_signals

from .settings import EdgeSettings, SettingsError

logger = logging.getLogger("edge_node")


def main(argv: list[str] | None = None) -> int:
    setup_logging(fmt=default_format())  # until the settings say how
    try:
        settings = EdgeSettings.load(argv)
    except SettingsError as e:
        logger.error("%s", e)
        return 2
    except SystemExit as e:  # argparse: --help (0) or an unknown flag (2)
        return int(e.code or 0)
    settings.setup_logging()

    node = None

    def on_stop(signum: int) -> None:
        logger.info("%s: shutting down", signal.Signals(signum).name)
        if node is not None:
            node.stop()

    with stop_on_signals(on_stop) as stop_requested, tracing.running("splitglm-edge"):
        try:
            from .node import EdgeNode  # heavy imports (torch, transformers) after the settings are known good

            node = EdgeNode(settings)
            if stop_requested.is_set():
                node.stop()
            node.run()
        except Exception as e:  # noqa: BLE001 -- a failed start-up is reported, not a traceback for operators
            logger.error("edge node failed: %s", e, exc_info=logger.isEnabledFor(logging.DEBUG))
            if node is not None:
                node.close()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
