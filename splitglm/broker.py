"""The embedded MQTT broker of the demo (amqtt, MQTT 3.1.1): ``python -m splitglm.broker --port P``.

Zero set-up: no system broker needed. It logs ``ready: mqtt://HOST:PORT``
(``mqtts://`` with TLS) once it accepts connections and stops cleanly on
SIGTERM / SIGINT. Without flags it is open (anonymous clients, no ACL): for
the local demo only. ``--secrets DIR`` (from ``splitglm secrets``) makes it
what Mosquitto is with ``DIR/mosquitto/mosquitto.conf``: TLS, logins from the
password file, the ACL file enforced (see ``splitglm.broker_auth``). Use a
real broker (Mosquitto, MQTT v5) in production: see docker-compose.yml.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("splitglm.broker")


@dataclass(frozen=True)
class BrokerSecurity:
    """What guards the listener; every field unset = the open demo broker."""

    tls_cert: Path | None = None  # PEM server certificate (with tls_key: TLS on the listener)
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_ca: Path | None = None  # CA bundle for optional client certificates
    password_file: Path | None = None  # Mosquitto $7$ password file: logins required
    acl_file: Path | None = None  # Mosquitto ACL file

    @classmethod
    def from_secrets(cls, folder: Path) -> BrokerSecurity:
        """The layout ``splitglm secrets`` writes."""
        m = Path(folder) / "mosquitto"
        return cls(m / "server.crt", m / "server.key", Path(folder) / "ca.crt", m / "passwd", m / "acl")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def broker_config(host: str, port: int, security: BrokerSecurity = BrokerSecurity()) -> dict:
    listener = {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}
    if security.tls:
        listener |= {"ssl": True, "certfile": str(security.tls_cert), "keyfile": str(security.tls_key)}
        if security.tls_ca:
            listener["cafile"] = str(security.tls_ca)
    if security.password_file:
        plugins = {"splitglm.broker_auth.PasswordFileAuth": {"password_file": str(security.password_file)}}
    else:
        plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    if security.acl_file:
        plugins["splitglm.broker_auth.AclFileTopics"] = {"acl_file": str(security.acl_file)}
    return {"listeners": {"default": listener}, "plugins": plugins}


def check_security(host: str, security: BrokerSecurity) -> None:
    """ValueError for unusable files (before the broker starts); a warning when open beyond loopback."""
    from splitglm.broker_auth import Acl, load_passwords

    if (security.tls_cert is None) != (security.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    for path in (security.tls_cert, security.tls_key, security.tls_ca, security.password_file, security.acl_file):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{path} does not exist")
    if security.password_file:
        load_passwords(security.password_file)
    if security.acl_file:
        Acl.load(security.acl_file)
    if security.password_file is None:
        loopback = host == "localhost" or _is_loopback(host)
        logger.warning("anonymous clients allowed, no ACL%s", ": local demo only" if loopback else
                       f": anyone who reaches {host} can read and write every topic (use --secrets DIR)")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(host: str, port: int, security: BrokerSecurity) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port, security))
    await broker.start()
    # start() returns once the listeners accept connections
    logger.info("ready: %s://%s:%d", "mqtts" if security.tls else "mqtt", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stopping the broker")
    await broker.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m splitglm.broker", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 1883, or 8883 with TLS)")
    parser.add_argument("--secrets", type=Path, help="folder from `splitglm secrets`: TLS, logins and ACL from it")
    parser.add_argument("--tls-cert", type=Path, help="PEM server certificate: TLS on the listener")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", type=Path, help="CA bundle for (optional) client certificates")
    parser.add_argument("--password-file", type=Path, help="Mosquitto password file: logins required")
    parser.add_argument("--acl-file", type=Path, help="Mosquitto ACL file, enforced on subscribe/publish/delivery")
    return parser


def security_from_args(args: argparse.Namespace) -> BrokerSecurity:
    """--secrets DIR, with any of the single-file flags overriding its files."""
    base = BrokerSecurity.from_secrets(args.secrets) if args.secrets else BrokerSecurity()
    given = {name: getattr(args, name) for name in ("tls_cert", "tls_key", "tls_ca", "password_file", "acl_file")}
    return BrokerSecurity(**{name: value or getattr(base, name) for name, value in given.items()})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    security = security_from_args(args)
    try:
        check_security(args.host, security)
    except (ValueError, OSError) as e:
        logger.error("%s", e)
        return 2
    port = args.port if args.port is not None else (8883 if security.tls else 1883)
    asyncio.run(_serve(args.host, port, security))
    return 0


if __name__ == "__main__":
    sys.exit(main())
