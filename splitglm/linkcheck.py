"""Measure a shaped link before a benchmark uses it: its round trip and its bandwidth, as they are.

Every shaped link is the project's ``DelayProxy`` (real TCP through a user-space delay and
bandwidth limit): the agents' benches and the planner's live rig (``splitglm.live``) alike.
``measure_proxy`` puts one in front of a small server and sends ``ROUND_TRIPS`` one-byte
requests (the median is the RTT), then one ``nbytes`` message that the far side acknowledges
with one byte once it has all of it: bandwidth = nbytes x 8 / (that time - RTT).
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time

ROUND_TRIPS = 5
_LEN = struct.Struct("!I")


def _fit(rtts_s: list[float], big_s: float, nbytes: int) -> dict:
    rtt = statistics.median(rtts_s)
    serial = max(big_s - rtt, 1e-9)
    return {"measured_rtt_ms": round(rtt * 1e3, 2), "measured_mbit_s": round(nbytes * 8 / serial / 1e6, 3),
            "rtt_spread_ms": [round(min(rtts_s) * 1e3, 2), round(max(rtts_s) * 1e3, 2)],
            "probe_bytes": nbytes}


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the link closed during the measurement")
        buf += chunk
    return bytes(buf)


def _ack_server() -> tuple[socket.socket, threading.Thread]:
    """A server that answers each length-prefixed message with one byte, once it has all of it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    (n,) = _LEN.unpack(_exact(conn, _LEN.size))
                    _exact(conn, n)
                    conn.sendall(b"k")
            except (ConnectionError, OSError):
                pass

    thread = threading.Thread(target=serve, name="linkcheck-ack", daemon=True)
    thread.start()
    return listener, thread


def measure_proxy(rtt_ms: float, bandwidth_mbit_s: float | None = None, nbytes: int = 256 * 1024) -> dict:
    """A ``DelayProxy`` of this RTT and bandwidth, measured; the set values beside the measured ones."""
    from .linkproxy import DelayProxy

    listener, thread = _ack_server()
    proxy = DelayProxy("127.0.0.1", listener.getsockname()[1], rtt_ms, bandwidth_mbit_s=bandwidth_mbit_s).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def exchange(payload: bytes) -> float:
                t0 = time.perf_counter()
                sock.sendall(_LEN.pack(len(payload)) + payload)
                _exact(sock, 1)
                return time.perf_counter() - t0

            exchange(b"x")  # (the connection through the proxy is set up)
            rtts = [exchange(b"x") for _ in range(ROUND_TRIPS)]
            big = exchange(bytes(nbytes))
    finally:
        proxy.stop()
        listener.close()
        thread.join(5)
    return {"kind": "DelayProxy (TCP, user-space delay)", "rtt_ms": rtt_ms, "bandwidth_mbit_s": bandwidth_mbit_s,
            **_fit(rtts, big, nbytes)}
