"""Mosquitto's password file and ACL file, enforced by the embedded amqtt broker (two amqtt plugins).

The same ``DIR/mosquitto/passwd`` and ``DIR/mosquitto/acl`` that ``splitglm
secrets`` writes for Mosquitto work here, so the demo broker confines each
login as the production one does:

- ``PasswordFileAuth``: ``user:$7$...`` lines; a client without a username,
  an unknown user or a wrong password is refused (CONNACK "not authorized").
- ``AclFileTopics``: ``user NAME`` / ``topic [read|write|readwrite|deny] TOPIC``
  / ``pattern [ACCESS] TOPIC`` lines (``%u`` = username, ``%c`` = client id).
  ``topic`` lines before any ``user`` line are for anonymous clients. A deny
  that matches wins. PUBLISH needs write, delivery (RECEIVE) needs read, and
  SUBSCRIBE needs a read rule covering the whole filter (after a
  ``$share/<group>/`` prefix): ``splitglm/v1/device/#`` is refused to a device
  that may read only its own steps. (Mosquitto 2.0's acl_file grants every
  SUBSCRIBE and filters at delivery; the result for the subscriber is the same.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from splitglm.mqtt_access import check_password, hash_password

READ, WRITE = 1, 2
ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": 0}
_DUMMY_HASH = hash_password("not a password")  # unknown users cost one hash too: no timing oracle for names


# ---- password file ------------------------------------------------------------------------------


def load_passwords(path: Path) -> dict[str, str]:
    """username -> ``$7$`` hash from a Mosquitto password file; ValueError naming a bad line."""
    users = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed.startswith("$7$"):
            raise ValueError(f"{path}:{n}: expected 'user:$7$...' (what mosquitto_passwd writes)")
        users[user] = hashed
    return users


def login_ok(users: dict[str, str], username: str | None, password: str | None) -> bool:
    """Whether the login matches the password file (anonymous never does)."""
    if not username:
        return False
    hashed = users.get(username)
    ok = check_password(password or "", hashed or _DUMMY_HASH)  # hmac.compare_digest inside
    return ok and hashed is not None


class PasswordFileAuth(BaseAuthPlugin):
    """Logins from a Mosquitto ``$7$`` password file; anonymous clients are refused."""

    @dataclass
    class Config:
        password_file: str = ""  # path of the Mosquitto password file

    def __init__(self, context) -> None:
        super().__init__(context)
        self.users = load_passwords(Path(self.config.password_file))

    async def authenticate(self, *, session: Session) -> bool:
        ok = login_ok(self.users, session.username, session.password)
        if not ok:
            self.context.logger.warning("refused the login of %r (client %s)", session.username, session.client_id)
        return ok


# ---- topic matching -----------------------------------------------------------------------------


def topic_matches(topic: str, rule: str) -> bool:
    """Whether a topic name matches a filter (MQTT rules: '+' one level, '#' the rest or nothing)."""
    return covers(rule, topic)


def covers(rule: str, subscription: str) -> bool:
    """Whether every topic that ``subscription`` (a filter) matches is matched by ``rule`` (a filter)."""
    r, s = rule.split("/"), subscription.split("/")
    if s[0].startswith("$") and r[0] in ("+", "#"):  # wildcards at the first level skip $-topics
        return False
    for i, level in enumerate(r):
        if level == "#":
            return True
        if i == len(s):
            return False
        if s[i] == "#" or (s[i] == "+" and level != "+") or (level not in ("+", s[i])):
            return False
    return len(s) == len(r)


def strip_share(subscription: str) -> str:
    """``$share/<group>/<filter>`` -> ``<filter>``."""
    if subscription.startswith("$share/"):
        return subscription.split("/", 2)[2] if subscription.count("/") >= 2 else ""
    return subscription


# ---- ACL file -----------------------------------------------------------------------------------


@dataclass
class Acl:
    """A parsed Mosquitto ACL file: (access, topic) rules per user, for anonymous clients, and patterns."""

    users: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    anonymous: list[tuple[int, str]] = field(default_factory=list)
    patterns: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, source: str = "acl") -> Acl:
        acl, current = cls(), None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            rest = rest.strip()
            if word == "user" and rest:
                current = acl.users.setdefault(rest, [])
                continue
            if word not in ("topic", "pattern") or not rest:
                raise ValueError(f"{source}:{n}: expected 'user NAME', 'topic [ACCESS] TOPIC' or 'pattern ...'")
            access, _, topic = rest.partition(" ")
            if access not in ACCESS or not topic.strip():
                access, topic = "readwrite", rest  # no access word: readwrite, as in Mosquitto
            rule = (ACCESS[access], topic.strip())
            if word == "pattern":
                acl.patterns.append(rule)
            else:
                (acl.anonymous if current is None else current).append(rule)
        return acl

    @classmethod
    def load(cls, path: Path) -> Acl:
        return cls.parse(Path(path).read_text(), str(path))

    def rules(self, username: str | None, client_id: str | None) -> list[tuple[int, str]]:
        """This client's rules: its user block (or the anonymous one) and the patterns, substituted."""
        own = self.users.get(username, []) if username else self.anonymous
        subs = {"%u": username, "%c": client_id}
        patterns = []
        for access, topic in self.patterns:
            used = {k: v for k, v in subs.items() if k in topic}
            if any(not v or any(c in v for c in "/+#") for v in used.values()):
                continue  # e.g. %u for an anonymous client, or a name that would widen the rule
            for k, v in used.items():
                topic = topic.replace(k, v)
            patterns.append((access, topic))
        return own + patterns

    def allows(self, username: str | None, client_id: str | None, topic: str, access: int) -> bool:
        """Whether the client may read (``READ``) or write (``WRITE``) the topic name."""
        rules = self.rules(username, client_id)
        if any(a == 0 and topic_matches(topic, t) for a, t in rules):
            return False
        return any(a & access and topic_matches(topic, t) for a, t in rules)

    def allows_subscription(self, username: str | None, client_id: str | None, subscription: str) -> bool:
        """Whether a read rule covers the whole filter (no deny rule covers it)."""
        subscription = strip_share(subscription)
        rules = self.rules(username, client_id)
        if not subscription or any(a == 0 and covers(t, subscription) for a, t in rules):
            return False
        return any(a & READ and covers(t, subscription) for a, t in rules)


class AclFileTopics(BaseTopicPlugin):
    """A Mosquitto ACL file for SUBSCRIBE (the filter), PUBLISH (write) and RECEIVE (read)."""

    @dataclass
    class Config:
        acl_file: str = ""  # path of the Mosquitto ACL file

    def __init__(self, context) -> None:
        super().__init__(context)
        self.acl = Acl.load(Path(self.config.acl_file))

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if session is None or not topic:
            return False
        user, client = session.username, session.client_id
        if action == Action.SUBSCRIBE:
            ok = self.acl.allows_subscription(user, client, topic)
        else:
            ok = self.acl.allows(user, client, topic, WRITE if action == Action.PUBLISH else READ)
        if not ok:
            self.context.logger.warning("ACL: %s of %r refused to %r (client %s)", action, topic, user, client)
        return ok
