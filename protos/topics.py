"""MQTT topics and message properties shared by device agents, edges and sensors.

Request/reply between a device agent (the session owner) and an edge uses
MQTT v5 properties, as paho's examples do:

- the device publishes Frame bytes (QoS 1) with ``ResponseTopic`` = its
  steps topic and ``CorrelationData`` = ``correlation(session_id, seq)``;
- the edge publishes the StepResult bytes (QoS 1) to that response topic
  with the same correlation data and the user property ``EDGE_ID_PROPERTY``.

Session affinity: an edge keeps the KV cache of the sessions it serves, so
only a session's first frame (seq 0) goes to the pool topic that the edges
of a pool share (``$share/<group>/...``); the reply names the edge that took
it, and every later frame of the session goes to that edge's own topic.
Close frames (``close``) get no reply.

Identity: a frames topic ends in the sending device's id, and the broker's
ACL (``pattern write splitglm/v1/edge/+/frames/%u``) lets a device publish only
under its own login, so the edge knows who sent a frame from its topic alone.
It answers only on that device's steps topic and refuses a frame whose
reply topic, or whose session, belongs to another device.
"""

from __future__ import annotations

SENSORS = "sensors/{device_id}/{sensor}"  # JSON readings a device publishes
FRAMES = "splitglm/v1/edge/{edge_id}/frames/{device_id}"  # a device's frames to one edge, or to a pool
STEPS = "splitglm/v1/device/{device_id}/steps"  # step results back to a device agent
RESULTS = "results/{device_id}"  # the finished answer for a sensor request (JSON)

DEFAULT_POOL = "pool"  # the edge pool that new sessions go to
SHARE_GROUP = "splitglm-edges"  # shared-subscription group of the edges of a pool
EDGE_ID_PROPERTY = "splitglm-edge-id"  # user property on step results: the edge holding the session
# MQTT client ids: one per login, bound to it by the broker (``splitglm secrets`` writes the binding)
CLIENT_IDS = {"device": "splitglm-device-{}", "edge": "splitglm-edge-{}", "sensors": "splitglm-sensors-{}",
              "app": "splitglm-app-{}"}


def _check_level(kind: str, value: str) -> str:
    if not value or any(c in value for c in "/+#$") or len(value) > 128:
        raise ValueError(f"{kind} {value!r} must be 1-128 characters without '/', '+', '#' or '$'")
    return value


def client_id(role: str, name: str) -> str:
    """The MQTT client id of a device agent, an edge, a device's sensors or its app (``CLIENT_IDS``)."""
    return CLIENT_IDS[role].format(_check_level(f"{role} id", name))


def sensor_topic(device_id: str, sensor: str) -> str:
    return SENSORS.format(device_id=_check_level("device id", device_id), sensor=_check_level("sensor", sensor))


def sensors_subscription(device_id: str) -> str:
    """Every sensor of one device: ``sensors/{device_id}/#``."""
    return f"sensors/{_check_level('device id', device_id)}/#"


def frames_topic(edge_id: str, device_id: str) -> str:
    """Where ``device_id`` publishes frames for one edge (or, with a pool name, for whichever edge of the pool)."""
    return FRAMES.format(edge_id=_check_level("edge id", edge_id), device_id=_check_level("device id", device_id))


def frames_subscription(edge_id: str) -> str:
    """Every device's frames to one edge (or pool): ``splitglm/v1/edge/{edge_id}/frames/+``."""
    return FRAMES.format(edge_id=_check_level("edge id", edge_id), device_id="+")


def pool_subscription(pool: str = DEFAULT_POOL, group: str = SHARE_GROUP) -> str:
    """The shared subscription an edge of ``pool`` takes for new sessions."""
    return f"$share/{_check_level('share group', group)}/{frames_subscription(pool)}"


def frame_sender(topic: str) -> str:
    """The device id that a frames topic ends in; ValueError if ``topic`` is not a frames topic."""
    levels = topic.split("/")
    if len(levels) != 6 or levels[:3] != ["splitglm", "v1", "edge"] or levels[4] != "frames":
        raise ValueError(f"{topic!r} is not a frames topic ({FRAMES})")
    return _check_level("device id", levels[5])


def steps_topic(device_id: str) -> str:
    return STEPS.format(device_id=_check_level("device id", device_id))


def results_topic(device_id: str) -> str:
    return RESULTS.format(device_id=_check_level("device id", device_id))


def errors_topic(device_id: str) -> str:  # dead letters: the device's refused sensor messages (JSON)
    return f"{results_topic(device_id)}/errors"


def correlation(session_id: str, seq: int) -> bytes:
    """CorrelationData of a frame and of its step result."""
    return f"{session_id}:{seq}".encode()


def parse_correlation(data: bytes) -> tuple[str, int]:
    """(session_id, seq) from CorrelationData; ValueError if it is not ``session:seq``."""
    session, sep, seq = bytes(data).decode("utf-8", "replace").rpartition(":")
    if not sep or not session or not seq.isdigit():
        raise ValueError(f"correlation data {bytes(data)[:64]!r} is not 'session:seq'")
    return session, int(seq)
