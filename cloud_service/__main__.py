"""``python -m cloud_service``: serve a plan's cloud segment over gRPC until SIGTERM or SIGINT.

Exit codes: 0 after a clean shutdown, 1 when the plan folder cannot be
served (missing, tampered with, not a plan) or the service failed (a rank of
its tensor-parallel replica died), 2 for invalid settings.
"""

from __future__ import annotations

import logging
import sys

from runtime import tracing
from runtime.artifacts import ArtifactError
from runtime.logs import default_format, setup_logging
from runtime.settings import stop_on_signals

from .settings import CloudSettings, SettingsError

logger = logging.getLogger("cloud_service")


def main(argv: list[str] | None = None) -> int:
    setup_logging(fmt=default_format())  # until the settings say how
    try:
        settings = CloudSettings.load(argv)
    except SettingsError as e:
        logger.error("%s", e)
        return 2
    settings.setup_logging()
    from .server import serve  # imports torch and grpc: after the settings are known to be good

    with stop_on_signals() as stop, tracing.running("splitglm-cloud"):  # (before the gRPC server is made)
        try:
            if settings.tensor_parallel > 1:
                from .parallel import serve_parallel

                server = serve_parallel(settings, stop.set)
            else:
                server = serve(settings)
        except SettingsError as e:
            logger.error("%s", e)
            return 2
        except (ArtifactError, OSError) as e:
            logger.error("cannot serve plan %s: %s", settings.plan, e)
            return 1
        while not stop.wait(1.0):  # wakes for the signal handler
            pass
        logger.info("shutting down: health NOT_SERVING, %.1f s for running streams", settings.grace_s)
        server.stop(settings.grace_s)
        return 1 if server.failure else 0


if __name__ == "__main__":
    sys.exit(main())
