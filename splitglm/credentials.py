"""Development secrets for a deployment: a CA, TLS certificates, MQTT logins and ACL, HTTP API keys.

``splitglm secrets --out DIR`` (or ``make_secrets``) writes, into a new folder::

    ca.crt ca.key                       development CA (EC P-256, 10 years)
    cloud/server.{crt,key}              cloud gRPC server (SAN: hosts + "cloud")
    edge/server.{crt,key}               edge HTTPS server (SAN: hosts + "edge")
    edge/client.{crt,key}               edge client certificate for mTLS to the cloud (CN "edge")
    mosquitto/server.{crt,key}          MQTT broker (SAN: hosts + "mosquitto")
    mosquitto/mosquitto.conf            TLS listener, no anonymous clients, the logins and the ACL enforced
    mosquitto/passwd, mosquitto/acl     Mosquitto password file ($7$, as mosquitto_passwd writes) and ACL
    mosquitto/dynamic-security.json     the same logins and ACL for Mosquitto's dynamic-security plugin
    devices/<id>/{username,password}    one MQTT login per device (username = device id)
    edges/<id>/{username,password}      one MQTT login per edge (username = edge id)
    api-key                             HTTP API keys, one per line

Mosquitto 2.0's ``acl_file`` grants every SUBSCRIBE and only filters what it
delivers; its dynamic-security plugin refuses a subscription outside the ACL in
the SUBACK. So ``mosquitto.conf`` loads the plugin, with ``dynamic-security.json``
rendered from the ``acl`` file (one role per login, ``%u`` replaced: the plugin
of 2.0 has no pattern substitution), wherever the plugin is found, or is named
with ``mosquitto_plugin``; without it, it falls back to ``password_file`` and
``acl_file``. The embedded broker reads ``passwd`` and ``acl`` and refuses
subscriptions itself.

Keys and passwords are mode 0600, folders 0700. The Mosquitto password hash
(``check_password`` verifies it; the embedded broker uses it too) is
PBKDF2-HMAC-SHA512, 101 iterations, a 12-byte salt, base64:
``user:$7$101$<salt>$<hash>``.
"""

from __future__ import annotations

import base64
import datetime
import getpass
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protos.topics import steps_topic

DEFAULT_DEVICES = ("demo-device-1",)
DEFAULT_EDGES = ("edge-demo",)
DEFAULT_HOSTS = ("localhost", "127.0.0.1")  # always in every server certificate
CA_DAYS = 3650  # validity of the development CA, days
LEAF_DAYS = 825  # validity of the server and client certificates, days
PBKDF2_ITERATIONS, SALT_BYTES = 101, 12  # what mosquitto_passwd uses for $7$ hashes
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
DYNSEC_FOLDERS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/lib/mosquitto",
                  "/usr/local/lib", "/opt/homebrew/lib")  # Debian/Ubuntu, the eclipse-mosquitto image, source builds
# the plugin's ACL types for each access of an acl_file line
DYNSEC_ACCESS = {"read": ("subscribePattern", "publishClientReceive"), "write": ("publishClientSend",),
                 "readwrite": ("subscribePattern", "publishClientReceive", "publishClientSend")}

DEVICE_ACL = """\
# devices: the login name is the device id
pattern readwrite sensors/%u/#
pattern write splitglm/v1/edge/+/frames/%u
pattern read splitglm/v1/device/%u/steps
pattern readwrite results/%u/#
"""
EDGE_ACL = """\
user {edge}
topic read splitglm/v1/edge/+/frames/+
topic write splitglm/v1/device/+/steps
"""


class SecretsExist(FileExistsError):
    """The output folder already holds a CA key (pass force=True / --force to replace everything)."""


# ---- Mosquitto password hashes ------------------------------------------------------------------


def _pbkdf2(password: str, salt: bytes | None) -> tuple[str, str]:
    """(salt, digest), base64: PBKDF2-HMAC-SHA512 as Mosquitto hashes passwords (a new salt when None)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return base64.b64encode(salt).decode(), base64.b64encode(digest).decode()


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``$7$`` hash that mosquitto_passwd writes for ``password``."""
    salt_b64, digest_b64 = _pbkdf2(password, salt)
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


# ---- certificates -------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _names(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _certificate(subject: str, key, issuer_cert, issuer_key, days: int, extensions) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))  # tolerate a little clock skew
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
        builder = builder.add_extension(aki, critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(**set_bits: bool) -> x509.KeyUsage:
    bits = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                          "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    return x509.KeyUsage(**{**bits, **set_bits})


def make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed EC P-256 development CA, valid for ``CA_DAYS``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate("splitglm development CA", key, None, key, CA_DAYS, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), True),
    ])
    return cert, key


def make_leaf(common_name: str, hosts: list[str] | None, ca_cert, ca_key, client: bool = False):
    """(certificate, key) signed by the CA: a TLS server for ``hosts``, or (``client``) a TLS client."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    extensions = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(digital_signature=True), True),
        (x509.ExtendedKeyUsage([usage]), False),
    ]
    if hosts:
        extensions.append((_names(hosts), False))
    return _certificate(common_name, key, ca_cert, ca_key, LEAF_DAYS, extensions), key


# ---- files --------------------------------------------------------------------------------------


def _folder(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write(path: Path, data: str | bytes, secret: bool = False) -> Path:
    """Write ``path`` (mode 0600 if ``secret``, else 0644), replacing what was there."""
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_pair(folder: Path, stem: str, cert, key) -> list[Path]:
    return [_write(folder / f"{stem}.crt", _pem(cert)), _write(folder / f"{stem}.key", _key_pem(key), secret=True)]


def _check_login(kind: str, name: str) -> str:
    steps_topic(name)  # a topic level: no '/', '+', '#', '$'
    if not name or any(c in name for c in ": \t\n"):
        raise ValueError(f"{kind} {name!r} cannot be an MQTT login (no ':' or whitespace)")
    return name


def find_dynsec_plugin() -> str | None:
    """Where Mosquitto's dynamic-security plugin lies on this machine (None: not found)."""
    return next((str(Path(f) / DYNSEC_PLUGIN) for f in DYNSEC_FOLDERS if (Path(f) / DYNSEC_PLUGIN).is_file()), None)


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


def dynsec_config(acl: str, passwords: dict[str, str]) -> dict:
    """The dynamic-security plugin's configuration for these logins and this ACL: one role per login,
    nothing allowed by default (a SUBSCRIBE outside the role is refused in the SUBACK)."""
    clients, roles = [], []
    for user, rules in acl_rules(acl, list(passwords)).items():
        salt, digest = _pbkdf2(passwords[user], None)
        clients.append({"username": user, "password": digest, "salt": salt, "iterations": PBKDF2_ITERATIONS,
                        "roles": [{"rolename": user}]})
        acls = [(kind, topic) for access, topic in rules for kind in DYNSEC_ACCESS[access]]
        # the plugin checks a shared subscription with its "$share/<group>/" prefix: allow it where reading is
        acls += [("subscribePattern", f"$share/+/{topic}") for kind, topic in list(acls) if kind == "subscribePattern"]
        roles.append({"rolename": user, "acls": [{"acltype": kind, "topic": topic, "priority": 0, "allow": True}
                                                 for kind, topic in acls]})
    return {"clients": clients, "groups": [], "roles": roles,
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                                 "unsubscribe": True}}


def mosquitto_conf(out: Path, port: int, data: Path | None = None, plugin: str | None = None) -> str:
    """A Mosquitto 2 configuration: one TLS listener on all interfaces, logins and the ACL from ``out``.

    ``data``: a folder where the broker keeps QoS 1 sessions and their queues across restarts (None: in memory).
    ``plugin``: the dynamic-security plugin's path (logins and ACL from ``dynamic-security.json``; None: from
    ``passwd`` and ``acl``, where Mosquitto grants every SUBSCRIBE and filters what it delivers).
    """
    m = out / "mosquitto"
    persistence = (f"persistence true\npersistence_location {data}/\nautosave_interval 5\n" if data is not None
                   else "persistence false\n")
    security = (f"# the dynamic-security plugin refuses a SUBSCRIBE outside the ACL (acl_file only filters delivery)\n"
                f"plugin {plugin}\nplugin_opt_config_file {m / 'dynamic-security.json'}\n" if plugin else
                f"password_file {m / 'passwd'}\nacl_file {m / 'acl'}\n")
    return (
        "# written by `splitglm secrets`: TLS only, every client logs in, the ACL confines each login\n"
        "per_listener_settings false\n"
        f"user {getpass.getuser()}\n"  # the owner of these 0600 files (a root mosquitto would drop to 'mosquitto')
        + persistence +
        "max_queued_messages 10000\n"
        "# a decode step is a small frame right after a small PUBACK: no Nagle delay\n"
        "set_tcp_nodelay true\n"
        "# frames of long prompts are large: up to 64 MiB\n"
        "message_size_limit 67108864\n"
        "allow_anonymous false\n"
        + security +
        f"listener {port}\n"
        f"cafile {out / 'ca.crt'}\n"
        f"certfile {m / 'server.crt'}\n"
        f"keyfile {m / 'server.key'}\n"
        "tls_version tlsv1.2\n"
    )


def acl_text(edges: list[str]) -> str:
    """The Mosquitto ACL of the contract: device patterns, then one block per edge login."""
    return DEVICE_ACL + "# one block per edge\n" + "".join(EDGE_ACL.format(edge=e) for e in edges)


def _logins(out: Path, kind: str, names: list[str]) -> tuple[dict[str, str], list[Path]]:
    passwords, written = {}, []
    _folder(out / kind)
    for name in names:
        folder = _folder(out / kind / name)
        passwords[name] = secrets.token_urlsafe(24)
        written += [_write(folder / "username", name + "\n"),
                    _write(folder / "password", passwords[name] + "\n", secret=True)]
    return passwords, written


def make_secrets(out, devices=DEFAULT_DEVICES, edges=DEFAULT_EDGES, hosts=(), api_keys: int = 1,
                 mqtt_port: int = 8883, force: bool = False, mosquitto_data: Path | None = None,
                 mosquitto_plugin: str | None = "auto") -> Path:
    """Write a deployment's development secrets into ``out`` (see the module docstring); return ``out``."""
    write_secrets(out, devices, edges, hosts, api_keys, mqtt_port, force, mosquitto_data, mosquitto_plugin)
    return Path(out).resolve()


def write_secrets(out, devices=DEFAULT_DEVICES, edges=DEFAULT_EDGES, hosts=(), api_keys: int = 1,
                  mqtt_port: int = 8883, force: bool = False, mosquitto_data: Path | None = None,
                  mosquitto_plugin: str | None = "auto") -> list[Path]:
    """``make_secrets``, returning every file written.

    ``mosquitto_plugin``: the dynamic-security plugin's path where Mosquitto will run, "auto" (found on this
    machine, else none) or None (``mosquitto.conf`` uses the password and ACL files).
    """
    out = Path(out).resolve()
    devices = [_check_login("device id", d) for d in dict.fromkeys(devices)]
    edges = [_check_login("edge id", e) for e in dict.fromkeys(edges)]
    if clash := set(devices) & set(edges):
        raise ValueError(f"{sorted(clash)} named both a device and an edge: each login is one or the other")
    if not 0 < mqtt_port < 65536 or api_keys < 0:
        raise ValueError(f"need 0 < mqtt_port < 65536 (got {mqtt_port}) and api_keys >= 0 (got {api_keys})")
    if (out / "ca.key").exists() and not force:
        raise SecretsExist(f"{out} already holds secrets (ca.key); pass --force to replace all of them")
    hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))

    _folder(out)
    ca_cert, ca_key = make_ca()
    written = _write_pair(out, "ca", ca_cert, ca_key)
    for folder, service in (("cloud", "cloud"), ("edge", "edge"), ("mosquitto", "mosquitto")):
        cert, key = make_leaf(service, [*hosts, service], ca_cert, ca_key)
        written += _write_pair(_folder(out / folder), "server", cert, key)
    cert, key = make_leaf("edge", None, ca_cert, ca_key, client=True)
    written += _write_pair(out / "edge", "client", cert, key)

    device_passwords, files = _logins(out, "devices", devices)
    edge_passwords, more = _logins(out, "edges", edges)
    passwords = {**device_passwords, **edge_passwords}
    passwd = "".join(f"{user}:{hash_password(pw)}\n" for user, pw in passwords.items())
    acl = acl_text(edges)
    plugin = find_dynsec_plugin() if mosquitto_plugin == "auto" else mosquitto_plugin
    written += files + more + [
        _write(out / "mosquitto" / "passwd", passwd, secret=True),
        _write(out / "mosquitto" / "acl", acl),
        _write(out / "mosquitto" / "dynamic-security.json", json.dumps(dynsec_config(acl, passwords), indent=1),
               secret=True),
        _write(out / "mosquitto" / "mosquitto.conf", mosquitto_conf(out, mqtt_port, mosquitto_data, plugin)),
        _write(out / "api-key", "".join(f"sk-{secrets.token_urlsafe(32)}\n" for _ in range(api_keys)), secret=True),
    ]
    return written
