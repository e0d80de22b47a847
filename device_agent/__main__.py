"""``python -m device_agent``: run a plan's device segment for one device's MQTT sensor readings.

Exit status: 0 after a clean shutdown on SIGTERM / SIGINT, 1 if the broker
cannot be reached, 2 for bad settings (or a plan that does not load).
"""

from __future__ import annotations

import logging
import sys
import threading

from runtime import tracing
from runtime.logs import default_format, setup_logging
from runtime.settings import stop_on_signals

from .settings import DeviceSettings, SettingsError, load_settings

logger = logging.getLogger("device_agent")


def main(argv: list[str] | None = None) -> int:
    setup_logging(fmt=default_format())  # until the settings say how
    try:
        settings = load_settings(DeviceSettings, argv, "python -m device_agent", __doc__.splitlines()[0])
    except SettingsError as e:
        logger.error("%s", e)
        return 2
    settings.setup_logging()
    with stop_on_signals() as stop, tracing.running("splitglm-device"):
        return _serve(settings, stop)


def _serve(settings: DeviceSettings, stop: threading.Event) -> int:
    from runtime.artifacts import ArtifactError
    from runtime.checkpoint import CheckpointError

    from .agent import DeviceAgent

    try:
        agent = DeviceAgent(settings)
    except (ArtifactError, CheckpointError, KeyError) as e:
        logger.error("cannot load the device tier of plan %s: %s", settings.plan, e)
        return 2
    except ConnectionError as e:
        logger.error("%s", e)
        return 1
    try:
        agent.start()
    except OSError as e:  # the metrics port
        logger.error("cannot serve metrics on %s:%s: %s", settings.metrics_host, settings.metrics_port, e)
        return 1
    stop.wait()
    logger.info("stopping")
    agent.stop()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
