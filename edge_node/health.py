"""The edge's probes: ``/livez`` (the process works) and ``/readyz`` (it can serve now), as pure functions.

``/livez`` answers 200 ``{"status": "alive"}`` from the event loop: if it answers, the process works. A
kubelet restarts the edge only when it stops answering, never because the cloud or the broker is away.

``/readyz`` reads the node's checks (``EdgeNode.health``): ``broker`` (the relay's MQTT subscriptions are
all acknowledged now; True without a broker), ``cloud`` (a cloud replica's health service says SERVING) and
``fast_path`` (the edge's fast tail can answer):

- 200 ``{"status": "ready"}``: everything holds;
- 200 ``{"status": "degraded", "reasons": ["cloud_unavailable"]}``: the cloud is down, the fast path answers
  (flagged degraded in each answer);
- 503 ``{"status": "unready", "reasons": [...]}``: the broker subscription is lost
  (``broker_subscription_lost``: device frames would not arrive), or no path to tokens is left
  (``no_path_to_tokens``: neither the cloud nor the fast path).

``reasons`` names every check that fails, in that order (``cloud_unavailable`` beside the others too).

Each body also carries ``checks``, the booleans it was decided from. ``/healthz`` is a deprecated alias of
``/readyz``. The probes need no API key and are exempt from the request caps (``guard``, ``conn_guard``).
"""

from __future__ import annotations

PROBE_PATHS = ("/livez", "/readyz", "/healthz")  # open to anyone, never refused for load


def readiness(checks: dict[str, bool]) -> tuple[int, dict]:
    """The HTTP status and body of ``/readyz`` from the node's checks (a check not reported holds)."""
    broker, cloud, fast = (bool(checks.get(name, True)) for name in ("broker", "cloud", "fast_path"))
    reasons = [reason for reason, holds in (("broker_subscription_lost", broker), ("cloud_unavailable", cloud),
                                            ("no_path_to_tokens", cloud or fast)) if not holds]
    body = {"checks": {name: bool(ok) for name, ok in checks.items()}}
    if not broker or not (cloud or fast):
        return 503, {"status": "unready", "reasons": reasons, **body}
    if reasons:
        return 200, {"status": "degraded", "reasons": reasons, **body}
    return 200, {"status": "ready", **body}
