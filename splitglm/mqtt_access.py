"""Who may do what on the MQTT broker: logins, the client id bound to each, the ACL, and the size caps.

``splitglm secrets`` (``splitglm.credentials``) writes these for both brokers:
the embedded one (``splitglm.broker``, which reads ``passwd``, ``acl`` and
``clientids``) and Mosquitto (``mosquitto.conf``, with the dynamic-security
plugin's ``dynamic-security.json`` rendered from the same ACL and binding).

Logins. Every login has exactly one client id, so no login can take
another's session (a broker drops the session of a client id that connects
again; a login that may use any id could knock the edge off):

==========================  ===========================  ============================================
login                       client id                    may
==========================  ===========================  ============================================
``{device}``                ``splitglm-device-{device}``  the ``%u`` patterns: its own topics
``{device}$sensors``        ``splitglm-sensors-{device}``  write ``sensors/{device}/#``
``{device}$app``            ``splitglm-app-{device}``     read ``results/{device}/#`` (who reads answers)
``{edge}``                  ``splitglm-edge-{edge}``      read its own frames topic and the pool's; write
                                                         the steps of the devices it serves
``broker$health``           ``splitglm-health``           read ``splitglm/v1/health`` (health checks)
==========================  ===========================  ============================================

``$`` cannot appear in a device or edge id (they are topic levels), so a
service login never collides with one, and the ``%u`` patterns give it only
topics no device owns.

Caps. A frame larger than the edge's ``max_frame_bytes`` is refused by the
edge anyway, so the broker refuses packets above ``max_packet_bytes(max_frame_bytes)``
(the frame plus room for its topic and properties) before it queues them, and
holds at most ``QUEUED_FRAMES`` such packets per client (``max_queued_bytes``).

The password hash is Mosquitto's ``$7$``: PBKDF2-HMAC-SHA512, 101 iterations,
a 12-byte salt, base64: ``user:$7$101$<salt>$<hash>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from protos.topics import DEFAULT_POOL, client_id, frames_subscription, steps_topic

SEP = "$"  # between a device id and a service login's role: no device or edge id contains it
HEALTH_LOGIN, HEALTH_CLIENT_ID, HEALTH_TOPIC = "broker$health", "splitglm-health", "splitglm/v1/health"
PBKDF2_ITERATIONS, SALT_BYTES = 101, 12  # what mosquitto_passwd uses for $7$ hashes
PUBLISH_OVERHEAD = 64 << 10  # room in one PUBLISH beside the frame: topic, v5 properties, trace context, bytes
QUEUED_FRAMES = 4  # the largest packets one client's queue may hold (max_queued_bytes)
MAX_QUEUED_MESSAGES = 10_000  # messages queued per client, beside the byte cap
DYNSEC_ACCESS = {"read": ("subscribePattern", "publishClientReceive"), "write": ("publishClientSend",),
                 "readwrite": ("subscribePattern", "publishClientReceive", "publishClientSend")}
DEVICE_ACL = """\
# devices: the login name is the device id
pattern readwrite sensors/%u/#
pattern write splitglm/v1/edge/+/frames/%u
pattern read splitglm/v1/device/%u/steps
pattern readwrite results/%u/#
"""


# ---- Mosquitto password hashes ------------------------------------------------------------------


def pbkdf2(password: str, salt: bytes | None) -> tuple[str, str]:
    """(salt, digest), base64: PBKDF2-HMAC-SHA512 as Mosquitto hashes passwords (a new salt when None)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return base64.b64encode(salt).decode(), base64.b64encode(digest).decode()


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``$7$`` hash that mosquitto_passwd writes for ``password``."""
    salt_b64, digest_b64 = pbkdf2(password, salt)
    return f"$7${PBKDF2_ITERATIONS}${salt_b64}${digest_b64}"


def check_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$<iterations>$<salt>$<hash>`` entry (constant-time compare)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt, validate=True),
                                     int(iterations))
    except ValueError:  # binascii.Error is a ValueError
        return False
    return hmac.compare_digest(actual, expected)


# ---- logins and their client ids ----------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """One MQTT login: its name, the one client id it may use, its files and its ACL user block."""

    name: str
    client_id: str
    folder: str  # where its username and password files lie, relative to the secrets folder
    rules: tuple[tuple[str, str], ...] = ()  # (access, topic) lines of its user block; devices use the patterns


def edge_rules(edge: str, devices: list[str], pool: str = DEFAULT_POOL) -> tuple[tuple[str, str], ...]:
    """An edge reads its own frames and the pool's (shared), and writes only its devices' steps."""
    reads = [("read", frames_subscription(edge)), ("read", frames_subscription(pool))]
    return tuple(reads + [("write", steps_topic(d)) for d in devices])


def logins(devices: list[str], edges: list[str], serves: dict[str, list[str]] | None = None) -> list[Login]:
    """Every login of a deployment; ``serves``: edge -> the devices it answers (default: every device)."""
    serves = serves or {}
    if unknown := sorted(set(serves) - set(edges)) + sorted({d for ds in serves.values() for d in ds} - set(devices)):
        raise ValueError(f"--serves names {unknown}: not among --edges / --devices")
    found = [Login(d, client_id("device", d), f"devices/{d}") for d in devices]
    found += [Login(f"{d}{SEP}sensors", client_id("sensors", d), f"sensors/{d}", (("write", f"sensors/{d}/#"),))
              for d in devices]
    found += [Login(f"{d}{SEP}app", client_id("app", d), f"apps/{d}", (("read", f"results/{d}/#"),))
              for d in devices]
    found += [Login(e, client_id("edge", e), f"edges/{e}", edge_rules(e, serves.get(e, devices))) for e in edges]
    return found + [Login(HEALTH_LOGIN, HEALTH_CLIENT_ID, "health", (("read", HEALTH_TOPIC),))]


def acl_text(found: list[Login]) -> str:
    """The Mosquitto ACL: the device patterns, then one user block per login with rules of its own."""
    blocks = "".join(f"user {login.name}\n" + "".join(f"topic {a} {t}\n" for a, t in login.rules)
                     for login in found if login.rules)
    return DEVICE_ACL + "# the edges, the sensors, the apps and the health check: explicit topics\n" + blocks


def clientids_text(found: list[Login]) -> str:
    """``login client_id`` lines: the binding the embedded broker enforces (``splitglm.broker_auth``)."""
    return "# login client-id: the one client id each login may use, and no other login\n" + "".join(
        f"{login.name} {login.client_id}\n" for login in found)


def load_clientids(path: Path) -> dict[str, str]:
    """login -> client id from a ``clientids`` file; ValueError naming a bad line or a client id bound twice."""
    bound: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        words = line.split()
        if len(words) != 2 or words[1] in bound.values():
            raise ValueError(f"{path}:{n}: expected 'login client_id', each client id once")
        bound[words[0]] = words[1]
    return bound


# ---- the dynamic-security plugin ----------------------------------------------------------------


def acl_rules(acl: str, users: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(access, topic) rules per login of a Mosquitto ACL file: its patterns (``%u`` replaced) and user blocks."""
    rules: dict[str, list[tuple[str, str]]] = {u: [] for u in users}
    user = None
    for line in acl.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
            continue
        access, topic = words[1:3] if len(words) == 3 else ("readwrite", words[1])
        if access not in DYNSEC_ACCESS:
            raise ValueError(f"ACL line {line!r}: access must be one of {sorted(DYNSEC_ACCESS)}")
        if words[0] == "pattern":
            for u in users:
                rules[u].append((access, topic.replace("%u", u)))
        elif words[0] == "topic" and user in rules:
            rules[user].append((access, topic))
    return rules


def dynsec_config(acl: str, passwords: dict[str, str], client_ids: dict[str, str] | None = None) -> dict:
    """The dynamic-security plugin's configuration for these logins and this ACL: one role per login,
    nothing allowed by default (a SUBSCRIBE outside the role is refused in the SUBACK); ``client_ids``:
    login -> the one client id the plugin lets it connect with."""
    clients, roles = [], []
    for user, rules in acl_rules(acl, list(passwords)).items():
        salt, digest = pbkdf2(passwords[user], None)
        client = {"username": user, "password": digest, "salt": salt, "iterations": PBKDF2_ITERATIONS,
                  "roles": [{"rolename": user}]}
        if client_ids and user in client_ids:
            client["clientid"] = client_ids[user]
        clients.append(client)
        acls = [(kind, topic) for access, topic in rules for kind in DYNSEC_ACCESS[access]]
        # the plugin checks a shared subscription with its "$share/<group>/" prefix: allow it where reading is
        acls += [("subscribePattern", f"$share/+/{topic}") for kind, topic in list(acls) if kind == "subscribePattern"]
        roles.append({"rolename": user, "acls": [{"acltype": kind, "topic": topic, "priority": 0, "allow": True}
                                                 for kind, topic in acls]})
    return {"clients": clients, "groups": [], "roles": roles,
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                                 "unsubscribe": True}}


# ---- caps ---------------------------------------------------------------------------------------


def default_max_frame_bytes() -> int:
    """The edge's ``max_frame_bytes`` default: the largest frame it accepts, bytes."""
    from edge_node.settings import EdgeSettings

    return EdgeSettings.model_fields["max_frame_bytes"].default


def max_packet_bytes(max_frame_bytes: int) -> int:
    """The largest MQTT packet a broker accepts: the largest legal frame plus its topic and properties, bytes."""
    return max_frame_bytes + PUBLISH_OVERHEAD


def broker_caps(max_frame_bytes: int) -> dict[str, int]:
    """Mosquitto's size and queue options for frames of at most ``max_frame_bytes``."""
    packet = max_packet_bytes(max_frame_bytes)
    return {"max_packet_size": packet, "max_queued_bytes": QUEUED_FRAMES * packet,
            "max_queued_messages": MAX_QUEUED_MESSAGES}


def read_max_packet_size(conf: Path) -> int | None:
    """``max_packet_size`` from a mosquitto.conf (None: not set)."""
    for line in Path(conf).read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "max_packet_size":
            return int(words[1])
    return None
