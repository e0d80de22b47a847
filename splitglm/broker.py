"""The embedded MQTT broker of the demo (amqtt, MQTT 3.1.1): ``python -m splitglm.broker --port P``.

Zero set-up: no system broker needed. It logs ``ready: mqtt://HOST:PORT``
(``mqtts://`` with TLS) once it accepts connections and stops cleanly on
SIGTERM / SIGINT. Without flags it is open (anonymous clients, no ACL): for
the local demo only. ``--secrets DIR`` (from ``splitglm secrets``) makes it
what Mosquitto is with ``DIR/mosquitto/mosquitto.conf``: TLS, logins from the
password file, the ACL file enforced (see ``splitglm.broker_auth``), each
login bound to its client id (``DIR/mosquitto/clientids``), and packets over
the conf's ``max_packet_size`` refused. Use a real broker (Mosquitto, MQTT v5)
in production: see docker-compose.yml.

``GuardedBroker``: amqtt 0.12.1 deletes a clean-session client id's session
(and takes over a connected one) before it authenticates the CONNECT, so one
CONNECT with the edge's client id and a wrong password knocked the edge off.
Here the login and the client id's binding are checked right after the
CONNECT is read, before any session is looked up: a refused client gets its
CONNACK ("not authorized", or "identifier rejected" for a client id that is
not its login's) and is closed; nothing else is touched.
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

from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.utils import gen_client_id

from runtime.logs import FORMATS, default_format, setup_logging
from splitglm.mqtt_access import default_max_frame_bytes, load_clientids, max_packet_bytes, read_max_packet_size

logger = logging.getLogger("splitglm.broker")


@dataclass(frozen=True)
class BrokerSecurity:
    """What guards the listener; every field unset = the open demo broker."""

    tls_cert: Path | None = None  # PEM server certificate (with tls_key: TLS on the listener)
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_ca: Path | None = None  # CA bundle for optional client certificates
    password_file: Path | None = None  # Mosquitto $7$ password file: logins required
    acl_file: Path | None = None  # Mosquitto ACL file
    clientids_file: Path | None = None  # ``login client_id`` lines: each login's one client id
    max_packet_bytes: int | None = None  # largest packet accepted, bytes (None: from the edge's max_frame_bytes)

    @classmethod
    def from_secrets(cls, folder: Path) -> BrokerSecurity:
        """The layout ``splitglm secrets`` writes (the caps from its mosquitto.conf)."""
        m = Path(folder) / "mosquitto"
        clientids = m / "clientids" if (m / "clientids").is_file() else None  # older folders have none
        return cls(m / "server.crt", m / "server.key", Path(folder) / "ca.crt", m / "passwd", m / "acl", clientids,
                   read_max_packet_size(m / "mosquitto.conf") if (m / "mosquitto.conf").is_file() else None)

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
    for path in (security.tls_cert, security.tls_key, security.tls_ca, security.password_file, security.acl_file,
                 security.clientids_file):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{path} does not exist")
    if security.password_file:
        load_passwords(security.password_file)
    if security.acl_file:
        Acl.load(security.acl_file)
    if security.clientids_file:
        load_clientids(security.clientids_file)
    if security.password_file is None:
        loopback = host == "localhost" or _is_loopback(host)
        logger.warning("anonymous clients allowed, no ACL%s", ": local demo only" if loopback else
                       f": anyone who reaches {host} can read and write every topic (use --secrets DIR)")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GuardedBroker(Broker):
    """amqtt's broker with the login and the client id checked before any session is touched, and a size cap."""

    def __init__(self, config: dict, client_ids: dict[str, str] | None, max_packet: int):
        super().__init__(config)
        self.client_ids = client_ids or {}  # login -> its one client id
        self.owners = {cid: login for login, cid in self.client_ids.items()}  # client id -> its login
        self.max_packet = max_packet

    def refusal(self, username: str | None, client_id: str) -> str:
        """Why this login may not use this client id ("" = it may)."""
        own = self.client_ids.get(username or "")
        if own is not None and own != client_id:
            return f"login {username!r} may use client id {own!r} only, not {client_id!r}"
        owner = self.owners.get(client_id)
        if owner is not None and owner != username:
            return f"client id {client_id!r} belongs to login {owner!r}, not {username!r}"
        return ""

    async def _initialize_client_session(self, reader, writer, remote_address: str, remote_port: int):
        """amqtt 0.12.1's, with the guard between reading the CONNECT and any session handling."""
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        except NoDataError as exc:
            raise AMQTTError(exc) from exc
        code, why = None, ""
        if not await self._authenticate(session, None):
            code, why = NOT_AUTHORIZED, "wrong login"
        elif session.client_id and (why := self.refusal(session.username, session.client_id)):
            code = IDENTIFIER_REJECTED
        if code is not None:
            logger.warning("refused the CONNECT of login %r with client id %r from %s: %s", session.username,
                           session.client_id, remote_address, why)
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise MQTTError(f"refused: {why}")
        return handler, await self._attach(session)

    async def _take_over(self, client_id: str) -> None:
        """Close the connection that holds ``client_id`` now, if any: a new CONNECT with a connected client's id
        takes it over (MQTT 3.1.1 3.1.4-2). amqtt 0.12.1 deletes a clean session's subscriptions but leaves the
        old connection open, so that client would stay connected and receive nothing, and never notice."""
        old = self._sessions.get(client_id)
        if old is None or not old[0].transitions.is_connected():
            return
        logger.warning("client id %r connected again: closing its earlier connection", client_id)
        await old[1].handle_connection_closed()
        await old[1].stop()

    async def _attach(self, session):
        """The rest of amqtt's ``_initialize_client_session``: a clean session replaces the client id's old one."""
        if session.clean_session:
            if session.client_id:
                await self._take_over(session.client_id)
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions and self._sessions[session.client_id][0].clean_session:
            # a clean session ends with its connection (MQTT-3.1.2-6): nothing of it is resumed, and the CONNACK
            # says no session was present (amqtt 0.12.1 would hand the new client the old one's empty session)
            await self._take_over(session.client_id)
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            old, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username", "password"):
                setattr(old, name, getattr(session, name))
            session, session.parent = old, 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return session

    async def _handle_message_delivery(self, client_session, handler, wait_deliver) -> bool:
        """A PUBLISH over the size cap is dropped and its sender disconnected (Mosquitto's max_packet_size)."""
        message = wait_deliver.result()
        if message is not None and message.data is not None and len(message.data) > self.max_packet:
            logger.warning("refused a %d-byte message on %r from login %r (client %s): over max_packet_size %d; "
                           "disconnecting it", len(message.data), message.topic, client_session.username,
                           client_session.client_id, self.max_packet)
            await handler.writer.close()  # the message loop then sees the connection end, as for any client
            return True
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)


async def _serve(host: str, port: int, security: BrokerSecurity) -> None:
    client_ids = load_clientids(security.clientids_file) if security.clientids_file else None
    max_packet = security.max_packet_bytes or max_packet_bytes(default_max_frame_bytes())
    broker = GuardedBroker(broker_config(host, port, security), client_ids, max_packet)
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
    parser.add_argument("--clientids-file", type=Path, help="'login client_id' lines: the one client id of each login")
    parser.add_argument("--max-packet-bytes", type=int, help="largest message accepted, bytes (default: the edge's "
                        "max_frame_bytes plus 64 KiB; with --secrets, the max_packet_size of its mosquitto.conf)")
    parser.add_argument("--log-format", choices=FORMATS, default=default_format(), help="text (one line a record) or "
                        "json (one object a line); default: SPLITGLM_LOG_FORMAT, else text")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO", type=str.upper,
                        help="the least severe records logged (default INFO)")
    return parser


def security_from_args(args: argparse.Namespace) -> BrokerSecurity:
    """--secrets DIR, with any of the single-file flags overriding its files."""
    base = BrokerSecurity.from_secrets(args.secrets) if args.secrets else BrokerSecurity()
    given = {name: getattr(args, name) for name in ("tls_cert", "tls_key", "tls_ca", "password_file", "acl_file",
                                                    "clientids_file", "max_packet_bytes")}
    return BrokerSecurity(**{name: value or getattr(base, name) for name, value in given.items()})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
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
