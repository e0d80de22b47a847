"""Development secrets for a deployment: a CA, TLS certificates, MQTT logins and ACL, HTTP API keys.

``splitglm secrets --out DIR`` (or ``make_secrets``) writes, into a new folder::

    ca.crt ca.key                       development CA (EC P-256, 10 years)
    cloud/server.{crt,key}              cloud gRPC server (SAN: hosts + "cloud")
    cloud/health-client.{crt,key}       a client certificate for the cloud's own health check (mutual TLS)
    edge/server.{crt,key}               edge HTTPS server (SAN: hosts + "edge")
    edge/client.{crt,key}               edge client certificate for mTLS to the cloud (CN "edge")
    mosquitto/server.{crt,key}          MQTT broker (SAN: hosts + "mosquitto")
    mosquitto/mosquitto.conf            TLS listener, no anonymous clients, the logins, ACL and size caps enforced
    mosquitto/passwd, mosquitto/acl     Mosquitto password file ($7$, as mosquitto_passwd writes) and ACL
    mosquitto/clientids                 the one client id of each login (``login client_id`` lines)
    mosquitto/dynamic-security.json     the same logins, ACL and client ids for Mosquitto's dynamic-security plugin
    devices/<id>/{username,password}    one MQTT login per device (username = device id)
    sensors/<id>/, apps/<id>/           logins of the device's sensor simulator (``<id>$sensors``) and
                                        of what reads its answers (``<id>$app``)
    edges/<id>/{username,password}      one MQTT login per edge (username = edge id)
    health/{username,password}          the broker's health check login (``broker$health``)
    api-key                             HTTP API keys, one per line

What each login may do and the client id bound to it: ``splitglm.mqtt_access``.
Mosquitto 2.0's ``acl_file`` grants every SUBSCRIBE and only filters what it
delivers, and cannot bind client ids; its dynamic-security plugin refuses a
subscription outside the ACL in the SUBACK and a login connecting with another
client id. So ``mosquitto.conf`` loads the plugin, with ``dynamic-security.json``
rendered from the ``acl`` file (one role per login, ``%u`` replaced: the plugin
of 2.0 has no pattern substitution) and ``clientids``, wherever the plugin is
found, or is named with ``mosquitto_plugin``; without it, it falls back to
``password_file`` and ``acl_file`` (and client ids are not bound: a warning).
The embedded broker reads ``passwd``, ``acl`` and ``clientids`` itself.

Keys and passwords are mode 0600, folders 0700. ``splitglm.secret_folders``
splits the result into one folder per service (docker-compose).
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
import logging
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protos.topics import steps_topic
from splitglm.mqtt_access import (  # noqa: F401 -- re-exported: the secrets' MQTT side
    PBKDF2_ITERATIONS,
    Login,
    acl_rules,
    acl_text,
    broker_caps,
    check_password,
    clientids_text,
    default_max_frame_bytes,
    dynsec_config,
    hash_password,
    logins,
)

logger = logging.getLogger(__name__)

DEFAULT_DEVICES = ("demo-device-1",)
DEFAULT_EDGES = ("edge-demo",)
DEFAULT_HOSTS = ("localhost", "127.0.0.1")  # always in every server certificate
CA_DAYS = 3650  # validity of the development CA, days
LEAF_DAYS = 825  # validity of the server and client certificates, days
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
DYNSEC_FOLDERS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/lib/mosquitto",
                  "/usr/local/lib", "/opt/homebrew/lib")  # Debian/Ubuntu, the eclipse-mosquitto image, source builds


class SecretsExist(FileExistsError):
    """The output folder already holds a CA key (pass force=True / --force to replace everything)."""


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


def mosquitto_conf(out: Path, port: int, data: Path | None = None, plugin: str | None = None,
                   max_frame_bytes: int | None = None, user: str | None = None) -> str:
    """A Mosquitto 2 configuration: one TLS listener on all interfaces, logins, the ACL and caps from ``out``.

    ``data``: a folder where the broker keeps QoS 1 sessions and their queues across restarts (None: in memory).
    ``plugin``: the dynamic-security plugin's path (logins, ACL and client ids from ``dynamic-security.json``;
    None: from ``passwd`` and ``acl``, where Mosquitto grants every SUBSCRIBE, filters what it delivers and binds
    no client id). ``max_frame_bytes``: the edge's largest frame (default: its default), from which the packet
    and queue caps follow. ``user``: whom a root broker drops to (default: who runs this).
    """
    m = out / "mosquitto"
    persistence = (f"persistence true\npersistence_location {data}/\nautosave_interval 5\n" if data is not None
                   else "persistence false\n")
    security = (f"# the dynamic-security plugin refuses a SUBSCRIBE outside the ACL (acl_file only filters delivery)\n"
                f"# and a login that connects with a client id other than its own\n"
                f"plugin {plugin}\nplugin_opt_config_file {m / 'dynamic-security.json'}\n" if plugin else
                f"# no plugin: client ids are NOT bound to logins (any login may take any client id)\n"
                f"password_file {m / 'passwd'}\nacl_file {m / 'acl'}\n")
    caps = broker_caps(max_frame_bytes or default_max_frame_bytes())
    return (
        "# written by `splitglm secrets`: TLS only, every client logs in, the ACL confines each login\n"
        "per_listener_settings false\n"
        f"user {user or getpass.getuser()}\n"  # the owner of these 0600 files (a root mosquitto drops to it)
        + persistence +
        "# a decode step is a small frame right after a small PUBACK: no Nagle delay\n"
        "set_tcp_nodelay true\n"
        "# the largest legal frame (the edge's max_frame_bytes) plus its topic and properties; a larger packet\n"
        "# disconnects its sender. Per client, at most max_queued_messages and max_queued_bytes wait.\n"
        + "".join(f"{name} {value}\n" for name, value in caps.items()) +
        "allow_anonymous false\n"
        + security +
        f"listener {port}\n"
        f"cafile {out / 'ca.crt'}\n"
        f"certfile {m / 'server.crt'}\n"
        f"keyfile {m / 'server.key'}\n"
        "tls_version tlsv1.2\n"
    )


def _write_login(out: Path, login: Login) -> tuple[str, list[Path]]:
    """(password, files): ``out/<login.folder>/{username,password}``."""
    folder = out
    for part in Path(login.folder).parts:
        folder = _folder(folder / part)
    password = secrets.token_urlsafe(24)
    return password, [_write(folder / "username", login.name + "\n"),
                      _write(folder / "password", password + "\n", secret=True)]


def parse_serves(items: list[str]) -> dict[str, list[str]]:
    """``["e1=d1,d2", ...]`` -> {"e1": ["d1", "d2"]} (``--serves``)."""
    serves = {}
    for item in items:
        edge, sep, devices = item.partition("=")
        if not sep or not edge.strip():
            raise ValueError(f"--serves {item!r}: expected EDGE=DEVICE,DEVICE...")
        serves[edge.strip()] = [d.strip() for d in devices.split(",") if d.strip()]
    return serves


def make_secrets(out, devices=DEFAULT_DEVICES, edges=DEFAULT_EDGES, hosts=(), api_keys: int = 1,
                 mqtt_port: int = 8883, force: bool = False, mosquitto_data: Path | None = None,
                 mosquitto_plugin: str | None = "auto", **options) -> Path:
    """Write a deployment's development secrets into ``out`` (see the module docstring); return ``out``."""
    write_secrets(out, devices, edges, hosts, api_keys, mqtt_port, force, mosquitto_data, mosquitto_plugin, **options)
    return Path(out).resolve()


def write_secrets(out, devices=DEFAULT_DEVICES, edges=DEFAULT_EDGES, hosts=(), api_keys: int = 1,
                  mqtt_port: int = 8883, force: bool = False, mosquitto_data: Path | None = None,
                  mosquitto_plugin: str | None = "auto", serves: dict[str, list[str]] | None = None,
                  max_frame_bytes: int | None = None, conf_root: Path | None = None,
                  mosquitto_user: str | None = None) -> list[Path]:
    """``make_secrets``, returning every file written.

    ``mosquitto_plugin``: the dynamic-security plugin's path where Mosquitto will run, "auto" (found on this
    machine, else none) or None (``mosquitto.conf`` uses the password and ACL files, and binds no client id).
    ``serves``: edge -> the devices whose steps it may write (default: every device). ``max_frame_bytes``: the
    edges' largest frame, bytes (the broker's caps follow from it). ``conf_root``: where the broker will see this
    folder (default ``out``: mosquitto.conf names its files there); ``mosquitto_user``: the conf's ``user``.
    """
    out = Path(out).resolve()
    devices = [_check_login("device id", d) for d in dict.fromkeys(devices)]
    edges = [_check_login("edge id", e) for e in dict.fromkeys(edges)]
    if clash := set(devices) & set(edges):
        raise ValueError(f"{sorted(clash)} named both a device and an edge: each login is one or the other")
    if not 0 < mqtt_port < 65536 or api_keys < 0:
        raise ValueError(f"need 0 < mqtt_port < 65536 (got {mqtt_port}) and api_keys >= 0 (got {api_keys})")
    found = logins(devices, edges, serves)
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
    cert, key = make_leaf("cloud-health", None, ca_cert, ca_key, client=True)  # the cloud's own health check
    written += _write_pair(out / "cloud", "health-client", cert, key)

    passwords = {}
    for login in found:
        passwords[login.name], files = _write_login(out, login)
        written += files
    passwd = "".join(f"{user}:{hash_password(pw)}\n" for user, pw in passwords.items())
    acl = acl_text(found)
    plugin = find_dynsec_plugin() if mosquitto_plugin == "auto" else mosquitto_plugin
    if not plugin:
        logger.warning("no dynamic-security plugin: Mosquitto will bind no client id to its login (any login may "
                       "take the edge's session); the embedded broker still does (see docs/security.md)")
    client_ids = {login.name: login.client_id for login in found}
    conf = mosquitto_conf(Path(conf_root or out), mqtt_port, mosquitto_data, plugin, max_frame_bytes, mosquitto_user)
    written += [
        _write(out / "mosquitto" / "passwd", passwd, secret=True),
        _write(out / "mosquitto" / "acl", acl),
        _write(out / "mosquitto" / "clientids", clientids_text(found)),
        _write(out / "mosquitto" / "dynamic-security.json",
               json.dumps(dynsec_config(acl, passwords, client_ids), indent=1), secret=True),
        _write(out / "mosquitto" / "mosquitto.conf", conf),
        _write(out / "api-key", "".join(f"sk-{secrets.token_urlsafe(32)}\n" for _ in range(api_keys)), secret=True),
    ]
    return written
